"""The toy MLP score network: conventions (labels, σ-scaling, frozen Fourier features), and that training
it with run_lib.train on the 2-D Gaussian mixture learns the exact marginal score (gaussian_mixture.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresde import gaussian_mixture
from scoresde import datasets
from scoresde import run_lib
from scoresde import sde_lib
from configs.ve import toy_gmm as ve_toy
from configs.vp import toy_gmm as vp_toy
from scoresde.models import utils as mutils


def _randomise_output_layer(variables, rng):
  """The last layer starts at zero; give it weights so outputs differ from 0."""
  params = jax.tree.map(lambda x: x, variables['params'])
  last = max((k for k in params if k.startswith('Dense_')), key=lambda k: int(k.split('_')[1]))
  params[last] = {'kernel': jax.random.normal(rng, params[last]['kernel'].shape),
                  'bias': params[last]['bias']}
  return {'params': params}


def test_shapes_zero_init_and_scale_by_sigma():
  config = ve_toy.get_config()
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config, batch_size=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 2))
  sigmas = jnp.array([0.01, 0.1, 1., 10.])
  out = model.apply(variables, x, sigmas, train=False)
  assert out.shape == (4, 2)
  np.testing.assert_array_equal(out, 0.)  # zero-initialised output layer
  variables = _randomise_output_layer(variables, jax.random.PRNGKey(2))
  scaled = model.apply(variables, x, sigmas, train=False)
  config.model.scale_by_sigma = False
  unscaled = mutils.create_model(config).apply(variables, x, sigmas, train=False)
  np.testing.assert_allclose(scaled * sigmas[:, None], unscaled, rtol=1e-5)


def test_scale_by_sigma_reads_sigma_as_models_utils_says():
  """Discrete VE labels index the descending σ table (``label_kwargs``), continuous VE labels are σ, VP
  labels are times; the network is told which and never infers it from its embedding."""
  config = ve_toy.get_config()
  config.training.continuous, config.model.embedding_type = False, 'positional'
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config, batch_size=3)
  assert model.label_kind == 'index' and model.input_shape == (2,)
  variables = _randomise_output_layer(variables, jax.random.PRNGKey(2))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 2))
  labels = jnp.array([0, 4, config.model.num_scales - 1])
  scaled = model.apply(variables, x, labels, train=False)
  unscaled = model.clone(scale_by_sigma=False).apply(variables, x, labels, train=False)
  sigmas = mutils.get_sigmas(config)[np.asarray(labels)]
  np.testing.assert_allclose(scaled * sigmas[:, None], unscaled, rtol=1e-6)
  assert mutils.create_model(ve_toy.get_config()).label_kind == 'sigma'
  assert mutils.create_model(vp_toy.get_config()).label_kind == 'time'


def test_fourier_features_are_frozen_and_positional_labels_work():
  config = ve_toy.get_config()
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config, batch_size=4)
  x = jnp.ones((4, 2))
  grads = jax.grad(lambda v: jnp.sum(model.apply(v, x, jnp.full((4,), 0.5), train=False)**2))(
      _randomise_output_layer(variables, jax.random.PRNGKey(3)))
  assert float(jnp.abs(grads['params']['GaussianFourierProjection_0']['W']).max()) == 0.
  vp_config = vp_toy.get_config()
  vp_model, vp_vars = mutils.init_model(jax.random.PRNGKey(0), vp_config, batch_size=4)
  for labels in (jnp.array([0, 10, 500, 999]), jnp.array([0.1, 99.9, 500.5, 999.])):
    assert vp_model.apply(vp_vars, x, labels, train=False).shape == (4, 2)


def test_training_learns_the_exact_score(tmp_path):
  """2000 steps of the VP toy config: the EMA network's score at t in {0.1, 0.3, 0.6} has relative mean
  squared error E‖s_θ − s*‖² / E‖s*‖² below 2% on samples of the marginal (measured 0.5%, 0.3%, 0.04%)."""
  config = vp_toy.get_config()
  config.training.snapshot_sampling = False
  config.training.n_iters = 2000
  state = run_lib.train(config, str(tmp_path))
  sde = sde_lib.get_sde(config)
  model = mutils.create_model(config)
  score = mutils.get_score_fn(sde, model, {'params': state.params_ema}, continuous=True)
  mixture = datasets.toy_mixture(2)
  exact = gaussian_mixture.score_fn(sde, mixture)
  errors = {}
  for i, t in enumerate((0.1, 0.3, 0.6)):
    x = gaussian_mixture.marginal(sde, mixture, t).sample(jax.random.PRNGKey(i), 4096)
    tt = jnp.full((x.shape[0],), t)
    s_true = exact(x, tt)
    errors[t] = float(jnp.mean(jnp.sum((score(x, tt) - s_true)**2, -1)) / jnp.mean(jnp.sum(s_true**2, -1)))
  assert max(errors.values()) < 0.02, errors
