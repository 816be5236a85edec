"""Exact marginal scores of isotropic Gaussian mixtures without batched linear algebra.

``analytic.score_fn`` solves with each example's covariances; on jaxlib 0.10.2's CPU backend, large
batches of those LAPACK calls inside a sampler loop deadlocked the XLA thread pool (seen at 20,000
samples). For isotropic components N(μ_k, s_k² I) the marginal at time t is N(a μ_k, (a² s_k² + σ²) I)
(a, σ = ``sde.marginal_coeffs(t)``), whose score Σ_k r_k(x) (a μ_k - x) / v_k needs no solve. Tests check
it against ``analytic.score_fn``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import analytic
import sde_lib


def component_stds(data: analytic.GaussianMixture) -> np.ndarray:
  """s_k of an isotropic mixture (raises if a covariance is not a multiple of the identity)."""
  covs = np.asarray(data.covs)
  variances = covs[:, 0, 0]
  if not np.allclose(covs, variances[:, None, None] * np.eye(data.dim)[None]):
    raise ValueError('the mixture has non-isotropic covariances; use analytic.score_fn.')
  return np.sqrt(variances)


def score_fn(sde: sde_lib.SDE, data: analytic.GaussianMixture) -> sde_lib.ScoreFn:
  """∇ₓ log p_t(x) for x (B, ...) flattened to D, t (B,)."""
  stds = jnp.asarray(component_stds(data))
  log_weights = jnp.log(data.weights)
  means = data.means

  def score(x, t):
    flat = x.reshape(x.shape[0], -1)
    scale, std = sde.marginal_coeffs(t)
    var = scale[:, None]**2 * stds[None]**2 + std[:, None]**2  # (B, K)
    diff = scale[:, None, None] * means[None] - flat[:, None]  # (B, K, D)
    logits = (log_weights[None] - 0.5 * jnp.sum(diff**2, -1) / var
              - 0.5 * data.dim * jnp.log(var))
    resp = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum('bk,bkd->bd', resp / var, diff).reshape(x.shape)
  return score
