"""Anomaly detection in latent space (``--mode=qa`` on autoencoder latents): the digits benchmark
(benchmarks/qa.py) as the production recipe runs, on VAE-like latents instead of pixels.

Why. In production the detector sees 64x64x4 VAE latents (configs/qa/latents.py), not pixels. This
study reproduces that at digits scale on CPU: a small autoencoder of our own maps digits to 8x8x4
latents, the detector (configs/qa/digits.py with 4 channels) is trained on clean latents and the
corruptions are applied in latent space, where artefacts of a generator's latent stage would live.

Autoencoder. Deterministic (no KL term: the detector needs a fixed, smooth code, not samples). Digits
(benchmarks.qa.digits_split, [0, 1]) are upsampled bilinearly to 32x32; the encoder (3x3 convs, two
stride-2 convs) maps them to 8x8x4, the decoder (nearest-neighbour 2x upsamplings + 3x3 convs) back to
32x32; MSE loss, Adam, batch 64, trained on the train split only. Latents are standardised per channel
(mean and std over the train latents, as SDXL's latent scaling factor but also centred), so the
detector's σ ∈ {0.01, 0.05, 0.1, 0.2} are in units of the latent std; the scale is saved with the
weights (``--workdir/ae.msgpack``, ``latent_scale.json``) and reused on a rerun.

Detector. configs/qa/digits.py on the standardised train latents (data.dataset='arrays', 8x8x4),
``--holdout`` of them held out as the calibration set (99.5th percentile). data.centered stays False:
'arrays' are used as they are (the only setting datasets.py accepts for them); NCSN++ then maps its
input by 2x - 1 internally, an affine change that does not alter the DSM target in latent units.

Inputs (standardised latent units), the 300 clean test latents and corrupted copies of them:

  checkerboard   ± 0.3 alternating-element pattern on every channel (decoder checkerboard artefacts)
  collapsed      one channel (input i: channel i mod 4) set to its spatial mean
  half_mask      the lower half of every channel set to 0, i.e. to the mean train latent
  tile_patch     the right half filled by repeating the top-left 2x2 tile (mode-collapse patch)
  nan_latents    three elements (any channel) NaN
  noise_mid      additive N(0, 0.1²) noise

Table: per corruption the AUROC against the clean test scores of the single-σ score, the fused score,
the profile score where the report carries one, and the latent z baseline (benchmarks.qa.pixel_z_score
with the train part's per-element mean and std, sd floored at 0.05, thresholded at the same percentile of
the same held-out latents); reject rates at the calibrated thresholds; on clean test latents the false
reject rate with its binomial SE. Non-finite inputs score +inf. Writes ``--workdir/results.json``. The
figure shows, per corruption, one reject's ``--mode=qa`` heatmap (channels above residual maps) next to
the decoded clean and corrupted latent (NaN elements are set to 0, the mean latent, before decoding).

  python benchmarks/qa_latent.py --workdir=/tmp/qa_latent --figure=assets/qa_latent_heatmaps.png
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Iterator

import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from benchmarks.qa import auroc, checkerboard, common_flags, detector_config, digits_split, half_mask, pixel_z_score
from benchmarks.qa import rate_with_error, run_qa_on_sets, tile_patch
from scoresde import anomaly
from scoresde import datasets
from scoresde import run_lib

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
CORRUPTIONS = ('checkerboard', 'collapsed', 'half_mask', 'tile_patch', 'nan_latents', 'noise_mid')
SCORES = ('single', 'fused', 'profile', 'latent_z')

Params = Any


# ----------------------------------------------------------------------------------------------------
# Autoencoder


class Encoder(nn.Module):
  """(N, 32, 32, 1) -> (N, 8, 8, 4): two stride-2 convs halve the resolution twice."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = nn.gelu(nn.Conv(8, (3, 3))(x))
    x = nn.gelu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
    x = nn.gelu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
    x = nn.gelu(nn.Conv(32, (3, 3))(x))
    return nn.Conv(LATENT_CHANNELS, (1, 1))(x)


def _upsample2(x: jnp.ndarray) -> jnp.ndarray:
  # Nearest-neighbour upsampling + conv rather than a transposed conv: no checkerboard artefacts of
  # the decoder's own to confuse with the checkerboard corruption.
  n, h, w, c = x.shape
  return jax.image.resize(x, (n, 2 * h, 2 * w, c), 'nearest')


class Decoder(nn.Module):
  """(N, 8, 8, 4) -> (N, 32, 32, 1), unconstrained output (MSE against [0, 1] targets)."""

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    x = nn.gelu(nn.Conv(32, (3, 3))(z))
    x = nn.gelu(nn.Conv(16, (3, 3))(_upsample2(x)))
    x = nn.gelu(nn.Conv(8, (3, 3))(_upsample2(x)))
    return nn.Conv(1, (3, 3))(x)


class Autoencoder(nn.Module):
  encoder: Encoder = Encoder()
  decoder: Decoder = Decoder()

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return self.decoder(self.encoder(x))


def upsample_digits(images: np.ndarray) -> np.ndarray:
  """(N, 8, 8, 1) in [0, 1] -> (N, 32, 32, 1), bilinear."""
  n = len(images)
  return np.asarray(jax.image.resize(jnp.asarray(images), (n, IMAGE_SIZE, IMAGE_SIZE, 1), 'bilinear'))


def batches(x: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Endless shuffled epochs of ``x`` in batches of ``batch_size``."""
  while True:
    perm = rng.permutation(len(x))
    for i in range(0, len(x) - batch_size + 1, batch_size):
      yield x[perm[i:i + batch_size]]


def train_autoencoder(images: np.ndarray, steps: int, seed: int, batch_size: int = 64,
                      learning_rate: float = 1e-3) -> Params:
  """Adam on the reconstruction MSE of ``images`` (N, 32, 32, 1); returns the parameters."""
  model = Autoencoder()
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))['params']
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply({'params': p}, x) - x)**2))(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  data = batches(images, batch_size, np.random.default_rng(seed))
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, next(data))
    if (i + 1) % 500 == 0:
      print(f'autoencoder step {i + 1}: train MSE {float(loss):.5f}', flush=True)
  return params


def encode(params: Params, images: np.ndarray) -> np.ndarray:
  """Raw (unstandardised) latents (N, 8, 8, 4) of (N, 32, 32, 1) images."""
  return np.asarray(jax.jit(lambda p, x: Encoder().apply({'params': p['encoder']}, x))(params, images))


def decode(params: Params, latents: np.ndarray) -> np.ndarray:
  """(N, 32, 32, 1) images of raw latents (N, 8, 8, 4)."""
  return np.asarray(jax.jit(lambda p, z: Decoder().apply({'params': p['decoder']}, z))(params, latents))


def reconstruction_mse(params: Params, images: np.ndarray) -> float:
  return float(np.mean((decode(params, encode(params, images)) - images)**2))


def load_or_train_autoencoder(workdir: str, train_images: np.ndarray, steps: int,
                              seed: int) -> tuple[Params, dict[str, Any], float]:
  """The autoencoder and latent scale of ``workdir`` if saved there, else trained (and saved) now;
  also the training seconds (0 when loaded). The scale is the train latents' per-channel mean and std."""
  weights_path = os.path.join(workdir, 'ae.msgpack')
  scale_path = os.path.join(workdir, 'latent_scale.json')
  template = Autoencoder().init(jax.random.PRNGKey(seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))['params']
  if os.path.exists(weights_path) and os.path.exists(scale_path):
    with open(weights_path, 'rb') as f:
      params = serialization.from_bytes(template, f.read())
    with open(scale_path, encoding='utf-8') as f:
      return params, json.load(f), 0.
  started = time.time()
  params = train_autoencoder(train_images, steps, seed)
  seconds = time.time() - started
  raw = encode(params, train_images)
  scale = {'mean': raw.mean((0, 1, 2)).tolist(), 'std': raw.std((0, 1, 2)).tolist(), 'steps': steps}
  with open(weights_path, 'wb') as f:
    f.write(serialization.to_bytes(params))
  with open(scale_path, 'w', encoding='utf-8') as f:
    json.dump(scale, f, indent=2)
  return params, scale, seconds


def standardise(raw: np.ndarray, scale: dict[str, Any]) -> np.ndarray:
  return ((raw - np.asarray(scale['mean'])) / np.asarray(scale['std'])).astype(np.float32)


def unstandardise(z: np.ndarray, scale: dict[str, Any]) -> np.ndarray:
  return (z * np.asarray(scale['std']) + np.asarray(scale['mean'])).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Latent corruptions and scores


def latent_corruptions(clean: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """The corrupted copies of standardised latents ``clean`` (N, H, W, C) named in the docstring."""
  n, h, w, c = clean.shape
  out = {'checkerboard': checkerboard(clean, 0.3)}
  collapsed = clean.copy()
  for i in range(n):
    collapsed[i, ..., i % c] = collapsed[i, ..., i % c].mean()
  out['collapsed'] = collapsed
  out['half_mask'] = half_mask(clean)  # 0: the mean train latent, after standardisation
  out['tile_patch'] = tile_patch(clean)
  nan = clean.copy()
  for i in range(n):
    nan[i].reshape(-1)[rng.choice(h * w * c, 3, replace=False)] = np.nan
  out['nan_latents'] = nan
  out['noise_mid'] = clean + 0.1 * rng.standard_normal(clean.shape)
  return {k: v.astype(np.float32) for k, v in out.items()}


def scores_by_set(report: dict[str, Any], names: list[str]) -> dict[str, dict[str, np.ndarray]]:
  """Per input set: the single, fused (and profile, where the report has it) scores, null -> +inf, and
  each score's reject decisions at its calibrated threshold."""
  calibration = report['calibration']
  has_profile = (all('profile_score' in r for r in report['inputs'])
                 and calibration.get('profile_threshold') is not None)
  keys = {'single': 'score', 'fused': 'fused_score', **({'profile': 'profile_score'} if has_profile else {})}
  # The single-σ threshold is compared directly (as row['decision'] does under the default
  # qa.score='sigma'), so the columns stay right whichever score the config decides with.
  thresholds = {'single': calibration['threshold'], 'fused': calibration['fused_threshold'],
                'profile': calibration.get('profile_threshold')}
  out = {name: {k: [] for k in list(keys) + [f'reject_{k}' for k in keys]} for name in names}
  for r in report['inputs']:
    entry = out[r['id'].split('.npy')[0]]
    for k, field in keys.items():
      value = float('inf') if r[field] is None else r[field]
      entry[k].append(value)
      entry[f'reject_{k}'].append(value > thresholds[k])
  return {name: {k: np.asarray(v, np.float64) for k, v in entry.items()} for name, entry in out.items()}


def binomial_se(p: float, n: int) -> float:
  return float(np.sqrt(max(p * (1 - p), 1e-12) / n))


def results_table(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
  """AUROC against 'clean' and reject rate per set and score; the false-reject SE on 'clean'."""
  clean = scores['clean']
  kinds = [k for k in SCORES if k in clean]
  results = {}
  for name, s in scores.items():
    entry = {'n': len(s['single'])}
    for k in kinds:
      entry[f'reject_{k}'] = float(s[f'reject_{k}'].mean())
      if name == 'clean':
        entry[f'reject_{k}_se'] = binomial_se(entry[f'reject_{k}'], entry['n'])
      else:
        entry[f'auroc_{k}'] = auroc(clean[k], s[k])
    results[name] = entry
  return results


def print_table(results: dict[str, dict[str, float]]) -> None:
  kinds = [k for k in SCORES if f'reject_{k}' in results['clean']]
  titles = {'single': 'σ=0.05', 'fused': 'fused', 'profile': 'profile', 'latent_z': 'latent z'}
  header = [f'AUROC {titles[k]}' for k in kinds] + [f'reject {titles[k]}' for k in kinds]
  print('| input (n = 300 each) | ' + ' | '.join(header) + ' |')
  print('|---' * (len(header) + 1) + '|')
  for name, e in results.items():
    if name == 'clean':
      cells = ['–'] * len(kinds) + [rate_with_error(e[f'reject_{k}'], e['n']) for k in kinds]
      name = 'clean test (false rejects ± SE)'
    else:
      cells = [f'{e[f"auroc_{k}"]:.3f}' for k in kinds] + [f'{e[f"reject_{k}"]:.1%}' for k in kinds]
    print(f'| {name} | ' + ' | '.join(cells) + ' |')


# ----------------------------------------------------------------------------------------------------
# Figure


def _decoded_tile(params: Params, scale: dict[str, Any], z: np.ndarray, size: int):
  """The decoded image of one standardised latent as a PIL image ``size`` px wide; NaN -> 0 (mean)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = decode(params, unstandardise(np.nan_to_num(z, nan=0.)[None], scale))[0, ..., 0]
  grey = np.round(np.clip(image, 0., 1.) * 255).astype(np.uint8)
  return Image.fromarray(grey).resize((size, size), Image.NEAREST).convert('RGB')


def make_figure(report_dir: str, sets: dict[str, np.ndarray], params: Params, scale: dict[str, Any],
                out_path: str) -> None:
  """Per corruption, one reject: its ``--mode=qa`` heatmap (latent channels above residual maps, at half
  size) next to the decoded clean latent and the decoded corrupted one; two rows of cells."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  with open(os.path.join(report_dir, 'report.json'), encoding='utf-8') as f:
    rows = json.load(f)['inputs']
  cells = []
  for name in CORRUPTIONS:
    row = next((r for r in rows if r['id'].startswith(name + '.npy') and 'heatmap' in r), None)
    if row is None:
      continue
    index = int(row['id'].split('[')[1].rstrip(']'))
    heat = Image.open(os.path.join(report_dir, row['heatmap'])).convert('RGB')
    heat = heat.resize((heat.width // 2, heat.height // 2), Image.NEAREST)
    size = heat.height
    cells.append((f'{name} #{index}: latent | residual; decoded clean, corrupted', heat,
                  _decoded_tile(params, scale, sets['clean'][index], size),
                  _decoded_tile(params, scale, sets[name][index], size)))
  if not cells:
    print('figure: no rejected corruption, nothing to draw')
    return
  label_h, gap, columns = 14, 6, 3
  cell_w = max(h.width for _, h, _, _ in cells) + 2 * (cells[0][2].width + gap)
  cell_h = max(h.height for _, h, _, _ in cells) + label_h
  num_rows = -(-len(cells) // columns)
  canvas = Image.new('RGB', (columns * (cell_w + gap) + gap, num_rows * (cell_h + gap) + gap), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (label, heat, clean_tile, corrupt_tile) in enumerate(cells):
    left, top = gap + (i % columns) * (cell_w + gap), gap + (i // columns) * (cell_h + gap)
    draw.text((left, top), label, fill=(0, 0, 0))
    canvas.paste(heat, (left, top + label_h))
    canvas.paste(clean_tile, (left + heat.width + gap, top + label_h))
    canvas.paste(corrupt_tile, (left + heat.width + clean_tile.width + 2 * gap, top + label_h))
  canvas.save(out_path)
  print(f'figure: {out_path} ({len(cells)} rejects)')


# ----------------------------------------------------------------------------------------------------
# Main


def main():
  parser = common_flags('/tmp/qa_latent', 1000)
  parser.add_argument('--ae_steps', type=int, default=2000, help='autoencoder training steps')
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)

  train_images, test_images = upsample_digits(digits_split('train')), upsample_digits(digits_split('test'))
  params, scale, ae_seconds = load_or_train_autoencoder(args.workdir, train_images, args.ae_steps, args.seed)
  test_mse = reconstruction_mse(params, test_images)
  print(f'autoencoder: {args.ae_steps} steps ({ae_seconds:.0f} s), test reconstruction MSE {test_mse:.5f}')
  train = standardise(encode(params, train_images), scale)
  data_path = os.path.join(args.workdir, 'latents_train.npy')
  np.save(data_path, train)

  config = detector_config(data_path, args.n_iters, args.holdout, num_channels=LATENT_CHANNELS)
  workdir = os.path.join(args.workdir, 'detector')
  started = time.time()
  run_lib.train(config, workdir)
  train_seconds = time.time() - started

  test = standardise(encode(params, test_images), scale)
  sets = {'clean': test, **latent_corruptions(test, np.random.default_rng(args.seed))}
  report, qa_seconds = run_qa_on_sets(config, workdir, sets, os.path.join(args.workdir, 'inputs'))

  scores = scores_by_set(report, list(sets))
  # Latent z baseline, calibrated on the same held-out latents as the detector.
  calib = train[datasets.arrays_split_indices(len(train), args.holdout, 'test')]
  fit = train[datasets.arrays_split_indices(len(train), args.holdout, 'train')].reshape(-1, train[0].size)
  mean, std = fit.mean(0), np.maximum(fit.std(0), 0.05)
  z_threshold = anomaly.threshold_at(pixel_z_score(calib, mean, std), report['calibration']['percentile'])
  for name, x in sets.items():
    scores[name]['latent_z'] = pixel_z_score(x, mean, std)
    scores[name]['reject_latent_z'] = scores[name]['latent_z'] > z_threshold
  results = results_table(scores)

  out = {'results': results, 'calibration': report['calibration'], 'latent_z_threshold': z_threshold,
         'autoencoder': {'steps': args.ae_steps, 'train_seconds': round(ae_seconds, 1),
                         'test_reconstruction_mse': test_mse, 'latent_scale': scale},
         'n_iters': args.n_iters, 'holdout': args.holdout, 'train_seconds': round(train_seconds, 1),
         'train_steps_per_second': round(args.n_iters / max(train_seconds, 1e-9), 2),
         'qa_seconds': round(qa_seconds, 1), 'summary': report['summary']}
  with open(os.path.join(args.workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=2)

  calibration = report['calibration']
  print(f'detector: {args.n_iters} steps ({train_seconds:.0f} s), calibrated on {len(calib)} '
        f'held-out clean latents, threshold {calibration["threshold"]:.4g}; qa of {len(report["inputs"])} '
        f'inputs in {qa_seconds:.0f} s')
  print_table(results)
  if args.figure:
    make_figure(os.path.join(workdir, 'qa', 'inputs'), sets, params, scale, args.figure)


if __name__ == '__main__':
  main()
