"""Imports checkpoints of the original JAX reference (yang-song/score_sde) into our Flax models.

The reference saved its training state with ``flax.training.checkpoints.save_checkpoint``: one msgpack
file per checkpoint (``checkpoints/checkpoint_<k>``, no extension) holding the state dict of its
``State`` dataclass::

    {'step': int, 'lr': float, 'ema_rate': float, 'rng': uint32[2], 'model_state': {},
     'optimizer': {'target': params,                 # raw weights (flax.optim.Optimizer)
                   'state': {'step': int,            # Adam updates so far
                             'param_states': params-shaped tree of {'grad_ema', 'grad_sq_ema'}}},
     'params_ema': params}                           # the EMA weights it sampled and evaluated with

It is read with ``flax.serialization.msgpack_restore``, which builds plain dicts and numpy arrays and
runs no code of the file's. Our networks are ports of the reference's linen modules and create their
sub-modules in the same order, so flax's automatic names (``Conv_0``, ``ResnetBlockBigGANpp_3``, ...)
agree, with these exceptions, decided by the checkpoint's own module names:

- NCSN v1's noise-conditional blocks are separate classes in the reference (``CondRefineBlock``,
  ``CondRCUBlock``, ``CondCRPBlock``, ``CondMSFBlock``, ``ConditionalResidualBlock``) and one class with
  a conditional normaliser in ours (``RefineBlock``, ...);
- the FIR resampling convolution (``Conv2d``) calls its kernel ``weight``, ours ``kernel``;
- ``InstanceNorm2d`` and ``VarianceNorm2d`` call their scale and shift ``scale``/``bias``, ours
  ``gamma``/``beta``; these and ``InstanceNorm2dPlus`` store them with shape (1, 1, 1, C), ours (C,).

Every other leaf must sit at the same path with the same shape; a missing or extra module, or a shape
that differs, is refused naming the path and both shapes, and a file whose modules belong to another
architecture than ``config.model.name`` is refused naming both. The file stores no noise schedule (the
reference rebuilt it from its config), so ``model.sigma_min``/``sigma_max``/``num_scales`` and the SDE
cannot be checked against it.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from absl import logging
import flax
from flax import serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scoresde.models import utils
from scoresde.porting import released

Variables = Any
Flat = dict[tuple[str, ...], np.ndarray]
FORMAT = 'score_sde (JAX) flax msgpack'
SUPPORTED_MODELS = ('ncsnpp', 'ddpm', 'ncsnv2_64', 'ncsnv2_128', 'ncsnv2_256', 'ncsn')
_MODULE_RENAMES = {'CondRefineBlock': 'RefineBlock', 'CondRCUBlock': 'RCUBlock', 'CondCRPBlock': 'CRPBlock',
                   'CondMSFBlock': 'MSFBlock', 'ConditionalResidualBlock': 'ResidualBlock'}
_LEAF_RENAMES = {'Conv2d': {'weight': 'kernel'},
                 'InstanceNorm2d': {'scale': 'gamma', 'bias': 'beta'},
                 'VarianceNorm2d': {'scale': 'gamma', 'bias': 'beta'}}
_PER_CHANNEL = ('InstanceNorm2d', 'InstanceNorm2dPlus', 'VarianceNorm2d')
# A file holds four copies of the parameters (raw, EMA, two Adam moments) plus a few scalars; one larger
# than this many copies of the model's float32 parameters is not a checkpoint of it, and is not read.
_MAX_COPIES = 6
_SLACK_BYTES = 1 << 20
# The cap when the config builds no model to size the file by (the reference's largest model, DDPM at
# 256 px, has 112M parameters: 1.8 GB in four copies).
_MAX_FILE_BYTES = 8 << 30


def _module_class(name: str) -> str:
  """'ResnetBlockDDPM_3' -> 'ResnetBlockDDPM' (flax's automatic names are <class>_<index>)."""
  return re.sub(r'_\d+$', '', name)


def guess_architecture(params: dict) -> str | None:
  """The reference model (``config.model.name``) whose top-level modules ``params`` has, or None."""
  classes = {_module_class(name) for name in params}
  if classes & {'ResnetBlockBigGANpp', 'ResnetBlockDDPMpp'}:
    return 'ncsnpp'
  if 'ResnetBlockDDPM' in classes:
    return 'ddpm'
  if classes & {'CondRefineBlock', 'ConditionalResidualBlock'}:
    return 'ncsn'
  if 'RefineBlock' in classes:
    refine = sum(1 for name in params if _module_class(name) == 'RefineBlock')
    return {4: 'ncsnv2_64', 5: 'ncsnv2_128', 6: 'ncsnv2_256'}.get(refine)
  return None


def _convert(tree: dict, what: str, path: str | os.PathLike) -> tuple[Flat, dict[tuple[str, ...], tuple]]:
  """A reference parameter tree as {our leaf path: array}, and {our leaf path: (stored path, stored
  shape)} for messages."""
  flat: Flat = {}
  origin: dict[tuple[str, ...], tuple] = {}
  for key, value in flax.traverse_util.flatten_dict(tree).items():
    stored = '/'.join(str(k) for k in key)
    if not (isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating)):
      raise ValueError(f'{path}: {what}/{stored} is {type(value).__name__} '
                       f'{getattr(value, "dtype", "")}, not a floating-point array.')
    stored_shape = value.shape
    modules = [str(k) for k in key[:-1]]
    owner = _module_class(modules[-1]) if modules else ''
    leaf = _LEAF_RENAMES.get(owner, {}).get(str(key[-1]), str(key[-1]))
    if owner in _PER_CHANNEL and value.ndim == 4 and value.shape[:3] == (1, 1, 1):
      value = value.reshape(value.shape[-1])
    modules = [_MODULE_RENAMES.get(_module_class(m), _module_class(m)) + m[len(_module_class(m)):]
               for m in modules]
    ours = tuple(modules) + (leaf,)
    if ours in flat:
      raise ValueError(f'{path}: {what}/{stored} and {what}/{origin[ours][0]} both map to '
                       f'{"/".join(ours)}; this is not a score_sde parameter tree.')
    flat[ours] = value
    origin[ours] = (stored, stored_shape)
  return flat, origin


def _describe(items: list[tuple[tuple[str, ...], tuple]], limit: int = 8) -> str:
  text = ', '.join(f'{"/".join(p)} {tuple(s)}' for p, s in items[:limit])
  return text + (f' and {len(items) - limit} more' if len(items) > limit else '')


def _check_tree(flat: Flat, origin: dict, shapes: Flat, config: ml_collections.ConfigDict, what: str,
                path: str | os.PathLike) -> None:
  """Refuses ``flat`` unless it has exactly the model's leaves, each with the model's shape."""
  model = f'the {config.model.name} model built from this config'
  extra = sorted(set(flat) - set(shapes))
  missing = sorted(set(shapes) - set(flat))
  if extra or missing:
    parts = []
    if missing:
      parts.append(f'{model} has parameters the checkpoint lacks: '
                   f'{_describe([(p, shapes[p].shape) for p in missing])}')
    if extra:
      parts.append(f'the checkpoint has parameters {model} lacks: '
                   f'{_describe([(p, flat[p].shape) for p in extra])}')
    raise ValueError(f'{path}: {what} does not fit the model: ' + '; '.join(parts) + '. The config '
                     'does not describe this checkpoint (compare model.nf, ch_mult, num_res_blocks, '
                     'attn_resolutions, resblock_type, progressive*, conditional, normalization and '
                     'data.image_size/num_channels with the config it was trained with).')
  for key in sorted(flat):
    got, want = flat[key].shape, tuple(shapes[key].shape)
    if got != want:
      stored, stored_shape = origin[key]
      layout = f' ({got} in our layout)' if got != tuple(stored_shape) else ''
      raise ValueError(f'{path}: {what}/{stored} has shape {tuple(stored_shape)}{layout}, but {model} '
                       f'expects {want} at {"/".join(key)}: the config does not describe this checkpoint.')


def _abstract_params(config: ml_collections.ConfigDict) -> Flat:
  model = utils.create_model(config)
  x, labels = utils.dummy_inputs(model, 1)
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, labels, train=False))['params']
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))


def read_state(path: str | os.PathLike, max_bytes: int) -> dict:
  """The state dict of a reference checkpoint file, as plain data, after checking its layout.

  Raises:
    ValueError: the file is larger than ``max_bytes``, not msgpack (truncated, garbage, another
      format), or not the state of a score_sde training run.
  """
  size = os.path.getsize(path)
  if size > max_bytes:
    raise ValueError(f'{path} is {size:,} bytes; a score_sde checkpoint of the model built from this '
                     f'config holds at most about {max_bytes:,} (its parameters four times over): it is '
                     'not such a checkpoint, or the config describes a smaller model.')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    state = serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises several types for bad input)
    raise ValueError(f'{path} is not a readable flax msgpack checkpoint (truncated, damaged, or another '
                     f'format): {type(e).__name__}: {str(e)[:200]}') from e
  optimizer = state.get('optimizer') if isinstance(state, dict) else None
  if not (isinstance(optimizer, dict) and isinstance(optimizer.get('target'), dict)
          and isinstance(state.get('params_ema'), dict)):
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f'{path} is msgpack but not the state of a score_sde training run: expected the keys '
                     f"'optimizer' (with 'target') and 'params_ema', found {keys}.")
  if state.get('model_state'):
    raise ValueError(f'{path} holds mutable model state {sorted(state["model_state"])}, which none of the '
                     'score_sde models has.')
  return state


def _max_bytes(shapes: Flat) -> int:
  n = sum(math.prod(s.shape) for s in shapes.values())
  return _MAX_COPIES * 4 * n + _SLACK_BYTES


def _check_architecture(state: dict, config: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
  name = config.model.name
  found = guess_architecture(state['params_ema'])
  if found is not None and found != name:
    top = sorted(state['params_ema'])
    more = '...' if len(top) > 6 else ''
    raise ValueError(f'{path} holds a {found} network (top-level modules {top[:6]}{more}) but '
                     f'config.model.name={name!r}: use the config it was trained with.')


def _open(path: str | os.PathLike, config: ml_collections.ConfigDict) -> tuple[dict, Flat]:
  """(the file's state dict, the model's abstract parameters), once the architecture is checked."""
  if config.model.name not in SUPPORTED_MODELS:
    raise ValueError(f'importing score_sde (JAX) checkpoints supports config.model.name in '
                     f'{SUPPORTED_MODELS}, got {config.model.name!r}.')
  try:
    shapes = _abstract_params(config)
  except Exception as e:  # pylint: disable=broad-except  (reported below, after the file is identified)
    shapes, build_error = None, e
  state = read_state(path, _max_bytes(shapes) if shapes is not None else _MAX_FILE_BYTES)
  _check_architecture(state, config, path)
  if shapes is None:
    raise ValueError(f'the config does not build a {config.model.name} model to load {path} into: '
                     f'{type(build_error).__name__}: {str(build_error).splitlines()[0]}') from build_error
  logging.warning('%s stores no noise schedule: make sure config.model.sigma_min, sigma_max, num_scales '
                  '(and beta_min/beta_max, training.sde) are the ones it was trained with.', path)
  return state, shapes


def _moments(state: dict, path: str | os.PathLike) -> tuple[dict, dict, int] | None:
  """(grad_ema tree, grad_sq_ema tree, Adam step) from flax.optim.Adam's state, or None if absent."""
  opt_state = state['optimizer'].get('state')
  if not isinstance(opt_state, dict) or not opt_state.get('param_states'):
    return None
  first: dict = {}
  second: dict = {}
  for key, value in flax.traverse_util.flatten_dict(opt_state['param_states']).items():
    target = {'grad_ema': first, 'grad_sq_ema': second}.get(key[-1])
    if target is None:
      raise ValueError(f'{path}: optimizer state entry {"/".join(map(str, key))} is not an Adam moment '
                       "(grad_ema, grad_sq_ema); only flax.optim.Adam states can be imported.")
    target[key[:-1]] = value
  return (flax.traverse_util.unflatten_dict(first), flax.traverse_util.unflatten_dict(second),
          int(opt_state.get('step', state.get('step', 0))))


def _to_params(tree: dict, what: str, shapes: Flat, config, path) -> dict:
  flat, origin = _convert(tree, what, path)
  _check_tree(flat, origin, shapes, config, what, path)
  return flax.traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


def read_score_sde_jax(path: str | os.PathLike, config: ml_collections.ConfigDict) -> released.Released:
  """The whole training state of a score_sde (JAX) checkpoint in our layout: raw and EMA weights, step,
  Adam moments and PRNG key (for ``checkpointing.import_checkpoint``)."""
  state, shapes = _open(path, config)
  params = _to_params(state['optimizer']['target'], 'optimizer/target', shapes, config, path)
  params_ema = _to_params(state['params_ema'], 'params_ema', shapes, config, path)
  adam = None
  moments = _moments(state, path)
  if moments is not None:
    first, second, count = moments
    adam = (_to_params(first, 'optimizer/state/param_states[grad_ema]', shapes, config, path),
            _to_params(second, 'optimizer/state/param_states[grad_sq_ema]', shapes, config, path), count)
  rng = state.get('rng')
  rng = np.asarray(rng, np.uint32) if isinstance(rng, np.ndarray) and rng.shape == (2,) else None
  return released.Released(params=params, params_ema=params_ema, step=int(state.get('step', 0)), adam=adam,
                           rng=rng, format=FORMAT)


def load_score_sde_jax(path: str | os.PathLike, config: ml_collections.ConfigDict,
                       ema: bool = True) -> Variables:
  """Flax variables ``{'params': ...}`` for ``create_model(config)`` from a score_sde (JAX) checkpoint.

  Args:
    path: a checkpoint file written by the reference's training loop (``checkpoints/checkpoint_<k>``).
    config: the experiment config it was trained with (its ``model`` and ``data`` groups).
    ema: use the EMA weights ``params_ema`` (what the reference samples and evaluates with); else the
      raw weights ``optimizer.target``.
  """
  state, shapes = _open(path, config)
  what = 'params_ema' if ema else 'optimizer/target'
  params = _to_params(state['params_ema'] if ema else state['optimizer']['target'], what, shapes, config,
                      path)
  return {'params': jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)}

