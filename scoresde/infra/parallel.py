"""Data parallelism over every device of every process: one 1-D mesh, batch sharded, state replicated.

Everything that runs a batch (training, sampling, likelihood, evaluation) uses these helpers with
``jax.jit``; there is no pmap. A global batch of size B is split over ``jax.device_count()`` devices;
each process feeds its own ``B / process_count`` rows (``shard_batch``).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def data_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh, ndim: int = 1, axis: int = 0) -> NamedSharding:
  """Sharding of an array whose dimension ``axis`` is the batch."""
  spec = [None] * ndim
  spec[axis] = DATA_AXIS
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, what: str = 'config.training.batch_size') -> None:
  """Raises before any compilation when a global batch cannot be split evenly."""
  devices, processes = jax.device_count(), jax.process_count()
  if batch_size % devices:
    raise ValueError(f'{what}={batch_size} must be divisible by the number of devices ({devices}); '
                     f'use a multiple of {devices}.')
  if batch_size % processes:
    raise ValueError(f'{what}={batch_size} must be divisible by the number of processes ({processes}).')


def local_batch_size(global_batch: int) -> int:
  check_batch_size(global_batch)
  return global_batch // jax.process_count()


def shard_batch(mesh: Mesh, local: Any, axis: int = 0) -> Any:
  """Assembles each process's rows (a pytree of numpy arrays) into global arrays sharded on ``axis``."""
  def one(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim, axis)
    global_shape = list(x.shape)
    global_shape[axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))
  return jax.tree.map(one, local)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places a pytree, identical on every process, replicated on every device."""
  return jax.device_put(tree, replicated(mesh))


def to_host(x: jax.Array) -> np.ndarray:
  """This process's view of a (possibly multi-process) array as numpy.

  The global value when the array is fully addressable or fully replicated (any one shard holds it
  all); otherwise this process's rows of a batch-sharded array, in order. Several of a process's
  devices can hold the same rows (a mesh axis the batch is not split over), so each distinct row block
  is taken once.
  """
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  blocks = {}
  for shard in x.addressable_shards:
    blocks.setdefault(shard.index[0].start or 0, shard)
  return np.concatenate([np.asarray(blocks[start].data) for start in sorted(blocks)], axis=0)


def gather(x: Any) -> np.ndarray:
  """Every process's rows, concatenated in process order, on every process: the global value of a
  batch-sharded array, or the concatenation of each process's numpy rows (equal counts)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str) -> None:
  """Waits for every process (e.g. until process 0 has written files the others read)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
