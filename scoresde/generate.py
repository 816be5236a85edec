"""``main.py --mode=sample``: draw samples from a trained checkpoint's EMA weights and save them.

Samples ``num_samples`` images in rounds of ``config.eval.batch_size`` with the sampler configured in
``config.sampling`` (``sampling.get_sampling_fn``), each round continuing the per-sample seed sequence,
so sample i is the same whatever the batch size or device count (see ``sampling``). Writes
``samples_<round>.npz`` (key ``samples``: uint8 NHWC images, or float32 points for toy data) and a PNG
grid of the first samples.
"""

from __future__ import annotations

import math
import os

from absl import logging
import jax
import numpy as np
import tqdm

from scoresde import datasets
from scoresde.infra import images
from scoresde.infra import parallel
from scoresde import sampling
from scoresde import sde_lib


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

  variables, step = checkpointing.load_variables(config, workdir, checkpoint)
  sde = sde_lib.get_sde(config)
  model = mutils.create_model(config)
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  shape = (batch_size,) + tuple(datasets.data_shape(config))
  toy = len(shape) == 2
  inverse_scaler = None if toy else datasets.get_data_inverse_scaler(config)
  sampler = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, config.sampling.eps)

  tag = f'ckpt_{step}' if step is not None else os.path.splitext(os.path.basename(str(checkpoint)))[0]
  out_dir = out_dir or os.path.join(workdir, 'samples', tag)
  os.makedirs(out_dir, exist_ok=True)
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
    samples = samples.astype(np.float32) if toy else images.to_uint8(samples)
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
