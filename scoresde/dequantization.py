"""Variational dequantization: a conditional flow q(u | x) over the offsets u ∈ (0, 1)^D of discrete data.

For data levels x ∈ {0, ..., L-1}^D and any density p_V on [0, 1]^D, the discrete model
P(x) = ∫_{[0,1)^D} p_V((x + u) / L) L^{-D} du obeys, by Jensen's inequality, for every density q(u | x)
on the cell (Ho et al. 2019, "Flow++", Sec. 3.1; Song, Durkan, Murray, Ermon 2021, Sec. 5.2 and App. C)

  -log P(x) ≤ E_{u ~ q(u | x)} [ -log p_V((x + u) / L) + log q(u | x) ] + D log L.

Uniform dequantization is q = U[0, 1)^D (log q = 0); a learned q tightens the bound towards -log P(x),
which it reaches when q(u | x) ∝ p_V((x + u) / L).

The flow here (``DequantizerFlow``): ε ~ N(0, I) of x's shape, ``num_couplings`` affine couplings
h ← h · exp(s) + m on alternate checkerboard halves of the pixels, with (m, s) from a small conv net on
the other half and the centred levels, log-scales bounded by tanh, then u = sigmoid(h). The conditioner's
last layer is zero-initialised, so a fresh flow is u = sigmoid(ε) (a logit-normal q). Its density is the
change of variables of this map,

  log q(u | x) = log N(ε; 0, I) - Σ_layers Σ_halves s - Σ_d log σ'(h_d),

with log σ'(h) = -softplus(h) - softplus(-h), exact (no estimator). (In float32, sigmoid rounds to 0 or 1
for |h| ≳ 17: a point on the cell's edge, of probability zero under q, which no bits/dim relies on.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Params = Any


def checkerboard(height: int, width: int, parity: int) -> Array:
  """(H, W, 1) float mask, 1 on the pixels with (i + j) % 2 == parity: the half a coupling transforms."""
  i, j = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing='ij')
  return ((i + j) % 2 == parity).astype(jnp.float32)[..., None]


class _Conditioner(nn.Module):
  """(shift m, log-scale s) of one coupling from the fixed half of h and the centred levels."""
  features: int
  depth: int

  @nn.compact
  def __call__(self, fixed: Array, context: Array) -> tuple[Array, Array]:
    channels = fixed.shape[-1]
    y = jnp.concatenate([fixed, context], axis=-1)
    for _ in range(self.depth):
      y = nn.silu(nn.Conv(self.features, (3, 3))(y))
    # Zero-initialised: every coupling starts as the identity (m = 0, s = 0).
    out = nn.Conv(2 * channels, (3, 3), kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)(y)
    shift, raw_scale = jnp.split(out, 2, axis=-1)
    return shift, jnp.tanh(raw_scale)  # bounded log-scale: |s| ≤ 1 per coupling, for stable training


class DequantizerFlow(nn.Module):
  """``apply(variables, eps, levels) -> (u, log_q)``: u (B, H, W, C) in (0, 1) and log q(u | levels) (B,).

  Attributes:
    num_levels: L, the number of data levels (``config.data.num_levels``).
    features: channels of each conditioner's hidden conv layers.
    depth: hidden conv layers per conditioner.
    num_couplings: affine couplings, alternating the checkerboard half they transform.
  """
  num_levels: int
  features: int = 32
  depth: int = 2
  num_couplings: int = 4

  @nn.compact
  def __call__(self, eps: Array, levels: Array) -> tuple[Array, Array]:
    context = 2. * levels.astype(jnp.float32) / (self.num_levels - 1) - 1.
    h = eps
    log_q = jnp.sum(jax.scipy.stats.norm.logpdf(eps).reshape(eps.shape[0], -1), axis=1)
    height, width = eps.shape[1:3]
    for k in range(self.num_couplings):
      mask = checkerboard(height, width, k % 2)
      shift, log_scale = _Conditioner(self.features, self.depth)(h * (1. - mask), context)
      h = h * (1. - mask) + mask * (h * jnp.exp(log_scale) + shift)
      log_q -= jnp.sum((mask * log_scale).reshape(h.shape[0], -1), axis=1)
    log_sigmoid_derivative = -jax.nn.softplus(h) - jax.nn.softplus(-h)
    log_q -= jnp.sum(log_sigmoid_derivative.reshape(h.shape[0], -1), axis=1)
    return jax.nn.sigmoid(h), log_q


def check_levels(levels: Array, num_levels: int) -> None:
  """Raises for levels that are not integer images (B, H, W, C), or (when concrete) outside [0, L-1]."""
  if not jnp.issubdtype(levels.dtype, jnp.integer):
    raise TypeError(f'the dequantizer expects integer data levels in [0, {num_levels - 1}], got dtype '
                    f'{levels.dtype}.')
  if levels.ndim != 4:
    raise ValueError(f'the dequantizer expects images (B, H, W, C), got levels of shape {levels.shape}.')
  if not isinstance(levels, jax.core.Tracer) and levels.size:
    low, high = int(jnp.min(levels)), int(jnp.max(levels))
    if low < 0 or high >= num_levels:
      raise ValueError(f'data levels must lie in [0, {num_levels - 1}] (num_levels={num_levels}), got '
                       f'values in [{low}, {high}].')


def init(rng: Array, flow: DequantizerFlow, example_shape: tuple[int, ...]) -> Params:
  """The flow's parameters for examples of ``example_shape`` (H, W, C)."""
  if len(example_shape) != 3:
    raise ValueError(f'the dequantizer needs images (H, W, C), got example shape {example_shape}.')
  dummy = jnp.zeros((1,) + tuple(example_shape), jnp.float32)
  return flow.init(rng, dummy, dummy.astype(jnp.int32))['params']


def sample_and_log_prob(flow: DequantizerFlow, params: Params, rng: Array,
                        levels: Array) -> tuple[Array, Array]:
  """u ~ q(u | levels) (B, H, W, C) in (0, 1) and log q(u | levels) (B,) in nats, by reparameterisation
  (differentiable in ``params``). Levels are checked as ``check_levels`` does (their range only when
  concrete), before anything is traced further."""
  check_levels(levels, flow.num_levels)
  eps = jax.random.normal(rng, levels.shape, jnp.float32)
  return flow.apply({'params': params}, eps, levels)


@dataclasses.dataclass(frozen=True)
class _Sampler:
  """Hashable ``(params, rng, levels) -> (u, log_q)`` of one flow: the static function of a Partial."""
  flow: DequantizerFlow

  def __call__(self, params: Params, rng: Array, levels: Array) -> tuple[Array, Array]:
    return sample_and_log_prob(self.flow, params, rng, levels)


def as_dequantizer(flow: DequantizerFlow, params: Params) -> jax.tree_util.Partial:
  """``dequantizer(rng, levels) -> (u, log_q)`` for ``likelihood``'s bits/dim functions, a ``Partial``
  whose parameters are traced jit arguments: new parameters reuse the compiled program."""
  return jax.tree_util.Partial(_Sampler(flow), params)
