"""Likelihoods against closed forms: exact scores of Gaussian(-mixture) data make the probability-flow
ODE transport the true marginal p_eps to the true p_T, so every number here has an exact reference."""

import json
import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from scoresde import gaussian_mixture
from scoresde import datasets
from scoresde.evaluation import bits_per_dim
from scoresde import likelihood
from scoresde import ode_solvers
from scoresde import sde_lib
from configs import default_cifar10_configs

SDES = {
    'vesde': lambda: sde_lib.VESDE(0.01, 50.),
    'vpsde': lambda: sde_lib.VPSDE(0.1, 20.),
    'subvpsde': lambda: sde_lib.subVPSDE(0.1, 20.),
}
EPS = 1e-5
# Correlated, so that the Jacobian of the drift has off-diagonal terms (Rademacher probes see them).
COV3 = jnp.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
DATA = {
    'gaussian': gaussian_mixture.gaussian(jnp.zeros(3), COV3),
    'mixture': gaussian_mixture.default_mixture(3),
}


_DEFAULTS = default_cifar10_configs.get_default_configs()
SETTINGS = dict(num_probes=_DEFAULTS.eval.num_probes, rtol=_DEFAULTS.eval.ode_rtol,
                atol=_DEFAULTS.eval.ode_atol, eps=_DEFAULTS.eval.likelihood_eps, method=_DEFAULTS.eval.ode_method)


def log_likelihood_fn(sde, hutchinson_type, **settings):
  """``likelihood.get_log_likelihood_fn`` with the default config's settings, except those given."""
  return likelihood.get_log_likelihood_fn(sde, hutchinson_type, **{**SETTINGS, **settings})


def likelihood_fn(sde, inverse_scaler, **settings):
  """``likelihood.get_likelihood_fn`` with the default config's settings, except those given."""
  defaults = dict(SETTINGS, num_levels=_DEFAULTS.data.num_levels,
                  hutchinson_type=_DEFAULTS.eval.hutchinson_type)
  return likelihood.get_likelihood_fn(sde, inverse_scaler, **{**defaults, **settings})


def _eps_times(n):
  return jnp.full((n,), EPS)


@pytest.mark.parametrize('data_name', sorted(DATA))
@pytest.mark.parametrize('sde_name', sorted(SDES))
def test_exact_divergence_gives_true_log_density(sde_name, data_name):
  """|logp - log p_eps(x)| / D within 1e-3 nats at rtol = atol = 1e-5.

  The model's density differs from the true p_eps only through its prior: logp uses sde.prior_logp at
  z = x(T), the truth has the true marginal p_T there. The flow identity log p_eps(x) = log p_T(z) +
  ∫ div (D.2) isolates the solver and divergence; the model density itself is compared where p_T is
  close to the prior (zero-mean data). Achieved (8 points, D = 3): flow identity ≤ 8e-5 nats/dim for all
  six cases; model density for the Gaussian ≤ 2.2e-4 (VE), 2e-5 (VP), 7e-5 (sub-VP) nats/dim.
  """
  sde, data = SDES[sde_name](), DATA[data_name]
  x = data.sample(jax.random.PRNGKey(1), 8)
  fn = log_likelihood_fn(sde, 'exact', rtol=1e-5, atol=1e-5, eps=EPS)
  logp, z, nfe = fn(jax.random.PRNGKey(0), gaussian_mixture.score_fn(sde, data), x)
  true_logp = gaussian_mixture.log_prob_fn(sde, data)
  target = true_logp(x, _eps_times(8))
  flow = logp - sde.prior_logp(z) + true_logp(z, jnp.full((8,), sde.T))
  flow_error = float(jnp.max(jnp.abs(flow - target))) / 3
  model_error = float(jnp.max(jnp.abs(logp - target))) / 3
  print(f'{sde_name} {data_name}: flow identity {flow_error:.2e}, model density {model_error:.2e} '
        f'nats/dim, NFE {np.asarray(nfe).tolist()}')
  assert flow_error < 1e-3
  if data_name == 'gaussian':
    assert model_error < 1e-3
  assert nfe.shape == (8,) and np.all(np.asarray(nfe) > 0)


def test_nfe_counts_every_evaluation():
  """The reported NFE equals the number of times the vector field actually ran."""
  calls = []

  sde, data = SDES['vesde'](), DATA['mixture']
  score = gaussian_mixture.score_fn(sde, data)

  def counting_score(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return score(x, t)

  for method in sorted(ode_solvers.SOLVERS):
    calls.clear()
    fn = log_likelihood_fn(sde, 'rademacher', method=method)
    _, _, nfe = fn(jax.random.PRNGKey(0), counting_score, jnp.array([[4.3, -0.4, 0.2]]))
    jax.effects_barrier()
    assert int(nfe[0]) == len(calls), method


def test_hutchinson_is_unbiased_and_variance_falls_with_probes():
  """Mean of many single-probe estimates matches the exact log-density; std shrinks as 1/√probes."""
  sde, data = SDES['vpsde'](), DATA['gaussian']
  score = gaussian_mixture.score_fn(sde, data)
  x = jnp.array([[0.7, -0.4, 0.5]])
  exact, z_exact, _ = log_likelihood_fn(sde, 'exact')(jax.random.PRNGKey(0), score, x)
  copies = jnp.repeat(x, 256, axis=0)
  spread = {}
  for kind, probes in (('rademacher', 1), ('gaussian', 1), ('rademacher', 16)):
    fn = log_likelihood_fn(sde, kind, num_probes=probes)
    logp, z, _ = fn(jax.random.PRNGKey(3), score, copies)
    logp = np.asarray(logp, np.float64)
    stderr = logp.std(ddof=1) / math.sqrt(logp.size)
    print(f'{kind} x{probes}: mean - exact = {logp.mean() - float(exact[0]):+.4f}, '
          f'std {logp.std(ddof=1):.4f}, stderr {stderr:.4f}')
    assert abs(logp.mean() - float(exact[0])) < 4 * stderr + 1e-4
    # The trajectory does not depend on the probes.
    np.testing.assert_allclose(z, jnp.repeat(z_exact, 256, axis=0), atol=1e-4)
    spread[(kind, probes)] = logp.std(ddof=1)
  assert spread[('rademacher', 1)] > 0.01  # the test has teeth: one probe is noisy here
  ratio = spread[('rademacher', 1)] / spread[('rademacher', 16)]
  assert 3. < ratio < 5.3, ratio  # √16 = 4; the std of a std from 256 draws is ~5%


def _gaussian_model(sde, mean_v, std_v, shift, scale):
  """A model whose density is known: data-space N(mean_v, std_v²) per coordinate (D = 3), as the
  model-space Gaussian y = (v - shift) / scale with its exact scores. Returns the model-space data
  distribution and the data-space (mean, variance) of the model density p_eps."""
  mean_y = (mean_v - shift) / scale
  var_y = (std_v / scale)**2
  data = gaussian_mixture.gaussian(jnp.full((3,), mean_y), var_y * jnp.eye(3))
  a, s = sde.marginal_coeffs(jnp.full((1,), EPS))
  mean_eps = float(a[0]) * mean_y * scale + shift
  var_eps = (float(a[0])**2 * var_y + float(s[0])**2) * scale**2
  return data, mean_eps, var_eps


def _gaussian_bits(v, mean, var, num_levels):
  """-log2 N(v; mean, var) / D + log2 L, rows of v (B, D)."""
  nats = 0.5 * np.log(2 * np.pi * var) + (v - mean)**2 / (2 * var)
  return nats.mean(axis=1) / np.log(2) + math.log2(num_levels)


@pytest.mark.parametrize('centered,num_levels', [(True, 17), (False, 256)])
def test_bits_per_dim_of_known_discrete_distribution(centered, num_levels):
  """Against closed forms for a Gaussian model density p_V on the data space [0, 1] (D = 3):

  - pointwise, at the dequantized points v: bpd = -log2 p_V(v) / D + log2 L (after replacing the prior
    by the true p_T at z, as in the flow identity above, so that only the bits/dim algebra is tested);
  - in expectation over the dequantization noise: E_u[-log2 p_V((k + u) / L)] / D + log2 L, where
    E_u (v - m)² = (c - m)² + 1 / (12 L²) over a cell with centre c;
  - the discrete model's exact bits/dim -log2 P(k) / D with P(k) = Π (Φ(upper) - Φ(lower)), which the
    dequantized value bounds from above and, for a density smooth on the scale of a cell, nearly meets.
  Achieved (256 examples): pointwise ≤ 2e-4 bits; see the printed figures for the others.
  """
  sde = SDES['vpsde']()
  shift, scale = (0.5, 0.5) if centered else (0., 1.)  # inverse_scaler(y) = shift + scale y
  inverse_scaler = (lambda y: (y + 1.) / 2.) if centered else (lambda y: y)
  data, mean_v, var_v = _gaussian_model(sde, 0.5, 0.15, shift, scale)
  rng = np.random.default_rng(0)
  levels = np.clip(np.rint(rng.normal(0.5, 0.15, (256, 3)) * num_levels - 0.5), 0, num_levels - 1)
  levels = jnp.asarray(levels.astype(np.int32))
  fn = likelihood_fn(sde, inverse_scaler, num_levels=num_levels)
  key = jax.random.PRNGKey(0)
  bpd, z, _ = fn(key, gaussian_mixture.score_fn(sde, data), levels)
  prior_fix = gaussian_mixture.log_prob_fn(sde, data)(z, jnp.full((256,), sde.T)) - sde.prior_logp(z)
  bpd_true_prior = np.asarray(bpd - prior_fix / (3 * np.log(2)), np.float64)
  v = np.asarray(likelihood.dequantize(key, levels, num_levels), np.float64)
  pointwise = np.max(np.abs(bpd_true_prior - _gaussian_bits(v, mean_v, var_v, num_levels)))
  assert np.all((v >= np.asarray(levels) / num_levels) & (v < (np.asarray(levels) + 1) / num_levels))

  levels = np.asarray(levels)
  centres = (levels + 0.5) / num_levels
  square = (centres - mean_v)**2 + 1. / (12 * num_levels**2)
  expected = (0.5 * np.log2(2 * np.pi * var_v) + square / (2 * var_v * np.log(2))).mean(axis=1)
  expected += math.log2(num_levels)
  cells = stats.norm.cdf((levels + 1.) / num_levels, mean_v, math.sqrt(var_v)) - stats.norm.cdf(
      levels / num_levels, mean_v, math.sqrt(var_v))
  exact_discrete = -np.log2(cells).mean(axis=1)
  bpd = np.asarray(bpd, np.float64)
  stderr = (bpd - expected).std(ddof=1) / math.sqrt(bpd.size)
  print(f'L={num_levels}: pointwise error {pointwise:.1e} bits; mean bpd {bpd.mean():.5f}, expected '
        f'{expected.mean():.5f} (stderr {stderr:.1e}), exact discrete {exact_discrete.mean():.5f}')
  assert pointwise < 1e-3
  assert abs(bpd.mean() - expected.mean()) < 4 * stderr + 1e-3
  assert 0 <= expected.mean() - exact_discrete.mean() < 0.02
  assert likelihood.dequantization_offset_bits(inverse_scaler, num_levels) == pytest.approx(
      math.log2(num_levels) + (-1. if centered else 0.))


def test_bits_per_dim_refuses_undequantizable_input():
  sde = SDES['vesde']()
  fn = likelihood_fn(sde, lambda y: y, num_levels=17)
  score = gaussian_mixture.score_fn(sde, DATA['gaussian'])
  with pytest.raises(TypeError, match='integer data levels'):
    fn(jax.random.PRNGKey(0), score, jnp.full((2, 3), 0.5))
  with pytest.raises(ValueError, match=r'\[0, 16\]'):
    fn(jax.random.PRNGKey(0), score, jnp.full((2, 3), 17, jnp.int32))
  with pytest.raises(ValueError, match='affine'):
    likelihood_fn(sde, jnp.tanh)
  with pytest.raises(ValueError, match='config.eval.hutchinson_type'):
    log_likelihood_fn(sde, 'Rademacher ')
  with pytest.raises(ValueError, match='uniform_dequantization=False'):
    likelihood.levels_from_unit_interval(np.array([[0.5 / 17]]), 17)
  np.testing.assert_array_equal(likelihood.levels_from_unit_interval(np.array([[0., 0.5, 1.]]), 17),
                                [[0, 8, 16]])


def test_encode_decode_round_trip():
  """z from the likelihood function, decoded by sampling.get_ode_sampler(z=...), gives back x."""
  sampling = pytest.importorskip('sampling')
  sde, data = SDES['vpsde'](), DATA['mixture']
  score = gaussian_mixture.score_fn(sde, data)
  x = data.sample(jax.random.PRNGKey(5), 4)
  fn = log_likelihood_fn(sde, 'rademacher', rtol=1e-6, atol=1e-6, eps=EPS)
  _, z, _ = fn(jax.random.PRNGKey(0), score, x)
  decode = sampling.get_ode_sampler(sde, x.shape, rtol=1e-6, atol=1e-6, method='dopri5', eps=EPS,
                                    denoise=False)
  x_back, _ = decode(jax.random.PRNGKey(1), score, z=z)
  error = float(jnp.max(jnp.abs(x_back - x)))
  print(f'round trip max |x - decode(encode(x))| = {error:.1e} (|x| up to {float(jnp.max(jnp.abs(x))):.1f})')
  assert error < 1e-3


# ----------------------------------------------------------------------------------------------------
# Resumable evaluation


class _ExactGaussianScore(nn.Module):
  """VE model whose score is exact for zero-mean N(0, var I) data in model space: −x / (var + σ²)."""
  var: float = 0.09

  @nn.compact
  def __call__(self, x, labels, train=False):
    del train
    log_var = self.param('log_var', lambda key: jnp.log(jnp.full((), self.var)))
    return -x / (jnp.exp(log_var) + labels.reshape((-1,) + (1,) * (x.ndim - 1))**2)


NUM_EXAMPLES, BATCH, SHAPE = 10, 4, (2, 2, 1)


def _eval_config():
  config = ml_collections.ConfigDict()
  config.seed = 7
  config.training = ml_collections.ConfigDict({'sde': 'vesde', 'continuous': True})
  config.data = ml_collections.ConfigDict({
      'dataset': 'digits', 'image_size': 2, 'num_channels': 1, 'centered': True, 'num_levels': 17})
  config.eval = ml_collections.ConfigDict({
      'batch_size': BATCH, 'bpd_dataset': 'test', 'bpd_num_repeats': 2, 'likelihood_eps': EPS,
      'hutchinson_type': 'exact', 'num_probes': 1, 'ode_method': 'dopri5', 'ode_rtol': 1e-5,
      'ode_atol': 1e-5})
  return config


class _Preempted(Exception):
  pass


@pytest.fixture
def fake_data(monkeypatch):
  """10 examples in batches of 4 (the last one padded and masked); optionally preempted."""
  levels = np.random.default_rng(0).integers(5, 12, (NUM_EXAMPLES,) + SHAPE)
  state = {'served': 0, 'fail_after': None}

  def get_eval_iterator(config, split='test', uniform_dequantization=False):
    assert split == 'test' and not uniform_dequantization
    for start in range(0, NUM_EXAMPLES, BATCH):
      if state['fail_after'] is not None and state['served'] >= state['fail_after']:
        raise _Preempted()
      state['served'] += 1
      rows = levels[start:start + BATCH]
      image = np.zeros((BATCH,) + SHAPE, np.float32)
      image[:len(rows)] = rows / (config.data.num_levels - 1)
      yield {'image': image, 'mask': np.arange(BATCH) < len(rows)}

  monkeypatch.setattr(datasets, 'get_eval_iterator', get_eval_iterator)
  monkeypatch.setattr(datasets, 'num_examples', lambda config, split: NUM_EXAMPLES)
  return levels, state


def test_evaluation_resumes_across_repeats_and_keeps_last_batch(fake_data, tmp_path):
  levels, state = fake_data
  config = _eval_config()
  sde = sde_lib.get_sde(ml_collections.ConfigDict({
      'training': {'sde': 'vesde'}, 'model': {'sigma_min': 0.01, 'sigma_max': 50., 'num_scales': 1000}}))
  model = _ExactGaussianScore()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE), jnp.ones((1,)))

  full = bits_per_dim.evaluate_bpd(config, str(tmp_path / 'full'), 3, model, variables, sde,
                                      show_progress=False)
  assert full['num_examples'] == NUM_EXAMPLES  # the padded last batch counts its 2 real examples
  assert len(full['bpd_per_repeat']) == 2 and full['bpd_per_repeat'][0] != full['bpd_per_repeat'][1]

  # Preempted in the second repeat, after its first batch (4 of 6 batches done), then resumed.
  state['served'], state['fail_after'] = 0, 4
  with pytest.raises(_Preempted):
    bits_per_dim.evaluate_bpd(config, str(tmp_path / 'cut'), 3, model, variables, sde,
                                 show_progress=False)
  saved = sorted(os.listdir(tmp_path / 'cut' / 'bpd_test_ckpt_3'))
  assert saved == ['r0_b0.npz', 'r0_b1.npz', 'r0_b2.npz', 'r1_b0.npz', 'settings.json']
  state['fail_after'] = None
  resumed = bits_per_dim.evaluate_bpd(config, str(tmp_path / 'cut'), 3, model, variables, sde,
                                         show_progress=False)
  for key in ('bpd', 'bpd_stderr', 'bpd_per_repeat', 'nfe_mean', 'num_examples'):
    assert resumed[key] == full[key], key
  for name in ('r1_b0.npz', 'r1_b2.npz'):
    a, b = np.load(tmp_path / 'full' / 'bpd_test_ckpt_3' / name), np.load(
        tmp_path / 'cut' / 'bpd_test_ckpt_3' / name)
    np.testing.assert_array_equal(a['bpd'], b['bpd'])
  with open(tmp_path / 'cut' / 'bpd_test_ckpt_3.json') as f:
    assert json.load(f)['bpd'] == full['bpd']

  # The network is the exact score of N(0, 0.09 I) in model space: data-space N(0.5, 0.0225) at eps
  # up to σ(eps)² ≈ 1e-4, so bits/dim has the closed form of the previous test (2 repeats, 40 dims).
  var_v = (0.09 + 0.01**2) / 4
  square = ((levels + 0.5) / 17 - 0.5)**2 + 1 / (12 * 17**2)
  expected = np.mean(0.5 * np.log2(2 * np.pi * var_v) + square / (2 * var_v * np.log(2))) + np.log2(17)
  print(f"eval: bpd {full['bpd']:.4f} ± {full['bpd_stderr']:.4f}, closed-form expectation {expected:.4f}")
  assert abs(full['bpd'] - expected) < 0.05, (full['bpd'], expected)

  # A run with other settings refuses to mix its batches with these.
  config.eval.num_probes = 2
  with pytest.raises(ValueError, match='num_probes'):
    bits_per_dim.evaluate_bpd(config, str(tmp_path / 'cut'), 3, model, variables, sde,
                                 show_progress=False)


# ----------------------------------------------------------------------------------------------------
# Data parallelism


_SHARDED = textwrap.dedent('''
    import json, os
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
    import jax, jax.numpy as jnp
    from scoresde import gaussian_mixture
    from scoresde import likelihood
    from scoresde.infra import parallel
    from scoresde import sde_lib
    sde = sde_lib.subVPSDE()
    data = gaussian_mixture.default_mixture(3)
    x = data.sample(jax.random.PRNGKey(1), 8)
    x = jax.device_put(x, parallel.batch_sharding(parallel.data_mesh(), 2))
    fn = likelihood.get_log_likelihood_fn(sde, 'rademacher', num_probes=2, rtol=1e-5, atol=1e-5, eps=1e-5,
                                          method='dopri5')
    logp, z, nfe = fn(jax.random.PRNGKey(0), gaussian_mixture.score_fn(sde, data), x)
    print(json.dumps({'devices': jax.device_count(), 'logp': logp.tolist(), 'nfe': nfe.tolist(),
                      'shards': len(logp.sharding.device_set)}))
''')


@pytest.mark.multiprocess
def test_sharded_over_four_devices_matches_one():
  """Per-example solves: each example's result is the same whether the batch sits on 1 or 4 devices."""
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  out = subprocess.run([sys.executable, '-c', _SHARDED], capture_output=True, text=True, env=env,
                       timeout=300, check=True)
  sharded = json.loads(out.stdout.strip().splitlines()[-1])
  assert sharded['devices'] == 4 and sharded['shards'] == 4
  sde = sde_lib.subVPSDE()
  data = gaussian_mixture.default_mixture(3)
  fn = log_likelihood_fn(sde, 'rademacher', num_probes=2)
  logp, _, nfe = fn(jax.random.PRNGKey(0), gaussian_mixture.score_fn(sde, data),
                    data.sample(jax.random.PRNGKey(1), 8))
  np.testing.assert_allclose(sharded['logp'], logp, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(sharded['nfe'], nfe)
