"""Command line: train, evaluate, sample, or compute dataset statistics.

  python main.py --config=configs/ve/digits_ncsnpp_continuous.py --workdir=runs/digits --mode=train
  python main.py --config=... --workdir=runs/digits --mode=train --allow_config_change  # resume, changed
  python main.py --config=... --workdir=runs/digits --mode=eval --eval_folder=eval
  python main.py --config=... --workdir=runs/digits --mode=sample [--checkpoint=3 | PATH | model.pth]
  python main.py --config=... --workdir=runs/digits --mode=fid_stats
  python main.py --config=... --workdir=runs/digits --mode=train_classifier  # into workdir/classifier
  python main.py --config=... --workdir=runs/digits --mode=train_deq  # dequantizer, into workdir/dequantizer
  python main.py --config=... --workdir=runs/digits --mode=sample --class_label=3 --guidance_scale=2
  python main.py --config=... --workdir=runs/digits --mode=sample --inpaint.mask=lower_half
  python main.py --config=... --workdir=runs/cifar10 --mode=import --checkpoint=checkpoint_26  # or a .pth
  python main.py --config=configs/qa/digits.py --workdir=runs/qa --mode=qa_calibrate  # anomaly threshold
  python main.py --config=configs/qa/digits.py --workdir=runs/qa --mode=qa --qa.input=inputs.npz
  python main.py --config=configs/vp/toy_gmm.py --workdir=runs/gmm --mode=visualize  # toy-lab PNGs

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

from scoresde.infra import host_allocator

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory of the run: checkpoints, samples, logs.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'fid_stats', 'qa', 'qa_calibrate',
                                    'import', 'train_classifier', 'train_deq', 'visualize'],
                  'What to do.')
flags.DEFINE_string('eval_folder', 'eval', 'Subdirectory of workdir for evaluation outputs.')
flags.DEFINE_string('qa.input', None, '--mode=qa: a .npy/.npz file of inputs (N, H, W, C) or a folder of '
                    'them, in the training data\'s space; reports go to workdir/qa/<name>/.')
flags.DEFINE_string('checkpoint', None, '--mode=sample, eval, qa, qa_calibrate, visualize: a checkpoint '
                    'index k '
                    '(checkpoints/checkpoint_k), a checkpoint directory, a score_sde_pytorch .pth file or a '
                    'score_sde (JAX) checkpoint file (the format is detected); default the newest (eval: '
                    'eval.begin_ckpt..end_ckpt). --mode=import: the reference checkpoint file to import.')
flags.DEFINE_bool('allow_config_change', False,
                  '--mode=train: resume a workdir whose recorded config.json differs in keys that change '
                  'what is learned (model, SDE, data, optimizer, ...); without it such a resume is refused. '
                  'n_iters, the log/eval/preemption frequencies, eval.* and sampling.* may always change '
                  '(run_lib.RESUME_MUTABLE_KEYS).')
flags.DEFINE_integer('class_label', None, '--mode=sample: guide every sample to this class (-1 cycles '
                     'through the classes); sets config.sampling.class_label and condition=class.')
flags.DEFINE_float('guidance_scale', None, '--mode=sample: the classifier guidance scale w (1 is Bayes\' '
                   'rule); sets config.sampling.guidance_scale and condition=class.')
flags.DEFINE_string('inpaint.input', None, '--mode=sample: images to inpaint, a .npy or .png (default the '
                    'test split); sets config.sampling.condition_input and condition=inpaint.')
flags.DEFINE_string('inpaint.mask', None, '--mode=sample: the region to fill in (lower_half, upper_half, '
                    'left_half, right_half, center) or a .png/.npy mask, 1 = known; sets '
                    'config.sampling.inpaint_mask and condition=inpaint.')
flags.DEFINE_string('coordinator_address', None, 'Multi-process: host:port of process 0.')
flags.DEFINE_integer('num_processes', 1, 'Multi-process: number of processes.')
flags.DEFINE_integer('process_id', 0, 'Multi-process: this process.')
flags.DEFINE_bool('keep_freed_memory', True, 'One CPU device on glibc: run its programs on this thread and '
                  'keep freed memory, so each training step reuses its temporaries instead of page-faulting '
                  'them in afresh (scoresde/infra/host_allocator.py); false leaves jax and malloc as they '
                  'start.')
flags.DEFINE_bool('jax_distributed', False, 'Call jax.distributed.initialize() with cluster auto-detection.')
flags.mark_flags_as_required(['config', 'workdir'])

# --mode=sample's shorthands: flag -> (the config.sampling key it sets, the condition it implies). The
# config keys stay the single source of truth; a flag only sets one.
CONDITION_FLAGS = {'class_label': ('class_label', 'class'),
                   'guidance_scale': ('guidance_scale', 'class'),
                   'inpaint.input': ('condition_input', 'inpaint'),
                   'inpaint.mask': ('inpaint_mask', 'inpaint')}


def apply_condition_flags(config, values: dict[str, object]) -> None:
  """Sets ``config.sampling``'s key for each condition flag given (``values``: flag name -> value, None
  when not given) and ``config.sampling.condition`` to the condition they imply, before the config is
  validated. A config that asks for another condition is an error, not silently overridden."""
  given = {name: value for name, value in values.items() if value is not None}
  if not given:
    return
  implied = {CONDITION_FLAGS[name][1] for name in given}
  flag_list = ', '.join(f'--{name}' for name in given)
  if len(implied) > 1:
    raise ValueError(f'{flag_list} ask for different conditions ({sorted(implied)}); give the flags of one.')
  condition = implied.pop()
  current = str(config.sampling.condition).lower()
  if current not in ('none', condition):
    raise ValueError(f'{flag_list} imply config.sampling.condition={condition!r}, but the config sets '
                     f'{current!r}; drop the flags or the --config.sampling.condition override.')
  config.sampling.condition = condition
  for name, value in given.items():
    config.sampling[CONDITION_FLAGS[name][0]] = value


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
  if FLAGS.keep_freed_memory and FLAGS.num_processes == 1 and not FLAGS.jax_distributed:
    host_allocator.inline_cpu_programs()  # before anything below starts jax's backends
  if FLAGS.num_processes > 1:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.jax_distributed:
    jax.distributed.initialize()
  config, workdir = FLAGS.config, FLAGS.workdir
  condition_flags = {name: FLAGS[name].value for name in CONDITION_FLAGS}
  if FLAGS.mode == 'sample':
    apply_condition_flags(config, condition_flags)
  elif any(value is not None for value in condition_flags.values()):
    raise app.UsageError(f'--{", --".join(CONDITION_FLAGS)} apply to --mode=sample only.')
  _log_to_file(workdir)
  logging.info('mode=%s workdir=%s process %d/%d, %d devices', FLAGS.mode, workdir, jax.process_index(),
               jax.process_count(), jax.device_count())
  if FLAGS.keep_freed_memory and host_allocator.keep_freed_memory():
    logging.info('one CPU device on glibc: its programs run on this thread and malloc keeps freed memory, '
                 'so each call reuses the temporaries of the last (scoresde/infra/host_allocator.py)')

  from scoresde import run_lib  # pylint: disable=import-outside-toplevel  (after jax.distributed.initialize)
  if FLAGS.mode == 'train':
    run_lib.train(config, workdir, allow_config_change=FLAGS.allow_config_change)
  elif FLAGS.mode == 'eval':
    run_lib.evaluate(config, workdir, FLAGS.eval_folder, checkpoint=FLAGS.checkpoint)
  elif FLAGS.mode == 'sample':
    from scoresde import generate  # pylint: disable=import-outside-toplevel
    out = generate.generate(config, workdir, checkpoint=FLAGS.checkpoint)
    logging.info('samples written to %s', out)
  elif FLAGS.mode == 'fid_stats':
    from scoresde.evaluation import sample_quality  # pylint: disable=import-outside-toplevel
    out = sample_quality.compute_dataset_stats(config)
    logging.info('dataset statistics written to %s', out)
  elif FLAGS.mode == 'train_classifier':
    from scoresde import classifier_training  # pylint: disable=import-outside-toplevel
    classifier_training.train_classifier(config, workdir, allow_config_change=FLAGS.allow_config_change)
  elif FLAGS.mode == 'train_deq':
    from scoresde import dequantization_training  # pylint: disable=import-outside-toplevel
    dequantization_training.train_dequantizer(config, workdir)
  elif FLAGS.mode == 'import':
    if not FLAGS.checkpoint:
      raise app.UsageError('--mode=import needs --checkpoint=PATH (a score_sde or score_sde_pytorch file).')
    out = run_lib.import_checkpoint(config, workdir, FLAGS.checkpoint)
    logging.info('imported %s into %s', FLAGS.checkpoint, out)
  elif FLAGS.mode == 'qa_calibrate':
    run_lib.qa_calibrate(config, workdir, checkpoint=FLAGS.checkpoint)
  elif FLAGS.mode == 'qa':
    run_lib.qa_check(config, workdir, FLAGS['qa.input'].value, checkpoint=FLAGS.checkpoint)
  elif FLAGS.mode == 'visualize':
    from scoresde import visualize  # pylint: disable=import-outside-toplevel
    out = visualize.visualize(config, workdir, checkpoint=FLAGS.checkpoint)
    logging.info('toy-lab figures written to %s', out)


if __name__ == '__main__':
  app.run(main)
