"""Imports checkpoints of the PyTorch reference (yang-song/score_sde_pytorch) into our Flax models.

A ``.pth`` file saved by the reference's training loop holds ``{'model': state_dict, 'ema': {'decay',
'num_updates', 'shadow_params'}, 'optimizer', 'step'}``, the state dict of the network wrapped in
``torch.nn.DataParallel`` (keys ``module.<name>``). It is read with ``torch_pickle`` (no PyTorch needed).

The reference's NCSN++/DDPM++ and DDPM keep their layers in one list, ``all_modules``, in the order the
forward pass uses them; our Flax modules create their sub-modules in the same order and give their
leaves the same names as the PyTorch attributes (``GroupNorm_0``, ``Conv_1``, ``NIN_0``, ...). So
``all_modules.<i>`` is the i-th parameter-holding top-level sub-module our model calls, which we record
by intercepting calls during an abstract initialisation. Call order alone would load two modules whose
shapes happen to agree into each other's places, so each pairing must also agree in kind (what the
checkpoint's leaves say the module is, against the Flax module's class), in its exact set of leaf paths,
and in every shape. Layouts differ only in (decided from the tensor alone, not from the model):

- convolution weights: PyTorch (out, in, kh, kw) -> Flax (kh, kw, in, out);
- dense weights: (out, in) -> (in, out);
- GroupNorm ``weight`` (the only 1-D weight) -> ``scale``;
- ``NIN`` (W, b) and the Fourier projection ``W`` are stored as in Flax.

EMA: ``shadow_params[i]`` belongs to the i-th state-dict entry that is a trainable parameter, i.e. after
dropping buffers (``sigmas``) and the frozen Fourier ``W``. The reference evaluates and samples with these.

Adam (``read_score_sde_pytorch``, for ``--mode=import``): the file's ``optimizer`` is torch Adam's
``state_dict()``, ``{'state': {i: {'step', 'exp_avg', 'exp_avg_sq'}}, 'param_groups': [{..., 'params':
[i, ...]}]}``, i the position in ``model.parameters()`` = the state dict's order without buffers (the
frozen Fourier ``W`` included, with no state: it gets no gradient). ``exp_avg``/``exp_avg_sq``/``step``
become optax's ``mu``/``nu``/``count``, each moment mapped like its weight. The moments and the update
made from them are the same in both (both bias-correct with the count of the update being made and add
ε after the square root); what differs is weight decay: torch Adam's ``weight_decay`` is an L2 term added
to the gradient (so it is inside the moments), ours (``config.optim.weight_decay``, optax.adamw) is
decoupled. Files with a coupled ``weight_decay`` != 0, ``amsgrad`` or ``maximize`` are refused, as are
indices outside the parameters, moments whose shape is not their parameter's, and per-parameter steps
that disagree (optax keeps one count).

Noise schedule: every one of these reference models stores ``sigmas = get_sigmas(config)`` (descending
geometric, ``model.sigma_max`` -> ``model.sigma_min``, ``model.num_scales`` of them), VP models
included, and nothing else about the schedule (VP's ``beta_min``/``beta_max`` are not in the file). A
config that disagrees with it is refused: the weights would load, and be used at the wrong noise levels.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scoresde.porting import released
from scoresde.porting import torch_pickle
from scoresde.models import utils

Variables = Any
FORMAT = 'score_sde_pytorch .pth'
# One module's converted leaves: path relative to the module ('Conv_0', 'kernel') -> array in Flax layout.
Leaves = dict[tuple[str, ...], np.ndarray]
_SUPPORTED_MODELS = ('ncsnpp', 'ddpm')
_BUFFERS = ('sigmas',)
# The stored sigmas are float64 from the same formula as get_sigmas, so any real disagreement is large.
_SCHEDULE_RTOL = 1e-5
_FOURIER = 'GaussianFourierProjection'
# What a checkpoint module is, judged from its own leaves, and the Flax classes that may take its place.
_KIND_CLASSES = {
    'Fourier projection': (_FOURIER,),
    'Dense': ('Dense',),
    'Conv': ('Conv',),
    'GroupNorm': ('GroupNorm',),
    'attention block': ('AttnBlock', 'AttnBlockpp'),
    'residual block': ('ResnetBlockDDPM', 'ResnetBlockDDPMpp', 'ResnetBlockBigGANpp'),
    'single-convolution block': ('Upsample', 'Downsample', 'Combine'),
}


def _strip_prefix(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops DataParallel's 'module.' prefix."""
  return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state_dict.items()}


def _check_noise_schedule(state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                          path: str | os.PathLike) -> None:
  """Refuses a config whose noise levels are not the ones stored with the checkpoint."""
  if 'sigmas' not in state_dict:
    logging.warning('%s has no "sigmas" buffer, so its noise schedule cannot be checked: make sure '
                    'config.model.sigma_max, sigma_min and num_scales are the ones it was trained with.',
                    path)
    return
  sigmas = np.asarray(state_dict['sigmas'], np.float64)
  if sigmas.ndim != 1 or not sigmas.size:
    raise ValueError(f'{path}: the "sigmas" buffer has shape {sigmas.shape}; a score_sde_pytorch '
                     'checkpoint stores a 1-D table of noise levels.')
  model = config.model
  problems = []
  if sigmas.size != int(model.num_scales):
    problems.append(f'num_scales={sigmas.size} (len(sigmas)) but config.model.num_scales='
                    f'{model.num_scales}; set --config.model.num_scales={sigmas.size}')
  for key, where, stored in (('sigma_max', 'sigmas[0]', sigmas[0]), ('sigma_min', 'sigmas[-1]', sigmas[-1])):
    if not np.isclose(stored, float(model[key]), rtol=_SCHEDULE_RTOL, atol=0.):
      problems.append(f'{key}={stored:.6g} ({where}) but config.model.{key}={float(model[key]):.6g}; '
                      f'set --config.model.{key}={stored:.6g}')
  if problems:
    raise ValueError(f'{path} was trained with another noise schedule than the config describes: '
                     'checkpoint has ' + '; checkpoint has '.join(problems) + '.')


def _abstract_init(model: nn.Module) -> tuple[dict, list[tuple[str, str]]]:
  """The model's parameter shapes, and (name, class name) of its parameterised direct sub-modules in the
  order the forward pass first calls them."""
  calls: dict[str, str] = {}

  def interceptor(next_fun, args, kwargs, context):
    path = context.module.path
    if len(path) == 1 and context.method_name == '__call__':
      calls.setdefault(path[0], type(context.module).__name__)
    return next_fun(*args, **kwargs)

  x, labels = utils.dummy_inputs(model, 1)
  with nn.intercept_methods(interceptor):
    shapes = jax.eval_shape(lambda: model.init(
        {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, labels, train=False))['params']
  shapes = flax.core.unfreeze(shapes)
  return shapes, [(name, cls) for name, cls in calls.items() if name in shapes]


def _convert_leaf(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """(Flax leaf name, array in Flax layout) of one PyTorch tensor, decided by the tensor alone so that
  the converted leaves describe the checkpoint, not the model it is being matched against."""
  name = key.rsplit('.', 1)[-1]
  if name == 'weight':
    if value.ndim == 1:
      return 'scale', value
    if value.ndim == 4:
      return 'kernel', np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
      return 'kernel', value.T
  if name in ('bias', 'W', 'b'):
    return name, value
  raise ValueError(f'no Flax counterpart for checkpoint entry {key!r} of shape {value.shape}.')


def _checkpoint_kind(leaves: Leaves) -> str:
  """What a checkpoint module is, from its leaves' names and ranks (a key of _KIND_CLASSES, or 'unknown')."""
  top = {path[0]: value for path, value in leaves.items() if len(path) == 1}
  children = {path[0] for path in leaves if len(path) > 1}
  if top and children:
    return 'unknown'
  if set(top) == {'W'}:
    return 'Fourier projection'
  if 'scale' in top:
    return 'GroupNorm'
  if 'kernel' in top:
    return {4: 'Conv', 2: 'Dense'}.get(top['kernel'].ndim, 'unknown')
  if 'Conv_1' in children:  # both convolutions of a residual block; the skip may be Conv_2 or NIN_0
    return 'residual block'
  if 'GroupNorm_0' in children and all(c == 'GroupNorm_0' or c.startswith('NIN_') for c in children):
    return 'attention block'
  if len(children) == 1 and children <= {'Conv_0', 'Conv2d_0'}:
    return 'single-convolution block'
  return 'unknown'


def _describe(shapes: dict[tuple[str, ...], tuple[int, ...]]) -> str:
  return '{' + ', '.join(f'{"/".join(path)} {shape}' for path, shape in sorted(shapes.items())) + '}'


def _check_module(index: int, leaves: Leaves, name: str, cls: str, expected: dict) -> None:
  """Refuses to load checkpoint module all_modules.<index> into the model's module `name` (class `cls`,
  abstract parameters `expected`) unless kind, leaf paths and shapes all agree."""
  kind = _checkpoint_kind(leaves)
  got = {path: value.shape for path, value in leaves.items()}
  want = {path: tuple(value.shape) for path, value in flax.traverse_util.flatten_dict(expected).items()}
  if cls not in _KIND_CLASSES.get(kind, ()) or set(got) != set(want):
    raise ValueError(
        f'checkpoint module all_modules.{index} ({kind}: {_describe(got)}) cannot be loaded into '
        f'{name} ({cls}: {_describe(want)}), the module the model calls in its place: the checkpoint\'s '
        'layers are not in the order this model calls them, or the config describes another architecture.')
  for path in sorted(got):
    if got[path] != want[path]:
      raise ValueError(f'checkpoint module all_modules.{index} has {"/".join(path)} of shape {got[path]} '
                       f'(Flax layout); the model expects {want[path]} at {"/".join((name,) + path)}: the '
                       'config does not describe this checkpoint.')


def _group_modules(state_dict: dict[str, np.ndarray]) -> dict[int, list[str]]:
  """Keys of the (prefix-free) state dict by their all_modules index, buffers left out."""
  groups: dict[int, list[str]] = {}
  for key in state_dict:
    if key in _BUFFERS:
      continue
    parts = key.split('.')
    if parts[0] != 'all_modules' or len(parts) < 3 or not parts[1].isdigit():
      raise ValueError(f'unexpected state-dict entry {key!r}: expected all_modules.<i>.<...> '
                       '(a score_sde_pytorch NCSN++/DDPM++/DDPM checkpoint).')
    groups.setdefault(int(parts[1]), []).append(key)
  return groups


def _map_state_dict(state_dict: dict[str, np.ndarray], modules: list[tuple[str, str]],
                    shapes: dict) -> tuple[dict, set[str]]:
  """Flax params from a (prefix-free) state dict, and the keys of its frozen parameters (no EMA copy)."""
  groups = _group_modules(state_dict)
  if len(groups) != len(modules):
    raise ValueError(f'the checkpoint has {len(groups)} parameterised modules, the model built from this '
                     f'config has {len(modules)}: the config does not describe this checkpoint.')
  params: dict = {}
  frozen: set[str] = set()
  for (index, keys), (name, cls) in zip(sorted(groups.items()), modules):
    leaves: Leaves = {}
    for key in keys:
      leaf, value = _convert_leaf(key, state_dict[key])
      leaves[tuple(key.split('.')[2:-1]) + (leaf,)] = value
    _check_module(index, leaves, name, cls, shapes[name])
    params[name] = flax.traverse_util.unflatten_dict(leaves)
    if cls == _FOURIER:
      frozen.update(keys)
  return params, frozen


def _check_complete(params: dict, shapes: dict) -> None:
  got = set(flax.traverse_util.flatten_dict(params))
  want = set(flax.traverse_util.flatten_dict(shapes))
  if got != want:
    missing = sorted('/'.join(p) for p in want - got)
    raise ValueError(f'the checkpoint lacks parameters the model needs: {missing[:10]}')


class _Opened(NamedTuple):
  """A .pth file read once and its raw weights mapped: what the EMA weights and Adam moments map through."""
  checkpoint: dict  # the file's top-level dict ({} for a bare state dict)
  state_dict: dict[str, np.ndarray]  # prefix-free
  modules: list[tuple[str, str]]
  shapes: dict
  params: dict  # raw weights in our layout
  frozen: set[str]


def _open(path: str | os.PathLike, config: ml_collections.ConfigDict) -> _Opened:
  """Reads ``path`` (once) and maps its raw weights onto the model ``config`` builds."""
  name = config.model.name
  if name not in _SUPPORTED_MODELS:
    raise ValueError(f'importing PyTorch checkpoints supports config.model.name in {_SUPPORTED_MODELS}, '
                     f'got {name!r}.')
  checkpoint = torch_pickle.load(path)
  if isinstance(checkpoint, dict) and 'model' in checkpoint:
    state_dict = checkpoint['model']
  else:
    state_dict, checkpoint = checkpoint, {}
  state_dict = _strip_prefix(dict(state_dict))
  _check_noise_schedule(state_dict, config, path)

  shapes, modules = _abstract_init(utils.create_model(config))
  params, frozen = _map_state_dict(state_dict, modules, shapes)
  _check_complete(params, shapes)
  return _Opened(checkpoint, state_dict, modules, shapes, params, frozen)


def _ema_params(opened: _Opened, path: str | os.PathLike) -> dict:
  """The EMA weights in our layout: ``shadow_params`` onto the trainable parameters, the rest raw."""
  checkpoint, state_dict = opened.checkpoint, opened.state_dict
  if 'ema' not in checkpoint:
    raise ValueError(f'{path} has no EMA weights; load it with ema=False.')
  trainable = [key for key in state_dict if key not in _BUFFERS and key not in opened.frozen]
  shadow = checkpoint['ema']['shadow_params']
  if len(shadow) != len(trainable):
    raise ValueError(f'{path}: {len(shadow)} EMA shadow parameters for {len(trainable)} trainable ones.')
  ema_state = {key: np.asarray(value) for key, value in zip(trainable, shadow)}
  for key, value in ema_state.items():
    if value.shape != state_dict[key].shape:
      raise ValueError(f'{path}: EMA entry for {key} has shape {value.shape}, the parameter '
                       f'{state_dict[key].shape}.')
  params, _ = _map_state_dict({**state_dict, **ema_state}, opened.modules, opened.shapes)
  return params


def _as_f32(tree: dict) -> dict:
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def _adam_settings(optimizer: dict, path: str | os.PathLike) -> list[int] | None:
  """The parameter indices ``param_groups`` lists (None without param_groups), after refusing settings
  whose state or update optax's Adam does not reproduce."""
  groups = optimizer.get('param_groups')
  if groups is None:
    return None
  if not isinstance(groups, (list, tuple)):
    raise ValueError(f'{path}: optimizer/param_groups is {type(groups).__name__}, not a list: not a torch '
                     'optimizer state_dict.')
  indices: list[int] = []
  for g, group in enumerate(groups):
    if not isinstance(group, dict) or 'params' not in group:
      raise ValueError(f'{path}: optimizer/param_groups[{g}] has no "params": not a torch optimizer '
                       'state_dict.')
    unsupported = []
    if group.get('amsgrad', False):
      unsupported.append('amsgrad=True (optax.adam keeps no max_exp_avg_sq)')
    if group.get('maximize', False):
      unsupported.append('maximize=True (its moments are of the negated gradient)')
    if float(group.get('weight_decay', 0) or 0) != 0 and not group.get('decoupled_weight_decay', False):
      unsupported.append(f'weight_decay={group["weight_decay"]} (torch Adam adds it to the gradient, so '
                         'its moments include that L2 term; our config.optim.weight_decay is decoupled, '
                         'as in flax.optim.Adam/AdamW, and training on would not continue that run)')
    if unsupported:
      raise ValueError(f'{path}: its Adam (optimizer/param_groups[{g}]) has ' + '; '.join(unsupported)
                       + ': these moments cannot be imported into our optax Adam.')
    indices.extend(int(i) for i in group['params'])
  return indices


def _adam_moments(opened: _Opened, path: str | os.PathLike) -> tuple[dict, dict, int] | None:
  """torch Adam's (``exp_avg``, ``exp_avg_sq``, ``step``) as optax's (``mu``, ``nu``, ``count``) in our
  layout, or None when the file has no optimizer state.

  The state is indexed by position in ``model.parameters()``, which is the state dict's order without
  its buffers (frozen parameters included: torch keeps no state for them, as they get no gradient, and
  their moments are zero). Each moment goes through the same mapping (module pairing, transposes) as
  the weight it belongs to. torch's Adam and optax's update identically from these: m̂ = m/(1-β₁ᵗ),
  v̂ = v/(1-β₂ᵗ), update = lr·m̂/(√v̂ + ε), with torch's per-parameter ``step`` = t = optax's ``count``
  (both count the update being made before bias-correcting), so one ``count`` needs every
  parameter's ``step`` to agree.
  """
  optimizer = opened.checkpoint.get('optimizer')
  if not isinstance(optimizer, dict) or not optimizer.get('state'):
    return None
  state = optimizer['state']
  if not isinstance(state, dict):
    raise ValueError(f'{path}: optimizer/state is {type(state).__name__}, not a dict: not a torch '
                     'optimizer state_dict.')
  keys = [key for key in opened.state_dict if key not in _BUFFERS]  # model.parameters() order
  listed = _adam_settings(optimizer, path)
  if listed is not None and sorted(listed) != list(range(len(keys))):
    raise ValueError(f'{path}: the optimizer\'s param_groups list {len(listed)} parameter indices '
                     f'({len(set(listed))} distinct, from {min(listed, default=0)} to '
                     f'{max(listed, default=-1)}); the model\'s state dict has {len(keys)} parameters '
                     f'(indices 0 to {len(keys) - 1}): the optimizer state does not belong to these weights.')
  first: dict[str, np.ndarray] = {}
  second: dict[str, np.ndarray] = {}
  steps: dict[int, list[int]] = {}
  for index, entry in sorted(state.items(), key=lambda item: int(item[0])):
    index = int(index)
    if not 0 <= index < len(keys):
      raise ValueError(f'{path}: optimizer/state has an entry for parameter index {index}, but the '
                       f'model\'s state dict has {len(keys)} parameters (indices 0 to {len(keys) - 1}): '
                       'the optimizer state does not belong to these weights.')
    key = keys[index]
    if not isinstance(entry, dict) or not {'exp_avg', 'exp_avg_sq'} <= set(entry):
      found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
      raise ValueError(f'{path}: optimizer/state[{index}] ({key}) holds {found}, not Adam\'s exp_avg and '
                       'exp_avg_sq: only torch.optim.Adam states can be imported.')
    extra = sorted(set(entry) - {'exp_avg', 'exp_avg_sq', 'step'})
    if extra:
      raise ValueError(f'{path}: optimizer/state[{index}] ({key}) also holds {extra} (amsgrad?), which '
                       'optax\'s Adam has no place for.')
    want = np.shape(opened.state_dict[key])
    for name, target in (('exp_avg', first), ('exp_avg_sq', second)):
      value = np.asarray(entry[name])
      if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f'{path}: optimizer/state[{index}][{name!r}] ({key}) has dtype {value.dtype}.')
      if value.shape != want:
        raise ValueError(f'{path}: optimizer/state[{index}][{name!r}] has shape {value.shape}, but '
                         f'parameter {index} ({key}) has shape {want}: the optimizer state does not '
                         'belong to these weights.')
      target[key] = value
    step = np.asarray(entry.get('step', -1), np.float64)
    if step.shape != () or not np.isfinite(step) or step < 0 or step != np.floor(step):
      raise ValueError(f'{path}: optimizer/state[{index}] ({key}) has step {entry.get("step")!r}, not a '
                       'count of updates.')
    steps.setdefault(int(step), []).append(index)
  if len(steps) != 1:
    found = ', '.join(f'{s} (parameters {v[:3]}{"..." if len(v) > 3 else ""})'
                      for s, v in sorted(steps.items()))
    raise ValueError(f'{path}: its Adam state counts different numbers of updates per parameter: {found}; '
                     'optax\'s Adam has one count for all.')
  missing = [key for key in keys if key not in first and key not in opened.frozen]
  if missing:
    logging.warning('%s: the optimizer state has no moments for %d trainable parameters (%s...); they start '
                    'at zero.', path, len(missing), ', '.join(missing[:3]))
  zeros = {key: np.zeros_like(np.asarray(opened.state_dict[key]), np.float32) for key in keys}
  mapped = []
  for moments in (first, second):
    tree, _ = _map_state_dict({**zeros, **moments}, opened.modules, opened.shapes)
    mapped.append(_as_f32(tree))
  return mapped[0], mapped[1], next(iter(steps))


def read_score_sde_pytorch(path: str | os.PathLike, config: ml_collections.ConfigDict) -> released.Released:
  """The whole training state of a score_sde_pytorch ``.pth`` in our layout, from one read of the file:
  raw and EMA weights, step, and torch Adam's moments as optax's (``_adam_moments``), for
  ``checkpointing.import_checkpoint``. The file holds no PRNG key."""
  opened = _open(path, config)
  step = opened.checkpoint.get('step', 0)
  return released.Released(params=_as_f32(opened.params), params_ema=_as_f32(_ema_params(opened, path)),
                           step=int(np.asarray(step)), adam=_adam_moments(opened, path), rng=None,
                           format=FORMAT)


def load_score_sde_pytorch(path: str | os.PathLike, config: ml_collections.ConfigDict,
                           ema: bool = True) -> Variables:
  """Flax variables ``{'params': ...}`` for ``create_model(config)`` from a score_sde_pytorch checkpoint.

  Args:
    path: a ``.pth`` file written by the reference's ``save_checkpoint`` (or a bare state dict).
    config: the experiment config the checkpoint was trained with (its ``model`` and ``data`` groups);
      its noise schedule must match the ``sigmas`` stored in the file.
    ema: use the EMA weights (what the reference samples and evaluates with); else the raw weights.
  """
  opened = _open(path, config)
  params = _ema_params(opened, path) if ema else opened.params
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return {'params': params}
