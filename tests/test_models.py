"""Model zoo: FIR resampling against a direct NumPy/SciPy oracle, the reference's parameter counts, and
forward/backward checks of every architecture and NCSN++ option on tiny configs.

(Numerical parity with the reference's own checkpoints is in test_torch_port.py.)
"""

import glob
import importlib
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from scoresde import datasets
from configs import default_cifar10_configs
from scoresde.models import layers
from scoresde.models import ncsnpp
from scoresde.models import normalization
from scoresde.models import up_or_down_sampling as updown
from scoresde.models import utils

# ----------------------------------------------------------------------------------------------------
# FIR up/down-sampling: compared with a direct implementation (zero insertion, padding, scipy's true
# 2-D convolution, decimation; transposed convolution as an explicit scatter-add).


def _np_upfirdn(x, k, up=1, down=1, pad0=0, pad1=0):
  b, h, w, c = x.shape
  z = np.zeros((b, h * up, w * up, c), x.dtype)
  z[:, ::up, ::up] = x
  z = np.pad(z, ((0, 0), (max(pad0, 0), max(pad1, 0)), (max(pad0, 0), max(pad1, 0)), (0, 0)))
  out = np.stack([np.stack([signal.convolve2d(z[i, :, :, j], k, mode='valid') for j in range(c)], -1)
                  for i in range(b)])
  return out[:, ::down, ::down]


def _np_conv_transpose(x, w, stride):
  """Adjoint of a stride-``stride`` VALID correlation: out[s*i + a, s*j + b] += x[i, j] w[a, b]."""
  b, h, wd, _ = x.shape
  kh, kw, _, cout = w.shape
  out = np.zeros((b, (h - 1) * stride + kh, (wd - 1) * stride + kw, cout))
  for i in range(h):
    for j in range(wd):
      out[:, stride * i:stride * i + kh, stride * j:stride * j + kw] += np.einsum('bc,hwco->bhwo', x[:, i, j],
                                                                                  w[::-1, ::-1])
  return out


@pytest.fixture(scope='module')
def rng():
  return np.random.default_rng(0)


def test_upfirdn_matches_direct_convolution(rng):
  x = rng.normal(size=(2, 7, 7, 3))
  k = rng.normal(size=(4, 4))  # asymmetric: checks the kernel flip (true convolution)
  for up, down, pad0, pad1 in ((1, 1, 2, 1), (2, 1, 2, 1), (1, 2, 1, 1), (2, 2, 3, 2)):
    ours = updown.upfirdn_2d(jnp.asarray(x, jnp.float32), k, up=up, down=down, pad0=pad0, pad1=pad1)
    np.testing.assert_allclose(ours, _np_upfirdn(x, k, up, down, pad0, pad1), rtol=1e-5, atol=1e-5)


def test_fir_resampling_shapes_and_constants():
  """The binomial filter preserves constants away from the border, in both directions."""
  x = jnp.ones((1, 8, 8, 2))
  up = updown.upsample_2d(x, (1, 3, 3, 1))
  down = updown.downsample_2d(x, (1, 3, 3, 1))
  assert up.shape == (1, 16, 16, 2) and down.shape == (1, 4, 4, 2)
  np.testing.assert_allclose(up[:, 2:-2, 2:-2], 1., atol=1e-6)
  np.testing.assert_allclose(down[:, 1:-1, 1:-1], 1., atol=1e-6)
  np.testing.assert_allclose(updown.naive_downsample_2d(updown.naive_upsample_2d(x + jnp.arange(8.)[:, None])),
                             x + jnp.arange(8.)[:, None], atol=1e-6)


def test_fused_up_and_down_convolutions_match_direct(rng):
  x = rng.normal(size=(2, 5, 5, 3))
  w = rng.normal(size=(3, 3, 3, 4))
  k = updown.setup_kernel((1, 3, 3, 1)) * 4
  expected = _np_upfirdn(_np_conv_transpose(x, w, 2), k, pad0=1, pad1=1)
  ours = updown.upsample_conv_2d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), (1, 3, 3, 1))
  assert ours.shape == (2, 10, 10, 4)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)

  x = rng.normal(size=(2, 8, 8, 3))
  filtered = _np_upfirdn(x, updown.setup_kernel((1, 3, 3, 1)), pad0=2, pad1=2)
  expected = np.stack([np.einsum('bhwc,hwco->bo', filtered[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3], w)
                       for i in range(4) for j in range(4)], 1).reshape(2, 4, 4, 4)
  ours = updown.conv_downsample_2d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), (1, 3, 3, 1))
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_timestep_embedding_closed_form():
  t = jnp.array([0., 3., 250.5])
  emb = layers.get_timestep_embedding(t, 8)
  freqs = np.exp(-np.log(10000.) * np.arange(4) / 3)
  np.testing.assert_allclose(emb, np.concatenate([np.sin(np.outer(t, freqs)), np.cos(np.outer(t, freqs))], 1),
                             rtol=1e-5, atol=1e-5)


def test_attention_is_pixel_permutation_equivariant(rng):
  """Self-attention without positions: permuting the pixels permutes the output."""
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 32)), jnp.float32)
  block = layers.AttnBlock()
  variables = block.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), variables)
  perm = rng.permutation(16)
  permute = lambda a: a.reshape(2, 16, 32)[:, perm].reshape(2, 4, 4, 32)
  np.testing.assert_allclose(block.apply(variables, permute(x)), permute(block.apply(variables, x)),
                             rtol=1e-4, atol=1e-5)


def test_instance_norm_plus_standardises_each_channel(rng):
  x = jnp.asarray(rng.normal(3., 2., size=(2, 8, 8, 4)), jnp.float32)
  norm = normalization.InstanceNorm2dPlus()
  params = {'params': {'alpha': jnp.zeros(4), 'gamma': jnp.ones(4), 'beta': jnp.zeros(4)}}
  h = norm.apply(params, x)
  np.testing.assert_allclose(jnp.mean(h, axis=(1, 2)), 0., atol=1e-5)
  np.testing.assert_allclose(jnp.std(h, axis=(1, 2)), 1., atol=1e-3)
  params['params']['alpha'] = jnp.ones(4)  # α adds back the standardised channel means
  means = np.mean(np.asarray(x), axis=(1, 2))
  expected = (means - means.mean(-1, keepdims=True)) / np.sqrt(means.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(jnp.mean(norm.apply(params, x), axis=(1, 2)), expected, atol=1e-4)


def _np_group_norm(x, groups, scale, bias, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups).astype(np.float64)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_group_norm_matches_the_definition_and_flax(rng):
  """Our GroupNorm (per-channel sums first: faster on XLA:CPU) is flax's two-pass GroupNorm: the same
  values, gradients and parameter tree, float32 statistics under a bfloat16 input."""
  x = jnp.asarray(rng.normal(3., 2., size=(2, 4, 4, 12)), jnp.float32)
  ours, flax_norm = layers.GroupNorm(num_groups=3), flax.linen.GroupNorm(num_groups=3, use_fast_variance=False)
  params = ours.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_norm.init(jax.random.PRNGKey(0), x))
  params = {'params': {'scale': jnp.asarray(rng.normal(size=12), jnp.float32),
                       'bias': jnp.asarray(rng.normal(size=12), jnp.float32)}}
  expected = _np_group_norm(np.asarray(x), 3, np.asarray(params['params']['scale']),
                            np.asarray(params['params']['bias']))
  np.testing.assert_allclose(ours.apply(params, x), expected, atol=2e-5)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  grads = [jax.grad(lambda p, x, m=m: jnp.sum(m.apply(p, x) * cotangent), argnums=(0, 1))(params, x)
           for m in (ours, flax_norm)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), grads[0], grads[1])
  low = ours.apply(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), x.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), expected, atol=0.05)
  with pytest.raises(ValueError, match='multiple of its 5 groups'):
    layers.GroupNorm(num_groups=5).init(jax.random.PRNGKey(0), x)


# ----------------------------------------------------------------------------------------------------
# Parameter counts of the paper's models, equal to the reference implementation's (REFERENCE §3.7).

PARAM_COUNTS = {
    've/cifar10_ncsnpp_continuous': 62_758_915,
    've/cifar10_ncsnpp': 62_693_251,
    'vp/cifar10_ncsnpp_continuous': 62_693_251,
    've/celeba_ncsnpp': 62_693_251,
    've/cifar10_ncsnpp_deep_continuous': 107_587_075,
    've/cifar10': 107_587_075,
    'vp/cifar10_ncsnpp_deep_continuous': 107_521_411,
    'subvp/cifar10_ncsnpp_deep_continuous': 107_521_411,
    'vp/cifar10_ddpmpp_continuous': 61_804_419,
    'subvp/cifar10_ddpmpp_continuous': 61_804_419,
    'vp/cifar10_ddpmpp_deep_continuous': 106_632_579,
    'vp/ddpm/cifar10': 35_218_947,
    've/cifar10_ddpm': 35_218_947,
    'subvp/cifar10_ddpm_continuous': 35_218_947,
    've/ncsnv2/cifar10': 33_970_563,
    've/ncsnv2/celeba': 33_970_563,
    've/ncsnv2/bedroom': 83_445_379,
    've/ncsn/cifar10': 34_428_675,
    've/ncsn/cifar10_124': 44_828_931,
    've/ffhq_256_ncsnpp_continuous': 65_574_549,
    've/bedroom_ncsnpp_continuous': 65_574_549,
    'vp/ddpm/bedroom': 111_569_923,
}


def load_config(name):
  return importlib.import_module('configs.' + name.replace('/', '.')).get_config()


def abstract_params(config):
  """Parameter shapes from jax.eval_shape (no memory, no compilation)."""
  model = utils.create_model(config)
  x = jnp.zeros((1,) + model.input_shape, jnp.float32)
  labels = jnp.ones((1,), jnp.float32 if config.training.continuous else jnp.int32)
  return jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                                           x, labels, train=False))


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_parameter_count_equals_reference(name):
  assert utils.param_count(abstract_params(load_config(name))) == PARAM_COUNTS[name]


# ----------------------------------------------------------------------------------------------------
# Tiny forward/backward checks: finite outputs of the right shape, a gradient reaching every trainable
# parameter, none reaching the frozen Fourier features.


def tiny_config(name, **model_overrides):
  config = default_cifar10_configs.get_default_configs()
  config.training.sde = 'vesde'
  config.data.image_size = 8
  config.data.num_channels = 1
  m = config.model
  m.name = name
  m.nf = 8
  m.ch_mult = (1, 2)
  m.num_res_blocks = 1
  m.attn_resolutions = (4,)
  m.nonlinearity = 'swish'
  m.normalization = 'GroupNorm'
  m.init_scale = 0.5  # non-negligible output layers, so gradients reach everything
  m.dropout = 0.1
  m.num_scales = 10
  for key, value in model_overrides.items():
    setattr(m, key, value)
  return config


def _labels(config, batch):
  if config.model.name == 'ncsnpp' and config.model.get('embedding_type', 'fourier') == 'fourier':
    return jnp.linspace(0.1, 5., batch)
  return jnp.arange(batch) % config.model.num_scales


# XLA's optimisation passes dominate the cost of these tests on a small CPU; correctness does not need them.
_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def compiled(f, *args):
  return jax.jit(f).lower(*args).compile(compiler_options=_FAST_COMPILE)


def random_variables(model, x, labels, seed=0):
  """Random parameters of the right shapes without compiling the initialiser: N(0, 0.1²), or N(1, 0.1²)
  for scales (so that no layer starts at zero and every parameter is exercised)."""
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                                             x, labels, train=False))
  r = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(shapes)
  return flax.traverse_util.unflatten_dict({
      path: jnp.asarray(r.normal(size=s.shape) * 0.1 + (path[-1] in ('scale', 'gamma', 'alpha', 'embedding')),
                        jnp.float32) for path, s in flat.items()})


def forward_backward(config, batch=2):
  """(input, output, grads) of a random batch under random parameters, train mode with dropout."""
  utils.validate_model_config(config)
  model = utils.create_model(config)
  x = jax.random.uniform(jax.random.key(1), (batch,) + model.input_shape)
  labels = _labels(config, batch)
  variables = random_variables(model, x, labels)

  def run(variables, x, labels):
    def loss(v):
      out = model.apply(v, x, labels, train=True, rngs={'dropout': jax.random.key(2)})
      return jnp.sum(out ** 2), out
    return jax.value_and_grad(loss, has_aux=True)(variables)

  (_, out), grads = compiled(run, variables, x, labels)(variables, x, labels)
  return x, out, grads


def assert_gradients_reach_parameters(grads):
  flat = flax.traverse_util.flatten_dict(grads['params'])
  for path, g in flat.items():
    if path[-2].startswith('GaussianFourierProjection'):
      assert float(jnp.max(jnp.abs(g))) == 0., 'the Fourier features must stay frozen'
    else:
      assert float(jnp.max(jnp.abs(g))) > 0., f'no gradient reaches {"/".join(path)}'


NCSNPP_VARIANTS = {
    # The released NCSN++ layout: BigGAN blocks, FIR, residual input pyramid, Fourier features.
    'biggan_fir_residual_in_fourier': dict(resblock_type='biggan', fir=True, progressive='none',
                                           progressive_input='residual', embedding_type='fourier',
                                           scale_by_sigma=True),
    # DDPM blocks with FIR resampling without convolution, output/input skip pyramids, concatenation.
    'ddpm_fir_noconv_skips_cat': dict(resblock_type='ddpm', fir=True, resamp_with_conv=False,
                                      progressive='output_skip', progressive_input='input_skip',
                                      progressive_combine='cat', embedding_type='positional',
                                      skip_rescale=False),
    # DDPM blocks with fused FIR up/down convolutions and residual pyramids both ways.
    'ddpm_fir_conv_residual_both': dict(resblock_type='ddpm', fir=True, resamp_with_conv=True,
                                        progressive='residual', progressive_input='residual',
                                        embedding_type='positional'),
    # BigGAN blocks with naive resampling, input skip with sum, no time conditioning.
    'biggan_naive_inputskip_uncond': dict(resblock_type='biggan', fir=False, progressive='output_skip',
                                          progressive_input='input_skip', progressive_combine='sum',
                                          embedding_type='positional', conditional=False),
}


@pytest.mark.parametrize('variant', sorted(NCSNPP_VARIANTS))
def test_ncsnpp_variants_forward_backward(variant):
  config = tiny_config('ncsnpp', **NCSNPP_VARIANTS[variant])
  x, out, grads = forward_backward(config)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  assert_gradients_reach_parameters(grads)


def test_ncsnpp_dropout_centering_and_scale_by_sigma():
  """Dropout acts only in training; [0,1] data is mapped to 2x-1 inside; scale_by_sigma divides by σ:
  σ[label] for discrete labels, the label itself for continuous VE (where labels are σ)."""
  config = tiny_config('ncsnpp', resblock_type='ddpm', fir=False, progressive='none',
                       progressive_input='none', embedding_type='positional')
  config.training.continuous = False
  centered = config.copy_and_resolve_references()
  centered.data.centered = True
  scaled = config.copy_and_resolve_references()
  scaled.model.scale_by_sigma = True
  scaled_continuous = scaled.copy_and_resolve_references()
  scaled_continuous.training.continuous = True
  model, model_centered, model_scaled, model_scaled_continuous = map(
      utils.create_model, (config, centered, scaled, scaled_continuous))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  labels = jnp.array([1, 7])
  variables = random_variables(model, x, labels)

  def outputs(v, x):
    train = [model.apply(v, x, labels, train=True, rngs={'dropout': jax.random.key(s)}) for s in (0, 1)]
    return (model.apply(v, x, labels, train=False), train,
            model_centered.apply(v, 2 * x - 1, labels, train=False), model_scaled.apply(v, x, labels, train=False),
            model_scaled_continuous.apply(v, x, labels.astype(jnp.float32), train=False))

  base, train, out_centered, out_scaled, out_scaled_continuous = compiled(outputs, variables, x)(variables, x)
  assert float(jnp.max(jnp.abs(train[0] - train[1]))) > 0
  assert float(jnp.max(jnp.abs(train[0] - base))) > 0
  np.testing.assert_allclose(out_centered, base, rtol=1e-5, atol=1e-6)
  sigmas = utils.get_sigmas(config)[np.array([1, 7])]
  np.testing.assert_allclose(out_scaled, base / sigmas[:, None, None, None], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out_scaled_continuous, base / np.array([1., 7.])[:, None, None, None],
                             rtol=1e-5, atol=1e-6)


def test_ddpm_forward_backward():
  config = tiny_config('ddpm', nf=32, ch_mult=(1, 1))
  x, out, grads = forward_backward(config)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  assert_gradients_reach_parameters(grads)


@pytest.mark.parametrize('name', ['ncsnv2_64', 'ncsnv2_128', 'ncsnv2_256', 'ncsn'])
def test_refinenet_models_forward_backward(name):
  config = tiny_config(name, nf=8, normalization='InstanceNorm++', nonlinearity='elu',
                       interpolation='bilinear', scale_by_sigma=name != 'ncsn')
  config.training.continuous = False
  if name == 'ncsn':
    config.model.num_classes = config.model.num_scales
  x, out, grads = forward_backward(config)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  assert_gradients_reach_parameters(grads)


def test_ncsn_is_noise_conditional():
  """NCSN v1 reads the noise level through its normalisation tables: different rows, different outputs."""
  config = tiny_config('ncsn', nf=8, normalization='InstanceNorm++', nonlinearity='elu', scale_by_sigma=False)
  config.training.continuous = False
  model = utils.create_model(config)
  x = jnp.broadcast_to(jax.random.uniform(jax.random.key(1), (1, 8, 8, 1)), (2, 8, 8, 1))
  labels = jnp.array([0, 5])
  variables = random_variables(model, x, labels)
  embeddings = [p for p in flax.traverse_util.flatten_dict(variables['params']) if p[-1] == 'embedding']
  assert len(embeddings) > 10
  out = compiled(lambda v: model.apply(v, x, labels, train=False), variables)(variables)
  assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 1e-3


def test_unknown_options_are_clear_errors():
  with pytest.raises(ValueError, match='config.model.progressive'):
    utils.validate_model_config(tiny_config('ncsnpp', progressive='skip'))
  with pytest.raises(ValueError, match='config.model.nonlinearity'):
    utils.validate_model_config(tiny_config('ddpm', nf=32, nonlinearity='gelu'))
  config = tiny_config('ncsnpp', embedding_type='fourier')
  config.training.continuous = False
  with pytest.raises(ValueError, match='embedding_type'):
    utils.validate_model_config(config)
  with pytest.raises(ValueError, match='config.model.name'):
    utils.validate_model_config(tiny_config('ncsnpp++'))


# ----------------------------------------------------------------------------------------------------
# Networks are built from explicit kwargs; models.utils alone decides what their labels mean.


def test_networks_are_built_from_explicit_kwargs():
  """create_model(config) is cls(**cls.kwargs_from_config(config), **label_kwargs(config)); the network
  holds no config, and the same kwargs written by hand build the same network."""
  config = tiny_config('ncsnpp', embedding_type='positional')
  config.training.continuous = False
  model = utils.create_model(config)
  assert not any(isinstance(v, type(config)) for v in vars(model).values())
  by_hand = ncsnpp.NCSNpp(
      nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8, num_channels=1,
      centered=False, nonlinearity='swish', conditional=True, embedding_type='positional', fourier_scale=16.,
      resblock_type='biggan', fir=True, fir_kernel=(1., 3., 3., 1.), resamp_with_conv=True,
      progressive='none', progressive_input='residual', progressive_combine='sum', skip_rescale=True,
      init_scale=0.5, dropout=0.1,
      scale_by_sigma=False, label_kind='index', sigmas=tuple(float(s) for s in utils.get_sigmas(config)))
  assert by_hand == model and model.input_shape == (8, 8, 1)
  for name in ('ddpm', 'ncsnv2_64', 'ncsn', 'mlp'):
    config = tiny_config(name, nf=32, normalization='InstanceNorm++', num_layers=1)
    config.training.continuous = False
    cls = utils.get_model(name)
    assert utils.create_model(config) == cls(**cls.kwargs_from_config(config), **utils.label_kwargs(config))


@pytest.mark.parametrize('sde,continuous,kind', [
    ('vesde', True, 'sigma'), ('VESDE', False, 'index'), ('vpsde', True, 'time'), ('vpsde', False, 'time'),
    ('subvpsde', True, 'time'), ('subvpsde', False, 'time')])
def test_label_kind_comes_from_the_sde_and_training(sde, continuous, kind):
  config = tiny_config('ncsnpp', embedding_type='positional')
  config.training.sde, config.training.continuous = sde, continuous
  kwargs = utils.label_kwargs(config)
  assert kwargs['label_kind'] == utils.label_kind(config) == kind
  if kind == 'index':
    np.testing.assert_array_equal(np.asarray(kwargs['sigmas'], np.float32), utils.get_sigmas(config))
  else:
    assert kwargs['sigmas'] is None
  assert utils.create_model(config).label_kind == kind


def test_scale_by_sigma_needs_noise_level_labels():
  """VP / sub-VP labels are times, which carry no σ to divide by: a clear error before anything runs."""
  config = tiny_config('ncsnpp', embedding_type='positional', scale_by_sigma=True)
  config.training.sde = 'vpsde'
  with pytest.raises(ValueError, match='config.model.scale_by_sigma'):
    utils.validate_model_config(config)
  with pytest.raises(ValueError, match='scale_by_sigma'):
    model = utils.create_model(config)
    jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                                      *utils.dummy_inputs(model, 1), train=False))


def test_input_shape_is_checked_against_the_data():
  config = tiny_config('mlp', num_layers=1)
  with pytest.raises(ValueError, match="config.model.name='mlp' is for vector data"):
    utils.check_input_shape(config, datasets.data_shape(config))
  utils.check_input_shape(tiny_config('ncsnpp'), datasets.data_shape(tiny_config('ncsnpp')))
  with pytest.raises(ValueError, match="config.model.name='ncsnpp' is for images"):
    utils.check_input_shape(tiny_config('ncsnpp'), (2,))


def test_models_do_not_import_the_data_pipeline():
  models_dir = os.path.join(os.path.dirname(__file__), '..', 'models')
  for path in glob.glob(os.path.join(models_dir, '*.py')):
    with open(path, encoding='utf-8') as f:
      assert not re.search(r'^\s*(import datasets|from datasets import)', f.read(), re.M), path
