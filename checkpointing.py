"""Checkpoints of training runs (orbax), and loading a model's variables for sampling or evaluation.

A workdir holds two orbax checkpoint managers, as in the reference:

- ``checkpoints-meta/checkpoint_{step}``: the preemption checkpoint (only the newest is kept), indexed by
  training step; what a restarted run resumes from.
- ``checkpoints/checkpoint_{k}``: permanent snapshots, k = ⌈step / snapshot_freq⌉, i.e. the state after
  k·snapshot_freq steps (or after ``n_iters`` for the final one); ``eval.begin_ckpt``/``end_ckpt`` and
  ``--checkpoint`` count in these k, as the reference's ``checkpoint_{k}`` files did.

Each checkpoint holds the whole ``losses.TrainState`` (item ``state``) and a JSON item ``meta`` with the
training step. Orbax writes to a temporary directory and renames it when complete, so a killed run never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

import losses
import parallel

PREEMPTION_DIR = 'checkpoints-meta'
PERMANENT_DIR = 'checkpoints'
_PREFIX = 'checkpoint'
_ITEMS = ('state', 'meta')


def make_manager(directory: str, max_to_keep: int | None) -> ocp.CheckpointManager:
  """A synchronous manager of ``directory/checkpoint_{index}`` holding (state, meta)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, step_prefix=_PREFIX, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=_ITEMS)


def preemption_manager(workdir: str) -> ocp.CheckpointManager:
  return make_manager(os.path.join(workdir, PREEMPTION_DIR), max_to_keep=1)


def permanent_manager(workdir: str) -> ocp.CheckpointManager:
  return make_manager(os.path.join(workdir, PERMANENT_DIR), max_to_keep=None)


def save(manager: ocp.CheckpointManager, index: int, state: losses.TrainState, meta: dict[str, Any]) -> None:
  """Saves ``state`` as checkpoint ``index`` (replacing one of the same index, e.g. after a resume)."""
  if index in manager.all_steps():
    manager.delete(index)
  manager.save(index, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """Shape/dtype (and sharding) structs of ``tree``, the restore target orbax needs to rebuild optax
  states and dataclasses (without one they come back as plain lists and dicts)."""
  def one(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None
                                else getattr(x, 'sharding', None))
  return jax.tree.map(one, tree)


def restore(manager: ocp.CheckpointManager, index: int, target: Any) -> tuple[Any, dict[str, Any]]:
  """(state, meta) of checkpoint ``index``, restored into the structure/sharding of ``target`` (abstract
  or concrete)."""
  restored = manager.restore(index, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()))
  return restored['state'], dict(restored['meta'])


def read_meta(manager: ocp.CheckpointManager, index: int) -> dict[str, Any]:
  return dict(manager.restore(index, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])


def newest_training_state(workdir: str) -> tuple[str, int, int] | None:
  """(manager kind, index, training step) of the checkpoint with the most training steps among the
  preemption and permanent ones, or None in a fresh workdir."""
  best = None
  for kind, make in (('preemption', preemption_manager), ('permanent', permanent_manager)):
    directory = os.path.join(workdir, PREEMPTION_DIR if kind == 'preemption' else PERMANENT_DIR)
    if not os.path.isdir(directory):
      continue
    manager = make(workdir)
    index = manager.latest_step()
    if index is not None:
      step = int(read_meta(manager, index)['step'])
      if best is None or step > best[2]:
        best = (kind, index, step)
    manager.close()
  return best


def abstract_train_state(config, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, losses.TrainState]:
  """(model, abstract TrainState) for ``config``, replicated on ``mesh``; computes no parameters."""
  from models import utils as mutils  # pylint: disable=import-outside-toplevel
  model = mutils.create_model(config)
  optimizer = losses.get_optimizer(config)

  def init():
    _, variables = mutils.init_model(jax.random.PRNGKey(0), config)
    return losses.init_train_state(jax.random.PRNGKey(0), variables['params'], optimizer)
  sharding = parallel.replicated(mesh if mesh is not None else parallel.data_mesh())
  return model, abstract_like(jax.eval_shape(init), sharding)


def load_variables(config, workdir: str | None = None, checkpoint: int | str | None = None,
                   ema: bool = True) -> tuple[dict[str, Any], int | None]:
  """The model variables ``{'params': ...}`` (EMA weights by default) and their training step.

  ``checkpoint``: None (the newest permanent snapshot in ``workdir/checkpoints``), an index k of
  ``workdir/checkpoints/checkpoint_{k}``, the path of an orbax checkpoint directory
  (``.../checkpoint_{k}``), or a score_sde_pytorch ``.pth`` file (imported through
  ``models.torch_port``; its step is reported as None).
  """
  if isinstance(checkpoint, str) and checkpoint.endswith('.pth'):
    from models import torch_port  # pylint: disable=import-outside-toplevel
    return torch_port.load_score_sde_pytorch(checkpoint, config, ema), None

  if isinstance(checkpoint, str) and not checkpoint.isdigit():
    path = os.path.abspath(checkpoint.rstrip('/'))
    name = os.path.basename(path)
    if not (os.path.isdir(path) and name.startswith(_PREFIX + '_') and name[len(_PREFIX) + 1:].isdigit()):
      raise ValueError(f'checkpoint={checkpoint!r} is neither a .pth file nor an orbax checkpoint '
                       f'directory named {_PREFIX}_<k>.')
    directory, index = os.path.dirname(path), int(name[len(_PREFIX) + 1:])
  else:
    if workdir is None:
      raise ValueError('load_variables needs workdir (or a checkpoint path).')
    directory = os.path.join(workdir, PERMANENT_DIR)
    index = None if checkpoint is None else int(checkpoint)

  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoints in {directory}; train first (--mode=train) or pass '
                            '--checkpoint.')
  manager = make_manager(directory, max_to_keep=None)
  if index is None:
    index = manager.latest_step()
    if index is None:
      raise FileNotFoundError(f'no checkpoints in {directory}; train first (--mode=train).')
  if index not in manager.all_steps():
    raise FileNotFoundError(f'checkpoint {index} not found in {directory}; available: '
                            f'{sorted(manager.all_steps())}.')
  _, target = abstract_train_state(config)
  state, meta = restore(manager, index, target)
  manager.close()
  logging.info('loaded %s weights of %s/%s_%d (training step %s)', 'EMA' if ema else 'raw',
               directory, _PREFIX, index, meta.get('step'))
  return {'params': state.params_ema if ema else state.params}, int(meta['step'])
