"""Exact marginal scores and log-densities for Gaussian-mixture data under the linear SDEs.

For data x(0) ~ Σ_k w_k N(μ_k, Σ_k) and any SDE whose perturbation kernel is
p_0t(x(t) | x(0)) = N(a(t) x(0), s(t)² I) (VE, VP and sub-VP all are; ``SDE.marginal_coeffs``), the
marginal p_t is again a mixture: Σ_k w_k N(a μ_k, a² Σ_k + s² I). Its score and log-density are closed
form at every t, so samplers, losses and likelihoods can be tested against truth, and a plain
``score_fn(x, t)`` built here is interchangeable with a trained network's.

A single Gaussian is the mixture with one component.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scoresde import sde_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """Σ_k w_k N(μ_k, Σ_k) over flat vectors of dimension D.

  Attributes:
    weights: (K,) mixture weights, summing to one.
    means: (K, D).
    covs: (K, D, D), symmetric positive definite.
  """
  weights: Array
  means: Array
  covs: Array

  def __post_init__(self):
    k, d = self.means.shape
    if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
      raise ValueError(f'inconsistent shapes: weights {self.weights.shape}, means {self.means.shape}, '
                       f'covs {self.covs.shape}; expected (K,), (K, D), (K, D, D).')

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  def sample(self, rng: Array, n: int) -> Array:
    """n samples, (n, D)."""
    rng_k, rng_z = jax.random.split(rng)
    k = jax.random.choice(rng_k, self.weights.shape[0], (n,), p=self.weights)
    chol = jnp.linalg.cholesky(self.covs)
    z = jax.random.normal(rng_z, (n, self.dim))
    return self.means[k] + jnp.einsum('nij,nj->ni', chol[k], z)

  def mean(self) -> Array:
    return self.weights @ self.means

  def cov(self) -> Array:
    centred = self.means - self.mean()
    return (jnp.einsum('k,kij->ij', self.weights, self.covs)
            + jnp.einsum('k,ki,kj->ij', self.weights, centred, centred))

  def diffuse(self, scale: Array, std: Array) -> 'GaussianMixture':
    """The law of a·x + s·z, z ~ N(0, I): the marginal of the SDE at a time with coefficients (a, s)."""
    eye = jnp.eye(self.dim)
    return GaussianMixture(self.weights, scale * self.means, scale**2 * self.covs + std**2 * eye)

  def component_log_probs(self, x: Array) -> Array:
    """log w_k + log N(x; μ_k, Σ_k) for one point x (D,): (K,)."""
    chol = jnp.linalg.cholesky(self.covs)
    diff = x[None] - self.means
    white = jax.vmap(lambda l, v: jax.scipy.linalg.solve_triangular(l, v, lower=True))(chol, diff)
    logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=1, axis2=2)), axis=1)
    return (jnp.log(self.weights) - 0.5 * jnp.sum(white**2, axis=1)
            - 0.5 * logdet - 0.5 * self.dim * jnp.log(2 * jnp.pi))

  def log_prob(self, x: Array) -> Array:
    """log-density at x (B, D): (B,)."""
    return jax.vmap(lambda xi: jax.scipy.special.logsumexp(self.component_log_probs(xi)))(x)

  def score(self, x: Array) -> Array:
    """∇ log p at x (B, D): Σ_k r_k(x) Σ_k⁻¹(μ_k - x), r_k the posterior responsibilities."""
    def one(xi):
      resp = jax.nn.softmax(self.component_log_probs(xi))
      pulls = jax.vmap(jnp.linalg.solve)(self.covs, self.means - xi[None])
      return resp @ pulls
    return jax.vmap(one)(x)


def isotropic_mixture(weights, means, stds) -> GaussianMixture:
  """A mixture of N(μ_k, std_k² I) from (K,), (K, D) and (K,) arrays."""
  means = jnp.asarray(means, jnp.float32)
  stds = jnp.asarray(stds, jnp.float32)
  eye = jnp.eye(means.shape[1])
  return GaussianMixture(jnp.asarray(weights, jnp.float32), means, stds[:, None, None]**2 * eye)


def gaussian(mean, cov) -> GaussianMixture:
  """A single Gaussian N(mean, cov) as a one-component mixture."""
  mean = jnp.asarray(mean, jnp.float32)
  return GaussianMixture(jnp.ones((1,)), mean[None], jnp.asarray(cov, jnp.float32)[None])


def marginal(sde: sde_lib.SDE, data: GaussianMixture, t: float | Array) -> GaussianMixture:
  """p_t of the SDE started at ``data``, for one scalar time t."""
  scale, std = sde.marginal_coeffs(jnp.reshape(jnp.asarray(t, jnp.float32), (1,)))
  return data.diffuse(scale[0], std[0])


def _flat_over_time(fn_of_marginal: Callable[[GaussianMixture, Array], Array],
                    sde: sde_lib.SDE, data: GaussianMixture) -> Callable[[Array, Array], Array]:
  def per_example(xi, ti):
    return fn_of_marginal(marginal(sde, data, ti), xi.reshape(1, -1))[0]
  return jax.vmap(per_example)


def score_fn(sde: sde_lib.SDE, data: GaussianMixture) -> sde_lib.ScoreFn:
  """The exact marginal score ∇ₓ log p_t(x) as a ``score_fn(x, t)`` for x of any shape (B, ...) with
  prod(shape[1:]) = D (image-shaped tests flatten row-major)."""
  flat = _flat_over_time(lambda m, x: m.score(x), sde, data)
  return lambda x, t: flat(x, t).reshape(x.shape)


def log_prob_fn(sde: sde_lib.SDE, data: GaussianMixture) -> Callable[[Array, Array], Array]:
  """The exact marginal log-density log p_t(x): (x (B, ...), t (B,)) -> (B,)."""
  return _flat_over_time(lambda m, x: m.log_prob(x), sde, data)


def _component_stds(data: GaussianMixture) -> np.ndarray:
  """s_k of an isotropic mixture (raises if a covariance is not a multiple of the identity)."""
  covs = np.asarray(data.covs)
  variances = covs[:, 0, 0]
  if not np.allclose(covs, variances[:, None, None] * np.eye(data.dim)[None]):
    raise ValueError('the mixture has non-isotropic covariances; use gaussian_mixture.score_fn.')
  return np.sqrt(variances)


def isotropic_score_fn(sde: sde_lib.SDE, data: GaussianMixture) -> sde_lib.ScoreFn:
  """``score_fn`` for a mixture of isotropic components N(μ_k, s_k² I), with no linear solves.

  ``score_fn`` solves with each example's covariances; on jaxlib 0.10.2's CPU backend, large batches of
  those LAPACK calls inside a sampler loop deadlocked the XLA thread pool (seen at 20,000 samples).
  Here the marginal at time t is Σ_k w_k N(a μ_k, v_k I) with v_k = a² s_k² + σ² (a, σ =
  ``sde.marginal_coeffs(t)``), whose score Σ_k r_k(x) (a μ_k − x) / v_k (r_k the responsibilities)
  needs only elementwise arithmetic. Raises ValueError for non-isotropic covariances.
  """
  stds = jnp.asarray(_component_stds(data))
  log_weights = jnp.log(data.weights)
  means = data.means

  def score(x, t):
    flat = x.reshape(x.shape[0], -1)
    scale, std = sde.marginal_coeffs(t)
    var = scale[:, None]**2 * stds[None]**2 + std[:, None]**2  # (B, K)
    diff = scale[:, None, None] * means[None] - flat[:, None]  # (B, K, D)
    logits = log_weights[None] - 0.5 * jnp.sum(diff**2, -1) / var - 0.5 * data.dim * jnp.log(var)
    resp = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum('bk,bkd->bd', resp / var, diff).reshape(x.shape)
  return score


def default_mixture(dim: int = 2, separation: float = 4., std: float = 0.5) -> GaussianMixture:
  """Three well-separated, unequally weighted isotropic modes in ``dim`` dimensions (for tests/demos)."""
  directions = np.zeros((3, dim), np.float32)
  directions[0, 0], directions[1, 0] = 1., -1.
  directions[2, min(1, dim - 1)] = 1.
  means = separation * directions
  if dim > 1:
    means[2, 0] = 0.
  return isotropic_mixture([0.5, 0.3, 0.2], means, [std, std, std])
