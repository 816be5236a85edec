"""Checkpoints of training runs (orbax), and loading a model's variables for sampling or evaluation.

A workdir holds two orbax checkpoint managers, as in the reference:

- ``checkpoints-meta/checkpoint_{step}``: the preemption checkpoint (only the newest is kept), indexed by
  training step; what a restarted run resumes from.
- ``checkpoints/checkpoint_{k}``: permanent snapshots, k = ⌈step / snapshot_freq⌉, i.e. the state after
  k·snapshot_freq steps (or after ``n_iters`` for the final one); ``eval.begin_ckpt``/``end_ckpt`` and
  ``--checkpoint`` count in these k, as the reference's ``checkpoint_{k}`` files did.

Each checkpoint holds the whole ``losses.TrainState`` (item ``state``) and a JSON item ``meta`` with the
training step and a CRC-32 of every array of the state.

Faults:

- Orbax writes into ``checkpoint_{k}.orbax-checkpoint-tmp`` and renames it when complete, so a killed run
  never leaves a half-written ``checkpoint_{k}``; replacing an existing index moves the old one aside
  until the new one is complete (``save``).
- A save that fails on the file system (disk full, read-only) raises an ``OSError`` naming the cause,
  the directory and the previous checkpoint, which is left intact.
- ``restore`` checks the restored arrays against the saved checksums (orbax itself does not notice
  flipped bytes in its data files) and the step; ``restore_newest`` falls back from a checkpoint that
  fails to the next older one, warning with its path and the error, and renames the bad one to
  ``checkpoint_{k}.corrupt`` (never deletes it) once an older one has restored.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
from typing import Any, NamedTuple
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from scoresde import losses
from scoresde.infra import parallel

PREEMPTION_DIR = 'checkpoints-meta'
PERMANENT_DIR = 'checkpoints'
_PREFIX = 'checkpoint'
_REPLACED = '.replaced'
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


def has_checkpoints(workdir: str) -> bool:
  """Whether ``workdir`` holds a preemption or permanent checkpoint (what a training run resumes)."""
  for sub in (PREEMPTION_DIR, PERMANENT_DIR):
    directory = os.path.join(workdir, sub)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    if any(re.fullmatch(_PREFIX + r'_\d+', name) for name in names):
      return True
  return False


def _step_path(manager: ocp.CheckpointManager, index: int) -> str:
  return os.path.join(str(manager.directory), f'{_PREFIX}_{index}')


def _on_process_0(fn, name: str) -> None:
  """Runs ``fn`` (a file operation on the shared workdir) on process 0; every process waits for it."""
  if jax.process_index() == 0:
    fn()
  parallel.sync(name)


def _os_errno(error: BaseException) -> int | None:
  """The errno behind ``error``: an OSError's, or the one TensorStore writes into its ValueError
  messages (``[os_error_code='28']``); None for anything else."""
  for e in (error, error.__cause__, error.__context__):
    if isinstance(e, OSError) and e.errno:
      return e.errno
    found = re.search(r"os_error_code='?(\d+)", str(e)) if e is not None else None
    if found:
      return int(found.group(1))
  return None


def save(manager: ocp.CheckpointManager, index: int, state: losses.TrainState, meta: dict[str, Any]) -> None:
  """Saves ``state`` as checkpoint ``index`` with ``meta`` and the state's ``checksums``.

  Never leaves the directory without a complete checkpoint it had: orbax renames a finished temporary
  directory into place, and an existing checkpoint of the same index (the final snapshot of a run
  whose ``n_iters`` was raised) is moved aside, to ``checkpoint_{index}.replaced``, and deleted only
  once the new one is complete (``restore_newest`` moves it back if a run was killed in between).

  Raises:
    OSError: the file system refused the write (disk full, read-only, ...), with its errno and a
      message naming the cause, the directory and the previous checkpoint, which is intact.
  """
  directory, path = str(manager.directory), _step_path(manager, index)
  aside = path + _REPLACED if index in manager.all_steps() else None
  meta = {**meta, 'checksums': checksums(state)}
  try:
    if aside is not None:
      def move_aside():
        shutil.rmtree(aside, ignore_errors=True)  # left by an earlier replacement that completed
        os.rename(path, aside)
      _on_process_0(move_aside, f'set aside {path}')
      manager.reload()
    manager.save(index, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
  except Exception as e:
    if jax.process_index() == 0:  # no sync: the other processes may not have failed
      for tmp in glob.glob(glob.escape(path) + '.orbax-checkpoint-tmp*'):
        shutil.rmtree(tmp, ignore_errors=True)  # partial data, which may be what filled the disk
      if aside is not None and os.path.exists(aside) and not os.path.exists(path):
        os.rename(aside, path)
    manager.reload()
    code = _os_errno(e)
    if code is None:
      raise
    previous = manager.latest_step()
    intact = (f'the previous checkpoint {previous} ({_step_path(manager, previous)}) is intact'
              if previous is not None else f'there is no earlier checkpoint in {directory}')
    cause = os.strerror(code)
    raise OSError(code, f'{cause[:1].lower()}{cause[1:]} while saving checkpoint {index} (training step '
                  f'{meta.get("step")}) to {directory}; {intact}. Free space or make the directory '
                  f'writable, then restart: training resumes from the newest intact checkpoint. '
                  f'({type(e).__name__}: {str(e)[:500]})') from e
  if aside is not None and jax.process_index() == 0:
    shutil.rmtree(aside, ignore_errors=True)


def checksums(tree: Any) -> dict[str, int]:
  """CRC-32 of each array's bytes, by key path (``jax.tree_util.keystr``). The state is replicated, so
  every process computes the same values from its own copy."""
  result = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    data = parallel.to_host(leaf) if isinstance(leaf, jax.Array) else np.asarray(leaf)
    result[jax.tree_util.keystr(path)] = zlib.crc32(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
  return result


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """Shape/dtype (and sharding) structs of ``tree``, the restore target orbax needs to rebuild optax
  states and dataclasses (without one they come back as plain lists and dicts)."""
  def one(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None
                                else getattr(x, 'sharding', None))
  return jax.tree.map(one, tree)


class CorruptCheckpointError(ValueError):
  """A checkpoint restored, but not to what was saved (checksums or step differ)."""


def restore(manager: ocp.CheckpointManager, index: int, target: Any) -> tuple[Any, dict[str, Any]]:
  """(state, meta) of checkpoint ``index``, restored into the structure/sharding of ``target`` (abstract
  or concrete) and checked against the checksums saved with it (checkpoints written before checksums
  existed are not checked).

  Raises:
    CorruptCheckpointError: an array differs from what was saved, or the step from ``meta['step']``.
    Exception: whatever orbax or TensorStore raise for a file that is missing, truncated or garbled.
  """
  restored = manager.restore(index, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()))
  state, meta = restored['state'], dict(restored['meta'])
  path = _step_path(manager, index)
  saved = meta.get('checksums')
  if saved is not None:
    actual = checksums(state)
    bad = sorted(k for k in set(saved) | set(actual) if saved.get(k) != actual.get(k))
    if bad:
      more = f' (and {len(bad) - 1} more arrays)' if len(bad) > 1 else ''
      raise CorruptCheckpointError(f'{path} is corrupt: the restored state{bad[0]}{more} does not match '
                                   'the checksum saved with it.')
  step = getattr(state, 'step', None)
  if step is not None and 'step' in meta and int(parallel.to_host(step)) != int(meta['step']):
    raise CorruptCheckpointError(f'{path} is corrupt: its state is at step {int(parallel.to_host(step))}, '
                                 f'its metadata says {meta["step"]}.')
  return state, meta


def read_meta(manager: ocp.CheckpointManager, index: int) -> dict[str, Any]:
  return dict(manager.restore(index, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])


class Restored(NamedTuple):
  state: Any
  meta: dict[str, Any]
  kind: str  # 'preemption' or 'permanent'
  index: int
  path: str


def _newest_first(managers: dict[str, ocp.CheckpointManager]):
  """(kind, index) of every checkpoint, the most training steps first (preemption first on ties).
  Preemption checkpoints are indexed by step; a permanent one's step is read from its meta when
  needed, and one whose meta is unreadable comes first (it fails, and is reported, when tried)."""
  pending = {kind: sorted(m.all_steps(), reverse=True) for kind, m in managers.items()}
  steps = {}

  def permanent_step(index):
    if index not in steps:
      try:
        steps[index] = int(read_meta(managers['permanent'], index)['step'])
      except Exception:  # pylint: disable=broad-except
        steps[index] = math.inf
    return steps[index]
  while pending['preemption'] or pending['permanent']:
    if pending['permanent'] and (not pending['preemption'] or
                                 permanent_step(pending['permanent'][0]) > pending['preemption'][0]):
      yield 'permanent', pending['permanent'].pop(0)
    else:
      yield 'preemption', pending['preemption'].pop(0)


def _set_aside(path: str) -> str:
  """Renames a damaged checkpoint to ``<path>.corrupt`` (``.corrupt2``, ... if taken): out of the
  managers' sight (orbax lists only ``checkpoint_<k>``), so that it is neither resumed from nor kept as
  the newest in place of good ones, but kept for inspection."""
  target, n = path + '.corrupt', 1
  while os.path.exists(target):
    n += 1
    target = f'{path}.corrupt{n}'
  _on_process_0(lambda: os.rename(path, target), f'set aside {path}')
  return target


def _recover_replaced(directory: str) -> None:
  """Undoes what a run killed inside ``save`` left: a checkpoint moved aside to be replaced goes back
  when its replacement never completed, and is deleted when it did."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  for name in names:
    if re.fullmatch(_PREFIX + r'_\d+' + re.escape(_REPLACED), name):
      aside = os.path.join(directory, name)
      path = aside[:-len(_REPLACED)]
      if os.path.exists(path):
        _on_process_0(lambda a=aside: shutil.rmtree(a), f'delete {aside}')
      else:
        logging.warning('moving %s back to %s: its replacement was never completed.', aside, path)
        _on_process_0(lambda a=aside, p=path: os.rename(a, p), f'recover {aside}')


def restore_newest(workdir: str, target: Any) -> Restored | None:
  """The newest checkpoint of ``workdir`` (preemption or permanent) that restores, into ``target``'s
  structure and sharding; None in a workdir without checkpoints.

  A checkpoint that fails to restore (missing, truncated or garbled files, a checksum mismatch) is
  reported in a warning with its path and the error, and the next older one is tried. Once one has
  restored, the newer failed ones are renamed to ``checkpoint_<k>.corrupt``, with a warning (they are
  not deleted). If none restores, nothing is renamed (the cause may be a changed config rather than
  damage) and a RuntimeError names the newest one and its error.
  """
  for sub in (PREEMPTION_DIR, PERMANENT_DIR):
    _recover_replaced(os.path.join(workdir, sub))
  managers = {'preemption': preemption_manager(workdir), 'permanent': permanent_manager(workdir)}
  failed, restored = [], None
  try:
    for kind, index in _newest_first(managers):
      path = _step_path(managers[kind], index)
      try:
        state, meta = restore(managers[kind], index, target)
      except Exception as e:  # pylint: disable=broad-except  (any failure to read it: try an older one)
        logging.warning('could not restore the checkpoint %s (%s: %s); trying the next older one.', path,
                        type(e).__name__, str(e)[:1000])
        failed.append((path, e))
        continue
      restored = Restored(state, meta, kind, index, path)
      break
  finally:
    for manager in managers.values():
      manager.close()
  if failed and restored is None:
    path, error = failed[0]
    raise RuntimeError(
        f'none of the {len(failed)} checkpoints in {workdir} could be restored; the newest, {path}, failed '
        f'with {type(error).__name__}: {str(error)[:1000].rstrip(".")}. If the model or optimizer config '
        'changed since they were written, resume with the config they were trained with; if they are '
        'damaged, move them out of the way to start afresh.') from error
  for path, _ in failed:
    logging.warning('moved the checkpoint %s, which could not be restored, aside to %s; resuming from the '
                    'older %s.', path, _set_aside(path), restored.path)
  return restored


def abstract_train_state(config, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, losses.TrainState]:
  """(model, abstract TrainState) for ``config``, replicated on ``mesh``; computes no parameters."""
  from scoresde.models import utils as mutils  # pylint: disable=import-outside-toplevel
  model = mutils.create_model(config)
  optimizer = losses.get_optimizer(config)

  def init():
    _, variables = mutils.init_model(jax.random.PRNGKey(0), config)
    return losses.init_train_state(jax.random.PRNGKey(0), variables['params'], optimizer)
  sharding = parallel.replicated(mesh if mesh is not None else parallel.data_mesh())
  return model, abstract_like(jax.eval_shape(init), sharding)


# ----------------------------------------------------------------------------------------------------
# Checkpoints of the reference implementations (released ones, or a user's own runs of them)

ORBAX = 'orbax checkpoint directory'
PYTORCH = 'score_sde_pytorch .pth'
FLAX_MSGPACK = 'score_sde (JAX) flax msgpack'
_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = 0x80  # a legacy torch file starts with a pickle (PROTO opcode, then the protocol 2..5)
_MSGPACK_MAPS = set(range(0x81, 0x90)) | {0xde, 0xdf}  # a non-empty map: fixmap, map16, map32


def checkpoint_format(path: str) -> str:
  """Which kind of checkpoint ``path`` is, from the file system and the file's first bytes (never its
  name): ``ORBAX`` (a directory), ``PYTORCH`` (torch's zip or legacy format) or ``FLAX_MSGPACK`` (the
  JAX reference's ``flax.training.checkpoints`` files).

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: a file in none of these formats.
  """
  if os.path.isdir(path):
    return ORBAX
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint {path!r} does not exist.')
  with open(path, 'rb') as f:
    head = f.read(4)
  if head == _ZIP_MAGIC or (len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5):
    return PYTORCH
  if head and head[0] in _MSGPACK_MAPS:
    return FLAX_MSGPACK
  raise ValueError(f'{path} is not a checkpoint this code reads (its first bytes are {head!r}): expected an '
                   'orbax checkpoint directory (checkpoints/checkpoint_<k> of a run), a score_sde_pytorch '
                   '.pth file (zip or legacy torch format) or a score_sde (JAX) checkpoint file (flax '
                   'msgpack, checkpoints/checkpoint_<k>).')


def _load_foreign(config, path: str, fmt: str, ema: bool) -> dict[str, Any]:
  """Variables of a reference checkpoint file (``PYTORCH`` or ``FLAX_MSGPACK``)."""
  # pylint: disable=import-outside-toplevel  (each port is only needed for its own format)
  if fmt == PYTORCH:
    from scoresde.porting import torch_port
    return torch_port.load_score_sde_pytorch(path, config, ema)
  from scoresde.porting import jax_port
  return jax_port.load_score_sde_jax(path, config, ema)


def read_released(config, path: str):
  """A reference checkpoint's whole training state in our layout (``porting.released.Released``)."""
  # pylint: disable=import-outside-toplevel
  fmt = checkpoint_format(path)
  if fmt == FLAX_MSGPACK:
    from scoresde.porting import jax_port
    return jax_port.read_score_sde_jax(path, config)
  if fmt == PYTORCH:
    from scoresde.porting import torch_port
    return torch_port.read_score_sde_pytorch(path, config)
  raise ValueError(f'{path} is an {ORBAX}, already a checkpoint of ours: pass it to --mode=eval/sample '
                   'with --checkpoint, or copy it into a run directory.')


def _with_adam_state(opt_state: Any, first: Any, second: Any, count: int, step: int) -> Any:
  """``opt_state`` (optax's Adam chain) with the file's moments and update count, and the learning-rate
  schedule at ``step``: flax.optim.Adam's ``grad_ema``, ``grad_sq_ema`` and ``step``, and torch Adam's
  ``exp_avg``, ``exp_avg_sq`` and ``step``, are optax's ``mu``, ``nu`` and ``count`` (all bias-correct
  with the count of the update being made and apply the same update)."""
  found = []

  def visit(node):
    if isinstance(node, optax.ScaleByAdamState):
      found.append(node)
      if first is None:
        return node
      return node._replace(count=jnp.asarray(count, node.count.dtype),
                           mu=jax.tree.map(jnp.asarray, first), nu=jax.tree.map(jnp.asarray, second))
    if isinstance(node, optax.ScaleByScheduleState):
      return node._replace(count=jnp.asarray(step, node.count.dtype))
    if isinstance(node, tuple) and not hasattr(node, '_fields'):
      return tuple(visit(n) for n in node)
    return node
  result = visit(opt_state)
  if len(found) != 1:
    raise ValueError(f'the optimizer state has {len(found)} Adam states; expected one (config.optim).')
  return result


def import_checkpoint(config, workdir: str, path: str) -> tuple[int, str]:
  """Writes a reference checkpoint (``PYTORCH`` or ``FLAX_MSGPACK``) into ``workdir`` as the permanent
  checkpoint ``checkpoints/checkpoint_{k}`` of ours, k = ⌈step / snapshot_freq⌉, so that evaluation,
  sampling and training (resuming at its step, or fine-tuning) read it like any of ours. Returns
  (k, its path).

  The state holds the raw and the EMA weights, the step, and Adam's moments and update count where the
  file has them (both formats; ``porting.torch_port`` documents how torch's Adam state maps and what it
  refuses). Without them Adam restarts from zero moments, with the learning-rate schedule still at the
  file's step.

  Raises:
    ValueError: ``workdir`` already holds checkpoints, or the file does not fit ``config``.
  """
  if has_checkpoints(workdir):
    raise ValueError(f'{workdir} already holds checkpoints; import into a new --workdir.')
  source = read_released(config, path)
  params = jax.tree.map(jnp.asarray, source.params)
  opt_state = losses.get_optimizer(config).init(params)
  if source.adam is None:
    logging.warning('%s has no Adam state to import: training from it starts Adam afresh (zero moments).',
                    path)
  first, second, count = source.adam if source.adam is not None else (None, None, 0)
  opt_state = _with_adam_state(opt_state, first, second, count, source.step)
  rng = source.rng if source.rng is not None else jax.random.PRNGKey(config.seed)
  state = losses.TrainState(step=jnp.asarray(source.step, jnp.int32), params=params, opt_state=opt_state,
                            params_ema=jax.tree.map(jnp.asarray, source.params_ema),
                            rng=jnp.asarray(rng, jnp.uint32))
  check_finite_weights({'params': state.params, 'params_ema': state.params_ema}, f'the checkpoint {path}')
  index = -(-source.step // int(config.training.snapshot_freq))
  manager = permanent_manager(workdir)
  try:
    save(manager, index, state, {'step': source.step, 'imported_from': os.path.abspath(path),
                                 'format': source.format})
  finally:
    manager.close()
  written = _step_path(manager, index)
  logging.info('imported %s (%s, training step %d%s) as %s', path, source.format, source.step,
               ', with its Adam moments' if source.adam is not None else '', written)
  return index, written


def load_variables(config, workdir: str | None = None, checkpoint: int | str | None = None,
                   ema: bool = True) -> tuple[dict[str, Any], int | None]:
  """The model variables ``{'params': ...}`` (EMA weights by default) and their training step.

  ``checkpoint``: None (the newest permanent snapshot in ``workdir/checkpoints``), an index k of
  ``workdir/checkpoints/checkpoint_{k}``, or a path (``checkpoint_format`` decides what it is): an orbax
  checkpoint directory (``.../checkpoint_{k}``), a score_sde_pytorch ``.pth`` file (imported through
  ``porting.torch_port``) or a score_sde (JAX) checkpoint file (``porting.jax_port``); the step of a
  reference file is reported as None.

  Raises ValueError, before anything is compiled, when the weights are not all finite (sampling or
  evaluating them would only give NaN).
  """
  kind = 'EMA' if ema else 'raw'
  if isinstance(checkpoint, str) and not checkpoint.isdigit():
    fmt = checkpoint_format(checkpoint)
    if fmt != ORBAX:
      variables = _load_foreign(config, checkpoint, fmt, ema)
      check_finite_weights(variables, f'the checkpoint {checkpoint}', kind)
      logging.info('loaded %s weights of %s (%s)', kind, checkpoint, fmt)
      return variables, None
    path = os.path.abspath(checkpoint.rstrip('/'))
    name = os.path.basename(path)
    if not (name.startswith(_PREFIX + '_') and name[len(_PREFIX) + 1:].isdigit()):
      raise ValueError(f'checkpoint={checkpoint!r} is a directory but not an orbax checkpoint directory '
                       f'named {_PREFIX}_<k>.')
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
  variables = {'params': state.params_ema if ema else state.params}
  check_finite_weights(variables, f'the checkpoint {_step_path(manager, index)} (training step '
                       f'{meta.get("step")})', kind)
  logging.info('loaded %s weights of %s/%s_%d (%s, training step %s)', kind, directory, _PREFIX, index,
               ORBAX, meta.get('step'))
  return variables, int(meta['step'])


def check_finite_weights(variables: Any, source: str, kind: str = '') -> None:
  """Raises ValueError naming the arrays of ``variables`` that hold NaN or Inf, and how many."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    values = parallel.to_host(leaf) if isinstance(leaf, jax.Array) else np.asarray(leaf)
    if not np.issubdtype(values.dtype, np.inexact):
      continue
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if nan or inf:
      name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
      counts = ', '.join(f'{n} {what}' for n, what in ((nan, 'NaN'), (inf, 'Inf')) if n)
      bad.append(f'{name} ({counts} of {values.size})')
  if bad:
    more = f' and {len(bad) - 1} more arrays' if len(bad) > 1 else ''
    raise ValueError(f'{source} has non-finite {kind + " " if kind else ""}weights in {bad[0]}{more}; '
                     'sampling or evaluating it would give NaN. Use an earlier checkpoint (--checkpoint, '
                     'config.eval.begin_ckpt/end_ckpt).')
