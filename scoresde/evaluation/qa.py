"""``--mode=qa_calibrate`` and ``--mode=qa``: a checkpoint as an anomaly detector (scoresde/anomaly.py).

- ``calibrate(config, workdir)``: the DSM residuals of the held-out clean split
  (``config.qa.calibration_split``) at ``config.qa.sigmas`` → ``workdir/qa_calibration.json``: the
  threshold at ``config.qa.percentile`` for the single-σ score (``qa.sigma``), the fused multi-σ score
  and the two-sided profile score (``anomaly.profile_score``), with the detector's config hash, σ, K,
  the checkpoint's step and the calibration set's size.
  ``run_lib.train`` calls it at the end of training when ``config.qa.calibrate_after_training``.
- ``run_qa(config, workdir, input_path)``: the residuals of every example of a .npy/.npz file or a folder
  of them (``datasets.read_arrays``; values in the training data's space: [0, 1] images or raw arrays),
  decided by ``config.qa.score`` against that calibration. Writes ``workdir/qa/<input>/``: ``report.json``
  (per input: id, score, its standard error, per-channel scores, fused and profile scores, the threshold
  and score decided on, decision, reason; and a summary), ``heatmaps/<k>.png`` for every reject (each
  channel of the input above its residual map, one colour scale per input so the failed channel stands
  out), and ``b<j>.npz`` per batch, kept so that a preempted run resumes at the next batch
  (``infra.resumable``). Batches of ``config.eval.batch_size``
  inputs are sharded over every device; each input's noise comes from its position, so its score does
  not depend on the batching.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np
from PIL import Image
import tqdm

from scoresde import anomaly
from scoresde import checkpointing
from scoresde import datasets
from scoresde.infra import parallel
from scoresde.infra import resumable
from scoresde.infra import xla_cpu
from scoresde import sde_lib
from scoresde.models import utils as mutils

CALIBRATION_FILE = 'qa_calibration.json'
QA_DIR = 'qa'
_TAG_CALIBRATION, _TAG_INPUTS = 0, 1
_HEATMAP_MIN_SIZE = 96  # pixels per panel side: 8x8 digits are enlarged 12x
SCORES = ('sigma', 'fused', 'profile')  # config.qa.score: what the decision thresholds
# What makes a detector: its network, its training objective and its data (not how it is run).
_DETECTOR_KEYS = ('model.', 'data.dataset', 'data.image_size', 'data.num_channels', 'data.centered',
                  'data.path', 'data.holdout_fraction', 'data.digits_layout', 'training.sde',
                  'training.continuous', 'training.dsm_sigmas', 'training.dsm_unit_weighting',
                  'training.reduce_mean', 'training.n_iters', 'seed')


def validate_qa_config(config) -> None:
  """Raises ValueError naming the ``config.qa`` key that cannot work, before anything is compiled."""
  qa = config.qa
  sigmas = [float(s) for s in qa.sigmas]
  if not sigmas:
    raise ValueError('config.qa.sigmas must list at least one noise level (and include config.qa.sigma).')
  anomaly.sigma_index(sigmas, float(qa.sigma))
  sde_lib.get_sde(config).noise_level_time(sigmas)
  if not isinstance(qa.num_draws, int) or qa.num_draws < 1:
    raise ValueError(f'config.qa.num_draws={qa.num_draws!r} must be a positive integer.')
  if qa.score not in SCORES:
    raise ValueError(f'config.qa.score={qa.score!r} must be one of {SCORES}.')
  if not 0 < float(qa.percentile) < 100:
    raise ValueError(f'config.qa.percentile={qa.percentile!r} must lie in (0, 100).')
  if qa.calibration_split not in datasets.SPLITS:
    raise ValueError(f'config.qa.calibration_split={qa.calibration_split!r} must be one of {datasets.SPLITS}.')
  if datasets.dataset_name(config) in datasets.TOY_DATASETS:
    raise ValueError(f'--mode=qa scores images or arrays (B, H, W, C); config.data.dataset='
                     f'{config.data.dataset!r} is 2-D toy data.')
  parallel.check_batch_size(int(config.eval.batch_size), 'config.eval.batch_size')


def detector_hash(config) -> str:
  """sha256 (16 hex digits) of the config keys that make the detector (``_DETECTOR_KEYS``)."""
  flat = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      elif any(prefix + key == k or (k.endswith('.') and (prefix + key).startswith(k))
               for k in _DETECTOR_KEYS):
        flat[prefix + key] = value
  walk(json.loads(config.to_json_best_effort()), '')
  return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


class _Detector:
  """The checkpoint's score function and the compiled residual over ``config.qa.sigmas``."""

  def __init__(self, config, workdir: str, checkpoint=None):
    validate_qa_config(config)
    self.config = config
    self.sigmas = [float(s) for s in config.qa.sigmas]
    self.primary = anomaly.sigma_index(self.sigmas, float(config.qa.sigma))
    self.num_draws = int(config.qa.num_draws)
    self.mesh = parallel.data_mesh()
    self.sde = sde_lib.get_sde(config)
    model = mutils.create_model(config)
    variables, self.step = checkpointing.load_variables(config, workdir, checkpoint=checkpoint, ema=True)
    self.score_fn = mutils.network_score_fn(config, self.sde, model, parallel.replicate(self.mesh, variables))
    self.scaler = datasets.get_data_scaler(config)
    self.rng = jax.random.PRNGKey(int(config.seed) + 3)
    sde, sigmas, num_draws, primary = self.sde, self.sigmas, self.num_draws, self.primary

    def residuals(score_fn, x, rng, index):
      out = anomaly.dsm_residuals(score_fn, sde, x, sigmas, rng, num_draws, index)
      out['map'] = out['map'][primary]
      return out
    self._fn = xla_cpu.jit(residuals, 'inference')

  def __call__(self, x: np.ndarray, index: np.ndarray, tag: int) -> dict[str, np.ndarray]:
    """This process's rows ``x`` (scaled here) at global positions ``index`` → host arrays, every
    process's rows in order."""
    x, index = parallel.shard_batch(self.mesh, (self.scaler(x), index.astype(np.int32)))
    out = self._fn(self.score_fn, x, jax.random.fold_in(self.rng, tag), index)
    return {k: np.asarray(parallel.gather(v)) for k, v in out.items()}


def calibrate(config, workdir: str, checkpoint=None, *, show_progress: bool = True) -> anomaly.Calibration:
  """Scores the clean ``config.qa.calibration_split`` and writes ``workdir/qa_calibration.json``."""
  detector = _Detector(config, workdir, checkpoint)
  split = str(config.qa.calibration_split)
  num_batches = math.ceil(datasets.num_examples(config, split) / int(config.eval.batch_size))
  local = int(config.eval.batch_size) // jax.process_count()
  scores = []
  batches = datasets.get_eval_iterator(config, split)
  for j, batch in enumerate(tqdm.tqdm(batches, total=num_batches, desc=f'qa calibration ({split})',
                                      unit='batch', disable=not show_progress or jax.process_index() != 0)):
    index = j * int(config.eval.batch_size) + jax.process_index() * local + np.arange(local)
    out = detector(batch['image'], index, _TAG_CALIBRATION)
    scores.append(out['score'][:, parallel.gather(batch['mask'])])
  scores = np.concatenate(scores, axis=1)
  calibration = anomaly.calibrate(scores, detector.sigmas, float(config.qa.sigma), float(config.qa.percentile),
                                  detector.num_draws, detector_hash(config), checkpoint_step=detector.step,
                                  split=split)
  path = os.path.join(workdir, CALIBRATION_FILE)
  if jax.process_index() == 0:
    anomaly.save_calibration(path, calibration)
  logging.info('qa calibration: threshold %.6g (%.4g percentile of %d clean %s scores at sigma=%g, K=%d; '
               'fused threshold %.4g, profile threshold %.4g) -> %s', calibration.threshold,
               calibration.percentile, calibration.num_examples, split, calibration.sigma,
               calibration.num_draws, calibration.fused_threshold, calibration.profile_threshold, path)
  return calibration


def load_checked_calibration(config, workdir: str, step: int | None) -> anomaly.Calibration:
  """``workdir/qa_calibration.json``, refused (naming what differs) unless it was made for this detector,
  checkpoint, σ and K."""
  path = os.path.join(workdir, CALIBRATION_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: calibrate the detector first (--mode=qa_calibrate, '
                            'or --mode=train with config.qa.calibrate_after_training=True).')
  calibration = anomaly.load_calibration(path)
  expected = {'config_hash': detector_hash(config), 'checkpoint_step': step, 'sigma': float(config.qa.sigma),
              'sigmas': [float(s) for s in config.qa.sigmas], 'num_draws': int(config.qa.num_draws),
              'percentile': float(config.qa.percentile)}
  changed = {k: (getattr(calibration, k), v) for k, v in expected.items() if getattr(calibration, k) != v}
  if config.qa.score == 'profile' and calibration.profile_threshold is None:
    changed['profile_threshold'] = (None, 'computed')
  if changed:
    listing = '; '.join(f'{k}: calibrated {old!r}, now {new!r}' for k, (old, new) in changed.items())
    raise ValueError(f'{path} was calibrated for another detector or settings ({listing}); re-run '
                     '--mode=qa_calibrate.')
  return calibration


def _hot(values: np.ndarray) -> np.ndarray:
  """[0, 1] → uint8 RGB along black → red → yellow → white."""
  v = np.clip(values, 0., 1.)[..., None] * 3. - np.arange(3.)
  return np.round(np.clip(v, 0., 1.) * 255.).astype(np.uint8)


def heatmap_image(x: np.ndarray, element_map: np.ndarray) -> np.ndarray:
  """uint8 RGB: the input's channels (top row, each min-max scaled) above their residual maps (bottom
  row, one scale for all channels: the input's largest finite entry; non-finite entries white)."""
  channels = x.shape[-1]
  finite_map = element_map[np.isfinite(element_map)]
  top = float(finite_map.max()) if finite_map.size else 1.
  heat = np.where(np.isfinite(element_map), element_map / max(top, 1e-30), 1.)
  gutter = 2
  h, w = x.shape[:2]
  factor = max(1, math.ceil(_HEATMAP_MIN_SIZE / max(h, w)))
  canvas = np.full((2 * h * factor + 3 * gutter, channels * (w * factor + gutter) + gutter, 3), 128, np.uint8)
  for c in range(channels):
    xc = np.where(np.isfinite(x[..., c]), x[..., c], 0.)
    span = float(xc.max() - xc.min())
    grey = np.round((xc - xc.min()) / (span if span > 0 else 1.) * 255).astype(np.uint8)
    panels = (np.repeat(grey[..., None], 3, -1), _hot(heat[..., c]))
    left = gutter + c * (w * factor + gutter)
    for row, panel in enumerate(panels):
      top_px = gutter + row * (h * factor + gutter)
      canvas[top_px:top_px + h * factor, left:left + w * factor] = panel.repeat(factor, 0).repeat(factor, 1)
  return canvas


def _read_inputs(config, input_path: str) -> tuple[list[str], np.ndarray]:
  shape = datasets.data_shape(config)
  ids, arrays = [], []
  for name, array in datasets.read_arrays(input_path):
    if array.shape[1:] != shape:
      raise ValueError(f'{name} holds inputs of shape {array.shape[1:]}; the detector takes {shape} '
                       '(arrays (N, H, W, C) or one (H, W, C) example, in the training data\'s space).')
    ids += [f'{name}[{i}]' for i in range(len(array))]
    arrays.append(array)
  return ids, np.concatenate(arrays)


def _input_settings(input_path: str) -> list[list[Any]]:
  return [[str(p), os.path.getsize(p), int(os.path.getmtime(p))] for p in datasets.array_files(input_path)]


def _derived_scores(scores: np.ndarray, calibration: anomaly.Calibration) -> dict[str, np.ndarray]:
  """The fused and profile scores of residuals (S, B) under the calibration (profile NaN when the
  calibration predates it and it is not decided on)."""
  fused = anomaly.fused_score(scores, calibration.sigma_means, calibration.sigma_stds)
  if calibration.profile_mean is None:
    profile = np.full(scores.shape[1], np.nan)
  else:
    profile = anomaly.profile_score(scores, calibration.profile_mean, calibration.profile_precision)
  return {'fused': fused, 'profile': profile}


def _decided(scores: dict[str, np.ndarray], decision_score: str, primary: int) -> np.ndarray:
  """The per-input score that ``config.qa.score`` thresholds."""
  return scores['score'][primary] if decision_score == 'sigma' else scores[decision_score]


def run_qa(config, workdir: str, input_path: str, checkpoint=None, *,
           show_progress: bool = True) -> dict[str, Any]:
  """Scores and decides every input under ``input_path``; returns the report (see the module doc)."""
  if not input_path:
    raise ValueError('--mode=qa needs --qa.input=PATH: a .npy/.npz file or a folder of them.')
  detector = _Detector(config, workdir, checkpoint)
  calibration = load_checked_calibration(config, workdir, detector.step)
  ids, inputs = _read_inputs(config, input_path)
  decision_score = str(config.qa.score)
  threshold = {'sigma': calibration.threshold, 'fused': calibration.fused_threshold,
               'profile': calibration.profile_threshold}[decision_score]
  name = os.path.basename(os.path.normpath(input_path))
  out_dir = os.path.join(workdir, QA_DIR, name)
  settings = {'inputs': _input_settings(input_path), 'calibration': json.loads(calibration.to_json()),
              'score': decision_score, 'batch_size': int(config.eval.batch_size), 'seed': int(config.seed)}
  resumable.open_run_dir(out_dir, settings, 'partial QA results')
  heatmap_dir = os.path.join(out_dir, 'heatmaps')
  os.makedirs(heatmap_dir, exist_ok=True)

  global_batch = int(config.eval.batch_size)
  local = global_batch // jax.process_count()
  n = len(ids)
  num_batches = math.ceil(n / global_batch)
  results = collections.defaultdict(list)
  started, resumed = time.time(), 0
  for j in tqdm.tqdm(range(num_batches), desc=f'qa {name}', unit='batch',
                     disable=not show_progress or jax.process_index() != 0):
    path = os.path.join(out_dir, f'b{j}.npz')
    if os.path.exists(path):
      with np.load(path) as saved:
        batch = {k: saved[k] for k in saved.files}
      resumed += 1
    else:
      rows = j * global_batch + jax.process_index() * local + np.arange(local)
      mask = rows < n
      x = np.zeros((local,) + inputs.shape[1:], np.float32)
      x[mask] = inputs[rows[mask]]
      out = detector(x, rows, _TAG_INPUTS)
      keep = parallel.gather(mask)
      batch = {k: (v[keep] if k in ('non_finite', 'map') else v[:, keep]) for k, v in out.items()}
      batch['index'] = parallel.gather(rows)[keep]
      batch.update(_derived_scores(batch['score'], calibration))
      decided = _decided(batch, decision_score, detector.primary)
      decision, _ = anomaly.decide(decided, batch['non_finite'], threshold)
      if jax.process_index() == 0:
        if config.qa.heatmaps:
          for r in np.flatnonzero(decision == anomaly.REJECT):
            k = int(batch['index'][r])
            Image.fromarray(heatmap_image(inputs[k], batch['map'][r])).save(
                os.path.join(heatmap_dir, f'{k:06d}.png'))
        saved = {k: v for k, v in batch.items() if k != 'map'}
        resumable.atomic_write(path, lambda f, b=saved: np.savez(f, **b))
    for key in ('index', 'score', 'score_se', 'per_channel', 'non_finite', 'fused', 'profile'):
      results[key].append(batch[key])
  seconds = time.time() - started
  index = np.concatenate(results['index'])
  score = np.concatenate(results['score'], axis=1)
  score_se = np.concatenate(results['score_se'], axis=1)
  per_channel = np.concatenate(results['per_channel'], axis=1)
  non_finite = np.concatenate(results['non_finite'])
  fused_scores = np.concatenate(results['fused'])
  profile_scores = np.concatenate(results['profile'])
  decided = _decided({'score': score, 'fused': fused_scores, 'profile': profile_scores}, decision_score,
                     detector.primary)
  decision, reason = anomaly.decide(decided, non_finite, threshold)

  def number(v):
    return float(v) if np.isfinite(v) else None  # JSON has no infinity: non-finite inputs score null

  report_inputs = []
  for r, k in enumerate(index):
    entry = {'id': ids[k], 'score': number(score[detector.primary, r]),
             'score_se': number(score_se[detector.primary, r]),
             'per_channel': [number(v) for v in per_channel[detector.primary, r]],
             'scores_by_sigma': {f'{s:g}': number(score[i, r]) for i, s in enumerate(detector.sigmas)},
             'fused_score': number(fused_scores[r]), 'profile_score': number(profile_scores[r]),
             'threshold': threshold,
             'decision': str(decision[r]), 'reason': str(reason[r])}
    if decision[r] == anomaly.REJECT and config.qa.heatmaps:
      entry['heatmap'] = os.path.join('heatmaps', f'{k:06d}.png')
    report_inputs.append(entry)
  by_reason = {str(k): int(v) for k, v in zip(*np.unique(reason[decision == anomaly.REJECT],
                                                        return_counts=True))}
  summary = {'n': n, 'rejected': int(np.sum(decision == anomaly.REJECT)), 'by_reason': by_reason,
             'threshold': threshold,
             'score': f'sigma={config.qa.sigma:g}' if decision_score == 'sigma' else decision_score,
             'num_draws': detector.num_draws, 'checkpoint_step': detector.step,
             'inputs_per_second': round(n / max(seconds, 1e-9), 2) if not resumed else None,
             'resumed_batches': resumed}
  report = {'summary': summary, 'calibration': json.loads(calibration.to_json()), 'inputs': report_inputs}
  if jax.process_index() == 0:
    resumable.atomic_write(os.path.join(out_dir, 'report.json'),
                           lambda f: f.write(json.dumps(report, indent=2).encode()))
  line = (f'qa {name}: n={n} rejected={summary["rejected"]} '
          + ' '.join(f'{k}={v}' for k, v in sorted(by_reason.items()))
          + f' threshold={threshold:.6g} ({summary["score"]}, K={detector.num_draws}) -> {out_dir}')
  logging.info(line)  # once: absl logging already reaches the terminal
  return report
