"""Blocks of NCSN++ / DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H).

All GroupNorms here use min(C // 4, 32) groups. ``skip_rescale`` divides every residual sum by √2, which
keeps activations' variance constant through the network (BigGAN; Song et al. 2021 §H.1).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoresde.models import layers
from scoresde.models import up_or_down_sampling as updown

Array = jax.Array
conv1x1 = layers.ddpm_conv1x1
conv3x3 = layers.ddpm_conv3x3
default_init = layers.default_init
NIN = layers.NIN


def num_groups(channels: int) -> int:
  """NCSN++'s GroupNorm group count for ``channels`` channels."""
  return min(channels // 4, 32)


def group_norm(channels: int) -> layers.GroupNorm:
  return layers.GroupNorm(num_groups=num_groups(channels))


def residual_sum(x: Array, h: Array, skip_rescale: bool) -> Array:
  return (x + h) / np.sqrt(2.) if skip_rescale else x + h


class GaussianFourierProjection(nn.Module):
  """Random Fourier features of a scalar (Tancik et al. 2020): [sin 2π x W, cos 2π x W], W ~ N(0, scale²).

  ``W`` is a parameter (so checkpoints carry it) that no gradient reaches: it stays at its initial draw.
  """
  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param('W', nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
    w = jax.lax.stop_gradient(w)
    x_proj = x[:, None] * w[None, :] * 2 * jnp.pi
    return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


class Combine(nn.Module):
  """Merges the input pyramid ``x`` into features ``y``: conv1x1(x) to y's channels, then sum or concat."""
  method: str = 'cat'

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    h = conv1x1(x, y.shape[-1])
    if self.method == 'cat':
      return jnp.concatenate([h, y], axis=-1)
    if self.method == 'sum':
      return h + y
    raise ValueError(f"config.model.progressive_combine={self.method!r}; choose 'sum' or 'cat'.")


class AttnBlockpp(nn.Module):
  """DDPM's self-attention with NCSN++'s group count, output init scale and optional √2 rescaling."""
  skip_rescale: bool = False
  init_scale: float = 0.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = group_norm(c)(x)
    q, k, v = NIN(c)(h), NIN(c)(h), NIN(c)(h)
    h = NIN(c, init_scale=self.init_scale)(layers.spatial_self_attention(x, q, k, v))
    return residual_sum(x, h, self.skip_rescale)


class Upsample(nn.Module):
  """x2 up-sampling: nearest (+ conv3x3) or FIR (+ fused transposed conv)."""
  out_ch: int | None = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    out_ch = self.out_ch or c
    if not self.fir:
      x = jax.image.resize(x, (b, 2 * h, 2 * w, c), 'nearest')
      return conv3x3(x, out_ch) if self.with_conv else x
    if not self.with_conv:
      return updown.upsample_2d(x, self.fir_kernel, factor=2)
    return updown.Conv2d(out_ch, kernel=3, up=True, resample_kernel=self.fir_kernel, use_bias=True,
                         kernel_init=default_init())(x)


class Downsample(nn.Module):
  """/2 down-sampling: stride-2 conv3x3 or 2x2 average pooling; or FIR (+ fused strided conv)."""
  out_ch: int | None = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      if self.with_conv:
        return conv3x3(x, out_ch, stride=2)
      return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding='SAME')
    if not self.with_conv:
      return updown.downsample_2d(x, self.fir_kernel, factor=2)
    return updown.Conv2d(out_ch, kernel=3, down=True, resample_kernel=self.fir_kernel, use_bias=True,
                         kernel_init=default_init())(x)


class ResnetBlockDDPMpp(nn.Module):
  """DDPM's residual block with NCSN++'s group count, init scale and √2 rescaling (DDPM++ 'ddpm' type)."""
  act: Callable[[Array], Array]
  out_ch: int | None = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    h = self.act(group_norm(c)(x))
    h = conv3x3(h, out_ch)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init())(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(out_ch)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale)
    if c != out_ch:
      x = conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
    return residual_sum(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN's residual block (Brock et al. 2019) with time conditioning; resamples both branches.

  GN-act-[up/down]-conv3x3, + Dense(act(temb)), GN-act-dropout-conv3x3(init_scale); the skip branch is
  resampled the same way and gets a 1x1 convolution when channels or resolution change.
  """
  act: Callable[[Array], Array]
  up: bool = False
  down: bool = False
  out_ch: int | None = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.

  def _resample(self, x: Array) -> Array:
    if self.up:
      if self.fir:
        return updown.upsample_2d(x, self.fir_kernel, factor=2)
      return updown.naive_upsample_2d(x, factor=2)
    if self.down:
      if self.fir:
        return updown.downsample_2d(x, self.fir_kernel, factor=2)
      return updown.naive_downsample_2d(x, factor=2)
    return x

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
    if self.up and self.down:
      raise ValueError('ResnetBlockBigGANpp cannot both up- and down-sample.')
    c = x.shape[-1]
    out_ch = self.out_ch or c
    h = self.act(group_norm(c)(x))
    h, x = self._resample(h), self._resample(x)
    h = conv3x3(h, out_ch)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init())(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(out_ch)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale)
    if c != out_ch or self.up or self.down:
      x = conv1x1(x, out_ch)
    return residual_sum(x, h, self.skip_rescale)
