"""The likelihood weighting of score matching: importance-sampled time and the ELBO on -log p.

Song, Durkan, Murray, Ermon, "Maximum Likelihood Training of Score-Based Diffusion Models", NeurIPS 2021
(arXiv:2101.09258; the score_flow code). Their Thm. 1: with λ(t) = g(t)², the weighted score-matching
loss bounds the KL divergence from the data to the model, and (their Thm. 2 / eq. 10) for each x

  -log p_θ(x) ≤ L(x) = -E[log π(x_T)] + ½ ∫ E[g² ‖s_θ(x_t, t) - ∇ log p_0t(x_t | x)‖²] dt
                       - ½ ∫ E[g² ‖∇ log p_0t(x_t | x)‖² + 2 ∇·f(x_t, t)] dt,              (ELBO)

x_t ~ p_0t(· | x) = N(a(t) x, s(t)² I). The integrals run over [eps, T] (score_flow's eps = 1e-5), which
drops an O(eps) piece of the bound.

Why one sampler serves all three SDEs: their drifts are linear, f = (ȧ/a) x, so the kernel's
noise-to-signal ratio ρ(t) = s(t)/a(t) obeys dρ²/dt = g²/a² (the variance ODE ds²/dt = 2(ȧ/a)s² + g²),
and therefore

  g(t)² / s(t)² = d/dt log ρ(t)².

The proposal q(t) ∝ g²/s² of the paper's variance reduction (Sec. 5.1) thus has the CDF
(log ρ(t)² - log ρ(eps)²) / Z with Z = log ρ(T)² - log ρ(eps)²: t ~ q is the time where log ρ reaches
log ρ(eps) + u (log ρ(T) - log ρ(eps)), u ~ U(0, 1), found in closed form by
``sde.time_of_noise_to_signal`` (ρ increases with t). For VE, ρ = σ(t) is log-linear in t and q is uniform.
With t ~ q, g² ‖s_θ + z/s‖² / ((T - eps) q(t)) = ‖s·s_θ + z‖² Z / (T - eps), whose mean over q is the
mean of the likelihood-weighted loss over t ~ U(eps, T): the importance-sampled loss is unbiased.

The last integral of (ELBO) is closed form: E‖∇ log p_0t‖² = D/s², ∇·f = D ȧ/a, and
g²/s² + 2ȧ/a = d/dt log s², so it equals -D log(s(T)/s(eps)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from scoresde import sde_lib

Array = jax.Array

def log_noise_to_signal(sde: sde_lib.SDE, t: Array) -> Array:
  """log ρ(t) = log s(t) - log a(t) for t (B,): (B,)."""
  scale, std = sde.marginal_coeffs(t)
  return jnp.log(std) - jnp.log(scale)


def _log_ratio_at(sde: sde_lib.SDE, t: float) -> Array:
  return log_noise_to_signal(sde, jnp.full((1,), t, jnp.float32))[0]


def importance_normalizer(sde: sde_lib.SDE, eps: float) -> Array:
  """Z = ∫_eps^T g(t)²/s(t)² dt = 2 (log ρ(T) - log ρ(eps)), a scalar."""
  return 2. * (_log_ratio_at(sde, sde.T) - _log_ratio_at(sde, eps))


def importance_time(rng: Array, sde: sde_lib.SDE, shape: tuple[int, ...], eps: float) -> Array:
  """Times of the given shape drawn from q(t) = g(t)² / (s(t)² Z) on [eps, T] (see the module doc)."""
  low_end, high_end = _log_ratio_at(sde, eps), _log_ratio_at(sde, sde.T)
  target = low_end + jax.random.uniform(rng, shape) * (high_end - low_end)
  return jnp.clip(sde.time_of_noise_to_signal(jnp.exp(target)), eps, sde.T)


def elbo(rng: Array, score_fn: sde_lib.ScoreFn, sde: sde_lib.SDE, x: Array, *, eps: float,
         num_samples: int) -> Array:
  """L(x) of (ELBO) in nats, an upper bound on -log p_θ(x) of the model whose score is ``score_fn``: (B,).

  ``x`` (B, ...) is in the model's data space. The time integral is estimated with ``num_samples``
  importance-sampled times per example (t ~ q, one z each); the prior term with one x_T per time.
  """
  batch, dim = x.shape[0], math.prod(x.shape[1:])
  rng_t, rng_z = jax.random.split(rng)
  t = importance_time(rng_t, sde, (num_samples * batch,), eps)
  xs = jnp.tile(x, (num_samples,) + (1,) * (x.ndim - 1))
  z = jax.random.normal(rng_z, xs.shape)
  mean, std = sde.marginal_prob(xs, t)
  residual = sde_lib.batch_mul(std, score_fn(mean + sde_lib.batch_mul(std, z), t)) + z
  matching = 0.5 * importance_normalizer(sde, eps) * jnp.sum(residual.reshape(xs.shape[0], -1)**2, -1)

  ones = jnp.ones((xs.shape[0],), jnp.float32)
  mean_T, std_T = sde.marginal_prob(xs, sde.T * ones)
  prior = -sde.prior_logp(mean_T + sde_lib.batch_mul(std_T, z))
  _, std_end = sde.marginal_coeffs(jnp.asarray([eps, sde.T], jnp.float32))
  closed_form = -dim * (jnp.log(std_end[1]) - jnp.log(std_end[0]))
  return jnp.mean((matching + prior).reshape(num_samples, batch), axis=0) + closed_form
