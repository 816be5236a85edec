"""Samplers against exact scores: Gaussian-mixture data, whose marginal score is known at every t.

Statistical tolerances. A sampler's output is split into modes by the true posterior responsibility (the
modes are ≥ 11 standard deviations apart, so misassignment is negligible), and every statistic is
compared with the truth in units of its own standard error at the sample size used:

  weight of mode k           SE = sqrt(w_k (1 - w_k) / n)
  mean of mode k, per coord  SE = s_k / sqrt(n_k)
  variance, per coord        SE = s_k² sqrt(2 / n_k)
  covariance, off-diagonal   SE = s_k² / sqrt(n_k)

and each must lie within Z_TOL = 5 standard errors; the fraction of samples farther from their mode
than exact samples are with probability 1e-6 (the χ²_D quantile) must stay below 1e-3. With n = 10,000
this is 0.025 on a weight of 0.5, 0.035 on a mean and 11% on a variance of the weight-0.2 mode. Step
counts are chosen so that discretisation bias stays small against these: achieved max |z| = 2.7 over
the whole predictor × corrector matrix at N = 250 (other cases noted below), no outliers anywhere.
"""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from scoresde import gaussian_mixture
from scoresde import ode_solvers
from scoresde import sampling
from scoresde import sde_lib
from configs import default_cifar10_configs
from scoresde.models import utils as mutils

Z_TOL = 5.
N_SAMPLES = 10_000
MIXTURE = gaussian_mixture.default_mixture(2)
STD = 0.5  # component std of default_mixture
EPS = {'vesde': 1e-5, 'vpsde': 1e-3, 'subvpsde': 1e-3}  # the reference's sampling eps per SDE
SAMPLING = default_cifar10_configs.get_default_configs().sampling


def pc_sampler(sde, shape, predictor, corrector, **settings):
  """``sampling.get_pc_sampler`` with the default config's settings, except those given."""
  defaults = dict(snr=SAMPLING.snr, n_steps=SAMPLING.n_steps_each, probability_flow=SAMPLING.probability_flow,
                  denoise=SAMPLING.noise_removal, eps=SAMPLING.eps,
                  langevin_per_sample=SAMPLING.langevin_per_sample)
  return sampling.get_pc_sampler(sde, shape, predictor, corrector, **{**defaults, **settings})


def ode_sampler(sde, shape, **settings):
  """``sampling.get_ode_sampler`` with the default config's settings, except those given, and without
  the final denoising step unless asked: the exact flow."""
  defaults = dict(rtol=SAMPLING.ode_rtol, atol=SAMPLING.ode_atol, method=SAMPLING.ode_method,
                  eps=SAMPLING.eps, denoise=False)
  return sampling.get_ode_sampler(sde, shape, **{**defaults, **settings})


def make_sde(name: str, n: int) -> sde_lib.SDE:
  # σ_max = 50 ≫ the data's diameter (8), so the prior N(0, σ_max² I) is p_T to within 0.4% in variance.
  return {'vesde': lambda: sde_lib.VESDE(0.01, 50., n),
          'vpsde': lambda: sde_lib.VPSDE(0.1, 20., n),
          'subvpsde': lambda: sde_lib.subVPSDE(0.1, 20., n)}[name]()


def mixture_z_scores(samples, data: gaussian_mixture.GaussianMixture, std: float) -> dict[str, float]:
  """Largest |statistic - truth| / SE per statistic family, and the outlier fraction."""
  x = np.asarray(samples, np.float64).reshape(len(samples), -1)
  assert np.all(np.isfinite(x)), 'non-finite samples'
  n, dim = x.shape
  labels = np.asarray(jax.vmap(data.component_log_probs)(jnp.asarray(x, jnp.float32))).argmax(1)
  weights, means = np.asarray(data.weights, np.float64), np.asarray(data.means, np.float64)
  counts = np.bincount(labels, minlength=len(weights))
  z = {'weight': np.max(np.abs(counts / n - weights) / np.sqrt(weights * (1 - weights) / n))}
  z_mean, z_var, z_cov, outliers = 0., 0., 0., 0
  for k, count in enumerate(counts):
    assert count > 10, f'mode {k} has {count} samples'
    centred = x[labels == k] - means[k]
    z_mean = max(z_mean, np.max(np.abs(centred.mean(0)) / (std / np.sqrt(count))))
    cov = np.cov(centred, rowvar=False).reshape(dim, dim)
    z_var = max(z_var, np.max(np.abs(np.diag(cov) / std**2 - 1) / np.sqrt(2 / count)))
    off = cov[~np.eye(dim, dtype=bool)]
    if off.size:
      z_cov = max(z_cov, np.max(np.abs(off) / std**2 * np.sqrt(count)))
    outliers += np.sum(np.sum(centred**2, axis=1) > std**2 * stats.chi2.isf(1e-6, dim))
  z.update(mean=z_mean, var=z_var, cov=z_cov)
  return {key: float(value) for key, value in z.items()} | {'outliers': outliers / n}


def assert_matches_mixture(samples, data=MIXTURE, std=STD):
  z = mixture_z_scores(samples, data, std)
  assert z['outliers'] < 1e-3, z
  assert max(z['weight'], z['mean'], z['var'], z['cov']) < Z_TOL, z


def test_fast_isotropic_score_is_analytic_score():
  """The solve-free isotropic score equals gaussian_mixture.score_fn (to float32 rounding)."""
  x = 3. * jax.random.normal(jax.random.PRNGKey(0), (64, 2))
  t = jax.random.uniform(jax.random.PRNGKey(1), (64,), minval=1e-5, maxval=1.)
  for name in EPS:
    sde = make_sde(name, 10)
    np.testing.assert_allclose(gaussian_mixture.isotropic_score_fn(sde, MIXTURE)(x, t),
                               gaussian_mixture.score_fn(sde, MIXTURE)(x, t), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='non-isotropic'):
    gaussian_mixture.isotropic_score_fn(sde, gaussian_mixture.gaussian([0., 0.], [[1., .5], [.5, 1.]]))


# (sde, predictor, corrector): the full matrix of predictors with and without each corrector. The
# reference's recommended pairs and one of each kind run by default; the rest is marked slow.
FAST_CASES = {
    ('vesde', 'reverse_diffusion', 'langevin'), ('vesde', 'ancestral_sampling', 'none'),
    ('vesde', 'euler_maruyama', 'ald'), ('vpsde', 'euler_maruyama', 'none'),
    ('vpsde', 'ancestral_sampling', 'langevin'), ('vpsde', 'reverse_diffusion', 'ald'),
    ('subvpsde', 'reverse_diffusion', 'none'), ('subvpsde', 'euler_maruyama', 'langevin'),
}


def _matrix():
  for sde_name in EPS:
    predictors = ['euler_maruyama', 'reverse_diffusion']
    if sde_name != 'subvpsde':
      predictors.append('ancestral_sampling')
    for predictor in predictors:
      for corrector in ('none', 'langevin', 'ald'):
        case = (sde_name, predictor, corrector)
        marks = () if case in FAST_CASES else (pytest.mark.slow,)
        yield pytest.param(*case, marks=marks, id='-'.join(case))


@pytest.mark.parametrize('sde_name,predictor,corrector', list(_matrix()))
def test_pc_sampler_matches_mixture(sde_name, predictor, corrector):
  """N = 250 steps, snr 0.16, one corrector step, denoised; 10,000 samples."""
  sde = make_sde(sde_name, 250)
  sampler = pc_sampler(sde, (N_SAMPLES, 2), predictor, corrector, eps=EPS[sde_name])
  samples, nfe = sampler(jax.random.PRNGKey(0), gaussian_mixture.isotropic_score_fn(sde, MIXTURE))
  assert nfe == 250 * (1 + (corrector != 'none'))
  assert_matches_mixture(samples)


@pytest.mark.parametrize('sde_name,corrector', [
    ('vesde', 'ald'), ('vesde', 'langevin'),
    pytest.param('vpsde', 'langevin', marks=pytest.mark.slow),
    pytest.param('subvpsde', 'langevin', marks=pytest.mark.slow)])
def test_corrector_only_sampling_matches_mixture(sde_name, corrector):
  """Annealed Langevin dynamics (predictor 'none'): N = 100 noise levels × 30 steps, snr 0.16.

  ALD is NCSN's sampler, for VE: under VP its step 2α(snr σ_t)² shrinks with σ_t while the marginal's
  mean moves from 0 to the data, so corrector-only VP sampling does not converge at this budget (means
  off by > 20 SE); the Langevin corrector's norm-based step does. Achieved max |z|: 3.5 (VE ALD),
  2.8 (VE Langevin), 3.2 (VP), 2.7 (sub-VP).
  """
  sde = make_sde(sde_name, 100)
  sampler = pc_sampler(sde, (N_SAMPLES, 2), 'none', corrector, n_steps=30, eps=EPS[sde_name])
  samples, nfe = sampler(jax.random.PRNGKey(0), gaussian_mixture.isotropic_score_fn(sde, MIXTURE))
  assert nfe == 100 * 30
  assert_matches_mixture(samples)


@pytest.mark.parametrize('sde_name', sorted(EPS))
def test_ode_sampler_matches_mixture(sde_name):
  """Probability-flow ODE, Dopri5, rtol = atol = 1e-5; 10,000 samples (achieved max |z| 2.5, 145-157
  NFE)."""
  sde = make_sde(sde_name, 1000)
  sampler = ode_sampler(sde, (N_SAMPLES, 2), eps=EPS[sde_name])
  samples, nfe = sampler(jax.random.PRNGKey(0), gaussian_mixture.isotropic_score_fn(sde, MIXTURE))
  assert 20 < nfe < 1000
  assert_matches_mixture(samples)


@pytest.mark.parametrize('sde_name', sorted(EPS))
def test_ode_sampler_is_the_exact_gaussian_flow(sde_name):
  """For Gaussian data N(μ, diag λ), the probability-flow ODE is affine: each coordinate keeps its
  standardised value, x_t = a_t μ + sqrt(v_t / v_T) (x_T - a_T μ) with v_t = a_t² λ + s_t². Decoding
  given latents z must land there to within 1e-3 (rtol = atol = 1e-5; achieved 2.7e-5 VE, 1.1e-4 VP,
  2.1e-4 sub-VP)."""
  sde = make_sde(sde_name, 1000)
  mean, lam = jnp.array([1., -2., 0.5]), jnp.array([0.25, 1., 4.])
  data = gaussian_mixture.gaussian(mean, jnp.diag(lam))
  eps = EPS[sde_name]
  z = sde.prior_sampling(jax.random.PRNGKey(3), (8, 3))
  sampler = ode_sampler(sde, (8, 3), eps=eps)
  x, _ = sampler(jax.random.PRNGKey(0), gaussian_mixture.score_fn(sde, data), z=z)
  (a_0,), (s_0,) = sde.marginal_coeffs(jnp.array([eps]))
  (a_1,), (s_1,) = sde.marginal_coeffs(jnp.array([sde.T]))
  v_0, v_1 = a_0**2 * lam + s_0**2, a_1**2 * lam + s_1**2
  expected = a_0 * mean + jnp.sqrt(v_0 / v_1) * (z - a_1 * mean)
  np.testing.assert_allclose(x, expected, atol=1e-3)


def test_ode_decodes_likelihood_latents():
  """Encoding data with the likelihood's ODE (eps → T) and decoding the latent with the ODE sampler
  (T → eps) returns the data: ≤ 1e-3 at rtol = atol = 1e-5 (mixture data, VP; achieved 7.5e-5)."""
  from scoresde import likelihood  # pylint: disable=import-outside-toplevel  (the likelihood helper's module)
  sde = make_sde('vpsde', 1000)
  score = gaussian_mixture.score_fn(sde, MIXTURE)
  x = MIXTURE.sample(jax.random.PRNGKey(5), 8)
  encode = likelihood.get_log_likelihood_fn(sde, 'exact', num_probes=1, rtol=1e-5, atol=1e-5, eps=1e-3,
                                            method='dopri5')
  _, z, _ = encode(jax.random.PRNGKey(0), score, x)
  decoded, _ = ode_sampler(sde, (8, 2), eps=1e-3)(jax.random.PRNGKey(0), score, z=z)
  np.testing.assert_allclose(decoded, x, atol=1e-3)


@pytest.mark.parametrize('method', ['pc', 'ode'])
def test_image_shaped_mixture(method):
  """(4, 4, 1) images from a 3-mode mixture in 16 dimensions, VE (PC: reverse diffusion + Langevin,
  N = 250; ODE: Dopri5), 4,000 samples: every pixel's mean and variance per mode within 5 SE (achieved
  max |z| 2.8 PC, 3.0 ODE). Off-diagonal covariances are not checked here: 360 of them make a max of
  ~4 SE likely under exact sampling."""
  data = gaussian_mixture.default_mixture(16)
  sde = make_sde('vesde', 250)
  config = default_cifar10_configs.get_default_configs()
  config.sampling.method = method
  sampler = sampling.get_sampling_fn(config, sde, (4000, 4, 4, 1), None, eps=EPS['vesde'])
  samples, _ = sampler(jax.random.PRNGKey(0), gaussian_mixture.isotropic_score_fn(sde, data))
  assert samples.shape == (4000, 4, 4, 1)
  z = mixture_z_scores(samples, data, STD)
  assert z['outliers'] < 1e-3, z
  assert max(z['weight'], z['mean'], z['var']) < Z_TOL, z


# ------------------------------------------------------------------------------------------------
# Exact NFE, seeds, compile-once behaviour and errors.


class _CountingScore:
  """An analytic score that counts its evaluations on the host (jax.debug.callback per call)."""

  def __init__(self, sde, data):
    self.score = gaussian_mixture.isotropic_score_fn(sde, data)
    self.calls = 0

  def _count(self):
    self.calls += 1

  def __call__(self, x, t):
    jax.debug.callback(self._count, ordered=True)
    return self.score(x, t)


@pytest.mark.parametrize('predictor,corrector,n_steps', [
    ('reverse_diffusion', 'langevin', 2), ('none', 'ald', 3), ('euler_maruyama', 'none', 1)])
def test_pc_nfe_is_exact(predictor, corrector, n_steps):
  sde = make_sde('vesde', 7)
  score = _CountingScore(sde, MIXTURE)
  sampler = pc_sampler(sde, (2, 2), predictor, corrector, n_steps=n_steps)
  x, nfe = sampler(jax.random.PRNGKey(0), score)
  jax.block_until_ready(x)
  jax.effects_barrier()
  assert nfe == score.calls == 7 * ((predictor != 'none') + (corrector != 'none') * n_steps)


@pytest.mark.parametrize('method,denoise', [(method, False) for method in sorted(ode_solvers.SOLVERS)]
                         + [('dopri5', True)])
def test_ode_nfe_is_exact(method, denoise):
  """ode_solvers.num_evaluations counts every score evaluation, for every solver the table offers."""
  sde = make_sde('vpsde', 1000)
  score = _CountingScore(sde, MIXTURE)
  sampler = ode_sampler(sde, (1, 2), rtol=1e-3, atol=1e-3, method=method, denoise=denoise)
  x, nfe = sampler(jax.random.PRNGKey(0), score)
  jax.block_until_ready(x)
  jax.effects_barrier()
  assert nfe == score.calls
  assert nfe > 10


def _small_samplers(batch):
  """Per-sample-reproducible samplers (and the batch-coupled default) on a 2-D mixture."""
  sde = make_sde('vesde', 20)
  score = gaussian_mixture.score_fn(sde, MIXTURE)
  shape = (batch, 2)
  return score, {
      'rd_langevin_per_sample': pc_sampler(sde, shape, 'reverse_diffusion', 'langevin',
                                           langevin_per_sample=True),
      'ald': pc_sampler(sde, shape, 'none', 'ald', n_steps=2),
      'ode': ode_sampler(sde, shape, rtol=1e-4, atol=1e-4),
      'rd_langevin_batch': pc_sampler(sde, shape, 'reverse_diffusion', 'langevin'),
  }


def test_sample_depends_only_on_seed_and_index():
  """Sample i of a batch of 16 equals sample i of a batch of 8, and rows 8..15 equal a batch of 8 drawn
  with first_index = 8 (a second round), for every sampler without batch coupling."""
  rng = jax.random.PRNGKey(7)
  score, small = _small_samplers(8)
  _, large = _small_samplers(16)
  for name in small:
    if name.endswith('_batch'):
      continue
    big, _ = large[name](rng, score)
    first, _ = small[name](rng, score)
    second, _ = small[name](rng, score, first_index=8)
    np.testing.assert_allclose(big[:8], first, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(big[8:], second, rtol=1e-5, atol=1e-5, err_msg=name)


def test_langevin_step_size_is_batch_coupled_by_default():
  rng = jax.random.PRNGKey(7)
  score, small = _small_samplers(8)
  _, large = _small_samplers(16)
  big, _ = large['rd_langevin_batch'](rng, score)
  first, _ = small['rd_langevin_batch'](rng, score)
  assert not np.allclose(big[:8], first, atol=1e-5)


_DEVICE_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, 'tests')
    import test_sampling
    score, samplers = test_sampling._small_samplers(8)
    out = {'devices': jax.device_count()}
    for name, sampler in samplers.items():
      x, nfe = sampler(jax.random.PRNGKey(7), score)
      assert len(x.sharding.device_set) == jax.device_count(), x.sharding
      out[name] = np.asarray(x).tolist()
    print('RESULT' + json.dumps(out))
''')


def _run_on_devices(count: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={count}',
             JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', _DEVICE_SCRIPT], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1]
  return json.loads(line[len('RESULT'):])


@pytest.mark.multiprocess
def test_identical_samples_on_one_and_four_devices():
  """The batch is sharded over 4 CPU devices; per-sample samplers give the same samples as on one
  device (to float32 rounding, 1e-5), and so does the batch-averaged Langevin step (a global mean)."""
  one, four = _run_on_devices(1), _run_on_devices(4)
  assert (one['devices'], four['devices']) == (1, 4)
  for name in one:
    if name != 'devices':
      np.testing.assert_allclose(four[name], one[name], rtol=1e-5, atol=1e-5, err_msg=name)


class _TinyScoreNet(nn.Module):
  """A model with the zoo's calling convention; counts how often it is traced."""
  traces = [0]

  @nn.compact
  def __call__(self, x, labels, train=False):
    self.traces[0] += 1
    return nn.Dense(x.shape[-1])(x) * labels[:, None]


def test_model_variables_are_jit_arguments():
  """Two different weight sets reuse one compiled sampler and give different samples."""
  sde = make_sde('vpsde', 5)
  model = _TinyScoreNet()
  config = default_cifar10_configs.get_default_configs()
  config.training.sde = 'vpsde'
  sampler = pc_sampler(sde, (4, 3), 'euler_maruyama', 'none')
  outs, traces = [], 0
  for seed in (0, 1):
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 3)), jnp.ones((1,)))
    before = _TinyScoreNet.traces[0]
    score_fn = mutils.network_score_fn(config, sde, model, variables)
    outs.append(sampler(jax.random.PRNGKey(0), score_fn)[0])
    traces += _TinyScoreNet.traces[0] - before
  assert traces == 1
  assert not np.allclose(outs[0], outs[1])


def test_pc_sampler_starts_from_z():
  """``z`` is x_T: a probability-flow predictor without corrector is then a function of z alone."""
  sde = make_sde('vpsde', 10)
  sampler = pc_sampler(sde, (4, 2), 'euler_maruyama', 'none', probability_flow=True)
  score = gaussian_mixture.score_fn(sde, MIXTURE)
  z = sde.prior_sampling(jax.random.PRNGKey(3), (4, 2))
  a, _ = sampler(jax.random.PRNGKey(0), score, z=z)
  b, _ = sampler(jax.random.PRNGKey(1), score, z=z)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, sampler(jax.random.PRNGKey(0), score)[0])
  with pytest.raises(ValueError, match=r'z has shape \(3, 2\)'):
    sampler(jax.random.PRNGKey(0), score, z=jnp.zeros((3, 2)))


def test_get_sampling_fn_reads_config():
  config = default_cifar10_configs.get_default_configs()
  sde = make_sde('vesde', 10)
  config.sampling.predictor, config.sampling.corrector = 'euler_maruyama', 'ald'
  config.sampling.n_steps_each = 2
  sampler = sampling.get_sampling_fn(config, sde, (4, 2), lambda x: x + 100., eps=1e-5)
  x, nfe = sampler(jax.random.PRNGKey(0), gaussian_mixture.score_fn(sde, MIXTURE))
  assert nfe == 30 and float(jnp.min(x)) > 80.  # inverse scaler applied
  config.sampling.method = 'sde'
  with pytest.raises(ValueError, match=r"config.sampling.method='sde'.*'pc', 'ode', 'heun'"):
    sampling.get_sampling_fn(config, sde, (4, 2))


def test_bad_arguments_fail_clearly():
  sde = make_sde('vpsde', 10)
  with pytest.raises(ValueError, match=r"predictor 'heun'.*ancestral_sampling.*euler_maruyama"):
    pc_sampler(sde, (4, 2), 'heun', 'none')
  with pytest.raises(ValueError, match=r"corrector 'hmc'.*'ald', 'langevin', 'none'"):
    pc_sampler(sde, (4, 2), 'none', 'hmc')
  with pytest.raises(ValueError, match='VESDE and VPSDE, not subVPSDE'):
    pc_sampler(make_sde('subvpsde', 10), (4, 2), 'ancestral_sampling', 'none')
  with pytest.raises(ValueError, match='probability_flow=False'):
    pc_sampler(sde, (4, 2), 'ancestral_sampling', 'none', probability_flow=True)
  with pytest.raises(ValueError, match=r'config.sampling.ode_method.*dopri5'):
    ode_sampler(sde, (4, 2), method='heun')
  with pytest.raises(ValueError, match=r'config.sampling.eps'):
    ode_sampler(sde, (4, 2), eps=0.)
  with pytest.raises(ValueError, match='snr'):
    pc_sampler(sde, (4, 2), 'none', 'langevin', snr=0.)
  with pytest.raises(ValueError, match='batch_size'):
    pc_sampler(sde, (2,), 'none', 'langevin')
  sampler = ode_sampler(sde, (4, 2))
  with pytest.raises(ValueError, match=r'z has shape \(3, 2\)'):
    sampler(jax.random.PRNGKey(0), gaussian_mixture.score_fn(sde, MIXTURE), z=jnp.zeros((3, 2)))


def test_custom_predictor_extension_point():
  """A registered Predictor subclass is usable by name, e.g. from config.sampling.predictor."""

  @sampling.register_predictor('test_half_step_euler')
  class HalfStep(sampling.Predictor):  # pylint: disable=unused-variable
    nfe = 2

    def update(self, rng, x, t, score_fn):
      dt = -0.5 * self.sde.T / self.sde.N
      rsde = self.sde.reverse(score_fn, probability_flow=True)
      x = x + rsde.sde(x, t)[0] * dt
      x = x + rsde.sde(x, jnp.maximum(t + dt, 1e-3))[0] * dt
      return x, x

  sde = make_sde('vpsde', 20)
  sampler = pc_sampler(sde, (4, 2), 'test_half_step_euler', 'none')
  x, nfe = sampler(jax.random.PRNGKey(0), gaussian_mixture.score_fn(sde, MIXTURE))
  assert nfe == 40 and np.all(np.isfinite(x))
  assert sampling.get_predictor('TEST_HALF_STEP_EULER') is HalfStep  # config names are case-blind
