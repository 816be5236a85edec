"""Training throughput: steps/s and examples/s of the compiled training step (run_lib.build_multi_step).

Random data of the config's shape (scaled as the data would be), the real loss, optimizer and EMA, on
every local device. Compilation is timed separately; then ``--calls`` host calls of ``n_jitted_steps``
steps each are timed after one warm-up call.

Defaults: the embedded digits config (its own batch size and n_jitted_steps) and the CIFAR-10 NCSN++
(configs/ve/cifar10_ncsnpp_continuous.py, 62.8M parameters) at batch 4, one step per call.

  .venv/bin/python benchmarks/train_throughput.py
  .venv/bin/python benchmarks/train_throughput.py --configs=ve.toy_gmm --batch_size=256
"""

from __future__ import annotations

import importlib
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
from scoresde import losses
from scoresde.infra import parallel
from scoresde import run_lib
from scoresde import sde_lib
from scoresde.models import utils as mutils

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['ve.digits_ncsnpp_continuous', 've.cifar10_ncsnpp_continuous'],
                  'Config modules under configs/.')
flags.DEFINE_list('batch_sizes', ['0', '4'], 'Global batch per config (0: the config\'s own).')
flags.DEFINE_list('n_jitted_steps', ['0', '1'], 'Steps per host call per config (0: the config\'s own).')
flags.DEFINE_integer('calls', 3, 'Timed host calls per config.')


def benchmark(config, calls: int) -> dict[str, float]:
  """Compile time, steps/s and examples/s of ``calls`` host calls after a warm-up call."""
  mesh = parallel.data_mesh()
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  optimizer = losses.get_optimizer(config)
  state = parallel.replicate(mesh, losses.init_train_state(jax.random.PRNGKey(1), variables['params'],
                                                           optimizer))
  sde = sde_lib.get_sde(config)
  multi_step = run_lib.build_multi_step(config, sde, model, optimizer, mesh)
  n = int(config.training.n_jitted_steps)
  shape = (n, config.training.batch_size // jax.process_count()) + tuple(datasets.data_shape(config))
  scaler = datasets.get_data_scaler(config)
  rng = np.random.default_rng(0)

  def batches():
    return parallel.shard_batch(mesh, scaler(rng.random(shape, dtype=np.float32)), axis=1)

  start = time.perf_counter()
  state, metrics = multi_step(state, batches())
  jax.block_until_ready(metrics)
  compile_and_first = time.perf_counter() - start
  timed = []
  for _ in range(calls):
    data = batches()
    start = time.perf_counter()
    state, metrics = multi_step(state, data)
    jax.block_until_ready(metrics)
    timed.append(time.perf_counter() - start)
  seconds_per_step = float(np.median(timed)) / n
  return {'params': mutils.param_count(variables), 'compile_s': compile_and_first,
          'steps_per_s': 1. / seconds_per_step,
          'examples_per_s': config.training.batch_size / seconds_per_step,
          'loss': float(np.asarray(metrics['loss'])[-1])}


def main(argv):
  del argv
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}')
  for i, name in enumerate(FLAGS.configs):
    config = importlib.import_module(f'configs.{name}').get_config()
    batch = int(FLAGS.batch_sizes[i]) if i < len(FLAGS.batch_sizes) else 0
    n_jitted = int(FLAGS.n_jitted_steps[i]) if i < len(FLAGS.n_jitted_steps) else 0
    if batch:
      config.training.batch_size = batch
    if n_jitted:
      config.training.n_jitted_steps = n_jitted
    parallel.check_batch_size(config.training.batch_size)
    r = benchmark(config, FLAGS.calls)
    print(f'{name}: {r["params"]:,} params, batch {config.training.batch_size}, '
          f'{config.training.n_jitted_steps} steps/call: compile+first call {r["compile_s"]:.1f} s, '
          f'{r["steps_per_s"]:.3f} steps/s, {r["examples_per_s"]:.1f} examples/s (loss {r["loss"]:.3g})',
          flush=True)


if __name__ == '__main__':
  app.run(main)
