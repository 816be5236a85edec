"""The DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239, App. B).

A PixelCNN++-style U-Net with ``num_res_blocks`` residual blocks per resolution, self-attention at
``attn_resolutions``, GroupNorm (32 groups), a sinusoidal embedding of the label (``conditional``) and
stride-2 convolution / nearest-neighbour resampling. ``scale_by_sigma`` (the VE-DDPM config) divides the
output by σ[label] so that the network learns σ·score.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from scoresde.models import layers
from scoresde.models import normalization
from scoresde.models import utils

Array = jax.Array


@utils.register_model(name='ddpm')
class DDPM(nn.Module):
  """``(x (B, H, W, C), labels (B,), train) -> (B, H, W, C)``.

  ``label_kind`` / ``sigmas`` (from ``models.utils.label_kwargs``) give σ of the labels for
  ``scale_by_sigma``; the time embedding embeds the label as it is.
  """
  nf: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  image_size: int
  num_channels: int
  centered: bool
  nonlinearity: str
  normalization: str
  conditional: bool
  resamp_with_conv: bool
  dropout: float
  scale_by_sigma: bool
  label_kind: str
  sigmas: tuple[float, ...] | None
  remat: bool  # per-block activation checkpointing (layers.maybe_remat)

  @staticmethod
  def kwargs_from_config(config: ml_collections.ConfigDict) -> dict:
    """The architecture kwargs of ``config.model`` / ``config.data`` (all but the label convention)."""
    m = config.model
    return dict(
        nf=int(m.nf), ch_mult=tuple(int(c) for c in m.ch_mult), num_res_blocks=int(m.num_res_blocks),
        attn_resolutions=tuple(int(r) for r in m.attn_resolutions), image_size=int(config.data.image_size),
        num_channels=int(config.data.num_channels), centered=bool(config.data.centered),
        nonlinearity=str(m.nonlinearity), normalization=str(m.normalization),
        conditional=bool(m.conditional), resamp_with_conv=bool(m.resamp_with_conv),
        dropout=float(m.dropout), scale_by_sigma=bool(m.scale_by_sigma),
        remat='remat' in m and bool(m.remat))  # optional (ours): reference configs lack it

  @staticmethod
  def check_config(config: ml_collections.ConfigDict) -> None:
    """Image size vs. down-samplings; every channel count a multiple of GroupNorm's 32 groups."""
    layers.get_act(config.model.nonlinearity)
    normalization.get_normalization(config.model.normalization)
    if config.model.normalization == 'GroupNorm':
      layers.check_unet_config(config, lambda channels: 32, 'DDPM')
    else:
      layers.check_unet_config(config, lambda channels: 1, 'DDPM')

  @property
  def input_shape(self) -> tuple[int, ...]:
    return (self.image_size, self.image_size, self.num_channels)

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    act = layers.get_act(self.nonlinearity)
    normalize = normalization.get_normalization(self.normalization)
    nf, ch_mult = self.nf, self.ch_mult
    num_res_blocks, attn_resolutions = self.num_res_blocks, self.attn_resolutions
    resamp_with_conv = self.resamp_with_conv
    num_resolutions = len(ch_mult)

    attn_block = functools.partial(layers.maybe_remat(layers.AttnBlock, self.remat), normalize=normalize)
    # The residual block's argument 3 (counting self), train, is a Python bool: static under remat.
    resnet_block = functools.partial(layers.maybe_remat(layers.ResnetBlockDDPM, self.remat, (3,)), act=act,
                                     normalize=normalize, dropout=self.dropout)

    if self.conditional:
      temb = layers.get_timestep_embedding(labels, nf)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(temb)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(act(temb))
    else:
      temb = None

    h = x if self.centered else 2 * x - 1.
    hs = [layers.ddpm_conv3x3(h, nf)]
    for i_level in range(num_resolutions):
      for _ in range(num_res_blocks):
        h = resnet_block(out_ch=nf * ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in attn_resolutions:
          h = attn_block()(h)
        hs.append(h)
      if i_level != num_resolutions - 1:
        hs.append(layers.Downsample(with_conv=resamp_with_conv)(hs[-1]))

    h = hs[-1]
    h = resnet_block()(h, temb, train)
    h = attn_block()(h)
    h = resnet_block()(h, temb, train)

    for i_level in reversed(range(num_resolutions)):
      for _ in range(num_res_blocks + 1):
        h = resnet_block(out_ch=nf * ch_mult[i_level])(jnp.concatenate([h, hs.pop()], axis=-1),
                                                       temb, train)
      if h.shape[1] in attn_resolutions:
        h = attn_block()(h)
      if i_level != 0:
        h = layers.Upsample(with_conv=resamp_with_conv)(h)

    h = act(normalize()(h))
    h = layers.ddpm_conv3x3(h, x.shape[-1], init_scale=0.)

    if self.scale_by_sigma:
      sigmas = layers.sigma_of_labels(labels, self.label_kind, self.sigmas)
      h = h / sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
    return h
