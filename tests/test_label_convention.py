"""One label convention: a network is given, in sampling, likelihood and evaluation alike, the labels it
was trained with (``models.utils.network_score_fn`` reads ``config.training.continuous`` and the SDE).

The reference's likelihood evaluation hard-coded ``continuous=True``, so a discretely trained model
(SMLD/NCSN, DDPM) got σ or 999 t where it was trained on an index: no error, a wrong bits/dim. These
tests train tiny discrete VE (NCSN++, positional embedding) and VP (DDPM) models for a few steps and
check that bits/dim uses the trained convention and differs from the hard-coded one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from scoresde import datasets
from scoresde.evaluation import bits_per_dim
from scoresde import likelihood
from scoresde import losses
from scoresde import sde_lib
from configs.ve import cifar10_ncsnpp as ve_discrete
from configs.vp.ddpm import cifar10 as vp_discrete
from scoresde.models import utils as mutils

NUM_SCALES = 50  # few, so that the discrete VP label t (N-1) is far from the continuous 999 t
BATCH = 4


def _tiny(module) -> object:
  config = module.get_config()
  config.data.dataset, config.data.image_size, config.data.num_channels = 'digits', 8, 1
  config.data.num_levels, config.data.centered, config.data.random_flip = 17, True, False
  model = config.model
  model.nf, model.ch_mult, model.num_res_blocks, model.attn_resolutions = 8, (1, 2), 1, (4,)
  model.num_scales, model.dropout = NUM_SCALES, 0.
  if model.name == 'ddpm':  # its GroupNorm has 32 groups
    model.nf, model.ch_mult = 32, (1, 1)
  if model.name == 'ncsnpp':
    model.fir, model.progressive_input, model.sigma_max = False, 'none', 6.
  config.optim.warmup, config.optim.lr = 0, 2e-3
  config.eval.batch_size, config.eval.bpd_num_repeats = BATCH, 1
  config.eval.ode_rtol = config.eval.ode_atol = 1e-3
  return config


def _train_a_few_steps(config, steps: int = 10):
  """The model and its parameters after ``steps`` Adam steps of the configured (discrete) loss."""
  sde = sde_lib.get_sde(config)
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  loss_fn = losses.get_loss_fn(config, sde, model, train=True)
  optimizer = losses.get_optimizer(config)
  params, opt_state = variables['params'], None
  opt_state = optimizer.init(params)
  x = jnp.asarray(datasets.get_data_scaler(config)(
      np.random.default_rng(0).integers(0, 17, (8, 8, 8, 1)) / 16.), jnp.float32)

  @jax.jit
  def step(rng, params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(rng, p, x)))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state, loss

  for i in range(steps):
    params, opt_state, loss = step(jax.random.PRNGKey(i), params, opt_state)
    assert np.isfinite(float(loss))
  return sde, model, {'params': params}


class _LabelEcho(nn.Module):
  """Returns its label at every pixel: shows what label a score builder passes."""

  @nn.compact
  def __call__(self, x, labels, train=False):
    scale = self.param('scale', nn.initializers.ones, ())
    return scale * jnp.broadcast_to(labels.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)),
                                    x.shape)


@pytest.mark.parametrize('module', [ve_discrete, vp_discrete], ids=['ve_discrete', 'vp_discrete'])
def test_network_score_fn_passes_the_trained_labels(module):
  """Discrete VE: the index of σ(t) in the descending table the loss draws from; discrete VP: t (N-1),
  whose floor indexes the loss's ᾱ table; continuous: σ(t) (VE) or 999 t (VP)."""
  config = _tiny(module)
  sde = sde_lib.get_sde(config)
  model = _LabelEcho()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.ones((1,)))
  x = jnp.zeros((3, 2))
  i = np.array([0, 17, NUM_SCALES - 1])
  if isinstance(sde, sde_lib.VESDE):
    t = 1. - i / (NUM_SCALES - 1)  # the times at which σ(t) is the i-th largest discrete σ
    got = -np.asarray(mutils.network_score_fn(config, sde, model, variables)(x, t))[:, 0]
    np.testing.assert_array_equal(-got, i)
    sigma = np.asarray(sde.marginal_coeffs(jnp.asarray(t))[1])
    np.testing.assert_allclose(np.asarray(sde.discrete_sigmas)[::-1][i], sigma, rtol=1e-5)
  else:
    t = (i + 0.5) / (NUM_SCALES - 1)
    score = np.asarray(mutils.network_score_fn(config, sde, model, variables)(x, t))[:, 0]
    std = np.asarray(sde.sqrt_1m_alphas_cumprod)[i]
    np.testing.assert_allclose(-score * std, t * (NUM_SCALES - 1), rtol=1e-6)
  config.training.continuous = True
  continuous = np.asarray(mutils.network_score_fn(config, sde, model, variables)(x, t))[:, 0]
  if isinstance(sde, sde_lib.VESDE):
    np.testing.assert_allclose(continuous, sigma, rtol=1e-5)
  else:
    np.testing.assert_allclose(-continuous * np.asarray(sde.marginal_coeffs(jnp.asarray(t))[1]),
                               999 * t, rtol=1e-5)


@pytest.fixture
def digits_batch(monkeypatch):
  """One batch of four digits as the bits/dim evaluation's data."""
  images = (load_digits().images[:BATCH, :, :, None] / 16.).astype(np.float32)

  def get_eval_iterator(config, split='test', uniform_dequantization=False):
    yield {'image': images, 'mask': np.ones(BATCH, bool)}

  monkeypatch.setattr(datasets, 'get_eval_iterator', get_eval_iterator)
  monkeypatch.setattr(datasets, 'num_examples', lambda config, split: BATCH)
  return images


@pytest.mark.slow
@pytest.mark.parametrize('module', [ve_discrete, vp_discrete], ids=['ve_discrete', 'vp_discrete'])
def test_bits_per_dim_uses_the_trained_labels(module, digits_batch, monkeypatch, tmp_path):
  config = _tiny(module)
  sde, model, variables = _train_a_few_steps(config)

  used = []
  make = likelihood.get_likelihood_fn

  def recording_get_likelihood_fn(*args, **kwargs):
    bpd_fn = make(*args, **kwargs)

    def recorded(rng, score_fn, x):
      used.append(score_fn)
      return bpd_fn(rng, score_fn, x)
    return recorded

  monkeypatch.setattr(likelihood, 'get_likelihood_fn', recording_get_likelihood_fn)
  result = bits_per_dim.evaluate_bpd(config, str(tmp_path), 0, model, variables, sde,
                                        show_progress=False)
  assert len(used) == 1 and np.isfinite(result['bpd'])

  # The score evaluation used is the one sampling uses, and the discrete convention, not the continuous.
  x = jax.random.normal(jax.random.PRNGKey(3), (BATCH, 8, 8, 1))
  t = jnp.asarray([0.9, 0.5, 0.1, 0.02])
  in_bpd = np.asarray(used[0](x, t))
  for_sampling = np.asarray(mutils.network_score_fn(config, sde, model, variables)(x, t))
  discrete = np.asarray(mutils.get_score_fn(sde, model, variables, continuous=False)(x, t))
  hard_coded = np.asarray(mutils.get_score_fn(sde, model, variables, continuous=True)(x, t))
  np.testing.assert_allclose(in_bpd, for_sampling, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(in_bpd, discrete, rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(in_bpd - hard_coded)) > 1e-2 * np.max(np.abs(in_bpd))

  # The figure the reference's hard-coded continuous=True gives is another number.
  bpd_fn = make(sde, datasets.get_data_inverse_scaler(config), num_levels=17,
                hutchinson_type=config.eval.hutchinson_type, num_probes=config.eval.num_probes,
                rtol=config.eval.ode_rtol, atol=config.eval.ode_atol, eps=config.eval.likelihood_eps,
                method=config.eval.ode_method)
  levels = likelihood.levels_from_unit_interval(digits_batch, 17)
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(int(config.seed) + 1), 0), 0)
  wrong = jax.tree_util.Partial(
      lambda v, x, t: mutils.get_score_fn(sde, model, v, continuous=True)(x, t), variables)
  # The evaluation's score function was shown above to be network_score_fn's, and this solve shares its
  # probes (same rng), so only the hard-coded convention needs a solve of its own.
  bpd_wrong = float(np.mean(bpd_fn(rng, wrong, levels)[0]))
  print(f'{module.__name__}: bits/dim with the trained labels {result["bpd"]:.4f}, '
        f'with continuous=True {bpd_wrong:.4f}')
  # Far above the solver's error at rtol = atol = 1e-3.
  assert abs(bpd_wrong - result['bpd']) > 3e-3
