"""Mixed precision (``config.training.dtype`` / ``config.sampling.dtype`` = 'bfloat16'): the network
computes in bfloat16 while parameters, optimizer state, EMA and losses stay float32
(``models.utils.with_compute_dtype``, the one place that casts).

Tolerances are measured on a 2-core CPU with a tiny NCSN++ (nf 8, 8x8x1, continuous VE, Fourier features):
- one score evaluation, bfloat16 vs float32: relative L2 error 0.008-0.013 at init (asserted < 0.05);
  rounding only the Fourier frequencies W to bfloat16 would alone move the float32 output by 0.20 (the
  two-level network), hence they stay float32;
- 30 Adam steps from the same seed: per-step losses agree to max relative 1.6e-3 while the loss more than
  halves (asserted < 1e-2);
- sampling the Gaussian mixture with the exact score behind the same casts: see
  ``test_bfloat16_score_samples_the_mixture``.
"""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.ve import digits_ncsnpp_continuous
from scoresde import gaussian_mixture
from scoresde import losses
from scoresde import run_lib
from scoresde import sde_lib
from scoresde.models import utils as mutils
from test_sampling import EPS, MIXTURE, N_SAMPLES, assert_matches_mixture, make_sde, pc_sampler

# XLA's optimisation passes dominate the cost of these tests on a small CPU; correctness does not need them.
_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
STEPS = 30


def tiny_config(dtype: str = 'float32', name: str = 'ncsnpp'):
  """The digits NCSN++ (continuous VE: Fourier features), shrunk; outputs not zero at init, so the loss
  depends on the network from the first step."""
  config = digits_ncsnpp_continuous.get_config()
  config.model.name = name
  config.model.nf = 8
  config.model.init_scale = 0.5
  config.optim.warmup = 5
  config.training.batch_size = 16
  config.training.dtype = dtype
  if name == 'ddpm':  # its GroupNorms have 32 groups
    config.training.sde, config.model.scale_by_sigma, config.model.nf = 'vpsde', False, 32
  return config


def _one_level_config(dtype: str = 'float32'):
  """``tiny_config`` with one resolution level (attention at 8x8): half the compile time."""
  config = tiny_config(dtype)
  config.model.ch_mult, config.model.attn_resolutions = (1,), (8,)
  config.training.batch_size = 8
  return config


def _init_params(model):
  init = jax.jit(lambda rng: model.init(rng, *mutils.dummy_inputs(model, 1), train=False))
  return init.lower(jax.random.PRNGKey(0)).compile(compiler_options=_FAST_COMPILE)(jax.random.PRNGKey(0))


def _train(config, model, params):
  """STEPS Adam steps from fixed seeds on uniform 8x8 images: (per-step losses, final state)."""
  sde = sde_lib.get_sde(config)
  optimizer = losses.get_optimizer(config)
  step = losses.get_train_step(config, losses.get_loss_fn(config, sde, model, train=True), optimizer)
  state = losses.init_train_state(jax.random.PRNGKey(1), params, optimizer)
  data = jax.random.uniform(jax.random.PRNGKey(2), (STEPS, config.training.batch_size, 8, 8, 1))
  train = jax.jit(lambda s, d: jax.lax.scan(step, s, d)).lower(state, data).compile(
      compiler_options=_FAST_COMPILE)
  state, metrics = train(state, data)
  return np.asarray(metrics['loss']), state


def test_bfloat16_training_tracks_float32():
  """Same seeds, 30 steps of a one-level NCSN++ (Fourier features, attention at 8x8), batch 8: losses
  within 1% (measured max 1.6e-3) while the loss more than halves (42.8 → 17.1); parameters, Adam's moments
  and the EMA stay float32."""
  config = _one_level_config()
  model = mutils.create_model(config)
  params = _init_params(model)['params']
  loss32, _ = _train(config, model, params)
  config.training.dtype = 'bfloat16'
  loss16, state = _train(config, model, params)
  assert loss32[-5:].mean() < 0.5 * loss32[0]  # the comparison covers real training, not a flat start
  assert loss16.dtype == np.float32
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  leaves = jax.tree.leaves((state.params, state.opt_state, state.params_ema))
  assert {str(leaf.dtype) for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)} == {'float32'}


def _matmul_input_dtypes(fn, *args) -> collections.Counter:
  """Counts of (primitive, lhs dtype) over the convolutions and dot products that ``fn`` traces to,
  inner jaxprs (remat, custom derivatives) included."""
  counts = collections.Counter()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
        counts[(eqn.primitive.name, str(eqn.invars[0].aval.dtype))] += 1
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(sub, 'eqns') or hasattr(sub, 'jaxpr'):
            visit(getattr(sub, 'jaxpr', sub))
  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


@pytest.mark.parametrize('name', ['ncsnpp', 'ddpm'])
def test_bfloat16_score_runs_every_matmul_in_bfloat16(name):
  """Every convolution and dot product of the traced score is bfloat16 (none would be without the casts;
  a float32 time embedding or NumPy-scalar rescaling would promote some back), the output is float32."""
  config = tiny_config(name=name)
  model = mutils.create_model(config)
  variables = jax.eval_shape(lambda: mutils.init_model(jax.random.PRNGKey(0), config)[1])  # no compute
  sde = sde_lib.get_sde(config)
  x, t = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 1)), jnp.array([0.01, 0.1, 0.5, 0.9])
  score = {dtype: lambda v, x, t, dtype=dtype: mutils.get_score_fn(sde, model, v, continuous=True,
                                                                   dtype=dtype)(x, t)
           for dtype in ('float32', 'bfloat16')}
  counts = {dtype: _matmul_input_dtypes(fn, variables, x, t) for dtype, fn in score.items()}
  assert set(k[1] for k in counts['float32']) == {'float32'}
  assert set(k[1] for k in counts['bfloat16']) == {'bfloat16'}
  assert sum(counts['bfloat16'].values()) == sum(counts['float32'].values()) > 10
  assert jax.eval_shape(score['bfloat16'], variables, x, t).dtype == jnp.float32


def test_bfloat16_score_is_close_to_float32():
  """``network_score_fn`` with config.sampling.dtype='bfloat16': relative L2 error 0.008 measured."""
  config = _one_level_config()
  model = mutils.create_model(config)
  variables = _init_params(model)
  sde = sde_lib.get_sde(config)
  x, t = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 1)), jnp.array([0.01, 0.1, 0.5, 0.9])

  def score(dtype):
    config.sampling.dtype = dtype
    fn = jax.jit(mutils.network_score_fn(config, sde, model, variables))
    return fn.lower(x, t).compile(compiler_options=_FAST_COMPILE)(x, t)
  ref, out = score('float32'), score('bfloat16')
  assert out.dtype == jnp.float32
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.05


@pytest.mark.parametrize('sde_name', ['vesde', 'vpsde'])
def test_bfloat16_score_samples_the_mixture(sde_name):
  """PC sampling (reverse diffusion + Langevin, N = 250, 10,000 samples) with the exact mixture score
  behind the policy's casts: its input and output rounded to bfloat16 (the errors the casts add to a
  network's own). Matches the mixture within test_sampling's Z_TOL: max |z| VE 2.44 (float32: 2.46),
  VP 2.15 (float32: 2.18); the same seed moves the samples by 0.09 (VE) and 0.07 (VP) rms."""
  sde = make_sde(sde_name, 250)
  exact = gaussian_mixture.isotropic_score_fn(sde, MIXTURE)
  score = mutils.with_compute_dtype(lambda variables, x, t: exact(x, t).astype(x.dtype), jnp.bfloat16)
  sampler = pc_sampler(sde, (N_SAMPLES, 2), 'reverse_diffusion', 'langevin', eps=EPS[sde_name])
  samples, _ = sampler(jax.random.PRNGKey(0), lambda x, t: score({}, x, t))
  assert_matches_mixture(samples)


class _Probe(nn.Module):
  """Checks at trace time that a sub-module computes in the input's dtype (float32 at init, bfloat16
  under the policy), and returns the labels it was given."""

  @nn.compact
  def __call__(self, x, labels):
    h = nn.Dense(3)(x)
    assert h.dtype == x.dtype, (h.dtype, x.dtype)
    return h * 0 + labels[:, None]


def test_labels_stay_float32():
  """999 t = 899.1 is 900 in bfloat16: the policy casts the network's sub-modules, never its labels."""
  probe = _Probe()
  x, labels = jnp.ones((1, 2)), jnp.array([899.1], jnp.float32)
  variables = probe.init(jax.random.PRNGKey(0), x, labels)
  out = mutils.with_compute_dtype(probe.apply, jnp.bfloat16)(variables, x, labels)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, np.full((1, 3), 899.1, np.float32))


@pytest.mark.parametrize('key', ['training', 'sampling'])
def test_unknown_dtype_is_refused_before_compilation(key):
  config = tiny_config()
  config[key].dtype = 'float16'
  with pytest.raises(ValueError, match=rf"config\.{key}\.dtype='float16'.*'bfloat16', 'float32'"):
    run_lib.validate_config(config)
  model = mutils.create_model(config)
  sde = sde_lib.get_sde(config)
  with pytest.raises(ValueError, match=rf'config\.{key}\.dtype'):
    if key == 'training':
      losses.get_loss_fn(config, sde, model, train=True)
    else:
      mutils.network_score_fn(config, sde, model, {})
