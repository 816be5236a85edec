"""Variational dequantization (Ho et al. 2019; Song, Durkan, Murray, Ermon 2021) against truth.

- The flow's log q(u | x) is the exact change of variables: it equals log N(ε) - log|det ∂u/∂ε| with the
  Jacobian from ``jax.jacfwd`` of the whole map ε -> u, for a flow with random (non-identity) weights.
- Zero-initialised, the flow is u = sigmoid(ε), and log q is the logit-normal density in closed form.
- The bits/dim functions with the default (uniform) dequantizer give the numbers of the formula they had
  before dequantizers existed; with a flow, the bound gains exactly log q / (D ln 2) at the flow's points.
- Trained against the exact score of a narrow Gaussian model on 2-pixel, 4-level data, the flow lowers
  the ELBO bits/dim below uniform dequantization's, and stays above the exact discrete -log2 P(x) / D,
  P(x) the model's mass of the cell (products of erf differences), within Monte-Carlo error.
- ``--mode=train_deq`` (with a stand-in score network) checkpoints and resumes the flow, and the bits/dim
  evaluation then reports the ODE and ELBO bits/dim under both dequantizers.
"""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from configs.vp import digits_likelihood
from scoresde import checkpointing
from scoresde import datasets
from scoresde import dequantization
from scoresde import dequantization_training
from scoresde.evaluation import bits_per_dim
from scoresde import gaussian_mixture
from scoresde import likelihood
from scoresde import likelihood_weighting
from scoresde.models import utils as mutils
from scoresde import run_lib
from scoresde import sde_lib

EPS = 1e-5
NUM_LEVELS = 4
SHAPE = (1, 2, 1)  # (H, W, C): two pixels, one per checkerboard half
SDE = sde_lib.VPSDE(0.1, 20., 1000)
INVERSE = lambda y: (y + 1.) / 2.  # centred data: v = (y + 1) / 2
# The model: data-space v ~ N(V_MEAN, V_STD² I), narrow against a cell (width 1/4), so the density varies
# within a cell and the uniform dequantizer's Jensen gap is large.
V_MEAN, V_STD = np.array([0.5, 0.7]), 0.07
MODEL = gaussian_mixture.isotropic_mixture([1.], [2. * V_MEAN - 1.], [2. * V_STD])


def _score_fn():
  return gaussian_mixture.score_fn(SDE, MODEL)


def _random_params(flow, rng, shape=SHAPE):
  """The flow's parameters with every array (the zero-initialised last layers too) randomised."""
  params = dequantization.init(jax.random.PRNGKey(0), flow, shape)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(treedef, [0.25 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_log_q_is_the_exact_change_of_variables():
  flow = dequantization.DequantizerFlow(num_levels=NUM_LEVELS, features=8)
  shape = (2, 2, 1)
  params = _random_params(flow, jax.random.PRNGKey(1), shape)
  levels = jnp.array([[[[0], [3]], [[2], [1]]]], jnp.int32)

  apply = jax.jit(lambda eps_flat: flow.apply({'params': params}, eps_flat.reshape((1,) + shape), levels))
  jacobian = jax.jit(jax.jacfwd(lambda eps_flat: apply(eps_flat)[0].reshape(-1)))

  for seed in range(3):
    eps = jax.random.normal(jax.random.PRNGKey(10 + seed), (4,))
    u, log_q = apply(eps)
    _, log_det = jnp.linalg.slogdet(jacobian(eps))
    numeric = jnp.sum(jax.scipy.stats.norm.logpdf(eps)) - log_det
    assert np.all((np.asarray(u) > 0) & (np.asarray(u) < 1))
    np.testing.assert_allclose(log_q[0], numeric, rtol=1e-4, atol=1e-4)
    # Not the identity: the couplings do act (else this test would not test them).
    assert abs(float(log_q[0]) - float(_logit_normal(u)[0])) > 0.05


def _logit_normal(u):
  logit = jnp.log(u) - jnp.log1p(-u)
  return jnp.sum((jax.scipy.stats.norm.logpdf(logit) - jnp.log(u) - jnp.log1p(-u)).reshape(u.shape[0], -1), 1)


def test_zero_initialised_flow_is_the_logit_normal():
  flow = dequantization.DequantizerFlow(num_levels=NUM_LEVELS, features=8)
  params = dequantization.init(jax.random.PRNGKey(0), flow, SHAPE)
  levels = jax.random.randint(jax.random.PRNGKey(1), (64,) + SHAPE, 0, NUM_LEVELS)
  rng = jax.random.PRNGKey(2)
  u, log_q = dequantization.sample_and_log_prob(flow, params, rng, levels)
  np.testing.assert_allclose(u, jax.nn.sigmoid(jax.random.normal(rng, levels.shape)), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(log_q, _logit_normal(u), rtol=1e-4, atol=1e-4)
  with pytest.raises(TypeError, match='integer data levels'):
    dequantization.sample_and_log_prob(flow, params, rng, levels.astype(jnp.float32))
  with pytest.raises(ValueError, match=r'\[0, 3\]'):
    dequantization.sample_and_log_prob(flow, params, rng, levels + 1)
  with pytest.raises(ValueError, match=r'images \(B, H, W, C\)'):
    dequantization.sample_and_log_prob(flow, params, rng, levels.reshape(64, 2))
  with pytest.raises(ValueError, match='needs images'):
    dequantization.init(jax.random.PRNGKey(0), flow, (2,))


def test_uniform_default_keeps_the_numbers_and_a_flow_adds_log_q():
  score_fn = _score_fn()
  levels = jax.random.randint(jax.random.PRNGKey(3), (4,) + SHAPE, 0, NUM_LEVELS)
  rng = jax.random.PRNGKey(4)
  dim, offset = 2, math.log2(NUM_LEVELS) + math.log2(0.5)

  elbo_fn = likelihood.get_elbo_bpd_fn(SDE, INVERSE, num_levels=NUM_LEVELS, eps=EPS, num_samples=2)
  y = 2. * likelihood.dequantize(rng, levels, NUM_LEVELS) - 1.
  nats = likelihood_weighting.elbo(jax.random.split(rng)[1], score_fn, SDE, y, eps=EPS, num_samples=2)
  default = elbo_fn(rng, score_fn, levels)
  np.testing.assert_array_equal(default, elbo_fn(rng, score_fn, levels,
                                                 jax.tree_util.Partial(likelihood.uniform_dequantizer)))
  np.testing.assert_allclose(default, nats / (dim * math.log(2.)) + offset, rtol=1e-5, atol=1e-5)

  ode_fn = likelihood.get_likelihood_fn(SDE, INVERSE, num_levels=NUM_LEVELS, hutchinson_type='exact',
                                        num_probes=1, rtol=1e-5, atol=1e-5, eps=EPS, method='dopri5')
  log_likelihood_fn = likelihood.get_log_likelihood_fn(SDE, 'exact', num_probes=1, rtol=1e-5, atol=1e-5,
                                                       eps=EPS, method='dopri5')
  logp, _, _ = log_likelihood_fn(jax.random.split(rng)[1], score_fn, y)
  ode_default = ode_fn(rng, score_fn, levels)[0]
  np.testing.assert_allclose(ode_default, -logp / (dim * math.log(2.)) + offset, rtol=1e-5, atol=1e-5)

  # A flow as the dequantizer: its points, plus log q / (D ln 2), in both functions.
  flow = dequantization.DequantizerFlow(num_levels=NUM_LEVELS, features=8)
  params = _random_params(flow, jax.random.PRNGKey(5))
  deq = dequantization.as_dequantizer(flow, params)
  u, log_q = dequantization.sample_and_log_prob(flow, params, jax.random.split(rng)[0], levels)
  y_flow = 2. * (levels + u) / NUM_LEVELS - 1.
  nats = likelihood_weighting.elbo(jax.random.split(rng)[1], score_fn, SDE, y_flow, eps=EPS, num_samples=2)
  np.testing.assert_allclose(elbo_fn(rng, score_fn, levels, deq),
                             (nats + log_q) / (dim * math.log(2.)) + offset, rtol=1e-5, atol=1e-5)
  logp, _, _ = log_likelihood_fn(jax.random.split(rng)[1], score_fn, y_flow)
  np.testing.assert_allclose(ode_fn(rng, score_fn, levels, deq)[0],
                             (-logp + log_q) / (dim * math.log(2.)) + offset, rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match='dequantizer must be a callable'):
    elbo_fn(rng, score_fn, levels, 'uniform')


def _exact_discrete_bits(levels: np.ndarray) -> np.ndarray:
  """-log2 P(levels) / D, P the cell's mass under the model at time eps (a product of erf differences)."""
  marginal = gaussian_mixture.marginal(SDE, MODEL, EPS)
  mean_v = (np.asarray(marginal.means[0], np.float64) + 1.) / 2.
  std_v = np.sqrt(np.diag(np.asarray(marginal.covs[0], np.float64))) / 2.
  flat = levels.reshape(levels.shape[0], -1).astype(np.float64)
  cdf = lambda v: 0.5 * (1. + special.erf((v - mean_v) / (std_v * math.sqrt(2.))))
  mass = cdf((flat + 1.) / NUM_LEVELS) - cdf(flat / NUM_LEVELS)
  return -np.sum(np.log2(mass), axis=1) / flat.shape[1]


def test_trained_dequantizer_tightens_the_bound_and_stays_above_the_exact_nll():
  rng = np.random.default_rng(0)
  v = V_MEAN + V_STD * rng.standard_normal((4096, 2))
  levels = np.clip(np.floor(v * NUM_LEVELS), 0, NUM_LEVELS - 1).astype(np.int32).reshape((-1,) + SHAPE)
  score_fn = _score_fn()
  elbo_fn = likelihood.get_elbo_bpd_fn(SDE, INVERSE, num_levels=NUM_LEVELS, eps=EPS, num_samples=1)
  flow = dequantization.DequantizerFlow(num_levels=NUM_LEVELS, features=16)
  optimizer = dequantization_training.get_optimizer(3e-3)
  state = dequantization_training.init_state(jax.random.PRNGKey(0), flow, SHAPE, optimizer)
  step = dequantization_training.get_train_step(elbo_fn, flow, optimizer)
  key = jax.random.PRNGKey(1)
  losses = []
  for i in range(400):
    batch = jnp.asarray(levels[(i * 256) % 4096:(i * 256) % 4096 + 256])
    state, loss = step(state, score_fn, jax.random.fold_in(key, i), batch)
    losses.append(float(loss))

  # Evaluation: 4096 data levels, 8 independent draws each (u, t, z), per-example means.
  evaluate = jax.jit(lambda rng, lv, deq: elbo_fn(rng, score_fn, lv, deq))
  test = jnp.asarray(levels)
  # The same (u-noise, t, z) draws for every dequantizer: their differences have little Monte-Carlo noise.
  eval_key = jax.random.PRNGKey(2)

  def bound(deq):
    return np.mean([np.asarray(evaluate(jax.random.fold_in(eval_key, r), test, deq)) for r in range(8)], 0)
  bound_u = bound(jax.tree_util.Partial(likelihood.uniform_dequantizer))
  bound_0 = bound(dequantization.as_dequantizer(flow, dequantization_training.init_state(
      jax.random.PRNGKey(0), flow, SHAPE, optimizer).params))
  bound_q = bound(dequantization.as_dequantizer(flow, state.params))
  exact = _exact_discrete_bits(levels)
  se = lambda d: d.std() / math.sqrt(d.size)
  gain, learned, excess = bound_u - bound_q, bound_0 - bound_q, bound_q - exact
  print(f'ELBO bits/dim: uniform {bound_u.mean():.4f}, untrained flow {bound_0.mean():.4f}, trained flow '
        f'{bound_q.mean():.4f} (gain over uniform {gain.mean():.4f} ± {se(gain):.4f}, over untrained '
        f'{learned.mean():.4f} ± {se(learned):.4f}); exact discrete {exact.mean():.4f} (trained excess '
        f'{excess.mean():.4f} ± {se(excess):.4f}); training loss {np.mean(losses[:20]):.4f} -> '
        f'{np.mean(losses[-20:]):.4f}')
  assert gain.mean() > 0.1 and gain.mean() > 5 * se(gain)
  assert learned.mean() > 0.05 and learned.mean() > 5 * se(learned)  # training, not the initial flow
  assert excess.mean() > -3 * se(excess)  # still an upper bound on -log2 P(x) / D


class _PixelScore(nn.Module):
  """A per-pixel affine 'score network' (NHWC in and out) standing in for a trained checkpoint."""

  @nn.compact
  def __call__(self, x, labels, train=False):
    del train
    return nn.Dense(x.shape[-1])(x) - x / (0.1 + labels.reshape(-1, 1, 1, 1))


@pytest.mark.slow
def test_train_deq_mode_resumes_and_eval_reports_both_dequantizations(tmp_path, monkeypatch):
  """--mode=train_deq on digits with a stand-in score model: checkpoints, resume, then the eval JSON."""
  config = digits_likelihood.get_config()
  config.training.batch_size = 8
  config.training.log_freq = 2
  config.training.snapshot_freq_for_preemption = 3
  config.training.deq_n_iters = 4
  config.eval.batch_size = 4
  config.eval.ode_rtol = config.eval.ode_atol = 1e-3
  config.eval.elbo_num_samples = 2
  model = _PixelScore()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))
  monkeypatch.setattr(mutils, 'create_model', lambda cfg: model)
  monkeypatch.setattr(checkpointing, 'load_variables', lambda cfg, workdir=None, checkpoint=None, ema=True:
                      (variables, 7))
  workdir = str(tmp_path)
  assert dequantization_training.load_dequantizer(config, workdir) is None  # eval without one: uniform only
  assert not os.path.exists(os.path.join(workdir, 'dequantizer'))
  state = dequantization_training.train_dequantizer(config, workdir)
  assert int(state.step) == 4
  saved = sorted(os.listdir(os.path.join(workdir, 'dequantizer', 'checkpoints-meta')))
  assert saved == ['checkpoint_4']
  config.training.deq_n_iters = 6
  resumed = dequantization_training.train_dequantizer(config, workdir)  # steps 5 and 6 only
  assert int(resumed.step) == 6
  loaded, meta = dequantization_training.load_dequantizer(config, workdir)
  assert meta['step'] == 6 and meta['score_step'] == 7
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), loaded.args[0], resumed.params))

  images = np.random.default_rng(0).integers(0, 17, (4, 8, 8, 1)) / 16.

  def get_eval_iterator(cfg, split='test', uniform_dequantization=False):
    del cfg, split, uniform_dequantization
    yield {'image': images.astype(np.float32), 'mask': np.ones(4, bool)}
  monkeypatch.setattr(datasets, 'get_eval_iterator', get_eval_iterator)
  monkeypatch.setattr(datasets, 'num_examples', lambda cfg, split: 4)
  sde = sde_lib.get_sde(config)
  result = bits_per_dim.evaluate_bpd(config, str(tmp_path / 'eval'), 7, model, variables, sde,
                                     show_progress=False, workdir=workdir)
  for key in ('bpd', 'elbo_bpd', 'deq_bpd', 'deq_elbo_bpd'):
    assert np.isfinite(result[key]), key
  assert result['deq_bpd'] != result['bpd'] and result['settings']['dequantizer_step'] == 6
  assert result['settings']['elbo_num_samples'] == 2


@pytest.mark.parametrize('key, value', [('deq_num_couplings', 0), ('deq_lr', -1e-3), ('deq_num_samples', 1.5)])
def test_train_deq_refuses_bad_settings_before_loading_anything(tmp_path, key, value):
  config = digits_likelihood.get_config()
  config.training[key] = value
  with pytest.raises(ValueError, match=f'config.training.{key} must be a positive'):
    dequantization_training.train_dequantizer(config, str(tmp_path))  # no checkpoint there: not reached
  assert f'training.{key}' in run_lib.RESUME_MUTABLE_KEYS  # they leave the score model's run resumable
