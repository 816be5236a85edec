"""Sample quality of a checkpoint (FID, IS, KID) and the dataset statistics it is measured against.

``evaluate_samples`` is what ``run_lib.evaluate`` calls for each checkpoint when
``config.eval.enable_sampling``; ``compute_dataset_stats`` is ``main.py --mode=fid_stats``.

Exactly ``config.eval.num_samples`` samples enter the metrics: ``ceil(num_samples / eval.batch_size)``
rounds of ``eval.batch_size`` samples (sharded over all devices), the surplus rows of the last round
discarded. Sample i is drawn from ``fold_in(PRNGKey(seed), i)`` (``sampling``'s per-sample keys), so
every checkpoint is sampled from the same latents. Each round's uint8 samples and features are saved
as it finishes and reused when found, so a preempted evaluation resumes at the first missing round.

Features: the FID Inception-v3 (pytorch-fid's port of TF's 2015-12-05 graph) for image datasets; the
committed digits classifier for ``digits`` ("digits FID/IS/KID", see ``evaluation.digits_classifier``).
Reference statistics: a file from ``--mode=fid_stats`` (train split, uint8 images, no dequantization:
what the reference's published CIFAR-10 statistics used); for digits without such a file, the test
split, computed on the fly (300 held-out images, so that train-vs-test is a meaningful control).

Files, in ``eval_dir``: ``samples_ckpt_{ckpt}/settings.json``, ``samples_{r}.npz`` (``samples`` uint8,
``nfe``) and ``statistics_{r}.npz`` (``features``, ``logits``) per round; ``report_ckpt_{ckpt}.json``
and ``samples_ckpt_{ckpt}.png`` (a grid of the first samples).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import numpy as np
import tqdm

import scoresde
from scoresde import datasets
from scoresde.evaluation import rounds
from scoresde.evaluation import metrics
from scoresde.infra import images
from scoresde.infra import parallel
from scoresde.infra import resumable
from scoresde import sampling
from scoresde import sde_lib
from scoresde.models import utils as mutils

GRID_SIZE = 64


def default_stats_path(config) -> str:
  """``assets/stats/{dataset}_{image_size}_stats.npz`` in the repository (``config.eval.stats_path``
  overrides it)."""
  name = datasets.dataset_name(config)
  return os.path.join(scoresde.ASSETS_DIR, 'stats', f'{name}_{int(config.data.image_size)}_stats.npz')


def stats_path(config) -> str:
  return str(config.eval.stats_path) or default_stats_path(config)


def _feature_batch_size(config) -> int:
  return int(config.eval.feature_batch_size)


def _check_config(config) -> None:
  if datasets.dataset_name(config) in datasets.TOY_DATASETS:
    raise ValueError(f'FID/IS/KID need images; config.data.dataset={config.data.dataset!r} is 2-D toy '
                     f'data: set config.eval.enable_sampling=False.')
  if int(config.eval.num_samples) < 4:
    raise ValueError(f'config.eval.num_samples={config.eval.num_samples} is too small for FID/KID; use '
                     f'at least 4 (thousands for meaningful numbers; the paper used 50000).')
  parallel.check_batch_size(int(config.eval.batch_size), 'config.eval.batch_size')


def _local_features(extractor: metrics.FeatureExtractor, images: np.ndarray,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Features of this process's rows, gathered over processes (all processes hold all rows after)."""
  features, logits = metrics.compute_features(extractor, images, batch_size)
  return parallel.gather(features), parallel.gather(logits)


# ----------------------------------------------------------------------------------------------------
# Dataset statistics.


def dataset_features(config, split: str, extractor: metrics.FeatureExtractor,
                     show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Features and logits of every example of ``split`` as uint8 images (no dequantization, no flips)."""
  batch_size = _feature_batch_size(config)
  total = math.ceil(datasets.num_examples(config, split) / int(config.eval.batch_size))
  feats, logits = [], []
  for batch in tqdm.tqdm(datasets.get_eval_iterator(config, split, uniform_dequantization=False),
                         total=total, desc=f'features {config.data.dataset}/{split}', unit='batch',
                         disable=not show_progress or jax.process_index() != 0):
    f, l = _local_features(extractor, images.to_uint8(batch['image']), batch_size)
    mask = parallel.gather(batch['mask'])
    feats.append(f[mask])
    logits.append(l[mask])
  return np.concatenate(feats), np.concatenate(logits)


def compute_dataset_stats(config, out_path: str = '', split: str = 'train') -> str:
  """Writes the reference statistics of ``split`` to ``out_path`` (default ``stats_path(config)``).

  The file holds ``mu`` and ``sigma`` (float64 mean and covariance, for FID), ``pool_3`` (the float32
  features, for KID; the reference's key), ``logits``, and what they were computed with
  (``feature_network``, ``dataset``, ``split``, ``image_size``, ``num_examples``). Returns the path.
  """
  _check_config(config)
  out_path = out_path or stats_path(config)
  extractor = metrics.get_feature_extractor(config)
  started = time.time()
  features, logits = dataset_features(config, split, extractor)
  mu, sigma = metrics.feature_stats(features)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    resumable.atomic_write(out_path, lambda f: np.savez(
        f, mu=mu, sigma=sigma, pool_3=features.astype(np.float32), logits=logits.astype(np.float32),
        feature_network=extractor.name, dataset=datasets.dataset_name(config), split=split,
        image_size=int(config.data.image_size), num_examples=len(features)))
  logging.info('dataset statistics of %s/%s (%d examples, %s features) -> %s in %.0f s',
               config.data.dataset, split, len(features), extractor.name, out_path, time.time() - started)
  return out_path


def load_reference(config, extractor: metrics.FeatureExtractor) -> dict[str, Any]:
  """``mu``, ``sigma``, ``features`` (or None) and ``source`` of the statistics samples are compared to.

  Accepts our files (``compute_dataset_stats``), the reference's (``pool_3`` only) and pytorch-fid's
  (``mu``, ``sigma``; no KID without features).
  """
  path = stats_path(config)
  if os.path.isfile(path):
    with np.load(path) as data:
      if 'feature_network' in data and str(data['feature_network']) != extractor.name:
        raise ValueError(f'{path} holds {data["feature_network"]} features, but {config.data.dataset} '
                         f'is scored with {extractor.name}; recompute it with --mode=fid_stats.')
      for key, ours in (('dataset', datasets.dataset_name(config)),
                        ('image_size', int(config.data.image_size))):
        if key in data and str(data[key]) != str(ours):
          raise ValueError(f'{path} was computed for {key}={data[key]}, this config has {ours}; point '
                           f'--config.eval.stats_path at matching statistics or run --mode=fid_stats.')
      features = data['pool_3'].astype(np.float64) if 'pool_3' in data else None
      if 'mu' in data:
        mu, sigma = data['mu'], data['sigma']
      elif features is not None:
        mu, sigma = metrics.feature_stats(features)
      else:
        raise ValueError(f'{path} has neither mu/sigma nor pool_3 features.')
    if mu.shape != (extractor.feature_dim,):
      raise ValueError(f'{path} holds {mu.shape[0]}-d statistics; {extractor.name} gives '
                       f'{extractor.feature_dim}-d features.')
    return {'mu': mu, 'sigma': sigma, 'features': features, 'source': path}
  if datasets.dataset_name(config) == 'digits':
    features, _ = dataset_features(config, 'test', extractor, show_progress=False)
    mu, sigma = metrics.feature_stats(features)
    return {'mu': mu, 'sigma': sigma, 'features': features, 'source': 'digits test split (on the fly)'}
  raise FileNotFoundError(
      f'no dataset statistics at {path}: compute them once with `python main.py --mode=fid_stats '
      f'--config=<this config>` (train split), or point --config.eval.stats_path at an .npz with '
      f'mu/sigma or pool_3 of the same feature network.')


# ----------------------------------------------------------------------------------------------------
# Samples of a checkpoint.


_SAMPLERS: dict[tuple, tuple[sde_lib.SDE, sampling.Sampler]] = {}


def _sampler(config, sde: sde_lib.SDE, shape: tuple[int, ...]) -> sampling.Sampler:
  """The configured sampler, reused across checkpoints: its compiled program takes the weights as
  arguments (``models.utils.network_score_fn``), so only the first checkpoint compiles."""
  key = (id(sde), shape, json.dumps(config.sampling.to_dict(), sort_keys=True),
         bool(config.data.centered), datasets.dataset_name(config))
  if key not in _SAMPLERS or _SAMPLERS[key][0] is not sde:
    if len(_SAMPLERS) >= 4:
      _SAMPLERS.clear()
    _SAMPLERS[key] = (sde, sampling.get_sampling_fn(config, sde, shape,
                                                    datasets.get_data_inverse_scaler(config)))
  return _SAMPLERS[key][1]


def sample_settings(config, extractor_name: str) -> dict[str, Any]:
  """Everything that changes the saved rounds; a resumed run must match it."""
  return {
      'dataset': str(config.data.dataset),
      'image_size': int(config.data.image_size),
      'num_samples': int(config.eval.num_samples),
      'batch_size': int(config.eval.batch_size),
      'seed': int(config.seed),
      'centered': bool(config.data.centered),
      # Samples of a model trained on dequantized data are mapped back to the levels before they are saved.
      'to_levels': bool(config.data.uniform_dequantization),
      'sde': str(config.training.sde),
      'sde_params': {k: config.model[k] for k in ('num_scales', 'sigma_min', 'sigma_max', 'beta_min',
                                                       'beta_max')},
      'continuous': bool(config.training.continuous),
      'sampling': config.sampling.to_dict(),
      'feature_network': extractor_name,
  }


def evaluate_samples(config, eval_dir: str, ckpt: int | str, model: nn.Module, variables: Any,
                     sde: sde_lib.SDE, *, show_progress: bool = True) -> dict[str, Any]:
  """FID, IS and KID of ``config.eval.num_samples`` samples of ``model`` (with ``variables``).

  Returns (and writes to ``eval_dir/report_ckpt_{ckpt}.json``) ``fid``; ``is`` / ``is_std`` (10
  splits) and ``is_single_split`` (the reference's); ``kid`` / ``kid_stderr`` (when the reference
  statistics include features); ``nfe_mean`` / ``nfe_max`` (score evaluations per sample);
  ``num_samples``; ``feature_network``; ``reference``; ``seconds``; and the settings.
  """
  _check_config(config)
  extractor = metrics.get_feature_extractor(config)
  reference = load_reference(config, extractor)
  settings = sample_settings(config, extractor.name)
  run_dir = os.path.join(eval_dir, f'samples_ckpt_{ckpt}')
  resumable.open_run_dir(run_dir, settings, 'samples')

  num_samples, batch_size = int(config.eval.num_samples), int(config.eval.batch_size)
  num_rounds = math.ceil(num_samples / batch_size)
  sampler = _sampler(config, sde, (batch_size,) + tuple(datasets.data_shape(config)))
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  rng = jax.random.PRNGKey(int(config.seed))
  feature_batch = _feature_batch_size(config)

  def compute(r: int) -> dict[str, np.ndarray]:
    samples, nfe = sampler(rng, score_fn, first_index=r * batch_size)
    keep = min(batch_size, num_samples - r * batch_size)  # rows of this round that enter the metrics
    local = images.to_uint8(datasets.samples_to_levels(config, parallel.to_host(samples)))
    f, l = _local_features(extractor, local, feature_batch)
    kept = parallel.gather(local)[:keep]
    if jax.process_index() == 0:
      resumable.atomic_write(os.path.join(run_dir, f'samples_{r}.npz'),
                             lambda out: np.savez(out, samples=kept, nfe=int(nfe)))
    # Kept (and so used) as float32, so a resumed evaluation computes from the same values.
    return {'features': f[:keep].astype(np.float32), 'logits': l[:keep].astype(np.float32),
            'nfe': np.asarray(int(nfe))}

  features, logits, nfes = [], [], []
  started = time.time()
  # The statistics file of a round is written after its samples file: its presence marks it finished.
  for _, arrays in rounds.resumable_rounds(
      run_dir, ((f'statistics_{r}', r) for r in range(num_rounds)), compute, total=num_rounds,
      desc=f'samples ckpt {ckpt}', show_progress=show_progress, postfix=lambda a: {'nfe': int(a['nfe'])}):
    features.append(arrays['features'])
    logits.append(arrays['logits'])
    nfes.append(int(arrays['nfe']))
  with np.load(os.path.join(run_dir, 'samples_0.npz')) as saved:
    grid = saved['samples'][:GRID_SIZE]

  features, logits = np.concatenate(features), np.concatenate(logits)
  if len(features) != num_samples:
    raise RuntimeError(f'{len(features)} samples were scored, expected {num_samples}.')
  quality = metrics.quality_metrics(features, logits, reference['mu'], reference['sigma'],
                                    reference['features'])
  result = {
      'ckpt': ckpt if isinstance(ckpt, int) else str(ckpt),
      **quality,
      'nfe_mean': float(np.mean(nfes)),
      'nfe_max': int(np.max(nfes)),
      'num_samples': num_samples,
      'feature_network': extractor.name,
      'reference': reference['source'],
      'seconds': round(time.time() - started, 1),
      'settings': settings,
  }
  logging.info('ckpt %s: FID %.3f, IS %.3f ± %.3f (single split %.3f), KID %s (%s, %d samples)', ckpt,
               result['fid'], result['is'], result['is_std'], result['is_single_split'],
               f"{result['kid']:.4g} ± {result['kid_stderr']:.2g}" if 'kid' in result else 'n/a',
               extractor.name, num_samples)
  if jax.process_index() == 0:
    resumable.atomic_write(os.path.join(eval_dir, f'report_ckpt_{ckpt}.json'),
                           lambda f: f.write(json.dumps(result, indent=2).encode()))
    images.save_grid(grid, os.path.join(eval_dir, f'samples_ckpt_{ckpt}.png'))
  return result
