"""Imports checkpoints of the PyTorch reference (yang-song/score_sde_pytorch) into our Flax models.

A ``.pth`` file saved by the reference's training loop holds ``{'model': state_dict, 'ema': {'decay',
'num_updates', 'shadow_params'}, 'optimizer', 'step'}``, the state dict of the network wrapped in
``torch.nn.DataParallel`` (keys ``module.<name>``). It is read with ``torch_pickle`` (no PyTorch needed).

The reference's NCSN++/DDPM++ and DDPM keep their layers in one list, ``all_modules``, in the order the
forward pass uses them; our Flax modules create their sub-modules in the same order and give their
leaves the same names as the PyTorch attributes (``GroupNorm_0``, ``Conv_1``, ``NIN_0``, ...). So
``all_modules.<i>`` is the i-th parameter-holding top-level sub-module our model calls, which we record
by intercepting calls during an abstract initialisation. Layouts differ only in:

- convolution weights: PyTorch (out, in, kh, kw) -> Flax (kh, kw, in, out);
- dense weights: (out, in) -> (in, out);
- GroupNorm ``weight`` -> ``scale``;
- ``NIN`` (W, b) and the Fourier projection ``W`` are stored as in Flax.

EMA: ``shadow_params[i]`` belongs to the i-th state-dict entry that is a trainable parameter, i.e. after
dropping buffers (``sigmas``) and the frozen Fourier ``W``. The reference evaluates and samples with these.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import torch_pickle
from models import layerspp
from models import utils

Variables = Any
_SUPPORTED_MODELS = ('ncsnpp', 'ddpm')
_BUFFERS = ('sigmas',)


def _strip_prefix(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops DataParallel's 'module.' prefix."""
  return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state_dict.items()}


def _top_level_call_order(model: nn.Module, config: ml_collections.ConfigDict,
                          shapes: Any) -> list[str]:
  """Names of the model's direct sub-modules in the order they are first called."""
  order: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    path = context.module.path
    if len(path) == 1 and context.method_name == '__call__' and path[0] not in order:
      order.append(path[0])
    return next_fun(*args, **kwargs)

  import datasets  # pylint: disable=import-outside-toplevel
  x = jnp.zeros((1,) + tuple(datasets.data_shape(config)), jnp.float32)
  labels = jnp.ones((1,), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                                      x, labels, train=False))
  return [name for name in order if name in shapes]


def _convert_leaf(name: str, value: np.ndarray, module_path: tuple[str, ...]) -> tuple[str, np.ndarray]:
  """(Flax leaf name, array in Flax layout) of one PyTorch tensor."""
  last = module_path[-1] if module_path else ''
  if name == 'weight':
    if last.startswith('GroupNorm'):
      return 'scale', value
    if value.ndim == 4:
      return 'kernel', np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
      return 'kernel', value.T
  if name in ('bias', 'W', 'b'):
    return name, value
  raise ValueError(f'no Flax counterpart for parameter {".".join(module_path + (name,))} {value.shape}.')


def _map_state_dict(state_dict: dict[str, np.ndarray], order: list[str], shapes: dict) -> tuple[
    dict, list[str]]:
  """Flax params from a (prefix-free) state dict, and the PyTorch keys of trainable params in order."""
  groups: dict[int, list[str]] = {}
  for key in state_dict:
    if key in _BUFFERS:
      continue
    parts = key.split('.')
    if parts[0] != 'all_modules' or len(parts) < 3:
      raise ValueError(f'unexpected state-dict entry {key!r}: expected all_modules.<i>.<...> '
                       '(a score_sde_pytorch NCSN++/DDPM++/DDPM checkpoint).')
    groups.setdefault(int(parts[1]), []).append(key)
  indices = sorted(groups)
  if len(indices) != len(order):
    raise ValueError(f'the checkpoint has {len(indices)} parameterised modules, the model built from this '
                     f'config has {len(order)}: the config does not describe this checkpoint.')

  params: dict = {}
  trainable: list[str] = []
  for index, flax_name in zip(indices, order):
    for key in groups[index]:
      parts = key.split('.')[2:]
      module_path = (flax_name,) + tuple(parts[:-1])
      leaf, value = _convert_leaf(parts[-1], state_dict[key], module_path)
      expected = shapes
      for p in module_path + (leaf,):
        if p not in expected:
          raise ValueError(f'checkpoint entry {key!r} maps to {"/".join(module_path + (leaf,))}, '
                           'which the model built from this config does not have.')
        expected = expected[p]
      if tuple(expected.shape) != value.shape:
        raise ValueError(f'checkpoint entry {key!r} has shape {value.shape} (as {leaf}); the model '
                         f'expects {tuple(expected.shape)} at {"/".join(module_path + (leaf,))}.')
      node = params
      for p in module_path:
        node = node.setdefault(p, {})
      node[leaf] = value
      if not flax_name.startswith(layerspp.GaussianFourierProjection.__name__):
        trainable.append(key)
  return params, trainable


def _check_complete(params: dict, shapes: dict) -> None:
  got = set(flax.traverse_util.flatten_dict(params))
  want = set(flax.traverse_util.flatten_dict(shapes))
  if got != want:
    missing = sorted('/'.join(p) for p in want - got)
    raise ValueError(f'the checkpoint lacks parameters the model needs: {missing[:10]}')


def load_score_sde_pytorch(path: str | os.PathLike, config: ml_collections.ConfigDict,
                           ema: bool = True) -> Variables:
  """Flax variables ``{'params': ...}`` for ``create_model(config)`` from a score_sde_pytorch checkpoint.

  Args:
    path: a ``.pth`` file written by the reference's ``save_checkpoint`` (or a bare state dict).
    config: the experiment config the checkpoint was trained with (its ``model`` and ``data`` groups).
    ema: use the EMA weights (what the reference samples and evaluates with); else the raw weights.
  """
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

  model = utils.create_model(config)
  import datasets  # pylint: disable=import-outside-toplevel
  x = jnp.zeros((1,) + tuple(datasets.data_shape(config)), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, jnp.ones((1,), jnp.float32),
      train=False))['params']
  shapes = flax.core.unfreeze(shapes)
  order = _top_level_call_order(model, config, shapes)
  params, trainable = _map_state_dict(state_dict, order, shapes)
  _check_complete(params, shapes)

  if ema:
    if 'ema' not in checkpoint:
      raise ValueError(f'{path} has no EMA weights; load it with ema=False.')
    shadow = checkpoint['ema']['shadow_params']
    if len(shadow) != len(trainable):
      raise ValueError(f'{path}: {len(shadow)} EMA shadow parameters for {len(trainable)} trainable ones.')
    ema_state = {key: np.asarray(value) for key, value in zip(trainable, shadow)}
    for key, value in ema_state.items():
      if value.shape != state_dict[key].shape:
        raise ValueError(f'{path}: EMA entry for {key} has shape {value.shape}, the parameter '
                         f'{state_dict[key].shape}.')
    state_dict = {**state_dict, **ema_state}
    params, _ = _map_state_dict(state_dict, order, shapes)

  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return {'params': params}
