"""Layers shared by the score networks: activations, initialisers, convolutions, DDPM blocks, RefineNet blocks.

Sub-module names (``Conv_0``, ``Dense_0``, ``GroupNorm_0``, ``NIN_0``, ...) are Flax's automatic names and
coincide with the attribute names of the reference's PyTorch port, which is what lets
``porting.torch_port`` map released checkpoints onto these modules.

DDPM blocks follow Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", arXiv:2006.11239, App. B);
the RefineNet blocks of NCSN/NCSNv2 follow Song & Ermon 2019/2020 (arXiv:1907.05600, 2006.09011) and
Lin et al. 2017 (RefineNet).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
_ACTIVATIONS = {
    'elu': nn.elu,
    'relu': nn.relu,
    'lrelu': lambda x: nn.leaky_relu(x, negative_slope=0.2),
    'swish': nn.swish,
}


def get_act(nonlinearity: str) -> Callable[[Array], Array]:
  """The activation named ``nonlinearity`` (``config.model.nonlinearity``), case-insensitive."""
  name = str(nonlinearity).lower()
  if name not in _ACTIVATIONS:
    raise ValueError(f'config.model.nonlinearity={name!r} is not known; choose one of {sorted(_ACTIVATIONS)}.')
  return _ACTIVATIONS[name]


@functools.cache
def _rematerialised(block: type[nn.Module], static_argnums: tuple[int, ...]) -> type[nn.Module]:
  wrapped = nn.remat(block, static_argnums=static_argnums)
  # Flax names a sub-module after its class (``ResnetBlockDDPM_0``); nn.remat's class is called
  # ``CheckpointResnetBlockDDPM``, which would rename every block's parameters. Under the block's own name
  # one parameter tree (and every released checkpoint) serves the network with and without remat.
  wrapped.__name__ = block.__name__
  wrapped.__qualname__ = block.__qualname__
  return wrapped


def maybe_remat(block: type[nn.Module], remat: bool, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """``block``, or with ``remat`` (``config.model.remat``) the same block under ``nn.remat``: its
  activations are recomputed in the backward pass instead of stored, trading one more forward pass of
  the block for the memory of its intermediates. Same parameters, names and outputs either way.

  ``static_argnums`` counts ``self`` as 0 and names the Python-valued arguments (``train``), which
  ``jax.checkpoint`` must not trace.
  """
  return _rematerialised(block, static_argnums) if remat else block


def sigma_of_labels(labels: Array, label_kind: str, sigmas: tuple[float, ...] | None) -> Array:
  """σ of each label, (B,), for networks that divide their output by σ (``scale_by_sigma``).

  What a label means is decided by ``models.utils.label_kwargs`` and given to the network: 'sigma' (the
  label is σ), 'index' (it indexes ``sigmas``, the descending table). 'time' labels (VP, sub-VP) have no σ.
  """
  if label_kind == 'sigma':
    return labels
  if label_kind == 'index':
    if sigmas is None:
      raise ValueError("label_kind='index' needs the σ table the labels index (sigmas).")
    return jnp.asarray(sigmas, jnp.float32)[labels.astype(jnp.int32)]
  raise ValueError(f'scale_by_sigma divides by σ, but label_kind={label_kind!r} labels carry no σ; '
                   "it needs 'sigma' or 'index' labels (the VE SDE).")


def default_init(scale: float = 1.) -> Callable[..., Array]:
  """DDPM's initialiser: variance scaling, fan-average, uniform. ``scale=0`` means 1e-10 (near-zero)."""
  scale = 1e-10 if scale == 0 else scale
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def ncsn_init(scale: float = 1.) -> Callable[..., Array]:
  """NCSN's kernel initialiser: PyTorch's default convolution init, U(±sqrt(scale / fan_in))."""
  scale = 1e-10 if scale == 0 else scale
  return nn.initializers.variance_scaling(scale / 3., 'fan_in', 'uniform')


def _ncsn_bias_init(scale: float, fan_in: int) -> Callable[..., Array]:
  """The bias drawn like the kernel entries, U(±sqrt(scale / fan_in)) (PyTorch's default, as the reference)."""
  scale = 1e-10 if scale == 0 else scale
  limit = math.sqrt(scale / fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


def ddpm_conv1x1(x: Array, out_planes: int, stride: int = 1, bias: bool = True,
                 init_scale: float = 1.) -> Array:
  """1x1 convolution with DDPM initialisation (call inside a compact module)."""
  return nn.Conv(out_planes, (1, 1), strides=(stride, stride), padding='SAME', use_bias=bias,
                 kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros)(x)


def ddpm_conv3x3(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.) -> Array:
  """3x3 'SAME' convolution with DDPM initialisation (stride 2 pads (0, 1), as TensorFlow does)."""
  return nn.Conv(out_planes, (3, 3), strides=(stride, stride), padding='SAME', use_bias=bias,
                 kernel_dilation=(dilation, dilation), kernel_init=default_init(init_scale),
                 bias_init=nn.initializers.zeros)(x)


def ncsn_conv1x1(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.) -> Array:
  """1x1 convolution with NCSN (PyTorch-default) initialisation."""
  return nn.Conv(out_planes, (1, 1), strides=(stride, stride), padding='SAME', use_bias=bias,
                 kernel_dilation=(dilation, dilation), kernel_init=ncsn_init(init_scale),
                 bias_init=_ncsn_bias_init(init_scale, x.shape[-1]))(x)


def ncsn_conv3x3(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.) -> Array:
  """3x3 convolution, padding = dilation (size-preserving), with NCSN (PyTorch-default) initialisation."""
  return nn.Conv(out_planes, (3, 3), strides=(stride, stride),
                 padding=((dilation, dilation), (dilation, dilation)), use_bias=bias,
                 kernel_dilation=(dilation, dilation), kernel_init=ncsn_init(init_scale),
                 bias_init=_ncsn_bias_init(init_scale, 9 * x.shape[-1]))(x)


def get_timestep_embedding(timesteps: Array, embedding_dim: int, max_positions: int = 10000) -> Array:
  """Transformer sinusoidal embedding of (possibly fractional) time steps, as in DDPM.

  e_j(t) = sin(t ω_j) for j < d/2 and cos(t ω_{j-d/2}) after, with ω_j = max_positions^(-j / (d/2 - 1)).
  Returns (B, embedding_dim); odd dimensions are zero-padded.
  """
  if timesteps.ndim != 1:
    raise ValueError(f'time steps must have shape (B,), got {timesteps.shape}.')
  half_dim = embedding_dim // 2
  if half_dim < 2:
    raise ValueError(f'the time embedding needs embedding_dim >= 4 (config.model.nf), got {embedding_dim}.')
  rate = math.log(max_positions) / (half_dim - 1)
  freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -rate)
  emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class NIN(nn.Module):
  """Network-in-network: a per-pixel linear map of the channels, y = x W + b (a 1x1 convolution)."""
  num_units: int
  init_scale: float = 0.1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_dim = x.shape[-1]
    w = self.param('W', default_init(self.init_scale), (in_dim, self.num_units))
    b = self.param('b', nn.initializers.zeros, (self.num_units,))
    return jnp.einsum('...c,cu->...u', x, w.astype(x.dtype)) + b.astype(x.dtype)


def spatial_self_attention(x: Array, q: Array, k: Array, v: Array) -> Array:
  """Single-head dot-product attention over all H·W positions: softmax(q kᵀ / √C) v, shapes (B, H, W, C)."""
  b, h, w, c = x.shape
  logits = jnp.einsum('bhwc,bHWc->bhwHW', q, k) * (int(c) ** -0.5)
  weights = jax.nn.softmax(logits.reshape(b, h, w, h * w), axis=-1).reshape(b, h, w, h, w)
  return jnp.einsum('bhwHW,bHWc->bhwc', weights, v)


def _spread_group_means(per_channel: Array, groups: int) -> Array:
  """(B, C) per-channel means -> (B, 1, 1, C): every channel gets the mean of its group's channels."""
  b, c = per_channel.shape
  grouped = jnp.mean(per_channel.reshape(b, groups, c // groups), axis=-1, keepdims=True)
  return jnp.broadcast_to(grouped, (b, groups, c // groups)).reshape(b, 1, 1, c)


class GroupNorm(nn.Module):
  """Group normalisation (Wu & He 2018) of (B, H, W, C): two-pass group mean and variance, then a
  per-channel affine ``scale``, ``bias``; statistics in float32, the output in the inputs' dtype.

  The same function, parameters and module names as ``flax.linen.GroupNorm(use_fast_variance=False)``
  (checkpoints are unchanged); only the order of the sums differs. Each statistic is reduced over H, W
  first, per channel, and then over a group's channels on the small (B, C) result: XLA:CPU reduces the
  (B, H, W, G, C/G) view of flax's formulation over its strided (H, W, C/G) axes several times slower,
  which made GroupNorm + SiLU with its gradient 1.5-2.4x PyTorch's (BENCHMARKS.md, "Where the CPU time goes").
  """
  num_groups: int = 32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    if x.ndim != 4 or c % self.num_groups:
      raise ValueError(f'GroupNorm needs (B, H, W, C) inputs with C a multiple of its {self.num_groups} '
                       f'groups, got shape {x.shape}.')
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    out_dtype = jnp.result_type(x, scale, bias)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    centred = x - _spread_group_means(jnp.mean(x, axis=(1, 2)), self.num_groups)
    variance = _spread_group_means(jnp.mean(jnp.square(centred), axis=(1, 2)), self.num_groups)
    y = centred * (jax.lax.rsqrt(variance + self.epsilon) * scale) + bias
    return y.astype(out_dtype)


def group_norm_32() -> GroupNorm:
  """DDPM's normalisation: GroupNorm with 32 groups."""
  return GroupNorm(num_groups=32)


class AttnBlock(nn.Module):
  """DDPM's self-attention block: x + NIN(attention(normalize(x)))."""
  normalize: Callable[[], nn.Module] = group_norm_32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = self.normalize()(x)
    q, k, v = NIN(c)(h), NIN(c)(h), NIN(c)(h)
    return x + NIN(c, init_scale=0.)(spatial_self_attention(x, q, k, v))


class Upsample(nn.Module):
  """DDPM up-sampling: nearest neighbour x2, then (``with_conv``) a 3x3 convolution."""
  with_conv: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), 'nearest')
    if self.with_conv:
      x = ddpm_conv3x3(x, c)
    return x


class Downsample(nn.Module):
  """DDPM down-sampling: a stride-2 3x3 convolution (``with_conv``) or 2x2 average pooling."""
  with_conv: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    if self.with_conv:
      return ddpm_conv3x3(x, c, stride=2)
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding='SAME')


class ResnetBlockDDPM(nn.Module):
  """DDPM residual block: GN-act-conv, + Dense(act(temb)), GN-act-dropout-conv(init 0), NIN shortcut."""
  act: Callable[[Array], Array]
  normalize: Callable[[], nn.Module] = group_norm_32
  out_ch: int | None = None
  conv_shortcut: bool = False
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    h = self.act(self.normalize()(x))
    h = ddpm_conv3x3(h, out_ch)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init())(self.act(temb))[:, None, None, :]
    h = self.act(self.normalize()(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = ddpm_conv3x3(h, out_ch, init_scale=0.)
    if c != out_ch:
      x = ddpm_conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
    return x + h


def unet_norm_channels(nf: int, ch_mult: Sequence[int], num_res_blocks: int,
                       input_skip_cat: bool = False) -> list[int]:
  """Channel counts of every normalised activation in the DDPM / NCSN++ U-Net (skip concatenations included)."""
  seen = [nf]
  skips = [nf]
  in_ch = nf
  for i_level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      seen.append(in_ch)
      in_ch = nf * mult
      seen.append(in_ch)
      skips.append(in_ch)
    if i_level != len(ch_mult) - 1:
      seen.append(in_ch)
      if input_skip_cat:
        in_ch *= 2
      skips.append(in_ch)
  for i_level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      seen.append(in_ch + skips.pop())
      in_ch = nf * ch_mult[i_level]
      seen.append(in_ch)
  return seen


def check_unet_config(config, groups: Callable[[int], int], model_name: str,
                      input_skip_cat: bool = False) -> None:
  """Resolution and GroupNorm constraints of a U-Net config; errors name the key to change."""
  m = config.model
  for key in ('nf', 'ch_mult', 'num_res_blocks', 'attn_resolutions'):
    if key not in m:
      raise ValueError(f'{model_name} needs config.model.{key}.')
  size = int(config.data.image_size)
  factor = 2 ** (len(m.ch_mult) - 1)
  if size % factor:
    raise ValueError(f'config.data.image_size={size} must be divisible by 2**(len(config.model.ch_mult)-1)'
                     f' = {factor} ({model_name} halves the resolution {len(m.ch_mult) - 1} times); change '
                     'the image size or config.model.ch_mult.')
  for channels in sorted(set(unet_norm_channels(int(m.nf), m.ch_mult, int(m.num_res_blocks), input_skip_cat))):
    g = groups(channels)
    if g < 1 or channels % g:
      raise ValueError(f'{model_name}: a layer with {channels} channels cannot use GroupNorm with {g} groups; '
                       f'choose config.model.nf (={m.nf}) and config.model.ch_mult (={tuple(m.ch_mult)}) so '
                       'that every channel count is a multiple of its group count.')


# RefineNet blocks of NCSN (conditional: the normalisations take the noise-level index y) and NCSNv2.
# ``normalization`` is a factory from models.normalization.get_normalization.


INTERPOLATIONS = ('bilinear', 'nearest')


def _resize(x: Array, shape: Sequence[int], interpolation: str) -> Array:
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'config.model.interpolation={interpolation!r}; choose one of {INTERPOLATIONS}.')
  return jax.image.resize(x, (x.shape[0], shape[0], shape[1], x.shape[-1]), interpolation)


class CRPBlock(nn.Module):
  """Chained residual pooling: x ← act(x); path ← conv(pool5x5(path)) n_stages times, each added to x."""
  features: int
  n_stages: int
  act: Callable[[Array], Array] = nn.relu
  normalization: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, x: Array, y: Array | None = None) -> Array:
    x = self.act(x)
    path = x
    for _ in range(self.n_stages):
      if self.normalization is None:
        path = nn.max_pool(path, window_shape=(5, 5), strides=(1, 1), padding='SAME')
      else:
        path = self.normalization()(path, y)
        path = nn.avg_pool(path, window_shape=(5, 5), strides=(1, 1), padding='SAME')
      path = ncsn_conv3x3(path, self.features, bias=False)
      x = path + x
    return x


class RCUBlock(nn.Module):
  """Residual conv units: n_blocks × (x + (act → conv) applied n_stages times), with optional norms."""
  features: int
  n_blocks: int
  n_stages: int
  act: Callable[[Array], Array] = nn.relu
  normalization: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, x: Array, y: Array | None = None) -> Array:
    for _ in range(self.n_blocks):
      residual = x
      for _ in range(self.n_stages):
        if self.normalization is not None:
          x = self.normalization()(x, y)
        x = self.act(x)
        x = ncsn_conv3x3(x, self.features, bias=False)
      x = x + residual
    return x


class MSFBlock(nn.Module):
  """Multi-resolution fusion: conv3x3 each input (after a norm, if given), resize to ``shape``, sum."""
  shape: Sequence[int]
  features: int
  interpolation: str = 'bilinear'
  normalization: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, xs: Sequence[Array], y: Array | None = None) -> Array:
    sums = 0.
    for x in xs:
      h = x if self.normalization is None else self.normalization()(x, y)
      h = ncsn_conv3x3(h, self.features, bias=True)
      sums = sums + _resize(h, self.shape, self.interpolation)
    return sums


class RefineBlock(nn.Module):
  """RefineNet block (Lin et al. 2017): RCU adaptation per input → fusion → CRP → output RCUs.

  With ``normalization`` (NCSN v1) every sub-block is noise-conditional and CRP average-pools.
  """
  output_shape: Sequence[int]
  features: int
  act: Callable[[Array], Array] = nn.relu
  interpolation: str = 'bilinear'
  start: bool = False
  end: bool = False
  normalization: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, xs: Sequence[Array], y: Array | None = None) -> Array:
    hs = [RCUBlock(x.shape[-1], n_blocks=2, n_stages=2, act=self.act,
                   normalization=self.normalization)(x, y) for x in xs]
    if self.start:
      h = hs[0]
    else:
      h = MSFBlock(shape=self.output_shape, features=self.features, interpolation=self.interpolation,
                   normalization=self.normalization)(hs, y)
    h = CRPBlock(self.features, n_stages=2, act=self.act, normalization=self.normalization)(h, y)
    return RCUBlock(self.features, n_blocks=3 if self.end else 1, n_stages=2, act=self.act,
                    normalization=self.normalization)(h, y)


class ConvMeanPool(nn.Module):
  """A 'SAME' convolution followed by 2x2 mean pooling (``adjust_padding``: pad top/left first, for 28 px)."""
  output_dim: int
  kernel_size: int = 3
  biases: bool = True
  adjust_padding: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.adjust_padding:
      x = jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))
    k = self.kernel_size
    x = nn.Conv(self.output_dim, (k, k), padding='SAME', use_bias=self.biases,
                kernel_init=ncsn_init(), bias_init=_ncsn_bias_init(1., k * k * x.shape[-1]))(x)
    return (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4.


class ResidualBlock(nn.Module):
  """NCSN's residual block: norm-act-conv-norm-act-conv + shortcut; 'down' halves the resolution
  (or, with dilation > 1, keeps it and only widens the receptive field, as NCSNv2 does).

  With ``conditional`` the norms take the noise-level index ``y`` (NCSN v1).
  """
  output_dim: int
  normalization: Callable[..., nn.Module]
  resample: str | None = None
  act: Callable[[Array], Array] = nn.elu
  dilation: int = 1
  adjust_padding: bool = False
  conditional: bool = False

  def _norm(self, x: Array, y: Array | None) -> Array:
    return self.normalization()(x, y) if self.conditional else self.normalization()(x)

  @nn.compact
  def __call__(self, x: Array, y: Array | None = None) -> Array:
    if self.resample not in (None, 'down'):
      raise ValueError(f"ResidualBlock resample must be None or 'down', got {self.resample!r}.")
    in_dim, d = x.shape[-1], self.dilation
    h = self.act(self._norm(x, y))
    if self.resample == 'down':
      h = ncsn_conv3x3(h, in_dim, dilation=d)
      h = self.act(self._norm(h, y))
      if d > 1:
        h = ncsn_conv3x3(h, self.output_dim, dilation=d)
        shortcut = ncsn_conv3x3(x, self.output_dim, dilation=d)
      else:
        h = ConvMeanPool(self.output_dim, adjust_padding=self.adjust_padding)(h)
        shortcut = ConvMeanPool(self.output_dim, kernel_size=1, adjust_padding=self.adjust_padding)(x)
    else:
      if self.output_dim == in_dim:
        shortcut = x
      elif d > 1:
        shortcut = ncsn_conv3x3(x, self.output_dim, dilation=d)
      else:
        shortcut = ncsn_conv1x1(x, self.output_dim)
      h = ncsn_conv3x3(h, self.output_dim, dilation=d)
      h = self.act(self._norm(h, y))
      h = ncsn_conv3x3(h, self.output_dim, dilation=d)
    return h + shortcut
