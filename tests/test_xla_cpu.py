"""XLA:CPU compiler options per program (infra/xla_cpu.py): chosen per kind, switchable, and in effect."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.ve import digits_ncsnpp_continuous
from scoresde import datasets
from scoresde import likelihood
from scoresde import losses
from scoresde import run_lib
from scoresde import sampling
from scoresde import sde_lib
from scoresde.infra import parallel
from scoresde.infra import xla_cpu
from scoresde.models import utils as mutils

cpu_only = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the options are for XLA:CPU')


def _vendor(monkeypatch, vendor: str) -> None:
  monkeypatch.delenv(xla_cpu.ENV_SWITCH, raising=False)
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setattr(xla_cpu, 'cpu_vendor', lambda: vendor)


@cpu_only
@pytest.mark.parametrize('vendor', ['GenuineIntel', 'an unknown vendor'])
def test_each_program_has_its_options_on_intel(monkeypatch, vendor):
  _vendor(monkeypatch, vendor)  # other vendors get Intel's table
  inference, gradient = xla_cpu.compiler_options('inference'), xla_cpu.compiler_options('gradient')
  assert inference == {'xla_cpu_experimental_ynn_fusion_type': ''}
  assert gradient == {'xla_cpu_experimental_ynn_fusion_type':
                      'LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_DOT'}
  assert xla_cpu.compiler_options('update') is None  # XLA's defaults: measured best for the update
  assert xla_cpu.compiler_options('training') is None
  assert xla_cpu.split_training()
  inference['extra'] = '1'  # a copy: callers cannot change the table
  assert 'extra' not in xla_cpu.compiler_options('inference')
  with pytest.raises(ValueError, match='program must be one of'):
    xla_cpu.compiler_options('sampling')


@cpu_only
def test_amd_programs_hand_only_reductions_to_ynnpack(monkeypatch):
  _vendor(monkeypatch, 'AuthenticAMD')
  for program in ('inference', 'gradient', 'update', 'training'):
    assert xla_cpu.compiler_options(program) == {'xla_cpu_experimental_ynn_fusion_type':
                                                 'LIBRARY_FUSION_TYPE_REDUCE'}
  assert not xla_cpu.split_training()  # one set for both halves: the step stays one program


def test_cpu_vendor_is_read_from_cpuinfo():
  vendor = xla_cpu.cpu_vendor()
  try:
    with open('/proc/cpuinfo', encoding='ascii', errors='replace') as f:
      expected = next((line.split(':', 1)[1].strip() for line in f if line.startswith('vendor_id')), '')
  except OSError:
    expected = ''
  assert vendor == expected


@cpu_only
@pytest.mark.parametrize('env', [{xla_cpu.ENV_SWITCH: '0'},
                                 {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT'}])
def test_switched_off_or_overridden_by_the_user(monkeypatch, env):
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert xla_cpu.compiler_options('inference') is None
  assert xla_cpu.compiler_options('gradient') is None


@cpu_only
@pytest.mark.parametrize('vendor', ['GenuineIntel', 'AuthenticAMD'])
def test_inference_options_keep_convolutions_in_xla(monkeypatch, vendor):
  """At this size XLA hands the convolution and its epilogue to YNNPACK by default; the inference
  options keep it in XLA, and AMD's hand a reduction to YNNPACK (if a jax upgrade changes this, the
  measured choice must be redone)."""
  _vendor(monkeypatch, vendor)
  def conv_tanh(x, w):
    return jnp.tanh(jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + 1.)
  x, w = jnp.ones((4, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
  options = xla_cpu.compiler_options('inference')
  default = jax.jit(conv_tanh).lower(x, w).compile().as_text()
  inference = jax.jit(conv_tanh, compiler_options=options).lower(x, w).compile().as_text()
  assert '__ynn_fusion' in default
  assert '__ynn_fusion' not in inference
  channel_means = jax.jit(lambda x: jnp.mean(x, axis=(1, 2)), compiler_options=options).lower(
      x).compile().as_text()
  assert ('__ynn_fusion' in channel_means) == (vendor == 'AuthenticAMD')


def test_library_programs_ask_for_their_kind(monkeypatch):
  """Samplers, likelihoods and the eval loss are built as inference programs; on CPU the trainer's step
  as a gradient and an update program, elsewhere (or asked to) as one training program."""
  asked = []
  real = xla_cpu.compiler_options
  monkeypatch.setattr(xla_cpu, 'compiler_options', lambda program: asked.append(program) or real(program))
  sde = sde_lib.VPSDE(0.1, 20., 1000)
  sampling.get_pc_sampler(sde, (2, 2), 'euler_maruyama', 'none', snr=0.16, n_steps=1,
                          probability_flow=False, denoise=True, eps=1e-3, langevin_per_sample=False)
  sampling.get_ode_sampler(sde, (2, 2), rtol=1e-5, atol=1e-5, method='dopri5', eps=1e-3, denoise=False)
  likelihood.get_log_likelihood_fn(sde, 'rademacher', num_probes=1, rtol=1e-5, atol=1e-5, eps=1e-5,
                                   method='dopri5')
  assert asked == ['inference'] * 3
  asked.clear()
  config = digits_ncsnpp_continuous.get_config()
  model = mutils.create_model(config)  # built, not traced: nothing compiles
  build = lambda **kw: run_lib.build_multi_step(config, sde_lib.get_sde(config), model,
                                                losses.get_optimizer(config), parallel.data_mesh(), **kw)
  monkeypatch.setattr(xla_cpu, 'cpu_vendor', lambda: 'GenuineIntel')
  build()
  assert asked == (['gradient', 'update'] if jax.default_backend() == 'cpu' else ['training'])
  asked.clear()
  build(split_on_cpu=False)
  assert asked == ['training']
  asked.clear()
  monkeypatch.setattr(xla_cpu, 'cpu_vendor', lambda: 'AuthenticAMD')  # one set for both halves
  build()
  assert asked == ['training']
  asked.clear()
  monkeypatch.setattr(xla_cpu, 'cpu_vendor', lambda: 'GenuineIntel')
  monkeypatch.setenv(xla_cpu.ENV_SWITCH, '0')  # no options: the split would only cost
  build()
  assert asked == ['training']


def test_nested_calls_run_as_plain_jits():
  """XLA takes compiler options only at top level: inside a caller's jit (traced or constant
  arguments), vmap or grad the function still runs, and gives the top-level result."""
  fn = xla_cpu.jit(lambda x: jnp.sin(x) * 2., 'inference')
  x = jnp.linspace(0., 1., 4)
  want = fn(x)
  np.testing.assert_allclose(jax.jit(fn)(x), want, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda y: fn(x) + y)(0.), want, rtol=1e-6)  # constant argument
  np.testing.assert_allclose(jax.vmap(fn)(x), want, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda y: jnp.sum(fn(y)))(x), 2. * jnp.cos(x), rtol=1e-6)


@cpu_only
def test_lowering_compiles_the_tuned_program(monkeypatch):
  """Ahead-of-time users (the memory plan) lower the function: they get the program that runs, with its
  options."""
  _vendor(monkeypatch, 'AuthenticAMD')
  def channel_means(x):
    return jnp.mean(x, axis=(1, 2))
  x = jnp.ones((4, 16, 16, 32))
  compiled = xla_cpu.jit(channel_means, 'training').lower(x).compile()
  assert '__ynn_fusion' in compiled.as_text()  # AMD's reductions in YNNPACK: the options are in effect
  assert compiled.memory_analysis().output_size_in_bytes == 4 * 32 * 4
  _vendor(monkeypatch, 'GenuineIntel')  # Intel's inference set: no YNNPACK at all
  assert '__ynn_fusion' not in xla_cpu.jit(channel_means, 'inference').lower(x).compile().as_text()


def test_split_cpu_step_matches_the_one_program_step():
  """The CPU trainer's gradient + update programs give the one-program step's state and metrics."""
  from configs.ve import toy_gmm  # pylint: disable=import-outside-toplevel
  config = toy_gmm.get_config()
  config.training.batch_size, config.training.n_jitted_steps = 8, 2
  mesh = parallel.data_mesh()
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  optimizer = losses.get_optimizer(config)
  sde = sde_lib.get_sde(config)
  shape = (2, 8) + tuple(datasets.data_shape(config))
  xs = parallel.shard_batch(mesh, np.random.default_rng(0).standard_normal(shape).astype(np.float32),
                            axis=1)
  results = []
  for split in (True, False):
    state = parallel.replicate(mesh, losses.init_train_state(
        jax.random.PRNGKey(1), jax.tree.map(jnp.copy, variables['params']), optimizer))
    step = run_lib.build_multi_step(config, sde, model, optimizer, mesh, split_on_cpu=split)
    results.append(step(state, xs))
  (split_state, split_metrics), (one_state, one_metrics) = results
  assert int(split_state.step) == int(one_state.step) == 2
  np.testing.assert_array_equal(split_state.rng, one_state.rng)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               (split_state.params, split_state.params_ema, split_state.opt_state, split_metrics),
               (one_state.params, one_state.params_ema, one_state.opt_state, one_metrics))
