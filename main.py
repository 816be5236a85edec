"""Command line: train, evaluate, sample, or compute dataset statistics.

  python main.py --config=configs/ve/digits_ncsnpp_continuous.py --workdir=runs/digits --mode=train
  python main.py --config=... --workdir=runs/digits --mode=train --allow_config_change  # resume, changed
  python main.py --config=... --workdir=runs/digits --mode=eval --eval_folder=eval
  python main.py --config=... --workdir=runs/digits --mode=sample [--checkpoint=3 | PATH | model.pth]
  python main.py --config=... --workdir=runs/digits --mode=fid_stats

Any config key can be overridden, e.g. ``--config.training.batch_size=32``. Several processes (hosts):
pass ``--num_processes``, ``--process_id`` and ``--coordinator_address`` (or ``--jax_distributed`` to let
JAX detect a cluster such as SLURM) and run the same command on every host.
"""

import logging as py_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory of the run: checkpoints, samples, logs.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'fid_stats'], 'What to do.')
flags.DEFINE_string('eval_folder', 'eval', 'Subdirectory of workdir for evaluation outputs.')
flags.DEFINE_string('checkpoint', None, '--mode=sample: a checkpoint index k (checkpoints/checkpoint_k), '
                    'a checkpoint directory, or a score_sde_pytorch .pth file; default the newest.')
flags.DEFINE_bool('allow_config_change', False,
                  '--mode=train: resume a workdir whose recorded config.json differs in keys that change '
                  'what is learned (model, SDE, data, optimizer, ...); without it such a resume is refused. '
                  'n_iters, the log/eval/preemption frequencies, eval.* and sampling.* may always change '
                  '(run_lib.RESUME_MUTABLE_KEYS).')
flags.DEFINE_string('coordinator_address', None, 'Multi-process: host:port of process 0.')
flags.DEFINE_integer('num_processes', 1, 'Multi-process: number of processes.')
flags.DEFINE_integer('process_id', 0, 'Multi-process: this process.')
flags.DEFINE_bool('jax_distributed', False, 'Call jax.distributed.initialize() with cluster auto-detection.')
flags.mark_flags_as_required(['config', 'workdir'])


def _not_orbax_info(record: py_logging.LogRecord) -> bool:
  """Orbax logs several INFO lines per checkpoint; keep its warnings and errors only."""
  return record.levelno >= py_logging.WARNING or 'orbax' not in record.pathname


def _log_to_file(workdir: str) -> None:
  """Mirror the log into workdir/stdout.txt (appending across restarts)."""
  os.makedirs(workdir, exist_ok=True)
  name = 'stdout.txt' if jax.process_index() == 0 else f'stdout_{jax.process_index()}.txt'
  handler = py_logging.FileHandler(os.path.join(workdir, name))
  handler.setFormatter(py_logging.Formatter('%(levelname)s %(asctime)s %(filename)s:%(lineno)d] %(message)s'))
  handler.addFilter(_not_orbax_info)
  py_logging.getLogger().addHandler(handler)
  logging.get_absl_handler().addFilter(_not_orbax_info)


def main(argv):
  del argv
  if FLAGS.num_processes > 1:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.jax_distributed:
    jax.distributed.initialize()
  config, workdir = FLAGS.config, FLAGS.workdir
  _log_to_file(workdir)
  logging.info('mode=%s workdir=%s process %d/%d, %d devices', FLAGS.mode, workdir, jax.process_index(),
               jax.process_count(), jax.device_count())

  from scoresde import run_lib  # pylint: disable=import-outside-toplevel  (after jax.distributed.initialize)
  if FLAGS.mode == 'train':
    run_lib.train(config, workdir, allow_config_change=FLAGS.allow_config_change)
  elif FLAGS.mode == 'eval':
    run_lib.evaluate(config, workdir, FLAGS.eval_folder)
  elif FLAGS.mode == 'sample':
    from scoresde import generate  # pylint: disable=import-outside-toplevel
    out = generate.generate(config, workdir, checkpoint=FLAGS.checkpoint)
    logging.info('samples written to %s', out)
  elif FLAGS.mode == 'fid_stats':
    from scoresde.evaluation import sample_quality  # pylint: disable=import-outside-toplevel
    out = sample_quality.compute_dataset_stats(config)
    logging.info('dataset statistics written to %s', out)


if __name__ == '__main__':
  app.run(main)
