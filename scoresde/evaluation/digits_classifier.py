"""A small convolutional classifier of 8×8 digits: the feature network of "digits FID / IS / KID".

The Inception-v3 of FID knows nothing of 8×8 grey digits, so the embedded digits default is scored with
this network instead, trained on the digits train split by ``scripts/train_digits_classifier.py``
(deterministic; weights committed as ``assets/digits_classifier.npz``). Its 64-d penultimate
activations play the role of Inception's pool_3 features and its 10 logits that of the 1008 logits.
The numbers are comparable only with other numbers from the same weights, like any FID.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import scoresde

FEATURE_DIM = 64
NUM_CLASSES = 10
WEIGHTS = os.path.join(scoresde.ASSETS_DIR, 'digits_classifier.npz')


class DigitsClassifier(nn.Module):
  """(B, 8, 8, 1) in [0, 1] → logits (B, 10), or (features (B, 64), logits) with ``return_features``."""

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    x = nn.relu(nn.Conv(32, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(64, (3, 3), name='conv2')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(FEATURE_DIM, name='hidden')(x))
    logits = nn.Dense(NUM_CLASSES, name='logits')(features)
    return (features, logits) if return_features else logits


def init_params(rng: jax.Array) -> dict:
  return DigitsClassifier().init(rng, jnp.zeros((1, 8, 8, 1), jnp.float32))['params']


def save_params(params: dict, path: str = WEIGHTS) -> None:
  flat = {'/'.join(k.key for k in path_): np.asarray(v)
          for path_, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(path, **flat)


def load_params(path: str = WEIGHTS) -> dict:
  """The committed weights (or another file written by ``save_params``)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'digits classifier weights not found at {path}; recreate them with '
                            '`python scripts/train_digits_classifier.py`.')
  params: dict = {}
  with np.load(path) as data:
    for key in data.files:
      node = params
      *parents, leaf = key.split('/')
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = jnp.asarray(data[key])
  expected = jax.tree.structure(jax.eval_shape(init_params, jax.random.key(0)))
  if jax.tree.structure(params) != expected:
    raise ValueError(f'{path} does not hold DigitsClassifier parameters.')
  return params


def to_native(images: jax.Array, size: int, layout: str) -> jax.Array:
  """Undoes ``datasets.layout_digits``: (N, size, size, 1) → (N, 8, 8, 1).

  'upsample' (nearest-neighbour by size/8) is inverted by averaging each size/8 block, which also maps
  generated images onto the classifier's grid; 'pad' is inverted by cropping the centred 8×8.
  """
  if images.shape[1:] == (8, 8, 1):
    return images
  if layout == 'upsample':
    f = size // 8
    return images.reshape(images.shape[0], 8, f, 8, f, 1).mean(axis=(2, 4))
  before = (size - 8) // 2
  return images[:, before:before + 8, before:before + 8]
