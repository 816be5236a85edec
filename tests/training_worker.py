"""Runs ``run_lib.train`` in its own process for tests/test_training.py and saves what it ended with.

  XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/training_worker.py \
      --workdir=DIR --out=params.npz --overrides='{"training.n_iters": 60}' \
      [--num_processes=2 --process_id=0 --port=PORT]

Writes ``out`` (this process's final params and EMA params, flattened, plus the step) only when training
returns; ``out + '.json'`` records the device count and the messages of deliberately bad configs.

Faults on request (tests/test_faults.py), by environment variable: the worker SIGKILLs itself
- ``WORKER_KILL_AT_STEP=k``: when it fetches training batch k, i.e. once the state has reached step k (after
  the checkpoints of step k, if any), in the middle of assembling the next host call's batches;
- ``WORKER_KILL_IN_SAVE=k``: inside the first checkpoint save of a training step >= k, once orbax has written
  the temporary directory and before it renames it into place.
"""

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_toy_config(overrides: dict):
  """The VE toy-GMM config shrunk to a small MLP and a few dozen steps."""
  from configs.ve import toy_gmm  # pylint: disable=import-outside-toplevel
  config = toy_gmm.get_config()
  config.model.nf = 32
  config.model.num_layers = 2
  config.model.num_scales = 20
  config.training.batch_size = 16
  config.training.n_iters = 60
  config.training.n_jitted_steps = 5
  config.training.log_freq = 10
  config.training.eval_freq = 20
  config.training.snapshot_freq = 30
  config.training.snapshot_freq_for_preemption = 5
  config.training.snapshot_sampling = False
  config.training.snapshot_batch_size = 64
  config.eval.batch_size = 512
  config.optim.warmup = 10
  config.optim.lr = 1e-2
  config.model.ema_rate = 0.9
  for key, value in overrides.items():
    group, name = key.split('.')
    config[group][name] = value
  return config


def _die():
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def install_fault_hooks(environ) -> None:
  """Arms the ``WORKER_KILL_AT_STEP`` / ``WORKER_KILL_IN_SAVE`` faults described in the module docstring."""
  from scoresde import checkpointing  # pylint: disable=import-outside-toplevel
  from scoresde import datasets  # pylint: disable=import-outside-toplevel
  if 'WORKER_KILL_AT_STEP' in environ:
    kill_at, real_iterator = int(environ['WORKER_KILL_AT_STEP']), datasets.get_train_iterator

    def get_train_iterator(config, start_step=0, **kwargs):
      for k, batch in enumerate(real_iterator(config, start_step, **kwargs), start=start_step):
        if k == kill_at:
          print(f'WORKER_KILL_AT_STEP: killing myself at step {k}', flush=True)
          _die()
        yield batch
    datasets.get_train_iterator = get_train_iterator
  if 'WORKER_KILL_IN_SAVE' in environ:
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
    kill_from, real_save = int(environ['WORKER_KILL_IN_SAVE']), checkpointing.save
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    armed = []

    def save(manager, index, state, meta):
      if meta['step'] >= kill_from:
        armed.append((str(manager.directory), index, meta['step']))
      real_save(manager, index, state, meta)

    async def finalize(self):
      if armed:
        print(f'WORKER_KILL_IN_SAVE: killing myself before renaming {self.get()} into place '
              f'(checkpoint {armed[0][1]} of {armed[0][0]}, step {armed[0][2]})', flush=True)
        _die()
      return await real_finalize(self)
    checkpointing.save = save
    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--overrides', default='{}')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--port', type=int, default=0)
  args = parser.parse_args()

  import logging  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(filename)s] %(message)s')
  logging.getLogger().handlers[0].addFilter(
      lambda r: r.levelno >= logging.WARNING or 'orbax' not in r.pathname)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{args.port}',
                               num_processes=args.num_processes, process_id=args.process_id)
  from scoresde.infra import parallel  # pylint: disable=import-outside-toplevel
  from scoresde import run_lib  # pylint: disable=import-outside-toplevel

  install_fault_hooks(os.environ)
  config = tiny_toy_config(json.loads(args.overrides))
  report = {'device_count': jax.device_count(), 'process_count': jax.process_count()}
  bad = tiny_toy_config(json.loads(args.overrides))
  bad.training.batch_size = jax.device_count() + 2
  try:
    run_lib.validate_config(bad)
  except ValueError as e:
    report['bad_batch_error'] = str(e)
  with open(args.out + '.json', 'w', encoding='utf-8') as f:
    json.dump(report, f)

  state = run_lib.train(config, args.workdir)
  flat = {}
  for prefix, tree in (('params', state.params), ('ema', state.params_ema)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      flat[prefix + jax.tree_util.keystr(path)] = parallel.to_host(leaf)
  flat['step'] = np.asarray(int(state.step))
  np.savez(args.out, **flat)


if __name__ == '__main__':
  main()
