"""A time-conditioned MLP score network for low-dimensional (e.g. 2-D toy) data.

Its labels are those of ``models.utils.get_score_fn``, as for NCSN++ (Song et al. 2021, reference
``models/ncsnpp.py``); ``models.utils.label_kwargs`` tells it what they are:

- ``embedding_type='fourier'``: the label (σ for continuous VE) is embedded as log(label) with random
  Fourier features of scale ``fourier_scale`` (Tancik et al. 2020), frozen at init.
- ``embedding_type='positional'``: the label (a discrete VE index, 999 t or t (N-1) for VP/sub-VP) is
  embedded with the Transformer's sinusoids (Vaswani et al. 2017), as in DDPM.
- ``scale_by_sigma``: the output is divided by σ (the label itself for σ labels, the descending σ table
  at the label for index labels), so that the network predicts σ·score, which has unit scale.

Constructor arguments: ``dim`` (data dimension), ``nf`` (hidden width), ``num_layers`` (hidden Dense
layers), ``embedding_type``, ``fourier_scale``, ``dropout``, ``scale_by_sigma``, and the label convention
(``label_kind``, ``sigmas``); ``MLP.kwargs_from_config`` reads them from ``config.model`` / ``config.data``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoresde.models import layers
from scoresde.models import layerspp
from scoresde.models import utils as mutils

Array = jax.Array


@mutils.register_model('mlp')
class MLP(nn.Module):
  """score/ε network: x (B, dim), labels (B,) -> (B, dim).

  ``label_kind`` / ``sigmas`` (from ``models.utils.label_kwargs``) give σ of the labels for
  ``scale_by_sigma``; the embedding embeds the label as it is (log of it for Fourier features).
  """
  dim: int
  nf: int
  num_layers: int
  embedding_type: str
  fourier_scale: float
  dropout: float
  scale_by_sigma: bool
  label_kind: str
  sigmas: tuple[float, ...] | None

  @staticmethod
  def kwargs_from_config(config) -> dict:
    """The architecture kwargs of ``config.model`` / ``config.data`` (all but the label convention)."""
    cfg = config.model
    return dict(dim=int(config.data.dim), nf=int(cfg.nf), num_layers=int(cfg.num_layers),
                embedding_type=str(cfg.embedding_type).lower(), fourier_scale=float(cfg.fourier_scale),
                dropout=float(cfg.dropout), scale_by_sigma=bool(cfg.scale_by_sigma))

  @staticmethod
  def check_config(config) -> None:
    """Raises ValueError naming the key for settings this network cannot take. (That the data are
    vectors of config.data.dim is checked against the data by ``models.utils.check_input_shape``.)"""
    cfg = config.model
    for key in ('nf', 'num_layers'):
      if key not in cfg:
        raise ValueError(f'the MLP needs config.model.{key} (see configs/default_toy_configs.py).')
      value = cfg[key]
      if not isinstance(value, int) or value < (1 if key == 'nf' else 0):
        raise ValueError(f'config.model.{key}={value!r} must be a '
                         f'{"positive" if key == "nf" else "non-negative"} integer.')
    if str(cfg.embedding_type).lower() not in ('fourier', 'positional'):
      raise ValueError(f'config.model.embedding_type={cfg.embedding_type!r} is not known; '
                       "choose 'fourier' or 'positional'.")

  @property
  def input_shape(self) -> tuple[int, ...]:
    return (self.dim,)

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool) -> Array:
    nf = self.nf
    act = nn.swish

    if self.embedding_type == 'fourier':
      temb = layerspp.GaussianFourierProjection(embedding_size=nf // 2, scale=self.fourier_scale)(
          jnp.log(labels))
    elif self.embedding_type == 'positional':
      temb = layers.get_timestep_embedding(labels, nf)
    else:
      raise ValueError(f'config.model.embedding_type={self.embedding_type!r} is not known; '
                       "choose 'fourier' or 'positional'.")
    temb = nn.Dense(nf * 2)(temb)
    temb = nn.Dense(nf)(act(temb))

    h = nn.Dense(nf)(x)
    for _ in range(self.num_layers):
      # Residual blocks with an additive time embedding, as in the DDPM/NCSN++ residual blocks.
      skip = h
      h = nn.Dense(nf)(act(h)) + nn.Dense(nf)(act(temb))
      h = nn.Dropout(self.dropout, deterministic=not train)(act(h))
      h = nn.Dense(nf)(h)
      h = (h + skip) / np.sqrt(2.)
    h = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(act(h))

    if self.scale_by_sigma:
      used_sigmas = layers.sigma_of_labels(labels, self.label_kind, self.sigmas)
      h = h / used_sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
    return h
