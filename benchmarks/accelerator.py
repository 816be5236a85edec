"""One accelerator run, one markdown table: training, sampling and likelihood of the paper's CIFAR-10 models.

Written for a lent GPU (issue 16): the whole script is meant to finish in under 8 minutes and print one
header line (jax version, backend, device kind, date) and one markdown table, each row printed as soon as
it is measured. Models: NCSN++ (configs/ve/cifar10_ncsnpp_continuous.py) and DDPM++
(configs/vp/cifar10_ddpmpp_continuous.py), random-init weights (timing does not depend on the weights,
except the ODE likelihood's NFE).

Rows, in this order (``--time_budget_s`` skips the rest once exceeded, printing 'skipped: budget'):

1. training steps/s at the paper's batch (``config.training.batch_size``) with the config's
   ``n_jitted_steps``, float32 and bfloat16 (``config.training.dtype``): the step the trainer runs
   (``run_lib.build_multi_step``), via ``train_throughput.benchmark`` — compile + first call timed apart,
   then the median of ``--train_calls`` timed calls;
2. the ODE likelihood (``likelihood.get_likelihood_fn``, dopri5, rtol = atol = 1e-5, one Rademacher
   probe, as benchmarks/likelihood.py) of DDPM++ on ``--lik_batch`` random 8-bit images, float32, with
   its NFE. Its (near-)zero-initialised kernels (``init_scale = 0``) are replaced by small random ones, so the
   score is not the trivial linear one that an adaptive solver crosses in a few steps;
3. sampling images/s at ``--sample_batch``: PC with the config's own predictor/corrector, run for
   ``--pc_steps`` steps of the same loop and extrapolated to N = ``config.model.num_scales`` (as
   benchmarks/sampling.py's ``_bench_pc``), and the fast samplers heun (18 steps), dpm_solver++ (35) and
   edm_sde (18) through ``sampling.get_sampling_fn``; float32 rows first, then bfloat16
   (``config.sampling.dtype``). Compile + first call timed apart from a second, timed call;
4. anomaly detection (issue 11): inputs/s of ``--mode=qa``'s residual at 64x64x4 with
   configs/qa/latents.py's network, K = 8 at the recipe's one σ, ``--qa_batch`` inputs per call
   (``benchmarks/qa.py``'s ``throughput``), float32.

``--small`` swaps in tiny models (nf 8, one residual block per resolution, 8x8x1 digits-like images,
batches 4 / 4 / 2, 2 PC steps) so the whole script can be smoke-tested on a CPU in a few minutes: its
figures are not a benchmark. ``--only=train,likelihood,sample`` picks row groups; ``--lik_perturb`` sets the
std of the likelihood row's random kernels (with random weights its NFE is not a trained model's).

  python benchmarks/accelerator.py                 # on the accelerator
  .venv/bin/python benchmarks/accelerator.py --small   # CPU smoke test
"""

from __future__ import annotations

import datetime
import importlib
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import qa as qa_bench  # pylint: disable=g-import-not-at-top  (benchmarks/qa.py)
import sampling as sampling_bench  # benchmarks/sampling.py
import train_throughput  # benchmarks/train_throughput.py
from scoresde import datasets
from scoresde import likelihood
from scoresde import sampling
from scoresde import sde_lib
from scoresde.infra import parallel
from scoresde.models import utils as mutils

FLAGS = flags.FLAGS
flags.DEFINE_float('time_budget_s', 420., 'Skip the remaining rows once this many seconds have passed.')
flags.DEFINE_bool('small', False, 'Tiny models and batches: a CPU smoke test, not a benchmark.')
flags.DEFINE_integer('sample_batch', 64, 'Images per sampler call.')
flags.DEFINE_integer('pc_steps', 20, 'PC steps actually run; the full N = num_scales is extrapolated.')
flags.DEFINE_integer('train_calls', 10, 'Timed training calls (n_jitted_steps steps each).')
flags.DEFINE_integer('lik_batch', 4, 'Random images per likelihood call.')
flags.DEFINE_float('lik_perturb', 0.02, 'Std of the random kernels that replace the (near-)zero-initialised '
                   'ones for the likelihood row (0: keep them; the score is then ~0 and the NFE trivial).')
flags.DEFINE_integer('qa_batch', 64, 'Inputs per call of the anomaly-detection row (64x64x4).')
flags.DEFINE_list('only', ['train', 'likelihood', 'sample', 'qa'], 'Row groups to run (the others are left out).')

MODELS = (('NCSN++', 've.cifar10_ncsnpp_continuous'), ('DDPM++', 'vp.cifar10_ddpmpp_continuous'))
FAST = (('heun', 18), ('dpm_solver++', 35), ('edm_sde', 18))
DTYPES = ('float32', 'bfloat16')
LIK_TOL = 1e-5


def load_config(module: str, small: bool):
  config = importlib.import_module(f'configs.{module}').get_config()
  if small:
    config.model.nf = 8
    config.model.num_res_blocks = 1
    config.model.ch_mult = (1, 2)
    config.model.attn_resolutions = (4,)
    config.data.image_size = 8
    config.data.num_channels = 1
    config.training.batch_size = 4
    config.training.n_jitted_steps = 1
  mutils.validate_model_config(config)
  return config


class Table:
  """Prints the table's rows as they come and skips them once the time budget is spent."""

  COLUMNS = ('task', 'model', 'dtype', 'batch', 'NFE / steps', 'compile + 1st call (s)', 'timed (s)',
             'result', 'note')

  def __init__(self, budget_s: float):
    self.start = time.perf_counter()
    self.budget_s = budget_s
    print('| ' + ' | '.join(self.COLUMNS) + ' |')
    print('|' + '---|' * len(self.COLUMNS), flush=True)

  def row(self, task: str, model: str, dtype: str, measure) -> None:
    """``measure()`` -> (batch, nfe, compile_s, timed_s, result, note), unless over budget."""
    if time.perf_counter() - self.start > self.budget_s:
      cells = (task, model, dtype, '', '', '', '', 'skipped: budget', '')
    else:
      try:
        batch, nfe, compile_s, timed_s, result, note = measure()
        cells = (task, model, dtype, batch, nfe, f'{compile_s:.1f}', f'{timed_s:.2f}', result, note)
      except Exception as e:  # pylint: disable=broad-except  (one failed row must not lose the rest)
        cells = (task, model, dtype, '', '', '', '', 'failed', f'{type(e).__name__}: {str(e)[:160]}')
    print('| ' + ' | '.join(str(c).replace('|', '/') for c in cells) + ' |', flush=True)


def train_row(config, dtype: str, calls: int):
  config = config.copy_and_resolve_references()
  config.training.dtype = dtype
  parallel.check_batch_size(config.training.batch_size)
  r = train_throughput.benchmark(config, calls)
  n = int(config.training.n_jitted_steps)
  return (config.training.batch_size, f'{calls} x {n} steps', r['compile_s'], calls * n / r['steps_per_s'],
          f'**{r["steps_per_s"]:.2f} steps/s** ({r["examples_per_s"]:,.0f} ex/s)',
          f'{r["params"]:,} params; median call; loss {r["loss"]:.3g}')


def _perturb_zero_kernels(variables, scale: float = 0.02):
  """Replaces every (near-)zero kernel (ndim >= 2, max |w| < 1e-4: the ``init_scale = 0`` layers, drawn
  at variance scale 1e-10) by ``scale`` · N(0, 1)."""
  leaves, treedef = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  new, count = [], 0
  for key, leaf in zip(keys, leaves):
    if leaf.ndim >= 2 and np.max(np.abs(np.asarray(leaf))) < 1e-4:
      leaf = scale * jax.random.normal(key, leaf.shape, leaf.dtype)
      count += 1
    new.append(leaf)
  return {**variables, 'params': jax.tree.unflatten(treedef, new)}, count


def likelihood_row(config, batch: int):
  config = config.copy_and_resolve_references()
  config.sampling.dtype = 'float32'
  sde = sde_lib.get_sde(config)
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  count = 0
  if FLAGS.lik_perturb > 0:
    variables, count = _perturb_zero_kernels(variables, FLAGS.lik_perturb)
  fn = likelihood.get_likelihood_fn(
      sde, datasets.get_data_inverse_scaler(config), num_levels=config.data.num_levels,
      hutchinson_type='rademacher', num_probes=1, rtol=LIK_TOL, atol=LIK_TOL, eps=1e-5, method='dopri5')
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  shape = (batch,) + tuple(datasets.data_shape(config))
  levels = np.random.default_rng(0).integers(0, config.data.num_levels, shape).astype(np.int32)

  def timed(rng):
    start = time.perf_counter()
    bpd, _, nfe = fn(rng, score_fn, levels)
    bpd, nfe = np.asarray(bpd), np.asarray(nfe)
    return time.perf_counter() - start, bpd, nfe

  first, _, _ = timed(jax.random.PRNGKey(1))
  wall, bpd, nfe = timed(jax.random.PRNGKey(2))
  return (batch, f'{nfe.mean():.0f} (max {nfe.max()})', first, wall, f'**{wall / batch:.3f} s/image**',
          f'dopri5 rtol=atol={LIK_TOL:g}, 1 probe; {count} zero kernels randomised (std '
          f'{FLAGS.lik_perturb:g}: NFE not a trained model\'s); '
          f'{wall / nfe.max() * 1e3:.1f} ms/evaluation; bpd {bpd.mean():.2f} (meaningless)')


def _sample_timed(sampler, score_fn):
  first, _, _ = sampling_bench._timed(sampler, jax.random.PRNGKey(0), score_fn)  # pylint: disable=protected-access
  wall, x, nfe = sampling_bench._timed(sampler, jax.random.PRNGKey(1), score_fn)  # pylint: disable=protected-access
  if not np.all(np.isfinite(x)):
    raise FloatingPointError('non-finite samples')
  return first, wall, int(np.max(nfe))


def pc_row(config, model, variables, batch: int, steps: int):
  config = config.copy_and_resolve_references()
  config.sampling.method = 'pc'
  full_n = int(config.model.num_scales)
  sde = sampling_bench._cut_sde(config, steps)  # pylint: disable=protected-access
  shape = (batch,) + tuple(datasets.data_shape(config))
  sampler = sampling.get_sampling_fn(config, sde, shape, datasets.get_data_inverse_scaler(config))
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  first, wall, nfe = _sample_timed(sampler, score_fn)
  full_nfe = nfe * full_n // steps
  full_s = wall / nfe * full_nfe
  return (batch, f'{full_nfe} (ran {nfe})', first, wall, f'**{batch / full_s:.2f} images/s** (extrapolated)',
          f'{config.sampling.predictor} + {config.sampling.corrector}, N = {full_n}: {steps} steps timed, '
          f'full run ≈ {full_s:.0f} s')


def fast_row(config, model, variables, batch: int, method: str, num_steps: int):
  config = config.copy_and_resolve_references()
  config.sampling.method = method
  config.sampling.num_steps = num_steps
  sde = sde_lib.get_sde(config)
  shape = (batch,) + tuple(datasets.data_shape(config))
  sampler = sampling.get_sampling_fn(config, sde, shape, datasets.get_data_inverse_scaler(config))
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  first, wall, nfe = _sample_timed(sampler, score_fn)
  return (batch, nfe, first, wall, f'**{batch / wall:.2f} images/s**', f'num_steps = {num_steps}')


def qa_row(batch: int):
  r = qa_bench.throughput(batch, (0.05,), calls=2, show=False)
  return (batch, f'{r["num_draws"]} per input', r['compile_seconds'], r['seconds_per_batch'],
          f'**{r["inputs_per_second"]:.1f} inputs/s**', f'64x64x4, {r["params"]:,} params, sigma = 0.05')


def main(argv):
  del argv
  small = FLAGS.small
  sample_batch = 4 if small else FLAGS.sample_batch
  pc_steps = 2 if small else FLAGS.pc_steps
  train_calls = 2 if small else FLAGS.train_calls
  lik_batch = 2 if small else FLAGS.lik_batch
  device = jax.devices()[0]
  print(f'# jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} x '
        f'{device.device_kind}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC'
        + (' — --small: tiny models, a smoke test, NOT a benchmark' if small else ''), flush=True)
  print()
  configs = {name: load_config(module, small) for name, module in MODELS}
  table = Table(FLAGS.time_budget_s)

  for name, _ in MODELS if 'train' in FLAGS.only else ():
    for dtype in DTYPES:
      table.row('train', name, dtype, lambda c=configs[name], d=dtype: train_row(c, d, train_calls))
  if 'likelihood' in FLAGS.only:
    table.row('ODE likelihood', 'DDPM++', 'float32', lambda: likelihood_row(configs['DDPM++'], lik_batch))
  models = {}
  for dtype in DTYPES if 'sample' in FLAGS.only else ():
    for name, _ in MODELS:
      config = configs[name].copy_and_resolve_references()
      config.sampling.dtype = dtype
      if name not in models and time.perf_counter() - table.start <= table.budget_s:
        models[name] = mutils.init_model(jax.random.PRNGKey(0), configs[name])
      model, variables = models.get(name, (None, None))
      table.row('sample: PC', name, dtype,
                lambda c=config, m=model, v=variables: pc_row(c, m, v, sample_batch, pc_steps))
      for method, num_steps in FAST:
        table.row(f'sample: {method}', name, dtype,
                  lambda c=config, m=model, v=variables, k=method, s=num_steps: fast_row(
                      c, m, v, sample_batch, k, s))
  if 'qa' in FLAGS.only:
    table.row('qa residual', 'qa/latents', 'float32', lambda: qa_row(2 if small else FLAGS.qa_batch))
  print()
  print(f'Random-init weights (timing does not depend on the weights, except the ODE likelihood\'s NFE); '
        f'training: the trainer\'s step (run_lib.build_multi_step), config n_jitted_steps, compile + first '
        f'call apart; sampling: compile + first call, then one timed call; PC extrapolated from '
        f'{pc_steps} steps. Total {time.perf_counter() - table.start:.0f} s '
        f'(budget {FLAGS.time_budget_s:.0f} s).', flush=True)


if __name__ == '__main__':
  app.run(main)
