r"""Trains the digits classifier behind "digits FID / IS / KID" and writes assets/digits_classifier.npz.

Deterministic: a fixed seed drives initialisation, shuffling and augmentation (±1-pixel shifts), so
rerunning reproduces the committed weights on the same JAX build. Data: the train split of
``datasets`` (the same 1,497 / 300 split the score models use), as the evaluation sees it
(8-bit quantised, then scaled to [0, 1]).

  python scripts/train_digits_classifier.py [--out=assets/digits_classifier.npz] [--epochs=60]
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scoresde import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
from scoresde.infra import images  # pylint: disable=g-import-not-at-top,wrong-import-position
from scoresde.evaluation import digits_classifier  # pylint: disable=g-import-not-at-top,wrong-import-position

SEED = 0
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4


def split_data(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, 8, 8, 1) float32 in [0, 1] through 8-bit quantisation, labels (N,)) of a digits split."""
  from sklearn import datasets as sk_datasets  # pylint: disable=import-outside-toplevel
  indices = datasets.digits_split_indices(split)
  raw = datasets._digits_raw()[indices]  # pylint: disable=protected-access
  labels = sk_datasets.load_digits().target[indices]
  pixels = images.to_uint8(raw / (datasets.DIGITS_NUM_LEVELS - 1.)).astype(np.float32) / 255.
  return pixels[..., None], labels.astype(np.int32)


def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Each image translated by a random (dy, dx) ∈ {-1, 0, 1}², zero-filled."""
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
  offsets = rng.integers(0, 3, size=(len(images), 2))
  return np.stack([p[dy:dy + 8, dx:dx + 8] for p, (dy, dx) in zip(padded, offsets)])


def accuracy(params: dict, images: np.ndarray, labels: np.ndarray) -> float:
  logits = digits_classifier.DigitsClassifier().apply({'params': params}, images)
  return float(np.mean(np.argmax(np.asarray(logits), axis=1) == labels))


def train(epochs: int, seed: int = SEED) -> dict:
  """Adam(W) on softmax cross-entropy over the train split with shift augmentation."""
  images, labels = split_data('train')
  model = digits_classifier.DigitsClassifier()
  params = digits_classifier.init_params(jax.random.key(seed))
  steps_per_epoch = -(-len(images) // BATCH_SIZE)
  optimizer = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, epochs * steps_per_epoch),
                          weight_decay=WEIGHT_DECAY)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': p}, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    perm = rng.permutation(len(images))
    # The last, short batch wraps around so every step has the same shape (one compilation).
    perm = np.concatenate([perm, perm[:steps_per_epoch * BATCH_SIZE - len(perm)]])
    for b in range(steps_per_epoch):
      idx = perm[b * BATCH_SIZE:(b + 1) * BATCH_SIZE]
      params, opt_state, loss = step(params, opt_state, jnp.asarray(shift(images[idx], rng)),
                                     jnp.asarray(labels[idx]))
    if (epoch + 1) % 10 == 0:
      logging.info('epoch %d/%d  loss %.4f  train accuracy %.4f', epoch + 1, epochs, float(loss),
                   accuracy(params, images, labels))
  return params


FLAGS = flags.FLAGS


def main(argv):
  del argv
  params = train(FLAGS.epochs)
  test_images, test_labels = split_data('test')
  logging.info('test accuracy %.4f (%d images)', accuracy(params, test_images, test_labels),
               len(test_labels))
  digits_classifier.save_params(params, FLAGS.out)
  logging.info('wrote %s', FLAGS.out)


if __name__ == '__main__':
  # Defined here, not at import, so that tests importing train() add no global absl flags.
  flags.DEFINE_string('out', digits_classifier.WEIGHTS, 'Where to write the weights (.npz).')
  flags.DEFINE_integer('epochs', 60, 'Training epochs.')
  app.run(main)
