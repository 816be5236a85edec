"""``main.py --mode=sample``: draw samples from a trained checkpoint's EMA weights and save them.

Samples ``num_samples`` images in rounds of ``config.eval.batch_size`` with the sampler configured in
``config.sampling`` (``sampling.get_sampling_fn``), each round continuing the per-sample seed sequence,
so sample i is the same whatever the batch size or device count (see ``sampling``). Writes
``samples_<round>.npz`` (key ``samples``: uint8 NHWC images, or float32 points for toy data) and a PNG
grid of the first samples.

Conditional sampling (``config.sampling.condition``; Song et al. 2021, Sec. 5 and App. I, through
``controllable``): ``inpaint`` fills the region named by ``config.sampling.inpaint_mask`` of the inputs
(``config.sampling.condition_input``, default the first test images), ``colorize`` colours their grey
levels, ``class`` guides the sampler with the classifier trained by ``--mode=train_classifier``
(``config.sampling.class_label``, ``guidance_scale``); ``main.py``'s ``--class_label``,
``--guidance_scale``, ``--inpaint.input`` and ``--inpaint.mask`` set these keys. It writes ``conditional_<round>.npz`` (samples,
and the inputs, masks or labels) and ``conditional.png``: for inpainting the masked input, the mask and
the completion side by side per example; for colorization the grey input and the result; for classes
the samples ordered by label.
"""

from __future__ import annotations

import math
import os
import pathlib

from absl import logging
import jax
import numpy as np
import tqdm

from scoresde import controllable
from scoresde import datasets
from scoresde.infra import images
from scoresde.infra import parallel
from scoresde import sampling
from scoresde import sde_lib
from scoresde.models import classifier as classifier_lib

CLASSIFIER_DIR = 'classifier'
# Named masks name the region to fill in; everything else is known (mask 1).
NAMED_MASKS = ('lower_half', 'upper_half', 'left_half', 'right_half', 'center')


def generate(config, workdir: str, checkpoint: str | int | None = None, out_dir: str | None = None,
             num_samples: int | None = None, batch_size: int | None = None,
             grid_size: int = 64) -> str:
  """Samples from a checkpoint's EMA variables and writes them to ``out_dir``.

  Args:
    config: the experiment config (``config.sampling`` picks the sampler).
    workdir: the training directory (``checkpointing.load_variables`` finds the newest snapshot).
    checkpoint: a step, a checkpoint path, or a score_sde_pytorch ``.pth`` file; newest if None.
    out_dir: where to write; default ``workdir/samples/ckpt_<step>``.
    num_samples: how many; default ``config.eval.num_samples``.
    batch_size: samples per round (global); default ``config.eval.batch_size``.
    grid_size: how many of the first samples go into the PNG (toy data: a scatter of up to 100x as
      many points).

  Returns:
    ``out_dir``.
  """
  from scoresde import checkpointing  # pylint: disable=import-outside-toplevel  (orbax is only needed here)
  from scoresde.models import utils as mutils  # pylint: disable=import-outside-toplevel

  num_samples = int(config.eval.num_samples if num_samples is None else num_samples)
  batch_size = int(config.eval.batch_size if batch_size is None else batch_size)
  if num_samples < 1:
    raise ValueError(f'num_samples (config.eval.num_samples) must be positive, got {num_samples}.')
  parallel.check_batch_size(batch_size, 'the sampling batch size (config.eval.batch_size)')

  condition = str(config.sampling.condition).lower()
  if condition not in controllable.CONDITIONS:
    raise ValueError(f'config.sampling.condition={config.sampling.condition!r} is not known; choose one of '
                     f'{controllable.CONDITIONS}.')
  variables, step = checkpointing.load_variables(config, workdir, checkpoint)
  sde = sde_lib.get_sde(config)
  model = mutils.create_model(config)
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  shape = (batch_size,) + tuple(datasets.data_shape(config))
  toy = len(shape) == 2
  inverse_scaler = None if toy else datasets.get_data_inverse_scaler(config)

  if condition != 'none' and toy:
    raise ValueError(f'config.sampling.condition={condition!r} needs image data, not the toy '
                     f'{config.data.dataset!r}.')

  tag = f'ckpt_{step}' if step is not None else os.path.splitext(os.path.basename(str(checkpoint)))[0]
  tag += '' if condition == 'none' else f'_{condition}'
  out_dir = out_dir or os.path.join(workdir, 'samples', tag)
  os.makedirs(out_dir, exist_ok=True)
  if condition != 'none':
    _generate_conditional(config, workdir, sde, score_fn, shape, num_samples, out_dir)
    return out_dir
  sampler = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, config.sampling.eps)
  rng = jax.random.PRNGKey(config.seed)
  rounds = math.ceil(num_samples / batch_size)
  logging.info('Sampling %d samples in %d rounds of %d from step %s (%s) into %s.', num_samples,
               rounds, batch_size, step, config.sampling.method, out_dir)
  kept, keep = [], grid_size * (100 if toy else 1)
  for r in tqdm.trange(rounds, desc='sampling rounds', unit='round'):
    samples, nfe = sampler(rng, score_fn, first_index=r * batch_size)
    # This process's rows are global rows [first, first + local) of the round; drop those past the end.
    first = r * batch_size + jax.process_index() * (batch_size // jax.process_count())
    samples = parallel.to_host(samples)[:max(num_samples - first, 0)]
    if toy:
      samples = samples.astype(np.float32)
    else:
      samples = images.to_uint8(datasets.samples_to_levels(config, samples))
    # Each process writes its own rows (one file per round and process on multi-host runs).
    suffix = f'_process_{jax.process_index()}' if jax.process_count() > 1 else ''
    np.savez_compressed(os.path.join(out_dir, f'samples_{r}{suffix}.npz'), samples=samples)
    if sum(len(k) for k in kept) < keep:
      kept.append(samples)
    logging.info('round %d/%d: %d samples, %d score evaluations each.', r + 1, rounds, len(samples),
                 nfe)
  if jax.process_index() == 0:
    grid_path = os.path.join(out_dir, 'samples.png')
    (images.save_scatter if toy else images.save_grid)(np.concatenate(kept)[:keep], grid_path)
  return out_dir


# ----------------------------------------------------------------------------------------------------
# Conditional sampling (controllable generation)


def classifier_workdir(workdir: str) -> str:
  """Where ``--mode=train_classifier`` writes the classifier of ``workdir``'s score model."""
  return os.path.join(workdir, CLASSIFIER_DIR)


def load_classifier(config, workdir: str, checkpoint: str = ''):
  """(model, EMA variables, step) of the classifier trained by ``--mode=train_classifier``: from
  ``checkpoint`` (a ``checkpoint_<k>`` directory) or the newest in ``workdir/classifier``."""
  from scoresde import checkpointing  # pylint: disable=import-outside-toplevel  (orbax is only needed here)
  from scoresde import losses  # pylint: disable=import-outside-toplevel
  model, variables = classifier_lib.init_classifier(jax.random.PRNGKey(0), config)
  target = checkpointing.abstract_like(losses.init_train_state(
      jax.random.PRNGKey(0), variables['params'], losses.get_optimizer(config)))
  if checkpoint:
    path = os.path.abspath(str(checkpoint).rstrip('/'))
    name = os.path.basename(path)
    if not (name.startswith('checkpoint_') and name[len('checkpoint_'):].isdigit()):
      raise ValueError(f'config.sampling.classifier_checkpoint={checkpoint!r} must be a checkpoint_<k> '
                       'directory of --mode=train_classifier.')
    manager = checkpointing.make_manager(os.path.dirname(path), max_to_keep=None)
    state, meta = checkpointing.restore(manager, int(name[len('checkpoint_'):]), target)
    manager.close()
  else:
    restored = checkpointing.restore_newest(classifier_workdir(workdir), target)
    if restored is None:
      raise FileNotFoundError(f'no classifier checkpoints in {classifier_workdir(workdir)}; train one with '
                              '--mode=train_classifier or set config.sampling.classifier_checkpoint.')
    state, meta = restored.state, restored.meta
  variables = {'params': state.params_ema}
  checkpointing.check_finite_weights(variables, 'the classifier checkpoint', 'EMA')
  return model, variables, int(meta['step'])


def named_mask(name: str, height: int, width: int) -> np.ndarray:
  """(H, W) float32, 1 = known: the named region (``NAMED_MASKS``) is the one to fill in; 'center' is
  the central square of half the size."""
  mask = np.ones((height, width), np.float32)
  h, w = height // 2, width // 2
  region = {'lower_half': (slice(h, None), slice(None)), 'upper_half': (slice(None, h), slice(None)),
            'left_half': (slice(None), slice(None, w)), 'right_half': (slice(None), slice(w, None)),
            'center': (slice(height // 4, height // 4 + h), slice(width // 4, width // 4 + w))}
  if name not in region:
    raise ValueError(f'config.sampling.inpaint_mask={name!r}: use one of {NAMED_MASKS} or a .png/.npy file.')
  mask[region[name]] = 0.
  return mask


def load_mask(spec: str, example_shape: tuple[int, int, int]) -> np.ndarray:
  """The inpainting mask (H, W, C) float32, 1 = known: a named mask, an .npy array (H, W) or (H, W, C)
  of 0/1, or a PNG whose light pixels (> 127) are known."""
  height, width, channels = example_shape
  suffix = pathlib.Path(spec).suffix.lower()
  if suffix == '.npy':
    mask = np.load(spec).astype(np.float32)
  elif suffix == '.png':
    from PIL import Image  # pylint: disable=import-outside-toplevel
    with Image.open(spec) as pil:
      mask = (np.asarray(pil.convert('L')) > 127).astype(np.float32)
  else:
    mask = named_mask(spec, height, width)
  mask = mask[..., None] if mask.ndim == 2 else mask
  if mask.shape[:2] != (height, width) or mask.shape[2] not in (1, channels):
    raise ValueError(f'the mask {spec!r} has shape {mask.shape}; the images are {example_shape}.')
  if not np.all((mask == 0) | (mask == 1)):
    raise ValueError(f'the mask {spec!r} must hold only 0 (fill in) and 1 (known).')
  return np.broadcast_to(mask, example_shape).astype(np.float32)


def load_condition_inputs(config, n: int) -> np.ndarray:
  """n input images (n, H, W, C) in [0, 1]: ``config.sampling.condition_input`` (.npy of images, uint8
  levels or floats in [0, 1]; or one .png), cycled to n, or else the first n images of the test split."""
  shape = tuple(datasets.data_shape(config))
  path = str(config.sampling.condition_input)
  if not path:
    images = np.concatenate([b['image'][b['mask']] for b in datasets.get_eval_iterator(config, 'test')])
  elif pathlib.Path(path).suffix.lower() == '.png':
    from PIL import Image  # pylint: disable=import-outside-toplevel
    with Image.open(path) as pil:
      images = np.asarray(pil.convert('L' if shape[-1] == 1 else 'RGB'))[None] / 255.
  else:
    images = np.load(path)
    images = images / (config.data.num_levels - 1) if images.dtype == np.uint8 else images
  images = np.asarray(images, np.float32).reshape((-1,) + shape)
  return images[np.arange(n) % len(images)]


def _cells(*columns: np.ndarray) -> np.ndarray:
  """Per example, the images of each column side by side (one gutter pixel apart): (N, H, k(W+1)-1, C)."""
  gutter = np.full(columns[0].shape[:2] + (1,) + columns[0].shape[3:], images.GUTTER, np.uint8)
  parts = []
  for column in columns:
    parts += [column, gutter]
  return np.concatenate(parts[:-1], axis=2)


def _generate_conditional(config, workdir: str, sde, score_fn, shape: tuple[int, ...], num_samples: int,
                          out_dir: str) -> None:
  """Inpainting, colorization or class-conditional samples in rounds of ``shape[0]``."""
  condition = str(config.sampling.condition).lower()
  batch_size = shape[0]
  scaler, inverse_scaler = datasets.get_data_scaler(config), datasets.get_data_inverse_scaler(config)
  rounds = math.ceil(num_samples / batch_size)
  n = rounds * batch_size
  rng = jax.random.PRNGKey(config.seed)
  extra = {}
  if condition in ('inpaint', 'colorize'):
    inputs = load_condition_inputs(config, n)
    extra['inputs'] = inputs
  if condition == 'inpaint':
    mask = load_mask(str(config.sampling.inpaint_mask), shape[1:])
    extra['mask'] = mask
    run = controllable.get_inpainter(config, sde, shape, config.sampling.eps, inverse_scaler)
    def draw(r, rows):
      return run(rng, score_fn, scaler(inputs[rows]), mask, first_index=r * batch_size)
  elif condition == 'colorize':
    run = controllable.get_colorizer(config, sde, shape, config.sampling.eps, inverse_scaler)
    def draw(r, rows):
      return run(rng, score_fn, scaler(inputs[rows].mean(-1, keepdims=True)), first_index=r * batch_size)
  else:
    model, variables, step = load_classifier(config, workdir, str(config.sampling.classifier_checkpoint))
    logits_fn = classifier_lib.classifier_logits_fn(sde, model, variables)
    label = int(config.sampling.class_label)
    labels = (np.full((n,), label) if label >= 0 else np.arange(n) % int(config.classifier.num_classes))
    extra['labels'] = labels
    sampler = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, config.sampling.eps)
    logging.info('class-conditional sampling with the classifier of step %d, guidance scale %g', step,
                 config.sampling.guidance_scale)
    def draw(r, rows):
      guided = controllable.guided_score_fn(score_fn, logits_fn, labels[rows],
                                            float(config.sampling.guidance_scale))
      return sampler(rng, guided, first_index=r * batch_size)
  kept = []
  for r in tqdm.trange(rounds, desc=f'{condition} rounds', unit='round'):
    rows = np.arange(r * batch_size, (r + 1) * batch_size)
    samples, nfe = draw(r, rows)
    samples = datasets.samples_to_levels(config, parallel.to_host(samples))
    kept.append(samples)
    np.savez_compressed(os.path.join(out_dir, f'conditional_{r}.npz'), samples=images.to_uint8(samples),
                        **{k: v[rows] if k != 'mask' else v for k, v in extra.items()})
    logging.info('round %d/%d: %d %s samples, %d score evaluations each.', r + 1, rounds, len(samples),
                 condition, nfe)
  if jax.process_index() != 0:
    return
  samples = images.to_uint8(np.concatenate(kept)[:num_samples])
  keep = min(len(samples), 64)
  if condition == 'inpaint':
    shown = np.where(extra['mask'] == 1, extra['inputs'][:keep], 0.5)
    grid = _cells(images.to_uint8(shown), images.to_uint8(np.broadcast_to(extra['mask'], shown.shape)),
                  samples[:keep])
  elif condition == 'colorize':
    grey = np.broadcast_to(extra['inputs'][:keep].mean(-1, keepdims=True), samples[:keep].shape)
    grid = _cells(images.to_uint8(grey), samples[:keep])
  else:
    grid = samples[np.argsort(extra['labels'][:len(samples)], kind='stable')][:keep]
  images.save_grid(grid, os.path.join(out_dir, 'conditional.png'))
