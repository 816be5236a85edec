"""NCSN++ and DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H).

One U-Net class covers both: DDPM++ is NCSN++ with plain (non-FIR) resampling, no input pyramid,
positional time embedding and no division by σ. The options (all under ``config.model``):

- ``embedding_type``: 'fourier' (Gaussian Fourier features of log σ, scale ``fourier_scale``; continuous
  VE training) or 'positional' (sinusoidal embedding of the label, as DDPM);
- ``resblock_type``: 'biggan' (resampling inside residual blocks) or 'ddpm' (separate Up/Downsample);
- ``fir`` / ``fir_kernel``: FIR resampling (StyleGAN2) instead of nearest / stride-2 / average pooling;
- ``progressive`` ∈ {none, output_skip, residual}: output pyramid; ``progressive_input`` ∈ {none,
  input_skip, residual}: input pyramid; ``progressive_combine`` ∈ {sum, cat} for input_skip;
- ``skip_rescale`` (residual sums / √2), ``attn_resolutions``, ``init_scale``, ``dropout``,
  ``conditional`` (time conditioning), ``scale_by_sigma`` (output / σ, so the network learns σ·score).

Inputs in [0, 1] (``data.centered=False``) are mapped to [-1, 1] first. Labels are what
``models.utils.get_score_fn`` passes: σ for continuous VE, an index into the descending σ table for
discrete VE, 999 t or t (N-1) for VP / sub-VP; ``models.utils.label_kwargs`` tells the network which.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from scoresde.models import layers
from scoresde.models import layerspp
from scoresde.models import utils

Array = jax.Array

# The config.model keys NCSN++ reads: the first four from the experiment config, the options from
# configs/default_cifar10_configs.py (the reference's NCSN++ values) unless the experiment changes them.
_KEYS = ('nf', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'conditional', 'embedding_type',
         'fourier_scale', 'resblock_type', 'fir', 'fir_kernel', 'resamp_with_conv', 'progressive',
         'progressive_input', 'progressive_combine', 'skip_rescale', 'init_scale', 'dropout',
         'scale_by_sigma')
_CHOICES = {
    'embedding_type': ('fourier', 'positional'),
    'resblock_type': ('biggan', 'ddpm'),
    'progressive': ('none', 'output_skip', 'residual'),
    'progressive_input': ('none', 'input_skip', 'residual'),
    'progressive_combine': ('sum', 'cat'),
}


@utils.register_model(name='ncsnpp')
class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ U-Net: ``(x (B, H, W, C), labels (B,), train) -> (B, H, W, C)``.

  The architecture options are described in the module docstring. ``label_kind`` says what the labels
  are ('sigma', 'time' or 'index', decided by ``models.utils.label_kwargs``) and ``sigmas`` is the
  descending σ table that 'index' labels point into: the network reads σ from them only to divide by
  it (``scale_by_sigma``). The Fourier embedding embeds log(label) whatever the labels are.
  """
  nf: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  image_size: int
  num_channels: int
  centered: bool
  nonlinearity: str
  conditional: bool
  embedding_type: str
  fourier_scale: float
  resblock_type: str
  fir: bool
  fir_kernel: tuple[float, ...]
  resamp_with_conv: bool
  progressive: str
  progressive_input: str
  progressive_combine: str
  skip_rescale: bool
  init_scale: float
  dropout: float
  scale_by_sigma: bool
  label_kind: str
  sigmas: tuple[float, ...] | None
  # Per-block activation checkpointing (layers.maybe_remat). It changes memory and compute, not the
  # function, so the network written out by hand (tests/test_models.py) may leave it out.
  remat: bool = False

  @staticmethod
  def kwargs_from_config(config: ml_collections.ConfigDict) -> dict:
    """The architecture kwargs of ``config.model`` / ``config.data`` (all but the label convention),
    checked; errors name the key and the allowed values."""
    m = config.model
    for key in _KEYS:
      if key not in m:
        raise ValueError(f'NCSN++ needs config.model.{key} (see configs/vp/cifar10_ddpmpp_continuous.py).')
    values = {key: m[key] for key in _KEYS}
    for key, allowed in _CHOICES.items():
      values[key] = str(values[key]).lower()
      if values[key] not in allowed:
        raise ValueError(f'config.model.{key}={values[key]!r} is not known; choose one of {allowed}.')
    return dict(
        nf=int(m.nf), ch_mult=tuple(int(c) for c in m.ch_mult), num_res_blocks=int(m.num_res_blocks),
        attn_resolutions=tuple(int(r) for r in m.attn_resolutions),
        image_size=int(config.data.image_size), num_channels=int(config.data.num_channels),
        centered=bool(config.data.centered), nonlinearity=str(m.nonlinearity).lower(),
        conditional=bool(values['conditional']),
        embedding_type=values['embedding_type'], fourier_scale=float(values['fourier_scale']),
        resblock_type=values['resblock_type'], fir=bool(values['fir']),
        fir_kernel=tuple(float(k) for k in values['fir_kernel']),
        resamp_with_conv=bool(values['resamp_with_conv']), progressive=values['progressive'],
        progressive_input=values['progressive_input'], progressive_combine=values['progressive_combine'],
        skip_rescale=bool(values['skip_rescale']), init_scale=float(values['init_scale']),
        dropout=float(values['dropout']), scale_by_sigma=bool(values['scale_by_sigma']),
        # Optional (ours): configs written for the reference (a released checkpoint's) lack it.
        remat='remat' in m and bool(m.remat))

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Option values, image size vs. down-samplings, GroupNorm divisibility (see models.utils)."""
    kwargs = cls.kwargs_from_config(config)
    if kwargs['embedding_type'] == 'fourier' and not config.training.continuous:
      raise ValueError("config.model.embedding_type='fourier' embeds a continuous σ; with "
                       "config.training.continuous=False use embedding_type='positional'.")
    layers.get_act(kwargs['nonlinearity'])
    layers.check_unet_config(config, layerspp.num_groups, 'NCSN++',
                             input_skip_cat=(kwargs['progressive_input'] == 'input_skip'
                                             and kwargs['progressive_combine'] == 'cat'))

  @property
  def input_shape(self) -> tuple[int, ...]:
    return (self.image_size, self.image_size, self.num_channels)

  @nn.compact
  def __call__(self, x: Array, time_cond: Array, train: bool = False) -> Array:
    act = layers.get_act(self.nonlinearity)
    num_resolutions = len(self.ch_mult)
    if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
      raise ValueError(f'NCSN++ built for config.data.image_size={self.image_size} got images '
                       f'{x.shape[1:3]}.')

    # Time / noise-level embedding.
    if self.embedding_type == 'fourier':
      temb = layerspp.GaussianFourierProjection(embedding_size=self.nf, scale=self.fourier_scale)(
          jnp.log(time_cond))
    else:
      temb = layers.get_timestep_embedding(time_cond, self.nf)
    if self.conditional:
      temb = nn.Dense(self.nf * 4, kernel_init=layers.default_init())(temb)
      temb = nn.Dense(self.nf * 4, kernel_init=layers.default_init())(act(temb))
    else:
      temb = None

    attn_block = functools.partial(layers.maybe_remat(layerspp.AttnBlockpp, self.remat),
                                   init_scale=self.init_scale, skip_rescale=self.skip_rescale)
    upsample = functools.partial(layerspp.Upsample, with_conv=self.resamp_with_conv, fir=self.fir,
                                 fir_kernel=self.fir_kernel)
    downsample = functools.partial(layerspp.Downsample, with_conv=self.resamp_with_conv, fir=self.fir,
                                   fir_kernel=self.fir_kernel)
    pyramid_upsample = functools.partial(layerspp.Upsample, fir=self.fir, fir_kernel=self.fir_kernel)
    pyramid_downsample = functools.partial(layerspp.Downsample, fir=self.fir, fir_kernel=self.fir_kernel)
    # A residual block's argument 3 (counting self), train, is a Python bool: static under remat.
    if self.resblock_type == 'ddpm':
      resnet_block = functools.partial(layers.maybe_remat(layerspp.ResnetBlockDDPMpp, self.remat, (3,)),
                                       act=act, dropout=self.dropout, init_scale=self.init_scale,
                                       skip_rescale=self.skip_rescale)
    else:
      resnet_block = functools.partial(layers.maybe_remat(layerspp.ResnetBlockBigGANpp, self.remat, (3,)),
                                       act=act, dropout=self.dropout, fir=self.fir, fir_kernel=self.fir_kernel,
                                       init_scale=self.init_scale, skip_rescale=self.skip_rescale)

    if not self.centered:
      x = 2 * x - 1.

    # Down-sampling path.
    input_pyramid = x if self.progressive_input != 'none' else None
    hs = [layerspp.conv3x3(x, self.nf)]
    for i_level in range(num_resolutions):
      for _ in range(self.num_res_blocks):
        h = resnet_block(out_ch=self.nf * self.ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block()(h)
        hs.append(h)

      if i_level != num_resolutions - 1:
        if self.resblock_type == 'ddpm':
          h = downsample()(hs[-1])
        else:
          h = resnet_block(down=True)(hs[-1], temb, train)

        if self.progressive_input == 'input_skip':
          input_pyramid = pyramid_downsample(with_conv=False)(input_pyramid)
          h = layerspp.Combine(method=self.progressive_combine)(input_pyramid, h)
        elif self.progressive_input == 'residual':
          input_pyramid = pyramid_downsample(out_ch=h.shape[-1], with_conv=True)(input_pyramid)
          input_pyramid = layerspp.residual_sum(input_pyramid, h, self.skip_rescale)
          h = input_pyramid
        hs.append(h)

    # Middle.
    h = hs[-1]
    h = resnet_block()(h, temb, train)
    h = attn_block()(h)
    h = resnet_block()(h, temb, train)

    # Up-sampling path.
    pyramid = None
    for i_level in reversed(range(num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = resnet_block(out_ch=self.nf * self.ch_mult[i_level])(jnp.concatenate([h, hs.pop()], axis=-1),
                                                           temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attn_block()(h)

      if self.progressive != 'none':
        if i_level == num_resolutions - 1:
          pyramid = act(layerspp.group_norm(h.shape[-1])(h))
          if self.progressive == 'output_skip':
            pyramid = layerspp.conv3x3(pyramid, self.num_channels, init_scale=self.init_scale)
          else:
            pyramid = layerspp.conv3x3(pyramid, h.shape[-1], bias=True)
        elif self.progressive == 'output_skip':
          pyramid = pyramid_upsample(with_conv=False)(pyramid)
          pyramid_h = act(layerspp.group_norm(h.shape[-1])(h))
          pyramid = pyramid + layerspp.conv3x3(pyramid_h, self.num_channels, bias=True,
                                               init_scale=self.init_scale)
        else:
          pyramid = pyramid_upsample(out_ch=h.shape[-1], with_conv=True)(pyramid)
          pyramid = layerspp.residual_sum(pyramid, h, self.skip_rescale)
          h = pyramid

      if i_level != 0:
        if self.resblock_type == 'ddpm':
          h = upsample()(h)
        else:
          h = resnet_block(up=True)(h, temb, train)

    if self.progressive == 'output_skip':
      h = pyramid
    else:
      h = act(layerspp.group_norm(h.shape[-1])(h))
      h = layerspp.conv3x3(h, self.num_channels, init_scale=self.init_scale)

    if self.scale_by_sigma:
      used_sigmas = layers.sigma_of_labels(time_cond, self.label_kind, self.sigmas)
      h = h / used_sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
    return h
