"""A time-conditioned MLP score network for low-dimensional (e.g. 2-D toy) data.

It follows the label conventions of ``models.utils.get_score_fn`` exactly as NCSN++ does (Song et al.
2021, reference ``models/ncsnpp.py``):

- ``embedding_type='fourier'``: the label is a noise level σ (continuous VE) and is embedded as
  log σ with random Fourier features of scale ``fourier_scale`` (Tancik et al. 2020), frozen at init.
- ``embedding_type='positional'``: the label is a time index (discrete VE index, 999 t for VP/sub-VP)
  and is embedded with the Transformer's sinusoids (Vaswani et al. 2017), as in DDPM.
- ``scale_by_sigma``: the output is divided by σ (the label itself with Fourier embedding, else the
  descending σ table at the label index), so that the network predicts σ·score, which has unit scale.

Config keys (``config.model``): ``nf`` (hidden width), ``num_layers`` (hidden Dense layers),
``embedding_type``, ``fourier_scale``, ``scale_by_sigma``, ``dropout``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from models import layerspp
from models import utils as mutils

Array = jax.Array


@mutils.register_model('mlp')
class MLP(nn.Module):
  """score/ε network: x (B, D), labels (B,) -> (B, D)."""
  config: Any

  @staticmethod
  def check_config(config) -> None:
    """Raises ValueError naming the key for settings this network cannot take."""
    import datasets  # pylint: disable=import-outside-toplevel
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
    if len(datasets.data_shape(config)) != 1:
      raise ValueError(f"config.model.name='mlp' is for vector data (the toy datasets "
                       f'{datasets.TOY_DATASETS}); config.data.dataset={config.data.dataset!r} is images: '
                       "use an image model such as 'ncsnpp'.")

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool) -> Array:
    cfg = self.config.model
    nf = int(cfg.nf)
    act = nn.swish
    embedding_type = str(cfg.embedding_type).lower()

    if embedding_type == 'fourier':
      used_sigmas = labels
      fourier_scale = float(cfg.fourier_scale)
      temb = layerspp.GaussianFourierProjection(embedding_size=nf // 2, scale=fourier_scale)(jnp.log(labels))
    elif embedding_type == 'positional':
      used_sigmas = jnp.asarray(mutils.get_sigmas(self.config))[labels.astype(jnp.int32)]
      temb = layers.get_timestep_embedding(labels, nf)
    else:
      raise ValueError(f'config.model.embedding_type={cfg.embedding_type!r} is not known; '
                       "choose 'fourier' or 'positional'.")
    temb = nn.Dense(nf * 2)(temb)
    temb = nn.Dense(nf)(act(temb))

    h = nn.Dense(nf)(x)
    for _ in range(int(cfg.num_layers)):
      # Residual blocks with an additive time embedding, as in the DDPM/NCSN++ residual blocks.
      skip = h
      h = nn.Dense(nf)(act(h)) + nn.Dense(nf)(act(temb))
      h = nn.Dropout(float(cfg.dropout), deterministic=not train)(act(h))
      h = nn.Dense(nf)(h)
      h = (h + skip) / np.sqrt(2.)
    h = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(act(h))

    if cfg.scale_by_sigma:
      h = h / used_sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
    return h
