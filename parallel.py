"""Data parallelism over every device of every process: one 1-D mesh, batch sharded, state replicated.

Everything that runs a batch (training, sampling, likelihood, evaluation) uses these helpers with
``jax.jit``; there is no pmap. A global batch of size B is split over ``jax.device_count()`` devices;
each process feeds its own ``B / process_count`` rows (``shard_batch``).
"""

from __future__ import annotations

from typing import Any

import jax
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
  """This process's view of a (possibly multi-process) array as numpy: the global value when it is
  fully addressable, else the process's own rows."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.concatenate([np.asarray(s.data) for s in sorted(
      x.addressable_shards, key=lambda s: s.index[0].start or 0)], axis=0)
