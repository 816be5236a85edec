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

from models import layers
from models import normalization
from models import utils

Array = jax.Array


@utils.register_model(name='ddpm')
class DDPM(nn.Module):
  """``(x (B, H, W, C), labels (B,), train) -> (B, H, W, C)``."""
  config: ml_collections.ConfigDict

  @staticmethod
  def check_config(config: ml_collections.ConfigDict) -> None:
    """Image size vs. down-samplings; every channel count a multiple of GroupNorm's 32 groups."""
    layers.get_act(config)
    normalization.get_normalization(config)
    if config.model.normalization == 'GroupNorm':
      layers.check_unet_config(config, lambda channels: 32, 'DDPM')
    else:
      layers.check_unet_config(config, lambda channels: 1, 'DDPM')

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    config = self.config
    m = config.model
    act = layers.get_act(config)
    normalize = normalization.get_normalization(config)
    nf, ch_mult = int(m.nf), tuple(m.ch_mult)
    num_res_blocks, attn_resolutions = int(m.num_res_blocks), tuple(m.attn_resolutions)
    resamp_with_conv = bool(m.resamp_with_conv)
    num_resolutions = len(ch_mult)

    attn_block = functools.partial(layers.AttnBlock, normalize=normalize)
    resnet_block = functools.partial(layers.ResnetBlockDDPM, act=act, normalize=normalize,
                                     dropout=float(m.dropout))

    if m.conditional:
      temb = layers.get_timestep_embedding(labels, nf)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(temb)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(act(temb))
    else:
      temb = None

    h = x if config.data.centered else 2 * x - 1.
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

    if m.scale_by_sigma:
      sigmas = jnp.asarray(utils.get_sigmas(config))
      h = h / sigmas[labels.astype(jnp.int32)].reshape((-1,) + (1,) * (h.ndim - 1))
    return h
