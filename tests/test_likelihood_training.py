"""Maximum-likelihood training pieces against truth (Song, Durkan, Murray, Ermon 2021).

- The importance sampler draws t from q(t) ∝ g²/σ² with the CDF written independently in closed form per
  SDE (VP: log expm1 B(t); sub-VP: 2 log 2 sinh(B(t)/2); VE: uniform; B(t) = ∫₀ᵗ β).
- The importance-sampled loss is an unbiased estimate of the likelihood-weighted loss: with the exact
  score on Gaussian data, both Monte-Carlo means agree within 4 standard errors, and for VP / sub-VP the
  importance-sampled one has the smaller variance (the point of it).
- The ELBO computed with the exact score exceeds the exact NLL by exactly its closed-form gap
  E_{x_T | x}[log p_T(x_T) − log π(x_T)] (the bound is tight but for the prior mismatch), within 4
  standard errors, and its mean gap KL(p_T ‖ π) ≥ 0; a VE SDE with a small σ_max makes the gap large.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scoresde import gaussian_mixture
from scoresde import likelihood
from scoresde import likelihood_weighting
from scoresde import losses
from scoresde import sde_lib

EPS = 1e-5
MEAN, STD, D = np.array([1.0, -0.5], np.float32), 1.5, 2
DATA = gaussian_mixture.isotropic_mixture([1.], [MEAN], [STD])
SDES = {'vesde': sde_lib.VESDE(0.01, 50., 1000), 'vpsde': sde_lib.VPSDE(0.1, 20., 1000),
        'subvpsde': sde_lib.subVPSDE(0.1, 20., 1000)}


def _mc(values):
  values = np.asarray(values, np.float64)
  return values.mean(), values.std() / math.sqrt(values.size)


def _closed_form_cdf(sde, t):
  """CDF of q(t) ∝ g²/σ² on [EPS, T], from each SDE's own antiderivative (float64)."""
  if isinstance(sde, sde_lib.VESDE):
    return (t - EPS) / (sde.T - EPS)
  big_b = lambda s: sde.beta_0 * s + 0.5 * (sde.beta_1 - sde.beta_0) * s**2
  if isinstance(sde, sde_lib.VPSDE):
    antiderivative = lambda s: np.log(np.expm1(big_b(s)))
  else:
    antiderivative = lambda s: 2 * np.log(2 * np.sinh(big_b(s) / 2))
  return (antiderivative(t) - antiderivative(EPS)) / (antiderivative(sde.T) - antiderivative(EPS))


@pytest.mark.parametrize('sde_name', sorted(SDES))
def test_importance_time_has_the_closed_form_law(sde_name):
  sde = SDES[sde_name]
  t = np.sort(np.asarray(likelihood_weighting.importance_time(jax.random.PRNGKey(0), sde, (20000,), EPS),
                         np.float64))
  assert t.min() >= EPS and t.max() <= sde.T
  empirical = np.arange(1, t.size + 1) / t.size
  assert np.max(np.abs(_closed_form_cdf(sde, t) - empirical)) < 0.015  # Kolmogorov-Smirnov, p ≈ 1e-3


@pytest.mark.parametrize('sde_name', sorted(SDES))
def test_importance_sampled_loss_is_unbiased(sde_name):
  sde = SDES[sde_name]
  score_fn = gaussian_mixture.isotropic_score_fn(sde, DATA)
  x = DATA.sample(jax.random.PRNGKey(1), 2**16)
  run = jax.jit(lambda rng, importance: losses.sde_loss(
      rng, score_fn, sde, x, reduce_mean=False, likelihood_weighting=True, eps=EPS,
      importance_sampling=importance), static_argnums=1)
  uniform = np.asarray(run(jax.random.PRNGKey(2), False))
  importance = np.asarray(run(jax.random.PRNGKey(3), True))
  (m_u, se_u), (m_i, se_i) = _mc(uniform), _mc(importance)
  assert abs(m_u - m_i) < 4 * math.hypot(se_u, se_i), (m_u, se_u, m_i, se_i)
  if sde_name != 'vesde':  # for VE, q is uniform and both estimators coincide
    assert importance.std() < 0.5 * uniform.std()


def test_importance_sampling_needs_likelihood_weighting():
  with pytest.raises(ValueError, match='likelihood_weighting'):
    losses.sde_loss(jax.random.PRNGKey(0), lambda x, t: x, SDES['vpsde'], jnp.zeros((2, D)),
                    importance_sampling=True)
  config = ml_collections.ConfigDict({'training': {
      'sde': 'vpsde', 'continuous': True, 'likelihood_weighting': False, 'sliced_score_matching': False,
      'importance_sampling': True}})
  with pytest.raises(ValueError, match='config.training.importance_sampling'):
    losses.check_objective(config)


def _expected_log_normal(mean_y, var_y, mean_p, var_p):
  """E_{y ~ N(mean_y, var_y I)} log N(y; mean_p, var_p I), per row of mean_y (B, D)."""
  return (-0.5 * D * np.log(2 * np.pi * var_p)
          - (np.sum((mean_y - mean_p)**2, -1) + D * var_y) / (2 * var_p))


@pytest.mark.parametrize('sde_name,prior_std', [('vesde_small', 1.5), ('vpsde', 1.), ('subvpsde', 1.)])
def test_elbo_of_exact_score_is_nll_plus_prior_gap(sde_name, prior_std):
  sde = sde_lib.VESDE(0.01, prior_std, 1000) if sde_name == 'vesde_small' else SDES[sde_name]
  score_fn = gaussian_mixture.isotropic_score_fn(sde, DATA)
  x = DATA.sample(jax.random.PRNGKey(4), 2048)
  bound = np.asarray(jax.jit(lambda rng, x: likelihood_weighting.elbo(
      rng, score_fn, sde, x, eps=EPS, num_samples=64))(jax.random.PRNGKey(5), x), np.float64)
  x64 = np.asarray(x, np.float64)
  nll = -np.asarray(DATA.log_prob(x), np.float64)
  scale, std = (float(v[0]) for v in sde.marginal_coeffs(jnp.full((1,), sde.T)))
  p_t_var = scale**2 * STD**2 + std**2
  gap = (_expected_log_normal(scale * x64, std**2, scale * MEAN, p_t_var)
         - _expected_log_normal(scale * x64, std**2, 0., prior_std**2))
  mean, se = _mc(bound - nll - gap)
  assert abs(mean) < 4 * se, (mean, se)
  kl = 0.5 * D * (p_t_var / prior_std**2 - 1 - np.log(p_t_var / prior_std**2)) + \
      0.5 * scale**2 * np.sum(MEAN**2) / prior_std**2
  assert kl >= 0 and abs(gap.mean() - kl) < 0.05 + 0.05 * kl
  bound_mean, bound_se = _mc(bound - nll)
  assert bound_mean > -3 * bound_se  # ELBO ≥ NLL
  if sde_name == 'vesde_small':
    assert kl > 0.5 and bound_mean > 10 * bound_se  # a large gap, resolved


def test_elbo_bits_per_dim_matches_nats_and_refuses_floats():
  sde = SDES['vpsde']
  score_fn = gaussian_mixture.isotropic_score_fn(sde, gaussian_mixture.isotropic_mixture(
      [1.], [[0., 0.]], [0.6]))
  levels = jax.random.randint(jax.random.PRNGKey(6), (16, D), 0, 17)
  inverse = lambda y: (y + 1.) / 2.
  fn = likelihood.get_elbo_bpd_fn(sde, inverse, num_levels=17, eps=EPS, num_samples=4)
  rng = jax.random.PRNGKey(7)
  bpd = np.asarray(fn(rng, score_fn, levels))
  y = 2. * likelihood.dequantize(rng, levels, 17) - 1.
  nats = likelihood_weighting.elbo(jax.random.split(rng)[1], score_fn, sde, y, eps=EPS, num_samples=4)
  expected = np.asarray(nats) / (D * math.log(2.)) + math.log2(17) + math.log2(0.5)
  np.testing.assert_allclose(bpd, expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(TypeError, match='integer data levels'):
    fn(rng, score_fn, levels.astype(jnp.float32))
