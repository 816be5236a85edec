r"""Sample-quality reference figures: the digits control and the Inception feature throughput.

1. Digits (committed classifier, ``evaluation``): FID / IS / KID of the digits train split (1,497
   images) and of 1,000- and 300-image subsets of it against the test split (300 images) — the control
   a model's samples are compared with (the digits default evaluates 1,000 samples) — and of uniform
   noise against the test split.
2. FID Inception-v3 (299×299, random weights: the throughput does not depend on them) on this machine's
   devices: images per second, i.e. the feature cost of 50,000 samples.

  python benchmarks/sample_quality.py [--inception_batch=32] [--inception_batches=3]
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scoresde import datasets  # pylint: disable=wrong-import-position
from scoresde.evaluation import metrics  # pylint: disable=wrong-import-position
from scoresde.infra import images  # pylint: disable=wrong-import-position
from configs import default_cifar10_configs  # pylint: disable=wrong-import-position
from scoresde.evaluation import inception  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer('inception_batch', 32, 'Images per Inception batch.')
flags.DEFINE_integer('inception_batches', 3, 'Timed Inception batches (after one compile batch).')


def digits_split(split: str) -> np.ndarray:
  config = default_cifar10_configs.get_default_configs()
  config.data.update(dataset='digits', image_size=8, num_channels=1, num_levels=17)
  source = datasets.get_source(config, split)
  return images.to_uint8(source.load(np.arange(len(source))) / 16.)


def digits_control() -> None:
  config = default_cifar10_configs.get_default_configs()
  config.data.update(dataset='digits', image_size=8, num_channels=1, num_levels=17)
  extractor = metrics.get_feature_extractor(config)
  train_f, train_l = metrics.compute_features(extractor, digits_split('train'))
  test_f, _ = metrics.compute_features(extractor, digits_split('test'))
  noise = images.to_uint8(np.random.default_rng(0).uniform(size=(1497, 8, 8, 1)))
  noise_f, noise_l = metrics.compute_features(extractor, noise)
  # Subsets of the size of a typical sample evaluation: FID and split IS are biased at small n.
  subsets = {n: np.random.default_rng(0).choice(len(train_f), n, replace=False) for n in (1000, 300)}
  mu, cov = metrics.feature_stats(test_f)
  print('digits quality against the test split (300 images), digits classifier features:')
  print(f'{"set":<22} {"n":>5} {"FID":>8} {"IS (10 splits)":>16} {"IS (1 split)":>12} {"KID":>18}')
  rows = [('train split', train_f, train_l)]
  rows += [(f'train subset ({n})', train_f[idx], train_l[idx]) for n, idx in subsets.items()]
  rows += [('uniform noise', noise_f, noise_l)]
  for name, f, l in rows:
    m = metrics.quality_metrics(f, l, mu, cov, test_f)
    print(f'{name:<22} {len(f):>5} {m["fid"]:>8.2f} {m["is"]:>9.2f} ± {m["is_std"]:<4.2f} '
          f'{m["is_single_split"]:>12.2f} {m["kid"]:>9.1f} ± {m["kid_stderr"]:<6.1f}')


def inception_throughput() -> None:
  variables = jax.jit(inception.FIDInceptionV3().init)(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  fn = inception.feature_fn(variables)
  batch = np.random.default_rng(0).uniform(size=(FLAGS.inception_batch, 32, 32, 3)).astype(np.float32)
  start = time.time()
  jax.block_until_ready(fn(batch))
  compile_s = time.time() - start
  start = time.time()
  for _ in range(FLAGS.inception_batches):
    jax.block_until_ready(fn(batch))
  rate = FLAGS.inception_batches * FLAGS.inception_batch / (time.time() - start)
  print(f'FID Inception-v3 on {jax.devices()[0].platform} ({jax.device_count()} device(s)), batch '
        f'{FLAGS.inception_batch} of 32x32 -> 299x299: first batch (compile) {compile_s:.1f} s, '
        f'{rate:.1f} images/s, 50,000 images in {50000 / rate / 60:.0f} min')


def main(argv):
  del argv
  digits_control()
  if FLAGS.inception_batches > 0:
    inception_throughput()


if __name__ == '__main__':
  app.run(main)
