"""Command line for config sweeps (scoresde/sweep.py): launch a grid or list of overrides, or report on one.

  python sweep.py launch --config=configs/ve/digits_ncsnpp_continuous.py --root=runs/sweep1 \\
      --grid='optim.lr=[1e-3,2e-4]' --grid='model.nf=[16,32]' --set=training.n_iters=2000 \\
      --launcher=local --parallel=2 [--then_eval]
  python sweep.py launch ... --launcher=slurm --slurm.partition=gpu --slurm.time=04:00:00 --slurm.gpus_per_node=1
  python sweep.py launch ... --launcher=tpu_pod --tpu.name=my-pod --tpu.zone=us-central2-b  # writes commands
  python sweep.py launch ... --list=runs.json   # [{"optim.lr": 1e-3}, {"optim.lr": 2e-4, "model.nf": 64}]
  python sweep.py report --root=runs/sweep1     # root/report.{csv,md,png}

Every run is main.py --mode=train in root/<name>; launching the same sweep again resumes each run from its
newest checkpoint. Overrides are checked against the config (keys, types, and run_lib's config checks)
before anything starts.
"""

import os
import sys

from absl import app
from absl import flags

from scoresde import sweep

FLAGS = flags.FLAGS
flags.DEFINE_string('config', None, 'launch: the base config file, as main.py\'s --config.')
flags.DEFINE_string('root', None, 'The sweep\'s directory: root/sweep.json, one workdir per run, the report.')
flags.DEFINE_multi_string('grid', [], 'launch: KEY=[V1,V2,...]; the runs are the product of all --grid axes.')
flags.DEFINE_multi_string('set', [], 'launch: KEY=VALUE given to every run.')
flags.DEFINE_string('list', None, 'launch: a JSON file listing one {"KEY": VALUE} object per run, instead of '
                    '--grid.')
flags.DEFINE_enum('launcher', 'local', ['local', 'slurm', 'submitit_local', 'tpu_pod'], 'launch: where runs go.')
flags.DEFINE_integer('parallel', 1, 'launch: runs at a time (local; SLURM: the array\'s parallelism, 0 = no '
                     'limit).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'train_classifier'], 'launch: main.py --mode.')
flags.DEFINE_bool('then_eval', False, 'launch: after training, run main.py --mode=eval in the same job.')
flags.DEFINE_bool('check_configs', True, 'launch: also run run_lib.validate_config on every run\'s config '
                  '(imports JAX) before launching.')
flags.DEFINE_bool('wait', False, 'launch --launcher=slurm: wait for the jobs and print the summary.')
flags.DEFINE_string('slurm.partition', None, 'SLURM partition.')
flags.DEFINE_string('slurm.time', '60', 'SLURM time limit per job: minutes or [D-]HH:MM:SS; a run cut by it is '
                    'requeued and resumes.')
flags.DEFINE_integer('slurm.gpus_per_node', 1, 'GPUs per job.')
flags.DEFINE_integer('slurm.cpus_per_task', 8, 'CPUs per job.')
flags.DEFINE_string('slurm.account', None, 'SLURM account.')
flags.DEFINE_string('tpu.name', None, 'TPU-VM pod name.')
flags.DEFINE_string('tpu.zone', None, 'TPU-VM pod zone.')
flags.DEFINE_string('tpu.project', None, 'Google Cloud project (default gcloud\'s).')
flags.DEFINE_string('tpu.repo', f'~/{os.path.basename(sweep.REPO_ROOT)}', 'This repository\'s checkout on '
                    'every pod worker.')
flags.DEFINE_string('tpu.python', 'python3', 'The Python of the pod workers.')


def _sweep_overrides() -> list[dict]:
  fixed = dict(sweep.parse_assignment(spec) for spec in FLAGS['set'].value)
  if FLAGS['list'].value:
    if FLAGS.grid:
      raise app.UsageError('give --grid or --list, not both.')
    return [{**fixed, **overrides} for overrides in sweep.load_override_list(FLAGS['list'].value)]
  return sweep.expand_grid([sweep.parse_grid_axis(spec) for spec in FLAGS.grid], fixed)


def _check_configs(config, runs) -> None:
  from scoresde import run_lib  # pylint: disable=import-outside-toplevel  (JAX: only when asked)
  for run in runs:
    try:
      run_lib.validate_config(sweep.apply_overrides(config, run.overrides), 'train')
    except ValueError as e:
      raise sweep.SweepError(f'run {run.name}: {e}') from e


def _slurm_parameters() -> dict:
  parameters = {'timeout_min': sweep.slurm_minutes(FLAGS['slurm.time'].value),
                'gpus_per_node': FLAGS['slurm.gpus_per_node'].value,
                'cpus_per_task': FLAGS['slurm.cpus_per_task'].value,
                'name': os.path.basename(os.path.abspath(FLAGS.root)),
                # The job runs `python -m submitit...` which unpickles scoresde.sweep.SweepJob.
                'setup': [f'export PYTHONPATH={sweep.REPO_ROOT}:${{PYTHONPATH:-}}']}
  if FLAGS['slurm.partition'].value:
    parameters['partition'] = FLAGS['slurm.partition'].value
  if FLAGS['slurm.account'].value:
    parameters['account'] = FLAGS['slurm.account'].value
  if FLAGS.parallel > 0:
    parameters['array_parallelism'] = FLAGS.parallel
  return parameters


def launch() -> int:
  if not FLAGS.config or not FLAGS.root:
    raise app.UsageError('launch needs --config and --root.')
  config = sweep.load_config(FLAGS.config)
  runs = sweep.plan_runs(FLAGS.config, config, _sweep_overrides(), FLAGS.root, mode=FLAGS.mode,
                         then_eval=FLAGS.then_eval)
  if FLAGS.check_configs:
    _check_configs(config, runs)
  launcher = FLAGS.launcher
  if launcher == 'tpu_pod' and not (FLAGS['tpu.name'].value and FLAGS['tpu.zone'].value):
    raise app.UsageError('--launcher=tpu_pod needs --tpu.name and --tpu.zone.')
  manifest = sweep.write_manifest(FLAGS.root, FLAGS.config, launcher, runs)
  print(f'{len(runs)} runs, plan in {manifest}')
  if launcher == 'local':
    codes = sweep.launch_local(runs, FLAGS.parallel)
  elif launcher == 'tpu_pod':
    text = sweep.tpu_script(runs, FLAGS.config, tpu_name=FLAGS['tpu.name'].value, zone=FLAGS['tpu.zone'].value,
                            repo=FLAGS['tpu.repo'].value, project=FLAGS['tpu.project'].value,
                            python=FLAGS['tpu.python'].value)
    print(f'TPU-pod commands written to {sweep.write_tpu_script(FLAGS.root, text)}; run it where gcloud is '
          'set up.')
    return 0
  else:
    cluster = 'slurm' if launcher == 'slurm' else 'local'
    parameters = _slurm_parameters() if cluster == 'slurm' else {'timeout_min': 24 * 60}
    jobs = sweep.launch_submitit(runs, os.path.join(FLAGS.root, 'submitit'), cluster, parameters)
    print('submitted jobs ' + ', '.join(str(job.job_id) for job in jobs))
    if cluster == 'slurm' and not FLAGS.wait:
      return 0
    codes = sweep.wait_submitit(jobs)
  print(sweep.summary(runs, codes))
  return int(any(codes))


def report() -> int:
  if not FLAGS.root:
    raise app.UsageError('report needs --root.')
  paths = sweep.write_report(FLAGS.root)
  with open(paths['md'], encoding='utf-8') as f:
    print(f.read())
  print('written: ' + ', '.join(paths.values()))
  return 0


def main(argv):
  commands = {'launch': launch, 'report': report}
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f'give one command: {" or ".join(commands)} (got {argv[1:]}).')
  try:
    return commands[argv[1]]()
  except sweep.SweepError as e:
    print(f'sweep.py: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  app.run(main)
