"""Fast samplers (10-50 score evaluations) for VE, VP and sub-VP, each written once in EDM's view.

Every SDE here has the Gaussian perturbation kernel x_t = a(t) x_0 + std(t) n (``SDE.marginal_coeffs``),
which is EDM's form x_t = s(t) (x_0 + σ̃(t) n) with s = a and σ̃ = std / a (Karras et al. 2022, eq. 10-11).
In the scaled variable x̂ = x / s the probability-flow ODE of any of them is dx̂/dσ̃ = (x̂ - D(x̂; σ̃)) / σ̃
(EDM eq. 4 with s divided out), D the denoiser E[x_0 | x_t] (Tweedie: D = (x + std² ∇log p_t(x)) / a), so
a solver written for x̂ and σ̃ runs on all three SDEs and takes only ``score_fn(x, t)``. ``EDMView`` is
that change of variables; nothing in this module types a schedule formula of its own.

Papers:
  Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative Models",
    NeurIPS 2022 (arXiv:2206.00364): Alg. 1 (``heun``), Alg. 2 (``edm_stochastic``), eq. 5 (ρ-schedule).
  Lu, Zhou, Bao, Chen, Li, Zhu, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling
    in Around 10 Steps", NeurIPS 2022 (arXiv:2206.00927): the third-order single-step solver (Alg. 2, with
    r₁ = 1/3, r₂ = 2/3), written here for the data prediction as DPM-Solver++ does.
  Lu, Zhou, Bao, Chen, Li, Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models" (arXiv:2211.01095): the multistep second-order solver with data prediction (Alg. 2, "2M").
  Jolicoeur-Martineau, Li, Piché-Taillefer, Kachman, Mitliagkas, "Gotta Go Fast When Generating Data with
    Score-Based Models" (arXiv:2105.14080): the adaptive reverse-SDE solver (Alg. 1, ``ggf``).

Conventions: a fixed-step solver runs over a grid of ``n`` times t_0 = T > ... > t_{n-1} = eps and then takes
the last step to σ̃ = 0 (EDM's t_N = 0), which for every method here is x_0 = D(x_{n-1}; t_{n-1}): the
denoised mean, what every sampler returns (the reference's ``x_mean`` convention). ``n`` counts that step,
as EDM's ``num_steps`` does (n = 18 is Heun's 35 evaluations). Solvers are pure JAX functions of a
``Denoiser`` and of ``Noise`` (per-sample standard normals by step index), so the caller owns the keys.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scoresde import sde_lib

Array = jax.Array
# D(x̂, t): the denoised mean E[x_0 | x_t = s(t) x̂] for x̂ (B, ...) at one scalar time t.
Denoiser = Callable[[Array, Array], Array]
# noise(index, like): standard normals like ``like`` (B, ...), row b drawn from sample b's key folded with
# ``index`` (a scalar, or (B,) for per-sample counters).
Noise = Callable[[Array, Array], Array]

@dataclasses.dataclass(frozen=True)
class EDMView:
  """An SDE seen as x_t = s(t) (x_0 + σ̃(t) n), s and σ̃ read off ``sde.marginal_coeffs``."""
  sde: sde_lib.SDE

  def coeffs(self, t: Array) -> tuple[Array, Array]:
    """(s(t), σ̃(t)) for times t of any shape."""
    t = jnp.asarray(t)
    scale, std = self.sde.marginal_coeffs(t.reshape(-1))
    return scale.reshape(t.shape), (std / scale).reshape(t.shape)

  def sigma(self, t: Array) -> Array:
    return self.coeffs(t)[1]

  def time_of_sigma(self, sigma: Array, eps: float) -> Array:
    """t in [eps, T] with σ̃(t) = sigma (σ̃ clipped to [σ̃(eps), σ̃(T)]), by the SDE's own closed-form
    inverse (``sde_lib.SDE.noise_level_time``: σ̃ is its noise-to-signal ratio). For build-time grids on
    the host, not for traced loops."""
    dtype = jnp.asarray(sigma).dtype
    low, high = float(self.sigma(eps)), float(self.sigma(self.sde.T))
    sigma = np.clip(np.asarray(sigma, np.float64), low, high)
    return jnp.asarray(np.clip(self.sde.noise_level_time(sigma), eps, self.sde.T), dtype)

  def denoiser(self, score_fn: sde_lib.ScoreFn) -> Denoiser:
    """D(x̂, t) = x̂ + s σ̃² ∇ₓ log p_t(s x̂): Tweedie's E[x_0 | x_t] in EDM's variables."""
    def denoise(x_hat: Array, t: Array) -> Array:
      scale, sigma = self.coeffs(t)
      score = score_fn(scale * x_hat, jnp.full((x_hat.shape[0],), t))
      return x_hat + scale * sigma**2 * score
    return denoise


# ----------------------------------------------------------------------------------------------------
# Time-step schedules: n times from T down to eps.


def _edm_rho(view: EDMView, n: int, eps: float, rho: float) -> Array:
  """EDM eq. 5: σ̃_i = (σ̃_max^{1/ρ} + i/(n-1) (σ̃_min^{1/ρ} - σ̃_max^{1/ρ}))^ρ, ρ = 7 by default: denser
  steps at low noise, where the ODE's curvature is."""
  hi, lo = view.sigma(view.sde.T) ** (1 / rho), view.sigma(eps) ** (1 / rho)
  return view.time_of_sigma((hi + jnp.linspace(0., 1., n) * (lo - hi)) ** rho, eps)


def _uniform_t(view: EDMView, n: int, eps: float, rho: float) -> Array:
  del rho
  return jnp.linspace(view.sde.T, eps, n)


def _uniform_log_snr(view: EDMView, n: int, eps: float, rho: float) -> Array:
  """Uniform in λ = -log σ̃ (half the log-SNR), DPM-Solver's choice for pixel-space models."""
  del rho
  lam = jnp.linspace(-jnp.log(view.sigma(view.sde.T)), -jnp.log(view.sigma(eps)), n)
  return view.time_of_sigma(jnp.exp(-lam), eps)


SCHEDULES: dict[str, Callable[[EDMView, int, float, float], Array]] = {
    'edm': _edm_rho, 'uniform_t': _uniform_t, 'logsnr': _uniform_log_snr}


# 'auto' (the default): per method and SDE, the schedule measured to reach the Gaussian mixture's
# sampling floor at 35 evaluations (tests/test_fast_samplers.py). Heun on VP and sub-VP takes steps
# uniform in t, the schedule of EDM's Table 1 for its VP sampler: with the ρ-schedule 17 Heun steps
# leave about two between σ̃ = 4 and 1, where the mixture's denoiser turns, and miss the floor until
# ~51 evaluations. DPM-Solver++(2M) needs the ρ-schedule there (uniform t misses the floor at 35), and
# every method on VE takes it.
AUTO_SCHEDULE = 'auto'


def resolve_schedule(schedule: str, method: str, sde: sde_lib.SDE) -> str:
  """``schedule`` itself, or for ``'auto'`` the measured choice for ``method`` on ``sde``."""
  if schedule != AUTO_SCHEDULE:
    return schedule
  return 'uniform_t' if method == 'heun' and not isinstance(sde, sde_lib.VESDE) else 'edm'


class Grid(NamedTuple):
  """The n times of a fixed-step solver and their σ̃, all (n,), descending; t[0] = T and t[-1] = eps."""
  t: Array
  sigma: Array


def time_grid(view: EDMView, schedule: str, n: int, eps: float, rho: float) -> Grid:
  """Times by ``schedule`` (a key of ``SCHEDULES``), with the end points exactly T and eps."""
  if schedule not in SCHEDULES:
    raise ValueError(f'schedule {schedule!r} (config.sampling.schedule) is not known; choose one of '
                     f'{sorted(SCHEDULES)}.')
  if int(n) < 2:
    raise ValueError(f'num_steps (config.sampling.num_steps) must be >= 2, got {n}.')
  t = SCHEDULES[schedule](view, int(n), float(eps), float(rho))
  t = t.at[0].set(view.sde.T).at[-1].set(eps)
  return Grid(t, view.sigma(t))


# ----------------------------------------------------------------------------------------------------
# Fixed-step solvers: build-time coefficients, then ``solve(denoise, noise, x̂_T) -> x_0``.


class Solver(NamedTuple):
  """A fixed-step sampler: ``solve(denoise, noise, x_hat)`` maps x̂ at t = T (B, ...) to the denoised
  x_0; ``nfe`` is its exact number of denoiser (score) evaluations per sample."""
  solve: Callable[[Denoiser, Noise, Array], Array]
  nfe: int


def _heun_step(denoise: Denoiser, x: Array, sigma: Array, t: Array, sigma_next: Array, t_next: Array,
               order: int) -> Array:
  """One step of EDM Alg. 1 from σ̃ to σ̃_next: Euler (lines 4-5), then Heun's correction (6-7)."""
  d = (x - denoise(x, t)) / sigma
  x_next = x + (sigma_next - sigma) * d
  if order == 1:
    return x_next
  d_next = (x_next - denoise(x_next, t_next)) / sigma_next
  return x + (sigma_next - sigma) * 0.5 * (d + d_next)


def heun(grid: Grid, order: int = 2) -> Solver:
  """EDM's deterministic sampler (Alg. 1): Heun's 2nd-order method in σ̃ (``order`` 1: Euler), the last
  step to σ̃ = 0 Euler's, which is x_0 = D. 2(n-1) + 1 evaluations (Euler: n)."""
  if order not in (1, 2):
    raise ValueError(f'order must be 1 (Euler) or 2 (Heun), got {order}.')
  n = grid.t.shape[0]

  def solve(denoise, noise, x):
    del noise
    def body(i, x):
      return _heun_step(denoise, x, grid.sigma[i], grid.t[i], grid.sigma[i + 1], grid.t[i + 1], order)
    x = jax.lax.fori_loop(0, n - 1, body, x)
    return denoise(x, grid.t[-1])

  return Solver(solve, order * (n - 1) + 1)


def edm_stochastic(view: EDMView, grid: Grid, eps: float, *, s_churn: float, s_tmin: float,
                   s_tmax: float, s_noise: float) -> Solver:
  """EDM's stochastic sampler (Alg. 2): before each step, noise is added to raise σ̃_i to
  σ̂_i = σ̃_i (1 + γ_i), γ_i = min(S_churn / n, √2 - 1) for σ̃_i ∈ [S_tmin, S_tmax] (else 0), with
  standard deviation S_noise √(σ̂_i² - σ̃_i²) (lines 4-6); then a Heun step from σ̂_i (lines 7-10).

  σ̂ is capped at σ̃(T): the SDEs here are not defined past T (EDM's σ has no such end). S_churn = 0 is
  ``heun``. 2(n-1) + 1 evaluations.
  """
  n = grid.t.shape[0]
  gamma = jnp.where((grid.sigma >= s_tmin) & (grid.sigma <= s_tmax),
                    min(float(s_churn) / n, np.sqrt(2.) - 1.), 0.)
  sigma_hat = jnp.minimum(grid.sigma * (1. + gamma), view.sigma(view.sde.T))
  # Unchurned steps keep their grid time exactly (the table inverse would add a tiny spurious kick).
  t_hat = jnp.where(sigma_hat > grid.sigma, view.time_of_sigma(sigma_hat, eps), grid.t)
  sigma_hat = view.sigma(t_hat)  # the σ̃ the score is evaluated at, exactly
  kick = float(s_noise) * jnp.sqrt(jnp.maximum(sigma_hat**2 - grid.sigma**2, 0.))

  def solve(denoise, noise, x):
    def churn(i, x):
      return x + kick[i] * noise(i, x)

    def body(i, x):
      return _heun_step(denoise, churn(i, x), sigma_hat[i], t_hat[i], grid.sigma[i + 1], grid.t[i + 1], 2)
    x = jax.lax.fori_loop(0, n - 1, body, x)
    return denoise(churn(n - 1, x), t_hat[-1])

  return Solver(solve, 2 * (n - 1) + 1)


def dpm_solver_2m(grid: Grid) -> Solver:
  """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in EDM's variables, where α = 1 and λ = -log σ̃:

    x̂_{i+1} = (σ̃_{i+1}/σ̃_i) x̂_i + (1 - e^{-h_i}) ((1 + 1/(2 r_i)) D_i - D_{i-1}/(2 r_i)),

  h_i = λ_{i+1} - λ_i, r_i = h_{i-1}/h_i; the first step is first order (DPM-Solver++1 = DDIM), the last
  (to σ̃ = 0, h = ∞) is x_0 = D_{n-1}. One evaluation per time: n.
  """
  n = grid.t.shape[0]
  lam = -jnp.log(grid.sigma)
  h = lam[1:] - lam[:-1]
  ratio = grid.sigma[1:] / grid.sigma[:-1]
  phi = -jnp.expm1(-h)
  r = jnp.concatenate([jnp.ones((1,), h.dtype), h[:-1] / h[1:]])
  w_prev = jnp.where(jnp.arange(n - 1) == 0, 0., 1. / (2. * r))

  def solve(denoise, noise, x):
    del noise
    def body(i, carry):
      x, d_prev = carry
      d = denoise(x, grid.t[i])
      return ratio[i] * x + phi[i] * ((1. + w_prev[i]) * d - w_prev[i] * d_prev), d
    x, _ = jax.lax.fori_loop(0, n - 1, body, (x, jnp.zeros_like(x)))
    return denoise(x, grid.t[-1])

  return Solver(solve, n)


def dpm_solver_3s(view: EDMView, grid: Grid, eps: float) -> Solver:
  """Third-order single-step DPM-Solver (Lu et al. 2022a, Alg. 2, r₁ = 1/3, r₂ = 2/3) with data
  prediction (as DPM-Solver++ writes it, 2022b App. B), in EDM's variables. Per step of λ-length h:

    u₁ = (σ̃_{s₁}/σ̃) x̂ + (1 - e^{-r₁h}) D(x̂)
    u₂ = (σ̃_{s₂}/σ̃) x̂ + (1 - e^{-r₂h}) D(x̂) + (r₂/r₁) φ₂(r₂h) (D(u₁) - D(x̂))
    x̂' = (σ̃'/σ̃) x̂ + (1 - e^{-h}) D(x̂) + (1/r₂) φ₂(h) (D(u₂) - D(x̂)),

  φ₂(h) = 1 + (e^{-h} - 1)/h, from x̂' = (σ̃'/σ̃) x̂ + σ̃' ∫ e^λ D(λ) dλ with D linear in λ over the step
  (the slope estimated from D(u₂) at r₂h; r₂ = 2/3 makes that third order). Three evaluations per step,
  plus the last D: 3(n-1) + 1.
  """
  n = grid.t.shape[0]
  r1, r2 = 1. / 3., 2. / 3.
  lam = -jnp.log(grid.sigma)
  h = lam[1:] - lam[:-1]
  t_s1 = view.time_of_sigma(jnp.exp(-(lam[:-1] + r1 * h)), eps)
  t_s2 = view.time_of_sigma(jnp.exp(-(lam[:-1] + r2 * h)), eps)
  sigma_s1, sigma_s2 = view.sigma(t_s1), view.sigma(t_s2)
  # Step lengths recomputed from the σ̃ actually reached, so the coefficients match the times evaluated.
  h1, h2 = jnp.log(grid.sigma[:-1] / sigma_s1), jnp.log(grid.sigma[:-1] / sigma_s2)

  def phi2(step):
    return 1. + jnp.expm1(-step) / step

  a1, b1 = sigma_s1 / grid.sigma[:-1], -jnp.expm1(-h1)
  a2, b2, c2 = sigma_s2 / grid.sigma[:-1], -jnp.expm1(-h2), (h2 / h1) * phi2(h2)
  a3, b3, c3 = grid.sigma[1:] / grid.sigma[:-1], -jnp.expm1(-h), (h / h2) * phi2(h)

  def solve(denoise, noise, x):
    del noise
    def body(i, x):
      d0 = denoise(x, grid.t[i])
      d1 = denoise(a1[i] * x + b1[i] * d0, t_s1[i])
      d2 = denoise(a2[i] * x + b2[i] * d0 + c2[i] * (d1 - d0), t_s2[i])
      return a3[i] * x + b3[i] * d0 + c3[i] * (d2 - d0)
    x = jax.lax.fori_loop(0, n - 1, body, x)
    return denoise(x, grid.t[-1])

  return Solver(solve, 3 * (n - 1) + 1)


# ----------------------------------------------------------------------------------------------------
# Gotta Go Fast: the adaptive reverse-SDE solver.

# Jolicoeur-Martineau et al. 2021, Sec. 3: the controller's safety factor θ and exponent r.
GGF_SAFETY = 0.9
GGF_EXPONENT = 0.9


def ggf(sde: sde_lib.SDE, score_fn: sde_lib.ScoreFn, noise: Noise, x: Array, eps: float, *, atol: float,
        rtol: float, h_init: float, max_steps: int) -> tuple[Array, Array, Array]:
  """Gotta Go Fast (Jolicoeur-Martineau et al. 2021, Alg. 1): the reverse SDE from x ~ p_T at t = T to
  eps with per-sample adaptive steps, then the denoised mean D(x; eps).

  Each attempt takes an Euler-Maruyama step x' and, with the same noise z, an improved-Euler step x''
  (Roberts 2012; x'' = (x' + x̃)/2, x̃ the EM step from x with the drift at (x', t - h)); the error
  E = ‖(x' - x'')/δ‖₂/√D with δ = max(atol, rtol·max(|x'|, |x'_prev|)) (elementwise; x'_prev the last
  accepted x') accepts the step when E ≤ 1, continuing from x'' (extrapolation), and the next step is
  h = min(t - eps, θ h E^{-r}). Samples step independently (a finished one is frozen), each drawing its
  k-th attempt's noise as ``noise(k)``, so a sample does not depend on the others.

  Returns x_0 (B, ...), the evaluations per sample (B,) int32 (two per attempt, one for D) and whether
  each sample reached eps within ``max_steps`` attempts (B,) bool.
  """
  reverse = sde.reverse(score_fn)
  batch = x.shape[0]

  def per_sample(flags: Array) -> Array:
    return flags.reshape((batch,) + (1,) * (x.ndim - 1))

  def em_step(x_from: Array, x_at: Array, t_at: Array, h: Array, z: Array) -> Array:
    # Reverse time: the drift multiplies dt = -h; noise √h g z.
    drift, diffusion = reverse.sde(x_at, t_at)
    return x_from - sde_lib.batch_mul(h, drift) + sde_lib.batch_mul(jnp.sqrt(h) * diffusion, z)

  def cond(state):
    _, _, t, _, _, step = state
    return jnp.any(t > eps) & (step < max_steps)

  def body(state):
    x, x_prev, t, h, attempts, step = state
    active = t > eps
    h = jnp.minimum(h, t - eps)
    z = noise(attempts, x)
    x_low = em_step(x, x, t, h, z)
    x_high = 0.5 * (x_low + em_step(x, x_low, t - h, h, z))
    delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
    error = jnp.sqrt(jnp.mean(((x_low - x_high) / delta).reshape(batch, -1)**2, axis=-1))
    accept = active & (error <= 1.)
    x = jnp.where(per_sample(accept), x_high, x)
    x_prev = jnp.where(per_sample(accept), x_low, x_prev)
    # The step that reaches eps lands on it exactly (t - (t - eps) may round past it).
    t = jnp.where(accept, jnp.where(h >= t - eps, eps, t - h), t)
    h_next = GGF_SAFETY * h * jnp.maximum(error, 1e-10) ** -GGF_EXPONENT
    h = jnp.where(active, jnp.minimum(h_next, t - eps), h)
    return x, x_prev, t, h, attempts + active.astype(attempts.dtype), step + 1

  t0 = jnp.full((batch,), sde.T, x.dtype)
  h0 = jnp.full((batch,), h_init, x.dtype)
  state = (x, x, t0, h0, jnp.zeros((batch,), jnp.int32), jnp.int32(0))
  x, _, t, _, attempts, _ = jax.lax.while_loop(cond, body, state)
  view = EDMView(sde)
  x0 = view.denoiser(score_fn)(x / view.coeffs(eps)[0], jnp.asarray(eps, x.dtype))
  return x0, 2 * attempts + 1, t <= eps
