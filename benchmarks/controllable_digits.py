r"""Controllable generation on the embedded digits: class guidance and lower-half inpainting.

Needs a trained digits score model and a noise-conditional classifier in one workdir:

  python main.py --config=configs/ve/digits_ncsnpp_continuous.py --mode=train --workdir=runs/digits_ve
  python main.py --config=configs/ve/digits_ncsnpp_continuous.py --mode=train_classifier \
      --workdir=runs/digits_ve
  python benchmarks/controllable_digits.py --workdir=runs/digits_ve [--per_class=100] \
      [--scales=0,1,2,4] [--config.sampling.method=...]

1. Class guidance (Song et al. 2021, Sec. 5): ``--per_class`` samples of each digit per guidance scale
   w, judged by the committed evaluation classifier (``assets/digits_classifier.npz``; not the guide):
   the rate at which samples are labelled as the requested class, and the digits-FID of each class's
   samples against that class's training digits (with the class's test digits as the control row: the
   FID a perfect sampler would get at that sample size is about theirs).
2. Inpainting the lower half of the first ``--inpaint_n`` test digits: the rate at which completions are
   labelled as the original's class, next to unconditional samples and the upper half alone.
Writes ``class_grid.png`` (one row per scale, ten samples of each digit) and ``inpaint_grid.png`` (input
with the lower half grey | completion | original) into ``--out``.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scoresde import checkpointing  # pylint: disable=wrong-import-position
from scoresde import controllable  # pylint: disable=wrong-import-position
from scoresde import datasets  # pylint: disable=wrong-import-position
from scoresde import generate  # pylint: disable=wrong-import-position
from scoresde import sampling  # pylint: disable=wrong-import-position
from scoresde import sde_lib  # pylint: disable=wrong-import-position
from scoresde.evaluation import metrics  # pylint: disable=wrong-import-position
from scoresde.infra import images  # pylint: disable=wrong-import-position
from scoresde.models import classifier as classifier_lib  # pylint: disable=wrong-import-position
from scoresde.models import utils as mutils  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs', 've', 'digits_ncsnpp_continuous.py'), 'Digits config.')
flags.DEFINE_string('workdir', None, 'Workdir with the score checkpoint and classifier/.', required=True)
flags.DEFINE_string('out', None, 'Where the PNG grids go (default: WORKDIR/controllable).')
flags.DEFINE_integer('per_class', 100, 'Class-conditional samples per digit and scale.')
flags.DEFINE_list('scales', ['0', '1', '2', '4'], 'Guidance scales w.')
flags.DEFINE_integer('inpaint_n', 100, 'Test digits to inpaint (0: none).')
flags.DEFINE_integer('batch', 250, 'Samples per sampler call.')
flags.DEFINE_string('inpaint_method', 'pc', 'config.sampling.method for inpainting (the deterministic samplers '
                    'do not follow the conditional there: BENCHMARKS.md, "Controllable generation").')


def _digits(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All images of a split in [0, 1] (N, 8, 8, 1) and their labels."""
  config = config.copy_and_resolve_references()
  config.data.labels = True
  xs, ys = [], []
  for batch in datasets.get_eval_iterator(config, split):
    keep = np.asarray(batch['mask'], bool)
    xs.append(np.asarray(batch['image'])[keep])
    ys.append(np.asarray(batch['label'])[keep])
  return np.concatenate(xs), np.concatenate(ys)


def _in_batches(sample, n: int, batch: int) -> np.ndarray:
  """``sample(first) -> images`` called at first = 0, batch, 2 batch, ... (one compile); n rows kept."""
  return np.concatenate([np.asarray(sample(i)) for i in range(0, n, batch)])[:n]


def main(argv):
  del argv
  config = FLAGS.config
  workdir = FLAGS.workdir
  out = FLAGS.out or os.path.join(workdir, 'controllable')
  os.makedirs(out, exist_ok=True)
  sde = sde_lib.get_sde(config)
  variables, step = checkpointing.load_variables(config, workdir)
  score = mutils.network_score_fn(config, sde, mutils.create_model(config), variables)
  cmodel, cvars, cstep = generate.load_classifier(config, workdir)
  logits_fn = classifier_lib.classifier_logits_fn(sde, cmodel, cvars)
  extractor = metrics.get_feature_extractor(config)
  judge = lambda x: metrics.compute_features(extractor, images.to_uint8(x))[1].argmax(-1)
  features = lambda x: metrics.compute_features(extractor, images.to_uint8(x))[0]
  inverse, scaler = datasets.get_data_inverse_scaler(config), datasets.get_data_scaler(config)
  batch = int(FLAGS.batch)
  shape = (batch,) + tuple(datasets.data_shape(config))
  sampler = sampling.get_sampling_fn(config, sde, shape, inverse)
  method = config.sampling.method
  print(f'score model step {step}, classifier step {cstep}; sampler {method} '
        f'(num_steps {config.sampling.num_steps} for the fast samplers), {jax.devices()[0].platform}')

  train_x, train_y = _digits(config, 'train')
  test_x, test_y = _digits(config, 'test')
  per_class = int(FLAGS.per_class)
  labels = np.repeat(np.arange(10), per_class)
  ref_feats = {k: features(train_x[train_y == k]) for k in range(10)}
  control = [metrics.fid_from_features(features(test_x[test_y == k]), ref_feats[k]) for k in range(10)]
  print('\n| guidance scale w | NFE | labelled as requested | per-class digits-FID (0-9) | mean FID | s |')
  print('|---|---|---|---|---|---|')
  print(f'| control: test digits of the class | — | {np.mean(judge(test_x) == test_y):.3f} | '
        f'{" ".join(f"{c:.1f}" for c in control)} | {np.mean(control):.1f} | — |')
  rows = []
  for w in (float(s) for s in FLAGS.scales):
    started = time.time()
    nfes = []

    def guided(first, w=w, nfes=nfes):
      y = np.resize(labels[first:first + batch], batch)
      x, nfe = sampler(jax.random.fold_in(jax.random.PRNGKey(0), first),
                       controllable.guided_score_fn(score, logits_fn, jnp.asarray(y), w))
      nfes.append(int(np.max(nfe)))
      return x

    x = _in_batches(guided, len(labels), batch)
    fids = [metrics.fid_from_features(features(x[labels == k]), ref_feats[k]) for k in range(10)]
    rate = np.mean(judge(x) == labels)
    print(f'| {w:g} | {max(nfes)} | {rate:.3f} | {" ".join(f"{f:.1f}" for f in fids)} | '
          f'{np.mean(fids):.1f} | {time.time() - started:.0f} |', flush=True)
    rows.append(np.concatenate([x[labels == k][:10] for k in range(10)]))
  images.save_grid(images.to_uint8(np.concatenate(rows)), os.path.join(out, 'class_grid.png'))

  n = int(FLAGS.inpaint_n)
  if n == 0:
    return
  x0, y0 = test_x[:n], test_y[:n]
  mask = generate.named_mask('lower_half', *x0.shape[1:3])[:, :, None]
  inpaint_config = config.copy_and_resolve_references()
  inpaint_config.sampling.method = FLAGS.inpaint_method
  inpaint = controllable.get_inpainter(inpaint_config, sde, shape, config.sampling.eps, inverse)
  inpaint_sampler = sampling.get_sampling_fn(inpaint_config, sde, shape, inverse)
  padded = np.resize(x0, (-(-n // batch) * batch,) + x0.shape[1:])
  started = time.time()
  filled = _in_batches(lambda i: inpaint(jax.random.fold_in(jax.random.PRNGKey(1), i), score,
                                         scaler(padded[i:i + batch]), mask)[0], n, batch)
  unconditional = _in_batches(lambda i: inpaint_sampler(jax.random.fold_in(jax.random.PRNGKey(2), i), score)[0],
                              n, batch)
  print(f'\nlower-half inpainting of {n} test digits with {FLAGS.inpaint_method} ({time.time() - started:.0f} s with the '
        f'unconditional samples): completions labelled as the original\'s class '
        f'{np.mean(judge(filled) == y0):.3f}; unconditional samples {np.mean(judge(unconditional) == y0):.3f}; '
        f'upper half alone (lower half 0) {np.mean(judge(x0 * mask) == y0):.3f}; originals '
        f'{np.mean(judge(x0) == y0):.3f}')
  cells = np.concatenate([np.where(mask == 1, x0, 0.5), filled, x0], axis=2)[:48]
  images.save_grid(images.to_uint8(cells), os.path.join(out, 'inpaint_grid.png'))
  print(f'grids: {out}/class_grid.png, {out}/inpaint_grid.png')


if __name__ == '__main__':
  app.run(main)
