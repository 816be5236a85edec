"""Each objective is minimised by the exact score, with the closed-form minimum, for Gaussian data.

For data N(μ, Σ) and a perturbation kernel N(a x₀, s² I) the marginal is N(aμ, C), C = a²Σ + s²I, with
score s*(x) = −C⁻¹(x − aμ). Gaussian integration by parts gives, per noise level,

  E‖s·s*(x_t) + z‖² = D − s² tr C⁻¹                     (DSM, SMLD, DDPM all have this form)
  E[vᵀ∇s* v + ½‖s*‖²] = −½ tr C⁻¹                        (SSM and SSM-VR)

and adding a constant c to the score raises the λ(t)-weighted objective by E[λ]‖c‖² (DSM) or
½E[λ]‖c‖² (SSM), because E[s*(x_t)] = 0 and E[σ s* + z] = 0. The t-average is done by Gauss-Legendre
quadrature in float64; Monte-Carlo estimates (2¹⁶ draws) must agree within 4 standard errors.
The exact score is evaluated in closed form via the eigenbasis of Σ (checked against gaussian_mixture.py first),
so that the Monte-Carlo runs stay cheap.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from scoresde import gaussian_mixture
from scoresde import losses
from scoresde import sde_lib

N_MC = 2**16
MEAN = np.array([0.5, -1.0, 2.0])
COV = np.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 2.0]])
EIG, EIGVEC = np.linalg.eigh(COV)
D = 3
SHIFT = np.array([0.2, -0.1, 0.3], np.float32)
DATA = gaussian_mixture.gaussian(MEAN, COV)
SDES = {'vesde': sde_lib.VESDE(0.01, 50., 1000), 'vpsde': sde_lib.VPSDE(0.1, 20., 1000),
        'subvpsde': sde_lib.subVPSDE(0.1, 20., 1000)}


def _gaussian_score(x, scale, std):
  """s*(x) = −C⁻¹(x − aμ), C = a²Σ + s²I = Q diag(a²λ + s²) Qᵀ, per example (scale, std (B,))."""
  inv = 1. / (scale[:, None]**2 * EIG[None] + std[:, None]**2)
  centred = (x - scale[:, None] * MEAN[None]) @ EIGVEC
  return -(centred * inv) @ EIGVEC.T


def _exact_score_fn(sde):
  return lambda x, t: _gaussian_score(x, *sde.marginal_coeffs(t))


@pytest.mark.parametrize('sde_name', sorted(SDES))
def test_closed_form_score_matches_analytic(sde_name):
  sde = SDES[sde_name]
  x = jax.random.normal(jax.random.PRNGKey(5), (64, D)) * 3
  t = jax.random.uniform(jax.random.PRNGKey(6), (64,), minval=1e-3)
  np.testing.assert_allclose(_exact_score_fn(sde)(x, t), gaussian_mixture.score_fn(sde, DATA)(x, t),
                             rtol=1e-4, atol=1e-4)


def _coeffs(sde, t):
  scale, std = sde.marginal_coeffs(jnp.asarray(t, jnp.float32))
  return np.asarray(scale, np.float64), np.asarray(std, np.float64)


def _tr_inv_cov(scale, std):
  return np.sum(1. / (scale[:, None]**2 * EIG[None] + std[:, None]**2), axis=1)


def _t_average(fn, eps, horizon=1., n=400):
  nodes, weights = np.polynomial.legendre.leggauss(n)
  t = 0.5 * (horizon - eps) * nodes + 0.5 * (horizon + eps)
  return float(np.sum(weights * fn(t)) * 0.5)  # mean over U(eps, T): ∫ / (T - eps)


def _reduce_factor(reduce_mean):
  return 1. / D if reduce_mean else 0.5


def _mc(values):
  values = np.asarray(values, np.float64)
  return values.mean(), values.std() / np.sqrt(values.size)


def _data():
  return DATA.sample(jax.random.PRNGKey(0), N_MC)


def _assert_close(values, exact, what):
  mean, se = _mc(values)
  assert abs(mean - exact) < 4 * se + 1e-6, f'{what}: MC {mean:.5f} ± {se:.5f} vs exact {exact:.5f}'


@pytest.mark.parametrize('sde_name', sorted(SDES))
@pytest.mark.parametrize('likelihood_weighting', [False, True])
@pytest.mark.parametrize('reduce_mean', [False, True])
def test_dsm_exact_score_minimum_and_perturbation(sde_name, likelihood_weighting, reduce_mean):
  sde = SDES[sde_name]
  eps = 1e-5
  exact_score = _exact_score_fn(sde)
  shifted_score = lambda x, t: exact_score(x, t) + SHIFT

  def weight(t):
    if not likelihood_weighting:
      return _coeffs(sde, t)[1]**2
    g = np.asarray(sde.sde(jnp.zeros((t.size, 1)), jnp.asarray(t, jnp.float32))[1], np.float64)
    return g**2

  def dsm_min(t):
    scale, std = _coeffs(sde, t)
    return weight(t) / std**2 * (D - std**2 * _tr_inv_cov(scale, std))

  factor = _reduce_factor(reduce_mean)
  exact_min = factor * _t_average(dsm_min, eps)
  exact_increase = factor * _t_average(weight, eps) * float(SHIFT @ SHIFT)

  run = jax.jit(lambda fn_id, x: losses.sde_loss(
      jax.random.PRNGKey(1), (exact_score, shifted_score)[fn_id], sde, x, reduce_mean=reduce_mean,
      likelihood_weighting=likelihood_weighting, eps=eps), static_argnums=0)
  x = _data()
  at_exact, at_shifted = run(0, x), run(1, x)
  _assert_close(at_exact, exact_min, 'DSM at the exact score')
  increase = np.asarray(at_shifted, np.float64) - np.asarray(at_exact, np.float64)
  _assert_close(increase, exact_increase, 'DSM increase for a shifted score')
  mean, se = _mc(increase)
  assert mean > 10 * se > 0


def _per_level_score(levels_scale, levels_std):
  """model_fn(x, labels) = exact score of N(aμ, a²Σ + s²I) at each example's own level."""
  def model_fn(x, labels):
    return _gaussian_score(x, levels_scale[labels], levels_std[labels])
  return model_fn


@pytest.mark.parametrize('reduce_mean', [False, True])
def test_smld_exact_score_minimum_and_perturbation(reduce_mean):
  sde = SDES['vesde']
  sigmas_desc = sde.label_sigma(jnp.arange(sde.N))  # σ of each network label, σ_max first
  exact = _per_level_score(jnp.ones_like(sigmas_desc), sigmas_desc)
  shifted = lambda x, labels: exact(x, labels) + SHIFT
  s = np.asarray(sigmas_desc, np.float64)
  factor = _reduce_factor(reduce_mean)
  exact_min = factor * np.mean(D - s**2 * _tr_inv_cov(np.ones_like(s), s))
  exact_increase = factor * np.mean(s**2) * float(SHIFT @ SHIFT)

  run = jax.jit(lambda fn_id, x: losses.smld_loss(jax.random.PRNGKey(2), (exact, shifted)[fn_id], sde, x,
                                                  reduce_mean=reduce_mean), static_argnums=0)
  x = _data()
  at_exact, at_shifted = run(0, x), run(1, x)
  _assert_close(at_exact, exact_min, 'SMLD at the exact score')
  increase = np.asarray(at_shifted, np.float64) - np.asarray(at_exact, np.float64)
  _assert_close(increase, exact_increase, 'SMLD increase')
  assert _mc(increase)[0] > 10 * _mc(increase)[1]


@pytest.mark.parametrize('reduce_mean', [False, True])
def test_ddpm_exact_noise_minimum_and_perturbation(reduce_mean):
  sde = SDES['vpsde']
  a, s = sde.sqrt_alphas_cumprod, sde.sqrt_1m_alphas_cumprod
  score = _per_level_score(a, s)
  exact = lambda x, labels: -s[labels][:, None] * score(x, labels)  # ε* = −std · score
  shifted = lambda x, labels: exact(x, labels) + SHIFT
  a64, s64 = np.asarray(a, np.float64), np.asarray(s, np.float64)
  factor = _reduce_factor(reduce_mean)
  exact_min = factor * np.mean(D - s64**2 * _tr_inv_cov(a64, s64))
  exact_increase = factor * float(SHIFT @ SHIFT)

  run = jax.jit(lambda fn_id, x: losses.ddpm_loss(jax.random.PRNGKey(3), (exact, shifted)[fn_id], sde, x,
                                                  reduce_mean=reduce_mean), static_argnums=0)
  x = _data()
  at_exact, at_shifted = run(0, x), run(1, x)
  _assert_close(at_exact, exact_min, 'DDPM at the exact noise')
  increase = np.asarray(at_shifted, np.float64) - np.asarray(at_exact, np.float64)
  _assert_close(increase, exact_increase, 'DDPM increase')
  assert _mc(increase)[0] > 10 * _mc(increase)[1]


@pytest.mark.parametrize('sde_name', ['vesde', 'vpsde'])
@pytest.mark.parametrize('variance_reduction', [True, False])
def test_sliced_score_matching_exact_score_minimum(sde_name, variance_reduction):
  sde = SDES[sde_name]
  eps = 1e-5
  exact_score = _exact_score_fn(sde)
  shifted_score = lambda x, t: exact_score(x, t) + SHIFT

  def ssm_min(t):
    scale, std = _coeffs(sde, t)
    return std**2 * -0.5 * _tr_inv_cov(scale, std)

  exact_min = _t_average(ssm_min, eps)
  exact_increase = 0.5 * _t_average(lambda t: _coeffs(sde, t)[1]**2, eps) * float(SHIFT @ SHIFT)
  run = jax.jit(lambda fn_id, x: losses.ssm_loss(
      jax.random.PRNGKey(4), (exact_score, shifted_score)[fn_id], sde, x, reduce_mean=False,
      variance_reduction=variance_reduction, n_projections=2, eps=eps), static_argnums=0)
  x = _data()
  at_exact, at_shifted = run(0, x), run(1, x)
  _assert_close(at_exact, exact_min, 'SSM at the exact score')
  increase = np.asarray(at_shifted, np.float64) - np.asarray(at_exact, np.float64)
  _assert_close(increase, exact_increase, 'SSM increase')
  assert _mc(increase)[0] > 10 * _mc(increase)[1]


def _config(**training):
  config = ml_collections.ConfigDict({
      'training': {'sde': 'vpsde', 'continuous': True, 'likelihood_weighting': False,
                   'sliced_score_matching': False},
      'optim': {'optimizer': 'Adam', 'lr': 1e-2, 'beta1': 0.9, 'eps': 1e-8, 'weight_decay': 0.,
                'warmup': 4, 'grad_clip': 1.},
  })
  config.training.update(training)
  return config


@pytest.mark.parametrize('overrides,match', [
    ({'sde': 'subvpsde', 'continuous': False}, "sde='subvpsde'"),
    ({'sde': 'vesde', 'continuous': False, 'likelihood_weighting': True}, 'likelihood_weighting'),
    ({'continuous': False, 'sliced_score_matching': True}, 'sliced_score_matching'),
])
def test_ruled_out_objectives_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    losses.check_objective(_config(**overrides))


def test_optimizer_warmup_clipping_and_ema():
  config = _config()
  optimizer = losses.get_optimizer(config)
  params = {'w': jnp.ones(3)}
  state = optimizer.init(params)
  grads = {'w': jnp.array([30., 40., 0.])}  # global norm 50, clipped to 1
  updates, state = optimizer.update(grads, state, params)
  np.testing.assert_array_equal(updates['w'], 0.)  # lr = 0 at step 0 (reference warm-up)
  updates, state = optimizer.update(grads, state, params)
  # Step 1: lr = 1e-2 · 1/4; Adam's bias-corrected update of a constant gradient is its sign.
  np.testing.assert_allclose(updates['w'], -2.5e-3 * np.array([1., 1., 0.]), atol=1e-6)
  assert float(losses.learning_rate_schedule(config)(100)) == pytest.approx(1e-2)

  clip = optax.clip_by_global_norm(1.)
  clipped, _ = clip.update(grads, clip.init(params))
  np.testing.assert_allclose(clipped['w'], [0.6, 0.8, 0.], rtol=1e-6)
  config.optim.grad_clip = -1.
  assert len(losses.get_optimizer(config).init(params)) != len(optimizer.init(params))

  assert float(losses.ema_decay(jnp.asarray(0), 0.999, warmup=False)) == pytest.approx(0.999)
  assert float(losses.ema_decay(jnp.asarray(0), 0.999, warmup=True)) == pytest.approx(0.1)
  assert float(losses.ema_decay(jnp.asarray(10**6), 0.999, warmup=True)) == pytest.approx(0.999)
