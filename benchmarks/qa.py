"""Anomaly detection on digits (``--mode=qa``): AUROC and reject rates per corruption (BENCHMARKS.md).

Protocol. The detector (configs/qa/digits.py) is trained on the digits train split (1,497 images) given
as user arrays (data.dataset='arrays'), which holds out ``--holdout`` of them as the clean calibration
set; the threshold is their 99.5th percentile. It is then run with ``--mode=qa`` (run_lib.qa_check) on
the clean digits test split (300 images, never seen) and on corrupted copies of it:

  checkerboard   ± 0.15 alternating-pixel pattern (decoder checkerboard artefacts)
  collapsed      a 4x4 block set to one constant (its mean)
  half_mask      the lower half blank (a half-rendered mask)
  noise_{lo,mid,hi}  additive N(0, s²) noise, s = 0.02, 0.05, 0.1
  tile_patch     the right half filled by repeating the top-left 2x2 tile (mode-collapse patch)
  nan_pixels     three pixels NaN
  strokes        out of distribution: random straight strokes (letter-like), no digits
  shuffled       out of distribution: each image's pixels permuted

Per corruption: AUROC of each score against the clean test scores, and the reject rate at the calibrated
threshold; on clean test data the false-reject rate with its binomial standard error. Scores: the recipe's
single-σ residual (σ = 0.05, K = 8), the multi-σ fused score (sum over σ of residuals standardised on the
calibration set), the two-sided profile score (Mahalanobis distance of the log residuals across σ,
``anomaly.profile_score``), and a pixel-space baseline (‖(x - μ) / sd‖², per-pixel mean and std of the
train split, sd floored at 0.05) thresholded at the same percentile of the same calibration set.
Non-finite inputs score +inf under every detector (all flag them).

With ``--likelihood_workdir`` (a generative digits checkpoint, e.g. ``make demo``'s runs/digits_ve, of
``configs.<--likelihood_config>``), the exact-likelihood detector joins as a baseline on the first
``--likelihood_n`` inputs of each set: the bits/dim of the model's continuous density at the input itself
(probability-flow ODE, ``likelihood.get_log_likelihood_fn`` with the config's eval settings; no
dequantization, since corrupted inputs are off the grid), AUROC only: one-sided (high bits/dim is
anomalous) and two-sided (distance from the mean bits/dim of as many *train* images, the typicality test
of Nalisnick et al. 2019). No reject rate: the generative model saw the whole train split, so there is no
held-out clean set to calibrate it on without spending test images.

Writes ``--workdir/results.json`` and prints the table. ``--reuse`` keeps a detector already trained in
``--workdir`` (recalibrates it and re-runs --mode=qa).

  python benchmarks/qa.py --workdir=/tmp/qa_bench --n_iters=2000
  python benchmarks/qa.py --workdir=/tmp/qa_bench --reuse --likelihood_workdir=runs/digits_ve
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from scoresde import anomaly
from scoresde import datasets
from scoresde import run_lib

NOISE_LEVELS = {'noise_lo': 0.02, 'noise_mid': 0.05, 'noise_hi': 0.1}


def digits_split(split: str) -> np.ndarray:
  """The digits split as float32 (N, 8, 8, 1) in [0, 1], as training sees it."""
  images = datasets._digits_raw()[datasets.digits_split_indices(split)]  # pylint: disable=protected-access
  return (images.astype(np.float32) / (datasets.DIGITS_NUM_LEVELS - 1))[..., None]


def checkerboard(clean: np.ndarray, amplitude: float) -> np.ndarray:
  """± ``amplitude`` alternating over pixels (every channel): a decoder's checkerboard artefact."""
  h, w = clean.shape[1:3]
  return clean + np.where((np.arange(h)[:, None] + np.arange(w)[None]) % 2 == 0, amplitude,
                          -amplitude)[None, ..., None]


def half_mask(clean: np.ndarray) -> np.ndarray:
  """The lower half set to 0 (black pixels; the mean of standardised latents)."""
  half = clean.copy()
  half[:, clean.shape[1] // 2:] = 0.
  return half


def tile_patch(clean: np.ndarray) -> np.ndarray:
  """The right half filled by repeating the top-left 2x2 tile (a mode-collapse patch)."""
  h, w = clean.shape[1:3]
  tiled = clean.copy()
  tiled[:, :, w // 2:] = np.tile(clean[:, :2, :2], (1, h // 2, w // 4, 1))
  return tiled


def corruptions(clean: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
  n, h, w, _ = clean.shape
  out = {'checkerboard': checkerboard(clean, 0.15)}
  collapsed = clean.copy()
  for i in range(n):
    r, c = rng.integers(0, h - 3), rng.integers(0, w - 3)
    collapsed[i, r:r + 4, c:c + 4] = collapsed[i, r:r + 4, c:c + 4].mean()
  out['collapsed'] = collapsed
  out['half_mask'] = half_mask(clean)
  for name, s in NOISE_LEVELS.items():
    out[name] = clean + s * rng.standard_normal(clean.shape)
  out['tile_patch'] = tile_patch(clean)
  nan = clean.copy()
  for i in range(n):
    idx = rng.choice(h * w, 3, replace=False)
    nan[i].reshape(-1)[idx] = np.nan
  out['nan_pixels'] = nan
  strokes = np.zeros_like(clean)
  for i in range(n):
    for _ in range(rng.integers(2, 4)):  # 2-3 straight strokes between random border-ish points
      (r0, c0), (r1, c1) = rng.integers(1, h - 1, (2, 2))
      for u in np.linspace(0, 1, 12):
        strokes[i, int(round(r0 + u * (r1 - r0))), int(round(c0 + u * (c1 - c0)))] = 1.
  out['strokes'] = strokes
  out['shuffled'] = np.stack([rng.permutation(x.reshape(-1)).reshape(x.shape) for x in clean])
  return {k: v.astype(np.float32) for k, v in out.items()}


def auroc(clean: np.ndarray, anomalous: np.ndarray) -> float:
  """P(anomalous score > clean score) + ½ P(tie) (the Mann-Whitney statistic); +inf ranks top."""
  clean = np.nan_to_num(np.asarray(clean, np.float64), nan=np.inf)
  anomalous = np.nan_to_num(np.asarray(anomalous, np.float64), nan=np.inf)
  greater = (anomalous[:, None] > clean[None]).mean()
  ties = (anomalous[:, None] == clean[None]).mean()
  return float(greater + 0.5 * ties)


def rate_with_error(p: float, n: int) -> str:
  """'p ± SE' of a rejection rate; with no rejections the SE at p = 0 would read 0, so the SE that
  n can resolve at the nominal 0.5 % is given as a bound instead."""
  if p == 0:
    return f'0 / {n} (SE ≤ {math.sqrt(0.005 * 0.995 / n):.1%})'
  return f'{p:.1%} ± {math.sqrt(p * (1 - p) / n):.1%}'


def pixel_z_score(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  flat = x.reshape(len(x), -1).astype(np.float64)
  z = np.sum(((flat - mean) / std)**2, axis=1)
  return np.where(np.all(np.isfinite(flat), axis=1), z, np.inf)


FIGURE_SETS = ('checkerboard', 'collapsed', 'half_mask', 'tile_patch', 'nan_pixels', 'strokes')


def make_figure(workdir: str, out_path: str) -> None:
  """One rejected input of each of ``FIGURE_SETS``: its ``--mode=qa`` heatmap PNG (input above its
  residual map), labelled, side by side."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  report_dir = os.path.join(workdir, 'detector', 'qa', 'inputs')
  with open(os.path.join(report_dir, 'report.json'), encoding='utf-8') as f:
    rows = json.load(f)['inputs']
  panels = []
  for name in FIGURE_SETS:
    row = next((r for r in rows if r['id'].startswith(name + '.npy') and 'heatmap' in r), None)
    if row is not None:
      panels.append((name, Image.open(os.path.join(report_dir, row['heatmap'])).convert('RGB')))
  label_h, gap = 14, 6
  width = sum(p.width for _, p in panels) + gap * (len(panels) + 1)
  height = max(p.height for _, p in panels) + label_h + 2 * gap
  canvas = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  left = gap
  for name, panel in panels:
    draw.text((left, gap // 2), name, fill=(0, 0, 0))
    canvas.paste(panel, (left, label_h + gap))
    left += panel.width + gap
  canvas.save(out_path)
  print(f'figure: {out_path} ({len(panels)} rejects)')


def likelihood_bits(sets: dict[str, np.ndarray], config_name: str, workdir: str, n: int,
                    seed: int) -> dict[str, np.ndarray]:
  """Per set, the first ``n`` inputs' bits/dim of the generative checkpoint's continuous density
  (+inf for non-finite inputs), and the mean of ``n`` train images' under 'train'."""
  import importlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from scoresde import checkpointing, likelihood, sde_lib  # pylint: disable=import-outside-toplevel
  from scoresde.models import utils as mutils  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f'configs.{config_name}').get_config()  # one of this repository's
  sde = sde_lib.get_sde(config)
  variables, _ = checkpointing.load_variables(config, workdir, ema=True)
  score_fn = mutils.network_score_fn(config, sde, mutils.create_model(config), variables)
  logp_fn = likelihood.get_log_likelihood_fn(
      sde, config.eval.hutchinson_type, num_probes=config.eval.num_probes, rtol=config.eval.ode_rtol,
      atol=config.eval.ode_atol, eps=config.eval.likelihood_eps, method=config.eval.ode_method)
  scaler = datasets.get_data_scaler(config)
  rng = jax.random.PRNGKey(seed)
  out = {}
  train = digits_split('train')
  for name, x in {**sets, 'train': train[:: max(1, len(train) // n)][:n]}.items():
    x = x[:n]
    finite = np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)
    started = time.time()
    logp, _, nfe = logp_fn(rng, score_fn, scaler(np.where(np.isfinite(x), x, 0.)))
    bits = -np.asarray(logp, np.float64) / (np.prod(x.shape[1:]) * np.log(2.))
    out[name] = np.where(finite, bits, np.inf)
    print(f'likelihood {name}: {len(x)} inputs, NFE max {int(np.max(nfe))}, {time.time() - started:.0f} s, '
          f'mean bits/dim {np.mean(bits):.3f}', flush=True)
  return out


def throughput(batch: int, sigmas: tuple[float, ...], calls: int = 2, show: bool = True) -> dict[str, float]:
  """Inputs per second of the residual at 64x64x4 with configs/qa/latents.py's network (random
  weights: the cost does not depend on them), ``batch`` inputs per call, K = 8, at ``sigmas``."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs.qa import latents  # pylint: disable=import-outside-toplevel
  from scoresde import sde_lib  # pylint: disable=import-outside-toplevel
  from scoresde.models import utils as mutils  # pylint: disable=import-outside-toplevel
  config = latents.get_config()
  sde = sde_lib.get_sde(config)
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  fn = jax.jit(lambda f, x: anomaly.dsm_residuals(f, sde, x, sigmas, jax.random.PRNGKey(1),
                                                  int(config.qa.num_draws))['score'])
  x = np.random.default_rng(0).standard_normal((batch, 64, 64, 4)).astype(np.float32)
  started = time.time()
  fn(score_fn, x).block_until_ready()
  compile_seconds = time.time() - started
  started = time.time()
  for _ in range(calls):
    fn(score_fn, x).block_until_ready()
  seconds = (time.time() - started) / calls
  out = {'backend': jax.default_backend(), 'batch': batch, 'sigmas': list(sigmas), 'num_draws': 8,
         'params': mutils.param_count(variables), 'compile_seconds': round(compile_seconds, 1),
         'seconds_per_batch': round(seconds, 2), 'inputs_per_second': round(batch / seconds, 2)}
  if show:
    print(json.dumps(out))
  return out


def detector_config(data_path: str, n_iters: int, holdout: float, unit_weighting: bool = True,
                    num_channels: int = 1, name: str = 'qa.digits'):
  """configs.<name> (default configs/qa/digits.py) on 8x8 arrays at ``data_path`` (``holdout`` of them
  held out for calibration), trained ``n_iters`` steps, snapshot at the end, locked."""
  config = importlib.import_module(f'configs.{name}').get_config()
  config.data.dataset = 'arrays'
  config.data.path = data_path
  config.data.num_channels = num_channels
  config.data.holdout_fraction = holdout
  config.training.n_iters = n_iters
  config.training.snapshot_freq = n_iters
  config.training.snapshot_freq_for_preemption = min(500, n_iters)
  config.training.eval_freq = min(250, n_iters)
  if config.training.dsm_sigmas:  # the weighting of a few-level detector; a generative one keeps σ²
    config.training.dsm_unit_weighting = unit_weighting
  config.lock()
  return config


def run_qa_on_sets(config, workdir: str, sets: dict[str, np.ndarray], input_dir: str) -> tuple[dict, float]:
  """Saves each set as ``input_dir/<name>.npy`` and runs ``--mode=qa`` on the folder: (report, seconds).
  A previous run's QA results for the folder are deleted first: they are this script's own, and the
  fresh files (new modification times) would not match their settings."""
  shutil.rmtree(os.path.join(workdir, 'qa', os.path.basename(os.path.normpath(input_dir))), ignore_errors=True)
  os.makedirs(input_dir, exist_ok=True)
  for name, x in sets.items():
    np.save(os.path.join(input_dir, f'{name}.npy'), x)
  started = time.time()
  report = run_lib.qa_check(config, workdir, input_dir)
  return report, time.time() - started


def common_flags(workdir: str, n_iters: int) -> argparse.ArgumentParser:
  """The flags this benchmark shares with benchmarks/qa_latent.py."""
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default=workdir)
  parser.add_argument('--n_iters', type=int, default=n_iters, help='detector training steps')
  parser.add_argument('--holdout', type=float, default=0.2, help='fraction held out for calibration')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--figure', default='', help='also write the heatmap figure here (e.g. assets/...)')
  return parser


def main():
  parser = common_flags('/tmp/qa_bench', 2000)
  parser.add_argument('--unit_weighting', type=int, default=1)
  parser.add_argument('--detector', default='qa.digits',
                      help='configs.<this>: the detector (qa.digits_generative: the demo\'s generative model)')
  parser.add_argument('--figure_only', action='store_true', help='only (re)make --figure from --workdir')
  parser.add_argument('--reuse', action='store_true', help='keep the detector trained in --workdir')
  parser.add_argument('--likelihood_workdir', default='', help='a generative digits checkpoint\'s workdir')
  parser.add_argument('--likelihood_config', default='ve.digits_ncsnpp_continuous',
                      help='configs.<this> of --likelihood_workdir')
  parser.add_argument('--likelihood_n', type=int, default=100, help='inputs per set for the likelihood')
  parser.add_argument('--throughput', type=int, default=0,
                      help='only measure --mode=qa throughput at 64x64x4 with this many inputs per batch')
  args = parser.parse_args()
  if args.throughput:
    throughput(args.throughput, (0.05,))
    return
  if args.figure_only:
    make_figure(args.workdir, args.figure)
    return
  os.makedirs(args.workdir, exist_ok=True)
  train = digits_split('train')
  data_path = os.path.join(args.workdir, 'digits_train.npy')
  np.save(data_path, train)
  config = detector_config(data_path, args.n_iters, args.holdout, bool(args.unit_weighting),
                           name=args.detector)

  started = time.time()
  workdir = os.path.join(args.workdir, 'detector')
  if args.reuse:
    run_lib.qa_calibrate(config, workdir)
  else:
    run_lib.train(config, workdir)
  train_seconds = time.time() - started
  calibration = anomaly.load_calibration(os.path.join(workdir, 'qa_calibration.json'))

  rng = np.random.default_rng(args.seed)
  test = digits_split('test')
  sets = {'clean': test, **corruptions(test, rng)}
  report, qa_seconds = run_qa_on_sets(config, workdir, sets, os.path.join(args.workdir, 'inputs'))

  rows = report['inputs']
  inf = float('inf')
  by_set = {name: {'single': [], 'fused': [], 'profile': [], 'reject': [], 'reject_fused': [],
                   'reject_profile': []} for name in sets}
  for r in rows:
    name = r['id'].split('.npy')[0]
    by_set[name]['single'].append(inf if r['score'] is None else r['score'])
    by_set[name]['fused'].append(inf if r['fused_score'] is None else r['fused_score'])
    by_set[name]['profile'].append(inf if r['profile_score'] is None else r['profile_score'])
    # The single-σ column is that score at its threshold, whatever config.qa.score decided on.
    by_set[name]['reject'].append(r['score'] is None or r['score'] > calibration.threshold)
    by_set[name]['reject_fused'].append(by_set[name]['fused'][-1] > calibration.fused_threshold)
    by_set[name]['reject_profile'].append(by_set[name]['profile'][-1] > calibration.profile_threshold)
  bits = {}
  if args.likelihood_workdir:
    bits = likelihood_bits(sets, args.likelihood_config, args.likelihood_workdir, args.likelihood_n, args.seed)
    typical = float(np.mean(bits.pop('train')))

  # Pixel-space baseline, calibrated on the same held-out images.
  calib_images = train[datasets.arrays_split_indices(len(train), args.holdout, 'test')]
  fit_images = train[datasets.arrays_split_indices(len(train), args.holdout, 'train')]
  mean = fit_images.reshape(len(fit_images), -1).mean(0)
  std = np.maximum(fit_images.reshape(len(fit_images), -1).std(0), 0.05)
  pixel_threshold = anomaly.threshold_at(pixel_z_score(calib_images, mean, std), calibration.percentile)

  results = {}
  clean = {k: np.asarray(v, np.float64) for k, v in by_set['clean'].items()}
  clean_pixel = pixel_z_score(sets['clean'], mean, std)
  for name, x in sets.items():
    s = {k: np.asarray(v, np.float64) for k, v in by_set[name].items()}
    pixel = pixel_z_score(x, mean, std)
    entry = {'n': len(x),
             'reject_single': float(s['reject'].mean()), 'reject_fused': float(s['reject_fused'].mean()),
             'reject_profile': float(s['reject_profile'].mean()),
             'reject_pixel': float(np.mean(pixel > pixel_threshold))}
    if bits and np.any(np.isfinite(bits[name])):
      entry['bits_per_dim_mean'] = float(np.mean(bits[name][np.isfinite(bits[name])]))
    if name == 'clean':
      for key in ('reject_single', 'reject_fused', 'reject_profile', 'reject_pixel'):
        p = entry[key]
        entry[key + '_se'] = float(np.sqrt(max(p * (1 - p), 1e-12) / len(x)))
    else:
      entry.update(auroc_single=auroc(clean['single'], s['single']), auroc_fused=auroc(clean['fused'], s['fused']),
                   auroc_profile=auroc(clean['profile'], s['profile']), auroc_pixel=auroc(clean_pixel, pixel))
      if bits:
        entry.update(auroc_likelihood=auroc(bits['clean'], bits[name]),
                     auroc_likelihood_typical=auroc(np.abs(bits['clean'] - typical), np.abs(bits[name] - typical)))
    results[name] = entry

  out = {'results': results, 'calibration': json.loads(calibration.to_json()),
         'n_iters': args.n_iters, 'detector': args.detector, 'unit_weighting': bool(args.unit_weighting),
         'holdout': args.holdout,
         'reused': args.reuse, 'train_seconds': round(train_seconds, 1), 'qa_seconds': round(qa_seconds, 1),
         'qa_inputs_per_second': report['summary']['inputs_per_second'], 'summary': report['summary'],
         'likelihood_n': args.likelihood_n if bits else 0}
  with open(os.path.join(args.workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=2)

  how = 'reused, recalibrated in ' if args.reuse else ''  # train_seconds is then the calibration's
  print(f'detector configs.{args.detector}: {args.n_iters} steps ({how}{train_seconds:.0f} s), calibrated on '
        f'{calibration.num_examples} held-out clean images, threshold {calibration.threshold:.4g} (sigma={calibration.sigma}, '
        f'K={calibration.num_draws}); qa of {len(rows)} inputs in {qa_seconds:.0f} s')
  likelihood = bool(bits)
  header = ['input', 'AUROC σ=0.05', 'AUROC fused', 'AUROC profile', 'AUROC pixel z']
  header += ['AUROC bits/dim', 'AUROC bits/dim typical'] if likelihood else []
  header += ['reject σ=0.05', 'reject fused', 'reject profile', 'reject pixel z']
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for name, e in results.items():
    if name == 'clean':
      cells = ['clean test (false rejects)'] + ['–'] * (6 if likelihood else 4)
      cells += [rate_with_error(e[k], e['n'])
                for k in ('reject_single', 'reject_fused', 'reject_profile', 'reject_pixel')]
    else:
      keys = ['auroc_single', 'auroc_fused', 'auroc_profile', 'auroc_pixel']
      keys += ['auroc_likelihood', 'auroc_likelihood_typical'] if likelihood else []
      cells = [name] + [f'{e[k]:.3f}' for k in keys]
      cells += [f'{e[k]:.1%}' for k in ('reject_single', 'reject_fused', 'reject_profile', 'reject_pixel')]
    print('| ' + ' | '.join(cells) + ' |')
  if args.figure:
    make_figure(args.workdir, args.figure)


if __name__ == '__main__':
  main()
