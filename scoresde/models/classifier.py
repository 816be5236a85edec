"""A noise-conditional Wide-ResNet classifier p_t(y | x(t)) for class-conditional sampling.

Song et al. 2021, Sec. 5 (eq. 14) and App. I: class-conditional samples of an unconditional score model
follow ∇ log p_t(x) + ∇ log p_t(y | x), with p_t(y | x) a classifier trained on noised data
x(t) ~ p_0t(x(t) | x(0)) (``main.py --mode=train_classifier``). The reference's model
(``models/wideresnet_noise_conditional.py``): a Wide-ResNet (Zagoruyko & Komodakis 2016) with GroupNorm,
per-image standardisation of the input and the noise level embedded by Gaussian Fourier features
(embedding 128, scale 16) → Dense(512) → swish → Dense(512), added as a bias after each block's first
convolution; WRN-28-10 (4 blocks per group, widths 16k/32k/64k with k = 10) for CIFAR-10.

The noise level: the reference fed log σ(t), the VE marginal std, which means nothing for VP. Here the
label is log(s(t)/a(t)), the noise-to-signal ratio of the kernel N(a x(0), s² I) (``sde.marginal_coeffs``),
which is σ(t) for VE and the same quantity of the data perturbed in data units for VP and sub-VP; with the
per-image standardisation the network sees the same input at the same noise level under every SDE.
``classifier_logits_fn`` is the one place that applies this convention, for training and sampling.

Constructor arguments: ``input_shape`` (H, W, C), ``num_classes``, ``blocks_per_group``,
``channel_multiplier``, ``embedding_size``, ``fourier_scale``, ``embedding_dim``;
``NoiseConditionalWideResNet.kwargs_from_config`` reads them from ``config.classifier`` / ``config.data``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoresde import sde_lib
from scoresde.models import layers
from scoresde.models import layerspp
from scoresde.models import utils as mutils

Array = jax.Array


def _group_norm(channels: int) -> layers.GroupNorm:
  return layers.GroupNorm(num_groups=min(channels // 4, 32))


class _WideResNetBlock(nn.Module):
  """Pre-activation residual block with the noise embedding added after the first convolution."""
  channels: int
  strides: int

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    y = nn.swish(_group_norm(x.shape[-1])(x))
    shortcut = x
    if x.shape[-1] != self.channels or self.strides != 1:
      shortcut = nn.Conv(self.channels, (1, 1), self.strides, use_bias=False)(y)
    y = nn.Conv(self.channels, (3, 3), self.strides, padding='SAME', use_bias=False)(y)
    y = y + nn.Dense(self.channels)(temb)[:, None, None, :]
    y = nn.swish(_group_norm(self.channels)(y))
    y = nn.Conv(self.channels, (3, 3), padding='SAME', use_bias=False)(y)
    return y + shortcut


@mutils.register_model('noise_conditional_wrn')
class NoiseConditionalWideResNet(nn.Module):
  """x (B, H, W, C), log noise-to-signal ratio (B,) -> logits (B, num_classes)."""
  input_shape: tuple[int, int, int]
  num_classes: int
  blocks_per_group: int
  channel_multiplier: int
  embedding_size: int
  fourier_scale: float
  embedding_dim: int

  @staticmethod
  def kwargs_from_config(config) -> dict:
    cfg, data = config.classifier, config.data
    return dict(input_shape=(int(data.image_size), int(data.image_size), int(data.num_channels)),
                num_classes=int(cfg.num_classes), blocks_per_group=int(cfg.blocks_per_group),
                channel_multiplier=int(cfg.channel_multiplier), embedding_size=int(cfg.embedding_size),
                fourier_scale=float(cfg.fourier_scale), embedding_dim=int(cfg.embedding_dim))

  @nn.compact
  def __call__(self, x: Array, log_noise: Array, train: bool = False) -> Array:
    del train  # no dropout or batch statistics: the same function in training and sampling
    temb = layerspp.GaussianFourierProjection(self.embedding_size, self.fourier_scale)(log_noise)
    temb = nn.Dense(self.embedding_dim)(nn.swish(nn.Dense(self.embedding_dim)(temb)))
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    std = jnp.maximum(jnp.std(x, axis=(1, 2, 3), keepdims=True), 1. / jnp.sqrt(x[0].size))
    h = nn.Conv(16, (3, 3), padding='SAME', use_bias=False)((x - mean) / std)
    for group, width in enumerate((16, 32, 64)):
      for block in range(self.blocks_per_group):
        strides = 2 if group > 0 and block == 0 else 1
        h = _WideResNetBlock(width * self.channel_multiplier, strides)(h, temb)
    h = nn.swish(_group_norm(h.shape[-1])(h))
    return nn.Dense(self.num_classes)(jnp.mean(h, axis=(1, 2)))


def create_classifier(config) -> NoiseConditionalWideResNet:
  """The classifier of ``config.classifier``."""
  cls = mutils.get_model(config.classifier.name)
  return cls(**cls.kwargs_from_config(config))


def init_classifier(rng: Array, config) -> tuple[NoiseConditionalWideResNet, dict]:
  model = create_classifier(config)
  x = jnp.zeros((1,) + tuple(model.input_shape), jnp.float32)
  return model, model.init(rng, x, jnp.zeros((1,), jnp.float32))


def noise_label(sde: sde_lib.SDE, t: Array) -> Array:
  """The classifier's label at time t (B,): log(s(t)/a(t)), the kernel's log noise-to-signal ratio."""
  scale, std = sde.marginal_coeffs(t)
  return jnp.log(std) - jnp.log(scale)


@dataclasses.dataclass(frozen=True, eq=False)
class _ClassifierLogits:
  """``(variables, x, t) -> logits`` for one (SDE, model); equal for the same objects, so ``jit`` caches
  one program for all weights."""
  sde: sde_lib.SDE
  model: nn.Module

  def __call__(self, variables, x: Array, t: Array) -> Array:
    return self.model.apply(variables, x, noise_label(self.sde, t))

  def __eq__(self, other):
    return isinstance(other, _ClassifierLogits) and self.sde is other.sde and self.model is other.model

  def __hash__(self):
    return hash((id(self.sde), id(self.model)))


def classifier_logits_fn(sde: sde_lib.SDE, model: nn.Module, variables) -> jax.tree_util.Partial:
  """``logits_fn(x, t) -> (B, num_classes)`` of the trained classifier, the weights a ``jit`` argument:
  what ``controllable.guided_score_fn`` takes."""
  return jax.tree_util.Partial(_ClassifierLogits(sde, model), variables)
