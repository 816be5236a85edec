"""Normalisation layers of the score networks, chosen by name (``config.model.normalization``).

- 'GroupNorm' (DDPM; 32 groups), 'InstanceNorm', 'VarianceNorm';
- 'InstanceNorm++' (Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data
  Distribution", §4.2 / App. A): instance normalisation that keeps the information in the channel means,

      h = γ ⊙ [(x - μ_c) / s_c + α ⊙ (μ_c - m) / v] + β,

  with μ_c, s_c the per-channel spatial mean / std and m, v the mean / std of the μ_c over channels;
- the conditional variant (NCSN v1) takes γ, α, β from a per-noise-level embedding table.

All statistics use biased variances and ε = 1e-5, as the reference's Flax code.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoresde.models import layers

Array = jax.Array
_EPS = 1e-5


def _near_one(stddev: float = 0.02) -> Callable[..., Array]:
  def init(key, shape, dtype=jnp.float32):
    return 1. + stddev * jax.random.normal(key, shape, dtype)
  return init


def _instance_standardise(x: Array) -> tuple[Array, Array]:
  """((x - μ_c) / s_c, μ_c) over the spatial axes of NHWC ``x``."""
  means = jnp.mean(x, axis=(1, 2))
  var = jnp.var(x, axis=(1, 2), keepdims=True)
  return (x - means[:, None, None, :]) / jnp.sqrt(var + _EPS), means


def _standardised_means(means: Array) -> Array:
  """(μ_c - m) / v across channels."""
  m = jnp.mean(means, axis=-1, keepdims=True)
  v = jnp.var(means, axis=-1, keepdims=True)
  return (means - m) / jnp.sqrt(v + _EPS)


class InstanceNorm2d(nn.Module):
  """Instance normalisation with a learned per-channel scale γ (~ N(1, 0.02²)) and bias β."""
  bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h, _ = _instance_standardise(x)
    h = h * self.param('gamma', _near_one(), (c,))
    if self.bias:
      h = h + self.param('beta', nn.initializers.zeros, (c,))
    return h


class VarianceNorm2d(nn.Module):
  """Division by the per-channel spatial std (no centring), then γ and β."""
  bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = x / jnp.sqrt(jnp.var(x, axis=(1, 2), keepdims=True) + _EPS)
    h = h * self.param('gamma', _near_one(), (c,))
    if self.bias:
      h = h + self.param('beta', nn.initializers.zeros, (c,))
    return h


class InstanceNorm2dPlus(nn.Module):
  """InstanceNorm++ (see the module docstring); parameters α, γ ~ N(1, 0.02²), β = 0."""
  bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h, means = _instance_standardise(x)
    alpha = self.param('alpha', _near_one(), (c,))
    gamma = self.param('gamma', _near_one(), (c,))
    h = h + _standardised_means(means)[:, None, None, :] * alpha
    h = h * gamma
    if self.bias:
      h = h + self.param('beta', nn.initializers.zeros, (c,))
    return h


class ConditionalInstanceNorm2dPlus(nn.Module):
  """InstanceNorm++ whose γ, α (and β) are rows of an embedding table indexed by the noise level y."""
  num_classes: int = 10
  bias: bool = True

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    c = x.shape[-1]
    h, means = _instance_standardise(x)
    n_maps = 3 if self.bias else 2

    def init_embed(key, shape, dtype=jnp.float32):
      scales = 1. + 0.02 * jax.random.normal(key, (shape[0], 2 * c), dtype)
      return jnp.concatenate([scales, jnp.zeros((shape[0], shape[1] - 2 * c), dtype)], axis=-1)

    embed = nn.Embed(num_embeddings=self.num_classes, features=n_maps * c, embedding_init=init_embed)
    maps = jnp.split(embed(y.astype(jnp.int32)), n_maps, axis=-1)
    gamma, alpha = maps[0], maps[1]
    h = h + _standardised_means(means)[:, None, None, :] * alpha[:, None, None, :]
    h = h * gamma[:, None, None, :]
    if self.bias:
      h = h + maps[2][:, None, None, :]
    return h


_NORMALIZATIONS = ('GroupNorm', 'InstanceNorm', 'InstanceNorm++', 'VarianceNorm')


def num_classes(config) -> int:
  """Rows of NCSN's noise-conditional normalisation: ``config.model.num_classes``, 0 meaning one per noise
  level (``config.model.num_scales``)."""
  return int(config.model.num_classes) or int(config.model.num_scales)


def get_normalization(name: str, conditional: bool = False,
                      num_classes: int | None = None) -> Callable[..., nn.Module]:
  """A factory for the layer named ``name`` (``config.model.normalization``).

  ``conditional`` (NCSN v1) gives the noise-conditional InstanceNorm++ with ``num_classes`` rows.
  """
  if name not in _NORMALIZATIONS:
    raise ValueError(f'config.model.normalization={name!r} is not known; choose one of {_NORMALIZATIONS}.')
  if conditional:
    if name != 'InstanceNorm++':
      raise ValueError(f"a noise-conditional model (NCSN) needs config.model.normalization='InstanceNorm++', "
                       f'got {name!r}.')
    return functools.partial(ConditionalInstanceNorm2dPlus, num_classes=num_classes)
  if name == 'GroupNorm':
    return layers.group_norm_32
  if name == 'InstanceNorm':
    return InstanceNorm2d
  if name == 'InstanceNorm++':
    return InstanceNorm2dPlus
  return VarianceNorm2d
