"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph) in flax.linen, with pytorch-fid's weights.

FID (Heusel et al. 2017), IS (Salimans et al. 2016) and KID (Bińkowski et al. 2018) as published — the
score_sde paper's FID 2.20 / IS 9.89 included, via TF-GAN — use the Inception-v3 graph of
``inception-2015-12-05.tgz``, which differs from torchvision's Inception-v3 (Szegedy et al. 2016):

- the average-pool branches of the A, C and first E blocks exclude padding from the average;
- the pool branch of the last E block (``Mixed_7c``) max-pools instead of average-pooling;
- the classifier has 1008 outputs (1000 ImageNet classes and 8 unused ones).

This module mirrors pytorch-fid's ``FIDInceptionA/C/E_1/E_2`` port of that graph block for block, with
parameter names equal to the state-dict keys of ``pt_inception-2015-12-05-6726825d.pth`` so that the
file imports one key to one parameter, and pytorch-fid's input pipeline: images in [0, 1] are resized
to 299×299 bilinearly (``F.interpolate(..., align_corners=False)``, no antialiasing) and mapped to
[-1, 1]. Outputs are the 2048-d global-average-pooled ``pool_3`` features and the 1008 logits.
Reading the weights needs no PyTorch (``torch_pickle``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoresde.porting import torch_pickle

FILENAME = 'pt_inception-2015-12-05-6726825d.pth'
URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FILENAME}'
SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'
FILE_BYTES = 95_628_359
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008

_HIGHEST = jax.lax.Precision.HIGHEST  # TPUs/GPUs would otherwise run f32 convolutions in bf16/tf32.


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of PyTorch's bilinear resize with ``align_corners=False`` along one axis.

  Output pixel i samples the input at s = (i + ½)·in/out − ½ (clamped at 0) and mixes pixels ⌊s⌋ and
  min(⌊s⌋ + 1, in − 1) with weights 1 − (s − ⌊s⌋) and s − ⌊s⌋. No antialiasing filter is applied when
  shrinking, unlike ``jax.image.resize``.
  """
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  weights = np.zeros((out_size, in_size))
  np.add.at(weights, (np.arange(out_size), lo), 1. - frac)
  np.add.at(weights, (np.arange(out_size), hi), frac)
  return weights.astype(np.float32)


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) → (B, size, size, C), as ``F.interpolate(mode='bilinear', align_corners=False)``."""
  rows = jnp.asarray(bilinear_matrix(images.shape[1], size))
  cols = jnp.asarray(bilinear_matrix(images.shape[2], size))
  return jnp.einsum('ih,jw,bhwc->bijc', rows, cols, images, precision=_HIGHEST)


class BasicConv2d(nn.Module):
  """Convolution without bias, batch norm (inference statistics, ε = 1e-3), ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=_HIGHEST, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF's average pool divides by the number of non-padding inputs (pytorch-fid's "Patch" comment).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """Mixed_5b/c/d (35×35): 1×1, 5×5, double 3×3 and pooled 1×1 branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name='branch1x1')(x)
    b5 = BasicConv2d(48, (1, 1), name='branch5x5_1')(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv2d(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv2d(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35×35 → 17×17."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv2d(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv2d(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b–6e (17×17): factorised 7×7 convolutions (1×7 then 7×1)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, (1, 1), name='branch1x1')(x)
    b7 = BasicConv2d(c7, (1, 1), name='branch7x7_1')(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv2d(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv2d(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17×17 → 8×8."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name='branch3x3_1')(x)
    b3 = BasicConv2d(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv2d(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv2d(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/7c (8×8): expanded 1×3 / 3×1 branches. ``max_pool`` marks the graph's Mixed_7c."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, (1, 1), name='branch1x1')(x)
    b3 = BasicConv2d(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = BasicConv2d(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv2d(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """``images`` (B, H, W, C) in [0, 1], C ∈ {1, 3} → (pool_3 (B, 2048), logits (B, 1008))."""
  resize_input: bool = True

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize_input:
      x = resize_bilinear(x, INPUT_SIZE)
    x = 2. * x - 1.
    x = BasicConv2d(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv2d(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_stride2(x)
    x = BasicConv2d(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_stride2(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, precision=_HIGHEST, name='fc')(pool)
    return pool, logits


# state-dict suffix -> (flax collection, leaf name, transform of the torch array)
_LEAVES = {
    'conv.weight': ('params', 'kernel', lambda w: np.transpose(w, (2, 3, 1, 0))),  # OIHW -> HWIO
    'bn.weight': ('params', 'scale', lambda w: w),
    'bn.bias': ('params', 'bias', lambda w: w),
    'bn.running_mean': ('batch_stats', 'mean', lambda w: w),
    'bn.running_var': ('batch_stats', 'var', lambda w: w),
    'fc.weight': ('params', 'kernel', lambda w: w.T),
    'fc.bias': ('params', 'bias', lambda w: w),
}


def _target_path(key: str) -> tuple[str, tuple[str, ...], Any] | None:
  """Maps 'Mixed_5b.branch1x1.conv.weight' to ('params', ('Mixed_5b', 'branch1x1', 'conv', 'kernel'), f)."""
  parts = key.split('.')
  suffix = '.'.join(parts[-2:])
  if suffix not in _LEAVES:
    return None
  collection, leaf, transform = _LEAVES[suffix]
  return collection, tuple(parts[:-1]) + (leaf,), transform


def variables_from_state_dict(state_dict: dict[str, np.ndarray], source: str = 'state dict') -> dict:
  """Flax variables of ``FIDInceptionV3`` from pytorch-fid's (torchvision-named) state dict.

  Every parameter must be present with its exact shape; ``num_batches_tracked`` counters are ignored.
  """
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  expected = {(c,) + tuple(k.key for k in path): leaf.shape
              for c in shapes for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[c])[0]}
  flat, unexpected = {}, []
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      continue
    target = _target_path(key)
    if target is None or (target[0],) + target[1] not in expected:
      unexpected.append(key)
      continue
    collection, path, transform = target
    array = np.asarray(transform(np.asarray(value)), np.float32)
    if array.shape != expected[(collection,) + path]:
      raise ValueError(f'{source}: {key} has shape {value.shape}; the FID Inception expects '
                       f'{expected[(collection,) + path]} (after transposing to flax layout).')
    flat[(collection,) + path] = array
  missing = sorted('/'.join(k) for k in expected if k not in flat)
  if missing or unexpected:
    raise ValueError(f'{source} is not the FID Inception-v3 state dict: missing {missing[:5]} '
                     f'({len(missing)} in all), unexpected {sorted(unexpected)[:5]} '
                     f'({len(unexpected)} in all).')
  variables: dict = {}
  for path, array in flat.items():
    node = variables
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(array)
  return variables


def default_path() -> str:
  """Where pytorch-fid (through torch.hub) caches the weights: $TORCH_HOME/hub/checkpoints."""
  torch_home = os.environ.get('TORCH_HOME', os.path.join(os.path.expanduser('~'), '.cache', 'torch'))
  return os.path.join(torch_home, 'hub', 'checkpoints', FILENAME)


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def load_variables(path: str = '', check_sha256: bool = True) -> dict:
  """FID Inception variables from pytorch-fid's weight file (``path``, else ``default_path()``).

  Raises FileNotFoundError saying how to obtain the file, and ValueError when its SHA-256 differs from
  the published file's (other weights would give FIDs not comparable with anyone else's).
  """
  path = path or default_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'FID Inception weights not found at {path!r}. Download {URL} ({FILE_BYTES:,} bytes, '
        f'SHA-256 {SHA256}) and pass its path as --config.eval.inception_path=/path/to/{FILENAME} '
        f'(or place it at {default_path()}, where pytorch-fid caches it).')
  if check_sha256:
    digest = sha256_of(path)
    if digest != SHA256:
      raise ValueError(f'{path} has SHA-256 {digest}, not the published FID Inception weights '
                       f'({SHA256}); download {URL} again.')
  return variables_from_state_dict(torch_pickle.load(path), source=path)


def feature_fn(variables: dict, resize_input: bool = True):
  """``f(images (B, H, W, C) in [0, 1]) -> (pool_3, logits)``, jitted."""
  apply = jax.jit(FIDInceptionV3(resize_input=resize_input).apply)  # weights as arguments, not constants
  return lambda images: apply(variables, images)

