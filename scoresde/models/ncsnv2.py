"""NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020): RefineNet score networks with InstanceNorm++.

- ``ncsnv2_64`` (images < 96 px), ``ncsnv2_128`` (96-128 px), ``ncsnv2_256`` (129-256 px): NCSNv2
  ("Improved Techniques for Training Score-Based Generative Models", arXiv:2006.09011) and its deeper
  variants. Unconditional networks: the noise level enters only through the output division by σ
  (technique 3, ``scale_by_sigma``).
- ``ncsn``: NCSN v1 ("Generative Modeling by Estimating Gradients of the Data Distribution",
  arXiv:1907.05600), the 64-px layout with noise-conditional InstanceNorm++ (one row of γ, α, β per
  noise level: ``config.model.num_classes``, 0 meaning ``num_scales``) in every block.

A ResNet encoder (stages of two ``ResidualBlock``s; dilation instead of down-sampling in the deeper stages)
feeds a RefineNet decoder that fuses each stage, deepest first. Labels are integer noise-level indices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from scoresde.models import layers
from scoresde.models import normalization
from scoresde.models import utils

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Stage:
  """An encoder stage: channels as a multiple of nf, first block's resampling, dilation."""
  mult: int
  resample: str | None
  dilation: int


# Encoder stages and RefineNet output widths (multiples of nf, deepest first) of each architecture, as
# in the reference's Flax code (its PyTorch port narrows the 64-px third RefineBlock to nf; the Flax
# widths are the ones whose parameter counts we match).
_ARCHITECTURES = {
    64: ((Stage(1, None, 1), Stage(2, 'down', 1), Stage(2, 'down', 2), Stage(2, 'down', 4)),
         (2, 2, 2, 1)),
    128: ((Stage(1, None, 1), Stage(2, 'down', 1), Stage(2, 'down', 1), Stage(4, 'down', 2),
           Stage(4, 'down', 4)), (4, 2, 2, 1, 1)),
    256: ((Stage(1, None, 1), Stage(2, 'down', 1), Stage(2, 'down', 1), Stage(2, 'down', 1),
           Stage(4, 'down', 2), Stage(4, 'down', 4)), (4, 2, 2, 2, 1, 1)),
}


def _downsamplings(size: int) -> int:
  return sum(1 for s in _ARCHITECTURES[size][0] if s.resample == 'down' and s.dilation == 1)


class _RefineNet(nn.Module):
  """The shared NCSN / NCSNv2 body; ``size`` selects the architecture, ``conditional`` NCSN v1.

  ``label_kind`` / ``sigmas`` (from ``models.utils.label_kwargs``) give σ of the labels for
  ``scale_by_sigma``; NCSN v1 also looks up its normalisation rows at the integer label.
  """
  size: ClassVar[int] = 64
  conditional: ClassVar[bool] = False
  nf: int
  image_size: int
  num_channels: int
  centered: bool
  nonlinearity: str
  normalization: str
  interpolation: str
  scale_by_sigma: bool
  label_kind: str
  sigmas: tuple[float, ...] | None
  remat: bool  # per-block activation checkpointing of the encoder's residual blocks (layers.maybe_remat)

  @classmethod
  def kwargs_from_config(cls, config: ml_collections.ConfigDict) -> dict:
    """The architecture kwargs of ``config.model`` / ``config.data`` (all but the label convention)."""
    m = config.model
    return dict(nf=int(m.nf), image_size=int(config.data.image_size),
                num_channels=int(config.data.num_channels), centered=bool(config.data.centered),
                nonlinearity=str(m.nonlinearity), normalization=str(m.normalization),
                interpolation=str(m.interpolation), scale_by_sigma=bool(m.scale_by_sigma),
                remat='remat' in m and bool(m.remat))

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Activation, normalisation, and image size divisible by the encoder's down-sampling factor."""
    layers.get_act(config.model.nonlinearity)
    rows = normalization.num_classes(config) if cls.conditional else None
    normalization.get_normalization(config.model.normalization, conditional=cls.conditional, num_classes=rows)
    interpolation = config.model.interpolation
    if interpolation not in layers.INTERPOLATIONS:
      raise ValueError(f'config.model.interpolation={interpolation!r}; choose one of {layers.INTERPOLATIONS}.')
    size = int(config.data.image_size)
    factor = 2 ** _downsamplings(cls.size)
    if size % factor:
      raise ValueError(f'config.data.image_size={size} must be divisible by {factor} for '
                       f'config.model.name={config.model.name!r} (it halves the resolution '
                       f'{_downsamplings(cls.size)} times).')
    if cls.conditional and normalization.num_classes(config) != int(config.model.num_scales):
      raise ValueError(f'NCSN needs one embedding row per noise level: config.model.num_classes '
                       f'({config.model.num_classes}) must equal config.model.num_scales '
                       f'({config.model.num_scales}), or be 0 (the default) to follow it.')

  @property
  def input_shape(self) -> tuple[int, ...]:
    return (self.image_size, self.image_size, self.num_channels)

  def _normalization(self):
    return normalization.get_normalization(self.normalization)

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    del train  # No dropout in these networks.
    nf = self.nf
    act = layers.get_act(self.nonlinearity)
    norm = self._normalization()
    interpolation = self.interpolation
    stages, refine_mults = _ARCHITECTURES[self.size]
    y = labels.astype(jnp.int32) if self.conditional else None
    block = functools.partial(layers.maybe_remat(layers.ResidualBlock, self.remat), normalization=norm,
                              act=act, conditional=self.conditional)

    h = x if self.centered else 2 * x - 1.
    h = layers.ncsn_conv3x3(h, nf)
    features = []
    for i, stage in enumerate(stages):
      adjust = self.size == 64 and i == len(stages) - 1 and self.image_size == 28
      h = block(stage.mult * nf, resample=stage.resample, dilation=stage.dilation,
                adjust_padding=adjust)(h, y)
      h = block(stage.mult * nf, dilation=stage.dilation)(h, y)
      features.append(h)

    refine = functools.partial(layers.RefineBlock, act=act, interpolation=interpolation,
                               normalization=norm if self.conditional else None)
    deepest = features[-1]
    h = refine(deepest.shape[1:3], refine_mults[0] * nf, start=True)([deepest], y)
    for k, skip in enumerate(reversed(features[:-1]), start=1):
      h = refine(skip.shape[1:3], refine_mults[k] * nf, end=(k == len(features) - 1))([skip, h], y)

    h = norm()(h, y) if self.conditional else norm()(h)
    h = act(h)
    h = layers.ncsn_conv3x3(h, x.shape[-1])

    if self.scale_by_sigma:
      sigmas = layers.sigma_of_labels(labels, self.label_kind, self.sigmas)
      h = h / sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
    return h


@utils.register_model(name='ncsnv2_64')
class NCSNv2(_RefineNet):
  """NCSNv2 for images below 96 px (CIFAR-10, CelebA 64)."""
  size: ClassVar[int] = 64


@utils.register_model(name='ncsnv2_128')
class NCSNv2_128(_RefineNet):  # pylint: disable=invalid-name
  """NCSNv2's deeper network for 96-128 px (one more stage, up to 4 nf channels)."""
  size: ClassVar[int] = 128


@utils.register_model(name='ncsnv2_256')
class NCSNv2_256(_RefineNet):  # pylint: disable=invalid-name
  """NCSNv2's deeper network for 129-256 px."""
  size: ClassVar[int] = 256


@utils.register_model(name='ncsn')
class NCSN(_RefineNet):
  """NCSN v1: the 64-px layout, every normalisation conditioned on the noise-level index, with
  ``num_classes`` rows (one per noise level)."""
  size: ClassVar[int] = 64
  conditional: ClassVar[bool] = True
  num_classes: int

  @classmethod
  def kwargs_from_config(cls, config: ml_collections.ConfigDict) -> dict:
    return dict(super().kwargs_from_config(config), num_classes=normalization.num_classes(config))

  def _normalization(self):
    return normalization.get_normalization(self.normalization, conditional=True, num_classes=self.num_classes)
