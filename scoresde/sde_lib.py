"""Forward SDEs of score-based generative modelling and their time reversals.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole, "Score-Based Generative Modeling through Stochastic
Differential Equations", ICLR 2021 (arXiv:2011.13456). Equation numbers refer to that paper.

Conventions: ``x`` has shape (B, ...) and ``t`` has shape (B,); per-example scalars (diffusion, std,
log-densities) have shape (B,). Samplers and likelihoods talk to an SDE only through this interface and a
``score_fn(x, t) -> array like x``.
"""

from __future__ import annotations

import abc
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def batch_mul(a: Array, x: Array) -> Array:
  """Multiplies ``x`` (B, ...) by the per-example scalars ``a`` (B,) (or by a plain scalar)."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) * x


def _sum_except_batch(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def geometric_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
  """SMLD's noise levels σ_i = σ_min (σ_max/σ_min)^{i/(n-1)}, i = 0..n-1, ascending, float32 (n,).

  The table the NCSN-family networks are built with (``models.utils.get_sigmas``): float64 rounded once
  to float32, as the reference's ``get_sigmas``. It is evaluated from σ_max down, as the reference did,
  because linspace in the other direction rounds a few float64 values differently.
  ``VESDE.discrete_sigmas`` holds the same levels computed in float32 (relative difference < 1e-6).
  """
  descending = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n)).astype(np.float32)
  return descending[::-1]


class SDE(abc.ABC):
  """dx = f(x, t) dt + g(t) dw on [0, T] (eq. 5), with N steps for discretised samplers."""

  def __init__(self, N: int):
    if int(N) < 1:
      raise ValueError(f'N (config.model.num_scales) must be a positive integer, got {N}.')
    self.N = int(N)

  @property
  @abc.abstractmethod
  def T(self) -> float:
    """End time of the forward SDE."""

  @abc.abstractmethod
  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Drift f(x, t) (like x) and diffusion g(t) (B,)."""

  @abc.abstractmethod
  def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
    """(a(t), s(t)), each (B,), with p_0t(x(t) | x(0)) = N(a(t) x(0), s(t)^2 I)."""

  def marginal_prob(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Mean (like x) and std (B,) of the perturbation kernel p_0t(x(t) | x(0) = x)."""
    scale, std = self.marginal_coeffs(t)
    return batch_mul(scale, x), std

  @abc.abstractmethod
  def prior_sampling(self, rng: Array, shape: tuple[int, ...]) -> Array:
    """A sample of p_T, the prior the reverse process starts from."""

  @abc.abstractmethod
  def prior_logp(self, z: Array) -> Array:
    """log p_T(z), summed over all but the batch dimension: (B,)."""

  def noise_level_time(self, sigma) -> np.ndarray:
    """t_σ, float64 like ``sigma``: the time at which the kernel's noise-to-signal ratio s(t)/a(t) is σ.

    x(t) = a(t) (x(0) + (s/a) z), so at t_σ the SDE's x(t) is a(t) times the data perturbed by σ z in
    data units (for VE, a = 1 and s = σ(t)). Raises ValueError naming σ when it lies outside what
    [0, T] reaches.
    """
    sigma = np.asarray(sigma, np.float64)
    if np.any(~np.isfinite(sigma)) or np.any(sigma <= 0):
      raise ValueError(f'noise levels must be positive and finite, got {sigma.tolist()}.')
    t = self.time_of_noise_to_signal(sigma, np)
    outside = (t < -1e-6 * self.T) | (t > self.T * (1 + 1e-6))
    if np.any(outside):
      raise ValueError(f'noise level(s) {np.atleast_1d(sigma)[np.atleast_1d(outside)].tolist()} '
                       f'are not reached by {type(self).__name__} on [0, {self.T}]: its noise-to-signal '
                       f'ratio runs from {self.noise_to_signal(0.):.4g} to {self.noise_to_signal(self.T):.4g}.')
    return np.clip(t, 0., self.T)

  def noise_to_signal(self, t: float) -> float:
    """s(t)/a(t) at one time t (host float)."""
    with jax.ensure_compile_time_eval():  # also when called while tracing
      scale, std = self.marginal_coeffs(jnp.full((1,), t, jnp.float32))
      return float(std[0] / scale[0])

  @abc.abstractmethod
  def time_of_noise_to_signal(self, ratio: Array, xp=jnp) -> Array:
    """The t with s(t)/a(t) = ``ratio``, in closed form, unchecked: traced on device with ``xp=jnp``
    (importance sampling of t), or in float64 on the host with ``xp=np`` (``noise_level_time``)."""

  def discrete_time(self, t: Array) -> Array:
    """t (N-1) / T, (B,) float: where t lies on the grid of the N discrete steps."""
    return t * (self.N - 1) / self.T

  def timestep_index(self, t: Array) -> Array:
    """The step i of the discrete chain at time t, (B,) int32: the reference's int(t (N-1) / T).

    Truncation, not rounding, as the reference: on the samplers' times linspace(T, eps, N) it gives
    N-1, N-2, ..., 0, each step's own entry of the discrete tables.
    """
    return self.discrete_time(t).astype(jnp.int32)

  def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
    """x_{i+1} = x_i + f_i(x_i) + G_i z_i; Euler-Maruyama with step T/N unless overridden."""
    dt = self.T / self.N
    drift, diffusion = self.sde(x, t)
    return drift * dt, diffusion * np.sqrt(dt)

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> 'ReverseSDE':
    """The reverse-time SDE (eq. 6) or, with ``probability_flow``, the probability-flow ODE (eq. 13)."""
    return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
  """dx = [f - c g^2 score] dt + [g dw if SDE], c = 1 (reverse SDE) or 1/2 (probability-flow ODE).

  Time runs backwards: the drift returned is the coefficient of dt, and samplers step with dt < 0.
  """

  def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
    self.forward = forward
    self.score_fn = score_fn
    self.probability_flow = bool(probability_flow)
    self.N = forward.N
    self.T = forward.T

  @property
  def _score_coeff(self) -> float:
    return 0.5 if self.probability_flow else 1.0

  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    drift, diffusion = self.forward.sde(x, t)
    drift = drift - batch_mul(diffusion**2 * self._score_coeff, self.score_fn(x, t))
    if self.probability_flow:
      diffusion = jnp.zeros_like(diffusion)
    return drift, diffusion

  def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
    """(f, G) of the reverse step x_{i-1} = x_i - f + G z, from the forward discretisation."""
    f, G = self.forward.discretize(x, t)
    rev_f = f - batch_mul(G**2 * self._score_coeff, self.score_fn(x, t))
    rev_G = jnp.zeros_like(G) if self.probability_flow else G
    return rev_f, rev_G


class _LinearBetaSDE(SDE):
  """What VP and sub-VP share: β(t) = β₀ + t(β₁-β₀) on [0, 1], mean coefficient e^{L(t)}, N(0, I) prior."""

  def __init__(self, beta_min: float = 0.1, beta_max: float = 20., N: int = 1000):
    super().__init__(N)
    if not 0 <= beta_min <= beta_max:
      raise ValueError(f'need 0 <= beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}.')
    self.beta_0 = float(beta_min)
    self.beta_1 = float(beta_max)

  @property
  def T(self) -> float:
    return 1.

  def beta(self, t: Array) -> Array:
    return self.beta_0 + t * (self.beta_1 - self.beta_0)

  def log_mean_coeff(self, t: Array) -> Array:
    """L(t) = -∫_0^t β(s) ds / 2 = -t²(β₁-β₀)/4 - tβ₀/2 (eq. 29)."""
    return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

  def _neg_log_mean_at(self, ratio: Array, xp) -> Array:
    """-L(t), where s/a = ratio (VP: s/a = √(e^{-2L} - 1))."""
    return 0.5 * xp.log1p(ratio**2)

  def time_of_noise_to_signal(self, ratio: Array, xp=jnp) -> Array:
    # -L(t) = t²(β₁-β₀)/4 + tβ₀/2 = c: the positive root of the quadratic, written without the
    # cancellation of (√(β₀²/4 + (β₁-β₀)c) - β₀/2) at small c (float32 on device).
    c = self._neg_log_mean_at(ratio, xp)
    return 2. * c / (0.5 * self.beta_0 + xp.sqrt(0.25 * self.beta_0**2 + (self.beta_1 - self.beta_0) * c))

  def discrete_beta(self, index: Array) -> Array:
    """DDPM's β_i = (β₀ + i (β₁-β₀)/(N-1)) / N in closed form, (B,), for a traced step ``index``.

    The Langevin corrector's α_i = 1 - β_i (Alg. 5) reads it: it serves sub-VP, which has no table,
    and gives the values that corrector always had; VP's ``discrete_betas`` table (a float32 linspace)
    differs from it by a few ulps at some steps.
    """
    return (self.beta_0 + index * (self.beta_1 - self.beta_0) / max(self.N - 1, 1)) / self.N

  def prior_sampling(self, rng, shape):
    return jax.random.normal(rng, shape)

  def prior_logp(self, z):
    dim = np.prod(z.shape[1:])
    return -0.5 * dim * np.log(2 * np.pi) - 0.5 * _sum_except_batch(z**2)


class VPSDE(_LinearBetaSDE):
  """Variance-preserving SDE (eq. 11), the continuous limit of DDPM: dx = -β(t)x/2 dt + √β(t) dw."""

  def __init__(self, beta_min: float = 0.1, beta_max: float = 20., N: int = 1000):
    super().__init__(beta_min, beta_max, N)
    # DDPM's discrete schedule β_i = β̄_i / N (Ho et al. 2020), float32 as in the reference.
    self.discrete_betas = jnp.linspace(beta_min / N, beta_max / N, N, dtype=jnp.float32)
    self.alphas = 1. - self.discrete_betas
    self.alphas_cumprod = jnp.cumprod(self.alphas)
    self.sqrt_alphas_cumprod = jnp.sqrt(self.alphas_cumprod)
    self.sqrt_1m_alphas_cumprod = jnp.sqrt(1. - self.alphas_cumprod)

  def sde(self, x, t):
    beta_t = self.beta(t)
    return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t)

  def marginal_coeffs(self, t):
    log_mean = self.log_mean_coeff(t)
    # -expm1 keeps the std accurate for small t, where 1 - e^{2L} cancels catastrophically.
    return jnp.exp(log_mean), jnp.sqrt(-jnp.expm1(2. * log_mean))

  def discretize(self, x, t):
    """DDPM ancestral step: x_{i+1} = √(1-β_i) x_i + √β_i z_i."""
    index = self.timestep_index(t)
    beta = self.discrete_betas[index]
    alpha = self.alphas[index]
    return batch_mul(jnp.sqrt(alpha), x) - x, jnp.sqrt(beta)

  def noise_label(self, t: Array) -> Array:
    """The discretely trained (DDPM) network's label at time t: the step t (N-1) / T, (B,) float,
    left fractional as the reference's score function passes it."""
    return self.discrete_time(t)

  def ancestral_coefficients(self, index: Array) -> tuple[Array, Array, Array]:
    """(a_i, b_i, c_i), each (B,), of DDPM's ancestral step x_{i-1} = a_i (x_i + b_i s) + c_i z (eq. 4):
    a_i = 1/√(1-β_i), b_i = β_i, c_i = √β_i."""
    beta = self.discrete_betas[index]
    return 1. / jnp.sqrt(1. - beta), beta, jnp.sqrt(beta)


class subVPSDE(_LinearBetaSDE):  # pylint: disable=invalid-name  (the reference's public name)
  """Sub-VP SDE (eq. 17): dx = -β(t)x/2 dt + √(β(t)(1 - e^{-2∫β})) dw; variance below VP's."""

  def sde(self, x, t):
    beta_t = self.beta(t)
    discount = -jnp.expm1(-2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t**2)
    return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t * discount)

  def _neg_log_mean_at(self, ratio, xp):
    # s/a = e^{-L} - e^{L} = ratio: -L = asinh(ratio / 2).
    return xp.arcsinh(0.5 * ratio)

  def marginal_coeffs(self, t):
    log_mean = self.log_mean_coeff(t)
    # The std itself is 1 - e^{2L} (eq. 29's variance is its square), not its square root.
    return jnp.exp(log_mean), -jnp.expm1(2. * log_mean)


class VESDE(SDE):
  """Variance-exploding SDE (eq. 9), the continuous limit of SMLD: dx = √(d[σ²(t)]/dt) dw."""

  def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50., N: int = 1000):
    super().__init__(N)
    if not 0 < sigma_min < sigma_max:
      raise ValueError(f'need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.')
    self.sigma_min = float(sigma_min)
    self.sigma_max = float(sigma_max)
    # σ_0 < ... < σ_{N-1}, ascending with the step i = timestep_index(t). Computed in float32, as the
    # reference's SDE; the networks' float64-rounded table is geometric_sigmas (a few ulps apart).
    self.discrete_sigmas = jnp.exp(jnp.linspace(np.log(sigma_min), np.log(sigma_max), N))

  @property
  def T(self) -> float:
    return 1.

  def sigma(self, t: Array) -> Array:
    return self.sigma_min * (self.sigma_max / self.sigma_min)**t

  def time_of_noise_to_signal(self, ratio, xp=jnp):
    return xp.log(ratio / self.sigma_min) / np.log(self.sigma_max / self.sigma_min)

  def sde(self, x, t):
    diffusion = self.sigma(t) * np.sqrt(2 * (np.log(self.sigma_max) - np.log(self.sigma_min)))
    return jnp.zeros_like(x), diffusion

  def marginal_coeffs(self, t):
    return jnp.ones_like(t), self.sigma(t)

  def prior_sampling(self, rng, shape):
    return jax.random.normal(rng, shape) * self.sigma_max

  def prior_logp(self, z):
    dim = np.prod(z.shape[1:])
    return (-0.5 * dim * np.log(2 * np.pi * self.sigma_max**2)
            - _sum_except_batch(z**2) / (2 * self.sigma_max**2))

  def adjacent_sigma(self, index: Array) -> Array:
    """σ_{i-1}, the next smaller noise level of step i, (B,); σ_{-1} = 0 (the data)."""
    return jnp.where(index == 0, 0., self.discrete_sigmas[jnp.maximum(index - 1, 0)])

  def discretize(self, x, t):
    """SMLD step: x_{i+1} = x_i + √(σ_{i+1}² - σ_i²) z_i, with σ_{-1} = 0."""
    index = self.timestep_index(t)
    sigma = self.discrete_sigmas[index]
    adjacent = self.adjacent_sigma(index)
    return jnp.zeros_like(x), jnp.sqrt(sigma**2 - adjacent**2)

  def noise_label(self, t: Array) -> Array:
    """The discretely trained (SMLD/NCSN) network's label at time t, (B,) int32: round((T-t)(N-1)).

    NCSN numbers its noise levels from the largest (Song & Ermon 2019, σ_1 > ... > σ_L), so label j is
    step N-1-j; rounded, not truncated like ``timestep_index``, as the reference's score function.
    """
    return jnp.round((self.T - t) * (self.N - 1)).astype(jnp.int32)

  def label_sigma(self, label: Array) -> Array:
    """σ of the network label ``label`` (see ``noise_label``): σ_{N-1-label}, (B,)."""
    return self.discrete_sigmas[self.N - 1 - label]

  def ancestral_coefficients(self, index: Array) -> tuple[Array, Array, Array]:
    """(a_i, b_i, c_i), each (B,), of SMLD's ancestral step x_{i-1} = a_i (x_i + b_i s) + c_i z
    (eq. 47): a_i = 1, b_i = σ_i² - σ_{i-1}², c_i = √(σ_{i-1}² (σ_i² - σ_{i-1}²) / σ_i²)."""
    sigma = self.discrete_sigmas[index]
    adjacent = self.adjacent_sigma(index)
    step = sigma**2 - adjacent**2
    return jnp.ones_like(sigma), step, jnp.sqrt(adjacent**2 * step / sigma**2)


SDES = {'vesde': VESDE, 'vpsde': VPSDE, 'subvpsde': subVPSDE}


def get_sde(config) -> SDE:
  """The SDE named by ``config.training.sde`` with its ``config.model`` parameters."""
  name = str(config.training.sde).lower()
  if name not in SDES:
    raise ValueError(f'config.training.sde={config.training.sde!r} is not known; '
                     f'choose one of {sorted(SDES)}.')
  model = config.model
  if name == 'vesde':
    return VESDE(sigma_min=model.sigma_min, sigma_max=model.sigma_max, N=model.num_scales)
  return SDES[name](beta_min=model.beta_min, beta_max=model.beta_max, N=model.num_scales)
