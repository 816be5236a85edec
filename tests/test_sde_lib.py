"""SDEs against exact references: Gaussian-mixture marginals (gaussian_mixture.py) and Monte Carlo of discretize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresde import gaussian_mixture
from scoresde import sde_lib

SDES = {
    'vesde': lambda N=1000: sde_lib.VESDE(0.01, 50., N),
    'vpsde': lambda N=1000: sde_lib.VPSDE(0.1, 20., N),
    'subvpsde': lambda N=1000: sde_lib.subVPSDE(0.1, 20., N),
}
TIMES = (0.02, 0.1, 0.3, 0.6, 0.95)


@pytest.fixture(scope='module')
def data():
  # Anisotropic, correlated components so the check is not blind to covariance handling.
  covs = jnp.array([[[0.30, 0.10], [0.10, 0.20]], [[0.50, -0.20], [-0.20, 0.40]]])
  return gaussian_mixture.GaussianMixture(jnp.array([0.6, 0.4]), jnp.array([[1.5, 0.5], [-1.0, -1.0]]), covs)


def _time_derivative_residual(sde, data, velocity_terms):
  """max |∂_t log p - rhs| / max(1, |∂_t log p|) over points and times, for rhs from the SDE."""
  logp = gaussian_mixture.log_prob_fn(sde, data)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 2)) * 1.5
  errors = []
  for t0 in TIMES:
    t = jnp.full((x.shape[0],), t0)
    dlogp_dt = jax.vmap(jax.grad(lambda ti, xi: logp(xi[None], ti[None])[0]))(t, x)
    rhs = velocity_terms(sde, logp, x, t)
    errors.append(np.max(np.abs(dlogp_dt - rhs) / np.maximum(1., np.abs(dlogp_dt))))
  return max(errors)


def _fokker_planck_rhs(sde, logp, x, t):
  """∂_t log p = -∇·f - f·∇log p + ½ g² (Δ log p + ‖∇ log p‖²) (Kolmogorov forward equation)."""
  def one(xi, ti):
    lp = lambda y: logp(y[None], ti[None])[0]
    drift = lambda y: sde.sde(y[None], ti[None])[0][0]
    g2 = sde.sde(xi[None], ti[None])[1][0]**2
    grad = jax.grad(lp)(xi)
    lap = jnp.trace(jax.hessian(lp)(xi))
    div_f = jnp.trace(jax.jacfwd(drift)(xi))
    return -div_f - drift(xi) @ grad + 0.5 * g2 * (lap + grad @ grad)
  return jax.vmap(one)(x, t)


def _continuity_rhs_of_probability_flow(sde, logp, x, t):
  """The probability-flow ODE's velocity v transports p_t: ∂_t log p = -∇·v - v·∇log p."""
  exact_score = lambda y, s: jax.vmap(jax.grad(lambda yi, si: logp(yi[None], si[None])[0]))(y, s)
  ode = sde.reverse(exact_score, probability_flow=True)

  def one(xi, ti):
    velocity = lambda y: ode.sde(y[None], ti[None])[0][0]
    grad = jax.grad(lambda y: logp(y[None], ti[None])[0])(xi)
    return -jnp.trace(jax.jacfwd(velocity)(xi)) - velocity(xi) @ grad
  return jax.vmap(one)(x, t)


@pytest.mark.parametrize('name', SDES)
def test_marginals_solve_fokker_planck(name, data):
  # The exact mixture marginal built from marginal_coeffs must solve the SDE's Fokker-Planck equation,
  # which ties marginal_coeffs to sde(): a wrong std (e.g. sub-VP's √ slip) fails by O(1).
  residual = _time_derivative_residual(SDES[name](), data, _fokker_planck_rhs)
  assert residual < 2e-3, residual


@pytest.mark.parametrize('name', SDES)
def test_probability_flow_transports_marginals(name, data):
  residual = _time_derivative_residual(SDES[name](), data, _continuity_rhs_of_probability_flow)
  assert residual < 2e-3, residual


@pytest.mark.parametrize('name', SDES)
def test_reverse_sde_drift_and_discretization(name):
  sde = SDES[name]()
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 3, 2, 1))
  t = jnp.linspace(0.1, 0.9, 5)
  score = lambda y, s: -y * (1 + s[:, None, None, None])
  drift, diffusion = sde.sde(x, t)
  f, g = sde.discretize(x, t)
  for pf, coeff in ((False, 1.), (True, 0.5)):
    rsde = sde.reverse(score, probability_flow=pf)
    rdrift, rdiff = rsde.sde(x, t)
    np.testing.assert_allclose(rdrift, drift - coeff * sde_lib.batch_mul(diffusion**2, score(x, t)), rtol=1e-6)
    np.testing.assert_allclose(rdiff, 0. if pf else diffusion)
    rf, rg = rsde.discretize(x, t)
    np.testing.assert_allclose(rf, f - coeff * sde_lib.batch_mul(g**2, score(x, t)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rg, 0. if pf else g)


@pytest.mark.parametrize('name', SDES)
def test_discretize_matches_marginal_by_monte_carlo(name):
  # Forward-simulate the discrete chain from a fixed x(0) and compare moments at t = 0.5 and 1 with
  # marginal_prob. Tolerances: 5 standard errors of the Monte Carlo estimate plus the O(1/N) gap
  # between the discrete chain and the continuous SDE (N = 1000 here).
  n_samples, N = 20000, 1000
  sde = SDES[name](N)
  x0 = jnp.full((n_samples, 1), 2.)
  checkpoints = {N // 2: None, N - 1: None}

  def step(carry, i):
    x, rng = carry
    rng, sub = jax.random.split(rng)
    t = jnp.full((n_samples,), i / (N - 1))
    f, g = sde.discretize(x, t)
    x = x + f + sde_lib.batch_mul(g, jax.random.normal(sub, x.shape))
    return (x, rng), x[:, 0]

  _, path = jax.lax.scan(step, (x0, jax.random.PRNGKey(2)), jnp.arange(N))
  for index in checkpoints:
    # Euler-Maruyama (sub-VP) advances T/N per step; the SMLD/DDPM chains index their tables by i/(N-1).
    t_end = (index + 1) / N if name == 'subvpsde' else index / (N - 1)
    mean, std = sde.marginal_prob(x0[:1], jnp.array([t_end]))
    samples = np.asarray(path[index])
    mc_mean, mc_std = samples.mean(), samples.std()
    se_mean = float(std[0]) / np.sqrt(n_samples)
    se_std = float(std[0]) / np.sqrt(2 * n_samples)
    disc = 3e-3 * max(float(std[0]), 1.)
    assert abs(mc_mean - float(mean[0, 0])) < 5 * se_mean + disc, (index, mc_mean, mean)
    assert abs(mc_std - float(std[0])) < 5 * se_std + disc, (index, mc_std, std)


@pytest.mark.parametrize('name', SDES)
def test_prior_sampling_and_logp(name):
  sde = SDES[name]()
  z = sde.prior_sampling(jax.random.PRNGKey(3), (4000, 2, 2, 1))
  scale = sde.sigma_max if name == 'vesde' else 1.
  assert abs(float(jnp.std(z)) / scale - 1) < 0.03
  expected = np.sum(-0.5 * np.log(2 * np.pi * scale**2) - np.asarray(z[:5])**2 / (2 * scale**2), axis=(1, 2, 3))
  np.testing.assert_allclose(sde.prior_logp(z[:5]), expected, rtol=1e-5)


def test_prior_matches_marginal_at_T():
  # The prior is the marginal of far-away data at T up to the documented approximations.
  data = gaussian_mixture.gaussian(jnp.zeros(2), 0.25 * jnp.eye(2))
  for name, tol in (('vpsde', 1e-4), ('subvpsde', 1e-4), ('vesde', 1e-4)):
    sde = SDES[name]()
    p_T = gaussian_mixture.marginal(sde, data, sde.T)
    z = sde.prior_sampling(jax.random.PRNGKey(4), (8, 2))
    np.testing.assert_allclose(p_T.log_prob(z), sde.prior_logp(z), rtol=tol)


def test_sub_vp_std_is_one_minus_exp_not_its_root():
  sde = SDES['subvpsde']()
  t = jnp.array([0.1, 0.5])
  _, std = sde.marginal_coeffs(t)
  np.testing.assert_allclose(std, 1 - np.exp(2 * np.asarray(sde.log_mean_coeff(t))), rtol=1e-5)


def test_mixture_sampling_moments_and_score(data):
  x = data.sample(jax.random.PRNGKey(5), 200000)
  np.testing.assert_allclose(x.mean(0), data.mean(), atol=0.01)
  np.testing.assert_allclose(jnp.cov(x.T), data.cov(), atol=0.02)
  pts = x[:10]
  numeric = jax.vmap(jax.grad(lambda p: data.log_prob(p[None])[0]))(pts)
  np.testing.assert_allclose(data.score(pts), numeric, rtol=1e-4, atol=1e-5)


def test_get_sde_rejects_unknown_names():
  import ml_collections
  config = ml_collections.ConfigDict({'training': {'sde': 'vesd'}, 'model': {}})
  with pytest.raises(ValueError, match=r"config.training.sde='vesd'.*\['subvpsde', 'vesde', 'vpsde'\]"):
    sde_lib.get_sde(config)


# ----------------------------------------------------------------------------------------------------
# Discrete schedules: every table and index against its closed form.


@pytest.mark.parametrize('name', SDES)
def test_timestep_index_truncates_and_walks_the_sampler_grid(name):
  sde = SDES[name](50)
  # The samplers' times linspace(T, eps, N) visit every step once, from N-1 down to 0.
  for eps in (1e-3, 1e-5):
    np.testing.assert_array_equal(sde.timestep_index(jnp.linspace(sde.T, eps, sde.N)), np.arange(49, -1, -1))
  t = jnp.array([0., 0.3, 0.99 / 49, 1.01 / 49, 1.])
  np.testing.assert_allclose(sde.discrete_time(t), np.asarray(t) * 49, rtol=1e-6)
  np.testing.assert_array_equal(sde.timestep_index(t), [0, 14, 0, 1, 49])  # int(), not round()


def test_geometric_sigmas_closed_form_and_the_sde_table():
  for sigma_min, sigma_max, n in ((0.01, 50., 1000), (0.01, 348., 2000), (0.5, 1., 7), (0.01, 50., 1)):
    sigmas = sde_lib.geometric_sigmas(sigma_min, sigma_max, n)
    i = np.arange(n)
    closed = sigma_min * (sigma_max / sigma_min)**(i / max(n - 1, 1)) if n > 1 else np.array([sigma_max])
    assert sigmas.dtype == np.float32 and sigmas.shape == (n,)
    np.testing.assert_allclose(sigmas, closed, rtol=1e-6)
    if n > 1:  # the SDE's float32 table holds the same levels, a few ulps apart
      np.testing.assert_allclose(sde_lib.VESDE(sigma_min, sigma_max, n).discrete_sigmas, sigmas, rtol=1e-6)


def test_adjacent_sigma_and_smld_ancestral_coefficients():
  """σ_{i-1} with σ_{-1} = 0, and the coefficients of eq. 47,
  x_{i-1} = x_i + (σ_i² − σ_{i−1}²) s + √(σ_{i−1}² (σ_i² − σ_{i−1}²) / σ_i²) z, from the closed-form σ_i."""
  sde = sde_lib.VESDE(0.01, 50., 20)
  index = jnp.arange(20)
  sigma = 0.01 * (50. / 0.01)**(np.arange(20) / 19)
  previous = np.concatenate([[0.], sigma[:-1]])
  np.testing.assert_allclose(sde.adjacent_sigma(index), previous, rtol=1e-5)
  scale, score_coeff, std = sde.ancestral_coefficients(index)
  np.testing.assert_array_equal(scale, np.ones(20))
  np.testing.assert_allclose(score_coeff, sigma**2 - previous**2, rtol=1e-5)
  np.testing.assert_allclose(std, np.sqrt(previous**2 * (sigma**2 - previous**2) / sigma**2), rtol=1e-5)
  assert float(std[0]) == 0.  # the last step to the data adds no noise


def test_ddpm_betas_and_ancestral_coefficients():
  """β_i = β̄_min/N + i (β̄_max − β̄_min)/(N(N−1)) (Ho et al. 2020 with β̄ = N β) as a table and in closed
  form, for VP and sub-VP; eq. 4's x_{i-1} = (x_i + β_i s)/√(1−β_i) + √β_i z; ᾱ_i = Π_{k≤i} (1 − β_k)."""
  N = 30
  beta = 0.1 / N + np.arange(N) * (20. - 0.1) / (N * (N - 1))
  vp, subvp = sde_lib.VPSDE(0.1, 20., N), sde_lib.subVPSDE(0.1, 20., N)
  np.testing.assert_allclose(vp.discrete_betas, beta, rtol=1e-5)
  for sde in (vp, subvp):
    np.testing.assert_allclose(sde.discrete_beta(jnp.arange(N)), beta, rtol=1e-5)
  np.testing.assert_allclose(vp.alphas_cumprod, np.cumprod(1 - beta), rtol=1e-5)
  np.testing.assert_allclose(vp.sqrt_1m_alphas_cumprod, np.sqrt(1 - np.cumprod(1 - beta)), rtol=1e-5)
  scale, score_coeff, std = vp.ancestral_coefficients(jnp.arange(N))
  np.testing.assert_allclose(scale, 1 / np.sqrt(1 - beta), rtol=1e-6)
  np.testing.assert_allclose(score_coeff, beta, rtol=1e-5)
  np.testing.assert_allclose(std, np.sqrt(beta), rtol=1e-5)


def test_noise_labels_round_trip_to_the_step_tables():
  """A discrete VE network's label j counts noise levels from σ_max: label_sigma(noise_label(t)) is the
  σ of the step at t, and label j is step N-1-j. A DDPM network's label is the fractional step t (N-1)."""
  N = 40
  ve, vp = sde_lib.VESDE(0.01, 50., N), sde_lib.VPSDE(0.1, 20., N)
  step = np.arange(N)
  t = jnp.asarray((step + 0.25) / (N - 1)).clip(0., 1.)  # off the grid, where int() and round() agree
  label = ve.noise_label(t)
  assert label.dtype == jnp.int32
  np.testing.assert_array_equal(label, N - 1 - step)
  np.testing.assert_array_equal(ve.timestep_index(t), step)
  np.testing.assert_array_equal(ve.label_sigma(label), ve.discrete_sigmas[step])
  np.testing.assert_array_equal(ve.label_sigma(jnp.arange(N)), ve.discrete_sigmas[::-1])
  # On the grid itself the label rounds where the step index truncates: both are exact there.
  np.testing.assert_array_equal(ve.noise_label(jnp.asarray(step / (N - 1))), N - 1 - step)
  np.testing.assert_allclose(vp.noise_label(t), (step + 0.25).clip(0, N - 1), rtol=1e-6)
