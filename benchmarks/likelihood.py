"""Wall time, NFE and bits/dim of the probability-flow likelihood (likelihood.get_likelihood_fn).

Two models at rtol = atol = 1e-5 (the reference's tolerances), one Rademacher probe, eps = 1e-5:

- digits: configs/ve/digits_ncsnpp_continuous.py on the first test batch, with the newest checkpoint
  of ``--workdir`` if it has one, else randomly initialised weights (said in the output);
- CIFAR-10-shaped NCSN++ (configs/ve/cifar10_ncsnpp_continuous.py, random init, batch 4 of random
  8-bit images). A full solve is minutes per function evaluation on a small CPU, so by default the
  solve is cut after ``--cifar_steps`` solver steps (6 evaluations each, plus 1) to measure the time per
  evaluation inside the real solver; the full-solve time is that times an NFE, extrapolated and printed
  as such. ``--cifar_full`` runs the whole solve instead.

Compilation is timed separately; the timed run is a second call with fresh noise and probes.

  .venv/bin/python benchmarks/likelihood.py [--workdir=runs/digits_ve] [--cifar_full]
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scoresde import datasets  # pylint: disable=g-import-not-at-top
from scoresde import likelihood
from scoresde import sde_lib
from scoresde.models import utils as mutils

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Digits training workdir whose newest checkpoint to load.')
flags.DEFINE_integer('digits_batch', 16, 'Test digits per likelihood call.')
flags.DEFINE_integer('cifar_steps', 2, 'Solver steps of the NFE-limited CIFAR-shaped run.')
flags.DEFINE_bool('cifar_full', False, 'Run the whole CIFAR-shaped solve instead of a limited one.')
flags.DEFINE_bool('skip_cifar', False, 'Only benchmark the digits model.')

TOL = 1e-5


def _load_config(module: str):
  return importlib.import_module(module).get_config()


def _variables(config, workdir: str | None):
  """(model, variables, description): the newest checkpoint of ``workdir``, else a random init."""
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  if workdir and os.path.isdir(os.path.join(workdir, 'checkpoints')):
    from scoresde import checkpointing  # pylint: disable=import-outside-toplevel  (training helper's module)
    variables, step = checkpointing.load_variables(config, workdir)
    return model, variables, f'EMA checkpoint at step {step} of {workdir}'
  return model, variables, 'random init (no trained checkpoint given)'


def _timed(fn, rng, score_fn, levels):
  start = time.perf_counter()
  bpd, _, nfe = fn(rng, score_fn, levels)
  bpd, nfe = np.asarray(bpd), np.asarray(nfe)
  return time.perf_counter() - start, bpd, nfe


def _bench(name, config, levels, variables_from, max_steps=4096):
  sde = sde_lib.get_sde(config)
  model, variables, source = variables_from
  fn = likelihood.get_likelihood_fn(
      sde, datasets.get_data_inverse_scaler(config), num_levels=config.data.num_levels,
      hutchinson_type='rademacher', num_probes=1, rtol=TOL, atol=TOL, eps=1e-5, method='dopri5',
      max_steps=max_steps)
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  first, _, _ = _timed(fn, jax.random.PRNGKey(1), score_fn, levels)
  wall, bpd, nfe = _timed(fn, jax.random.PRNGKey(2), score_fn, levels)
  print(f'[{name}] {source}; {mutils.param_count(variables):,} parameters; batch {levels.shape[0]} '
        f'of {levels.shape[1:]} ({config.data.num_levels} levels)')
  print(f'[{name}] compile + first call {first:.1f} s; timed call {wall:.1f} s; NFE mean '
        f'{nfe.mean():.1f}, max {nfe.max()} (batched evaluations: {nfe.max()}); '
        f'{wall / nfe.max() * 1e3:.1f} ms per batched evaluation')
  return wall, bpd, nfe


def main(argv):
  del argv
  print(f'likelihood benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
        f'jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, '
        f'rtol = atol = {TOL}, dopri5, 1 Rademacher probe, eps = 1e-5')

  config = _load_config('configs.ve.digits_ncsnpp_continuous')
  config.eval.batch_size = FLAGS.digits_batch
  batch = next(iter(datasets.get_eval_iterator(config, 'test', uniform_dequantization=False)))
  levels = likelihood.levels_from_unit_interval(batch['image'], config.data.num_levels)
  _, bpd, _ = _bench('digits', config, levels, _variables(config, FLAGS.workdir))
  print(f'[digits] bits/dim {bpd.mean():.3f} ± {bpd.std(ddof=1) / math.sqrt(bpd.size):.3f} on '
        f'{bpd.size} test digits (uniform baseline log2({config.data.num_levels}) = '
        f'{math.log2(config.data.num_levels):.3f})')

  if FLAGS.skip_cifar:
    return
  config = _load_config('configs.ve.cifar10_ncsnpp_continuous')
  levels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.int32)
  max_steps = 4096 if FLAGS.cifar_full else FLAGS.cifar_steps
  wall, bpd, nfe = _bench('cifar10-shaped', config, levels, _variables(config, None), max_steps)
  if FLAGS.cifar_full:
    print(f'[cifar10-shaped] bits/dim {bpd.mean():.3f} (random weights, random images)')
  else:
    per_eval = wall / nfe.max()
    print(f'[cifar10-shaped] solve cut after {max_steps} steps ({nfe.max()} evaluations, bits/dim '
          f'not meaningful); extrapolated full solve: {per_eval:.2f} s x NFE, e.g. '
          + ', '.join(f'{n} NFE -> {per_eval * n / 60:.0f} min' for n in (100, 200, 500)))


if __name__ == '__main__':
  app.run(main)
