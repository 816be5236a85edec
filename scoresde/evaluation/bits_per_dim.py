"""Bits/dim of a checkpoint over a dataset split: repeated, resumable, with a final aggregate.

``evaluate_bpd`` is what ``run_lib.evaluate`` calls for each checkpoint when ``config.eval.enable_bpd``.
It fixes three weaknesses of the reference's evaluation (score_sde run_lib.py):

- every example is evaluated: the padded last batch is computed and its padding masked out (the
  reference drops it: 9,216 of CIFAR-10's 10,000 test images);
- each (repeat, batch) result is saved as it is computed and skipped when found, so a preempted run
  resumes exactly where it stopped in any repeat (the reference's resume index skipped the first batches
  of every later repeat too), and the dequantization noise and Hutchinson probes of batch b in repeat r
  come from ``fold_in(seed, r, b)``, so a resumed run gives the same numbers as an uninterrupted one;
- a final JSON file holds the mean, its standard error, NFE and the settings (the reference writes
  none).

Beside the ODE bits/dim (``bpd``): the ELBO bound on them (``elbo_bpd``, ``likelihood.get_elbo_bpd_fn``)
when the optional key ``config.eval.elbo_num_samples`` is set (> 0: importance-sampled times per example),
and, when the run directory holds a variational dequantizer (``--mode=train_deq``,
``dequantization_training``), the same numbers with it in place of uniform dequantization (``deq_bpd``,
``deq_elbo_bpd``), from the same noise, probes and times.

Files, in ``eval_dir``: ``bpd_{split}_ckpt_{ckpt}/settings.json`` and ``r{repeat}_b{batch}.npz`` (the
real examples' ``bpd`` and ``nfe``), and ``bpd_{split}_ckpt_{ckpt}.json`` (the aggregate).
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

from scoresde import datasets
from scoresde import dequantization_training
from scoresde.evaluation import rounds
from scoresde import likelihood
from scoresde.infra import parallel
from scoresde.infra import resumable
from scoresde import sde_lib
from scoresde.models import utils as mutils


def bpd_settings(config) -> dict[str, Any]:
  """Everything that changes the per-batch results; a resumed run must match it."""
  return {
      'dataset': str(config.data.dataset),
      'split': str(config.eval.bpd_dataset),
      'num_levels': int(config.data.num_levels),
      'centered': bool(config.data.centered),
      'batch_size': int(config.eval.batch_size),
      'num_repeats': int(config.eval.bpd_num_repeats),
      'eps': float(config.eval.likelihood_eps),
      'hutchinson_type': str(config.eval.hutchinson_type),
      'num_probes': int(config.eval.num_probes),
      'ode_method': str(config.eval.ode_method),
      'ode_rtol': float(config.eval.ode_rtol),
      'ode_atol': float(config.eval.ode_atol),
      'seed': int(config.seed),
      'sde': str(config.training.sde),
  }


def _check_config(config) -> None:
  if datasets.dataset_name(config) in datasets.TOY_DATASETS:
    raise ValueError(f'bits/dim needs discrete image data; config.data.dataset={config.data.dataset!r} '
                     f'is continuous toy data: set config.eval.enable_bpd=False (or use '
                     f'likelihood.get_log_likelihood_fn for its density).')
  if config.eval.bpd_dataset not in datasets.SPLITS:
    raise ValueError(f'config.eval.bpd_dataset={config.eval.bpd_dataset!r} must be one of '
                     f'{datasets.SPLITS}.')
  if int(config.eval.bpd_num_repeats) < 1:
    raise ValueError(f'config.eval.bpd_num_repeats must be >= 1, got {config.eval.bpd_num_repeats}.')
  parallel.check_batch_size(int(config.eval.batch_size), 'config.eval.batch_size')


def _elbo_num_samples(config) -> int:
  """``config.eval.elbo_num_samples``, an optional key: absent (the reference configs) or 0, no bound."""
  return int(config.eval.elbo_num_samples) if 'elbo_num_samples' in config.eval else 0


def evaluate_bpd(config, eval_dir: str, ckpt: int | str, model: nn.Module, variables: Any,
                 sde: sde_lib.SDE, *, show_progress: bool = True,
                 workdir: str | None = None) -> dict[str, Any]:
  """Bits/dim of ``model`` (with ``variables``, e.g. the EMA weights) on ``config.eval.bpd_dataset``.

  Each of ``config.eval.bpd_num_repeats`` passes draws fresh dequantization noise (and probes), so the
  mean over repeats estimates the expected bits/dim of ``likelihood.get_likelihood_fn``. Returns (and
  writes to ``eval_dir/bpd_{split}_ckpt_{ckpt}.json``) ``bpd`` (mean over examples and repeats),
  ``bpd_stderr`` (standard error of that mean: the spread of the per-example means over repeats, over
  √examples), ``bpd_per_repeat``, ``nfe_mean``/``nfe_max``, ``num_examples``, ``num_failed`` (solves
  that hit the step limit, NaN) and the settings; and ``elbo_bpd``, ``deq_bpd``, ``deq_elbo_bpd`` (each
  with its ``_stderr``) where computed (module doc). ``workdir``: the run directory, searched for a
  dequantizer (None: none is used).
  """
  _check_config(config)
  split, repeats = str(config.eval.bpd_dataset), int(config.eval.bpd_num_repeats)
  settings = bpd_settings(config)
  num_levels = int(config.data.num_levels)
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  bpd_fn = likelihood.get_likelihood_fn(
      sde, inverse_scaler, num_levels=num_levels,
      hutchinson_type=config.eval.hutchinson_type, num_probes=config.eval.num_probes,
      rtol=config.eval.ode_rtol, atol=config.eval.ode_atol, eps=config.eval.likelihood_eps,
      method=config.eval.ode_method)
  elbo_samples = _elbo_num_samples(config)
  elbo_fn = likelihood.get_elbo_bpd_fn(sde, inverse_scaler, num_levels=num_levels,
                                       eps=config.eval.likelihood_eps,
                                       num_samples=elbo_samples) if elbo_samples else None
  loaded = dequantization_training.load_dequantizer(config, workdir) if workdir is not None else None
  dequantizer = loaded[0] if loaded is not None else None
  if elbo_fn is not None:
    settings['elbo_num_samples'] = elbo_samples
  if loaded is not None:
    settings['dequantizer_step'] = int(loaded[1]['step'])
    logging.info('bits/dim with the variational dequantizer of %s (step %d) too',
                 dequantization_training.dequantizer_workdir(workdir), settings['dequantizer_step'])
  run_dir = os.path.join(eval_dir, f'bpd_{split}_ckpt_{ckpt}')
  resumable.open_run_dir(run_dir, settings, 'partial bits/dim results')
  mesh = parallel.data_mesh()

  # The label convention the model was trained with (the reference hard-coded continuous=True here,
  # feeding discretely trained models labels they never saw). A Partial's arrays are traced arguments:
  # the weights are not baked into the compiled program.
  score_fn = mutils.network_score_fn(config, sde, model, parallel.replicate(mesh, variables))
  base_rng = jax.random.PRNGKey(int(config.seed) + 1)
  num_batches = math.ceil(datasets.num_examples(config, split) / int(config.eval.batch_size))

  def units():
    for repeat in range(repeats):
      for index, batch in enumerate(datasets.get_eval_iterator(config, split, uniform_dequantization=False)):
        yield f'r{repeat}_b{index}', (repeat, index, batch)

  def compute(unit) -> dict[str, np.ndarray]:
    repeat, index, batch = unit
    levels = likelihood.levels_from_unit_interval(
        batch['image'], num_levels, f'bits/dim input batch {index} (repeat {repeat}) of the {split} split')
    rng = jax.random.fold_in(jax.random.fold_in(base_rng, repeat), index)
    levels = parallel.shard_batch(mesh, levels)
    bpd, _, nfe = bpd_fn(rng, score_fn, levels)
    mask = parallel.gather(batch['mask'])
    arrays = {'bpd': parallel.gather(bpd)[mask], 'nfe': parallel.gather(nfe)[mask]}
    if elbo_fn is not None:
      arrays['elbo_bpd'] = parallel.gather(elbo_fn(rng, score_fn, levels))[mask]
    if dequantizer is not None:
      arrays['deq_bpd'] = parallel.gather(bpd_fn(rng, score_fn, levels, dequantizer)[0])[mask]
      if elbo_fn is not None:
        arrays['deq_elbo_bpd'] = parallel.gather(elbo_fn(rng, score_fn, levels, dequantizer))[mask]
    return arrays

  bpds: list[list[np.ndarray]] = [[] for _ in range(repeats)]
  nfes: list[np.ndarray] = []
  others: dict[str, list[list[np.ndarray]]] = {}  # elbo_bpd, deq_bpd, deq_elbo_bpd: as bpds

  def postfix(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    running = np.concatenate([b for rows in bpds for b in rows])
    return {'bpd': f'{np.mean(running):.4f}', 'nfe': int(np.max(arrays['nfe'], initial=0))}

  started = time.time()
  for (repeat, _, _), arrays in rounds.resumable_rounds(
      run_dir, units(), compute, total=repeats * num_batches, desc=f'bits/dim {split} ckpt {ckpt}',
      show_progress=show_progress, postfix=postfix):
    bpds[repeat].append(arrays['bpd'])
    nfes.append(arrays['nfe'])
    for key in ('elbo_bpd', 'deq_bpd', 'deq_elbo_bpd'):
      if key in arrays:
        others.setdefault(key, [[] for _ in range(repeats)])[repeat].append(arrays[key])

  per_repeat = np.stack([np.concatenate(rows) for rows in bpds])  # (repeats, examples)
  nfe_all = np.concatenate(nfes)
  per_example = per_repeat.mean(axis=0)
  n = per_example.size
  failed = int(np.sum(~np.isfinite(per_repeat)))
  if failed:
    logging.error('bits/dim: %d solves hit the step limit (NaN); the mean is NaN.', failed)
  result = {
      'ckpt': ckpt if isinstance(ckpt, int) else str(ckpt),
      'bpd': float(per_repeat.mean()),
      'bpd_stderr': float(per_example.std(ddof=1) / math.sqrt(n)) if n > 1 else float('nan'),
      'bpd_per_repeat': [float(v) for v in per_repeat.mean(axis=1)],
      'uniform_bpd': math.log2(num_levels),
      'nfe_mean': float(nfe_all.mean()),
      'nfe_max': int(nfe_all.max()),
      'num_examples': int(n),
      'num_failed': failed,
      'seconds': round(time.time() - started, 1),
      'settings': settings,
  }
  for key, rows in others.items():
    values = np.stack([np.concatenate(r) for r in rows])
    result[key] = float(values.mean())
    result[key + '_stderr'] = float(values.mean(axis=0).std(ddof=1) / math.sqrt(n)) if n > 1 else float('nan')
    logging.info('%s %s ckpt %s: %.4f ± %.4f', key, split, ckpt, result[key], result[key + '_stderr'])
  logging.info('bits/dim %s ckpt %s: %.4f ± %.4f (%d examples × %d repeats, mean NFE %.1f)', split,
               ckpt, result['bpd'], result['bpd_stderr'], n, repeats, result['nfe_mean'])
  if jax.process_index() == 0:
    resumable.atomic_write(os.path.join(eval_dir, f'bpd_{split}_ckpt_{ckpt}.json'),
                           lambda f: f.write(json.dumps(result, indent=2).encode()))
  return result
