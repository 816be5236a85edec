"""FIR up/down-sampling (StyleGAN2's ``upfirdn_2d``) in pure JAX, NHWC.

Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (arXiv:1912.04958), use a
finite-impulse-response filter ``k`` (here [1, 3, 3, 1], the binomial filter) when changing resolution so
that up- and down-sampling do not alias. NCSN++ (Song et al. 2021, §H) adopts it. The one primitive is

    upfirdn_2d(x, k, up, down, pad) = downsample_by(down)( convolve(pad(insert_zeros(x, up)), k) ),

evaluated per channel. The fused ``Conv2d(up=True)`` / ``Conv2d(down=True)`` layers put a learned 3x3
convolution before the up-sampling filter (transposed, stride 2) or after the down-sampling filter
(stride 2), with the paddings of StyleGAN2 (and of the reference implementation's PyTorch port, so
imported checkpoints give the same numbers).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def setup_kernel(k: Sequence[float] | np.ndarray) -> np.ndarray:
  """The 2-D filter of a 1-D (separable, outer product) or 2-D ``k``, normalised to sum to 1."""
  k = np.asarray(k, dtype=np.float32)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f'a FIR kernel (config.model.fir_kernel) must be 1-D or square 2-D, got shape {k.shape}.')
  return k / np.sum(k)


def _separate(k: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """(column, row) with k = outer(column, row) when ``k`` has rank one (every 1-D FIR kernel), else None."""
  u, s, vt = np.linalg.svd(k.astype(np.float64))
  if s.size > 1 and s[1] > 1e-7 * s[0]:
    return None
  return u[:, 0] * np.sqrt(s[0]), vt[0] * np.sqrt(s[0])


def upfirdn_2d(x: Array, k: np.ndarray, up: int = 1, down: int = 1,
               pad0: int = 0, pad1: int = 0) -> Array:
  """Up-samples by zero insertion, pads (negative pads crop), convolves with ``k``, keeps every ``down``-th.

  Args:
    x: (B, H, W, C).
    k: 2-D filter (kh, kw), applied to each channel separately (a true convolution: ``k`` is flipped).
    up, down: integer factors.
    pad0, pad1: padding before / after along both spatial axes, after zero insertion.
  Returns:
    (B, (H*up + pad0 + pad1 - kh) // down + 1, ..., C).

  The filter is a handful of taps, so it is applied as a weighted sum of shifted copies (separably when
  ``k`` has rank one): cheaper to compile and run than a depthwise convolution, on every backend.
  """
  b, h, w, c = x.shape
  if up > 1:
    x = x.reshape(b, h, 1, w, 1, c)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, up - 1), (0, 0), (0, up - 1), (0, 0)))
    x = x.reshape(b, h * up, w * up, c)
  zero = jnp.zeros((), x.dtype)
  x = jax.lax.pad(x, zero, ((0, 0, 0), (pad0, pad1, 0), (pad0, pad1, 0), (0, 0, 0)))
  k = np.asarray(k)[::-1, ::-1]
  kh, kw = k.shape
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  factors = _separate(k)
  if factors is not None:
    column, row = factors
    x = sum(x[:, a:a + ho] * np.asarray(column[a], x.dtype) for a in range(kh))
    x = sum(x[:, :, j:j + wo] * np.asarray(row[j], x.dtype) for j in range(kw))
  else:
    x = sum(x[:, a:a + ho, j:j + wo] * np.asarray(k[a, j], x.dtype) for a in range(kh) for j in range(kw))
  return x[:, ::down, ::down, :]


def upsample_2d(x: Array, k: Sequence[float] | None = None, factor: int = 2, gain: float = 1.) -> Array:
  """Up-samples (B, H, W, C) to (B, H*factor, W*factor, C) with the FIR filter ``k`` (default: nearest)."""
  k = setup_kernel([1] * factor if k is None else k) * (gain * factor ** 2)
  p = k.shape[0] - factor
  return upfirdn_2d(x, k, up=factor, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2)


def downsample_2d(x: Array, k: Sequence[float] | None = None, factor: int = 2, gain: float = 1.) -> Array:
  """Down-samples (B, H, W, C) to (B, H//factor, W//factor, C) with the FIR filter ``k`` (default: mean)."""
  k = setup_kernel([1] * factor if k is None else k) * gain
  p = k.shape[0] - factor
  return upfirdn_2d(x, k, down=factor, pad0=(p + 1) // 2, pad1=p // 2)


def upsample_conv_2d(x: Array, w: Array, k: Sequence[float] | None = None, factor: int = 2,
                     gain: float = 1.) -> Array:
  """Transposed convolution with ``w`` (kh, kw, in, out) at stride ``factor``, then the FIR filter.

  The transposed convolution is the adjoint of a strided correlation: a correlation of the
  zero-inserted, fully padded input with ``w``.
  """
  kh, kw = w.shape[0], w.shape[1]
  if kh != kw:
    raise ValueError(f'upsample_conv_2d needs a square kernel, got {w.shape}.')
  k = setup_kernel([1] * factor if k is None else k) * (gain * factor ** 2)
  p = (k.shape[0] - factor) - (kw - 1)
  x = jax.lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(1, 1),
                                   padding=((kh - 1, kh - 1), (kw - 1, kw - 1)),
                                   lhs_dilation=(factor, factor), dimension_numbers=_DIMENSIONS)
  return upfirdn_2d(x, k, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2 + 1)


def conv_downsample_2d(x: Array, w: Array, k: Sequence[float] | None = None, factor: int = 2,
                       gain: float = 1.) -> Array:
  """The FIR filter, then a stride-``factor`` VALID correlation with ``w`` (kh, kw, in, out)."""
  kw = w.shape[1]
  k = setup_kernel([1] * factor if k is None else k) * gain
  p = (k.shape[0] - factor) + (kw - 1)
  x = upfirdn_2d(x, k, pad0=(p + 1) // 2, pad1=p // 2)
  return jax.lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(factor, factor),
                                      padding='VALID', dimension_numbers=_DIMENSIONS)


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
  """Nearest-neighbour up-sampling: each pixel becomes a factor x factor block."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
  """Mean over non-overlapping factor x factor blocks."""
  b, h, w, c = x.shape
  return jnp.mean(x.reshape(b, h // factor, factor, w // factor, factor, c), axis=(2, 4))


class Conv2d(nn.Module):
  """A square convolution, optionally fused with FIR up- (``up``) or down-sampling (``down``) by 2.

  Parameters: ``kernel`` (k, k, in, out) and ``bias`` (out,).
  """
  fmaps: int
  kernel: int
  up: bool = False
  down: bool = False
  resample_kernel: Sequence[int] = (1, 3, 3, 1)
  use_bias: bool = True
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise ValueError('Conv2d cannot both up- and down-sample.')
    w = self.param('kernel', self.kernel_init, (self.kernel, self.kernel, x.shape[-1], self.fmaps))
    if self.up:
      x = upsample_conv_2d(x, w, k=self.resample_kernel)
    elif self.down:
      x = conv_downsample_2d(x, w, k=self.resample_kernel)
    else:
      x = jax.lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(1, 1), padding='SAME',
                                       dimension_numbers=_DIMENSIONS)
    if self.use_bias:
      x = x + self.param('bias', nn.initializers.zeros, (self.fmaps,)).astype(x.dtype)
    return x
