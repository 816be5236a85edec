"""Config sweeps (scoresde/sweep.py, sweep.py): grid expansion, run names, override validation before
anything starts, the TPU-pod command file (run through bash with a recording fake gcloud), the report
from synthetic workdirs, the submitit job's requeue; and for real, a 2x2 local sweep of the digits
default at 4 steps with its report, and one toy run through submitit's local executor.
"""

import csv
import json
import os
import pathlib
import pickle
import shlex
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from scoresde import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = 'configs/ve/digits_ncsnpp_continuous.py'
TOY = 'configs/ve/toy_gmm.py'
TIMEOUT = 900
SUBMITIT_MISSING = 'submitit is not installed; it is listed in requirements-test.txt'
# The cheapest real digits run: 4 steps, a checkpoint at the end, no eval loss, no snapshot samples, one
# resolution without attention (a third of the compile time).
TINY = ['training.n_iters=4', 'training.log_freq=2', 'training.snapshot_sampling=False',
        'training.batch_size=8', 'model.ch_mult=(1,)', 'model.attn_resolutions=()', 'optim.warmup=0']


def _env() -> dict:
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(ROOT)}


def _cli(*args, timeout=TIMEOUT) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / 'sweep.py'), *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout, check=False)


def _digits():
  return sweep.load_config(str(ROOT / DIGITS))


# ----------------------------------------------------------------------------------------------------
# Grids, names, validation


def test_grid_axes_parse_literals_and_bare_strings():
  assert sweep.parse_grid_axis('optim.lr=[1e-3,2e-4]') == ('optim.lr', [1e-3, 2e-4])
  assert sweep.parse_grid_axis('config.sampling.method=[pc, edm_sde]') == ('sampling.method', ['pc', 'edm_sde'])
  assert sweep.parse_grid_axis('model.ch_mult=[(1,2),(1,2,2)]') == ('model.ch_mult', [(1, 2), (1, 2, 2)])
  assert sweep.parse_grid_axis('model.name=[ncsnpp, (1, 2), True]') == ('model.name', ['ncsnpp', (1, 2), True])
  assert sweep.parse_assignment('training.n_iters=20') == ('training.n_iters', 20)
  with pytest.raises(sweep.SweepError, match=r'bracketed list.*use --set'):
    sweep.parse_grid_axis('optim.lr=1e-3')
  with pytest.raises(sweep.SweepError, match='KEY=VALUE'):
    sweep.parse_assignment('optim.lr')


def test_grid_is_the_cartesian_product_with_the_fixed_keys():
  runs = sweep.expand_grid([('optim.lr', [1e-3, 2e-4]), ('model.nf', [8, 16, 32])], {'training.n_iters': 20})
  assert len(runs) == 6
  assert runs[0] == {'training.n_iters': 20, 'optim.lr': 1e-3, 'model.nf': 8}
  assert runs[-1] == {'training.n_iters': 20, 'optim.lr': 2e-4, 'model.nf': 32}
  assert len({json.dumps(r, sort_keys=True) for r in runs}) == 6
  with pytest.raises(sweep.SweepError, match=r"\['optim.lr'\] given more than once"):
    sweep.expand_grid([('optim.lr', [1.]), ('model.nf', [8])], {'optim.lr': 2.})


def test_run_names_are_readable_unique_and_filesystem_safe():
  runs = sweep.expand_grid([('optim.lr', [1e-3, 2e-4]), ('model.ch_mult', [(1, 2), (1, 2, 2)])],
                           {'training.n_iters': 20})
  assert sweep.run_names(runs) == ['lr=0.001,ch_mult=1-2', 'lr=0.001,ch_mult=1-2-2',
                                   'lr=0.0002,ch_mult=1-2', 'lr=0.0002,ch_mult=1-2-2']
  # Two varying keys ending alike keep their full names; odd characters become '_'.
  same_end = [{'training.batch_size': 8, 'eval.batch_size': 8}, {'training.batch_size': 16, 'eval.batch_size': 8},
              {'training.batch_size': 16, 'eval.batch_size': 32}]
  assert sweep.run_names(same_end) == ['training.batch_size=8,eval.batch_size=8',
                                       'training.batch_size=16,eval.batch_size=8',
                                       'training.batch_size=16,eval.batch_size=32']
  odd = sweep.run_names([{'data.path': '/a b/../c'}, {'data.path': '/a b/../d'}, {'data.path': '/a_b/../d'}])
  assert odd == ['path=_a_b_.._c', 'path=_a_b_.._d', 'path=_a_b_.._d_2']
  long = sweep.run_names([{'data.path': 'x' * 300 + str(i)} for i in range(2)])
  assert len(set(long)) == 2 and all(len(n) <= sweep.MAX_NAME_LENGTH for n in long)
  assert sweep.run_names([{}]) == ['base']


def test_overrides_are_checked_against_the_config():
  config = _digits()
  assert sweep.validate_overrides(config, {'optim.lr': 1, 'model.ch_mult': [1, 2, 2], 'seed': 3}) == {
      'optim.lr': 1.0, 'model.ch_mult': (1, 2, 2), 'seed': 3}
  cases = [({'optim.lrr': 1e-3}, r'config.optim.lrr does not exist in the base config; did you mean optim.lr'),
           ({'modl.nf': 8}, r'config.modl.nf does not exist'),
           ({'model.nf': 8.5}, r'config.model.nf=8.5 \(float\).*give an integer, e.g. model.nf=32'),
           ({'model.nf': '8'}, r'give an integer'),
           ({'training.snapshot_sampling': 1}, r'give True or False'),
           ({'optim.lr': True}, r'give a number'),
           ({'sampling.method': 3}, r'give a string'),
           ({'model.ch_mult': 2}, r'give a tuple'),
           ({'model.fir_kernel': (1, 3, 3, 1)}, r'config.model.fir_kernel is a list.*make it a tuple'),
           ({'optim': 1}, r'config.optim is a group of keys')]
  for overrides, message in cases:
    with pytest.raises(sweep.SweepError, match=message):
      sweep.validate_overrides(config, overrides)


def test_bad_overrides_are_refused_before_anything_is_written_or_launched(tmp_path):
  config = _digits()
  with pytest.raises(sweep.SweepError, match='model.nff does not exist'):
    sweep.plan_runs(DIGITS, config, [{'model.nf': 8}, {'model.nff': 16}], str(tmp_path))
  with pytest.raises(sweep.SweepError, match='runs 0 and 1 have the same overrides'):
    sweep.plan_runs(DIGITS, config, [{'optim.lr': 1e-3}, {'optim.lr': 0.001}], str(tmp_path))
  for grid, message in [('model.nff=[8,16]', 'config.model.nff does not exist'),
                        ('model.nf=[8,16.5]', 'config.model.nf=16.5 (float)')]:
    root = tmp_path / 'cli'
    proc = _cli('launch', f'--config={DIGITS}', f'--root={root}', '--grid=optim.lr=[1e-3,2e-4]', f'--grid={grid}',
                timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert not root.exists()  # no plan, no workdir: nothing started


def test_commands_pass_every_override_as_a_config_flag(tmp_path):
  runs = sweep.plan_runs(DIGITS, _digits(), [{'optim.lr': 2e-4, 'model.ch_mult': (1, 2, 2)}, {'optim.lr': 1e-3}],
                         str(tmp_path / 'root'), then_eval=True)
  train, evaluate = runs[0].commands
  assert train == (sys.executable, sweep.MAIN_PY, f'--config={ROOT / DIGITS}', '--config.optim.lr=0.0002',
                   '--config.model.ch_mult=(1, 2, 2)', f'--workdir={tmp_path / "root" / runs[0].name}',
                   '--mode=train')
  assert evaluate[-1] == '--mode=eval' and evaluate[:-1] == train[:-1]
  path = sweep.write_manifest(str(tmp_path / 'root'), DIGITS, 'local', runs)
  manifest = json.loads(pathlib.Path(path).read_text())
  assert [r['name'] for r in manifest['runs']] == [r.name for r in runs]
  assert manifest['runs'][0]['commands'][0] == list(train) and manifest['launcher'] == 'local'


def test_a_list_file_gives_one_run_per_object(tmp_path):
  path = tmp_path / 'runs.json'
  path.write_text(json.dumps([{'optim.lr': 1e-3}, {'config.model.nf': 16, 'model.ch_mult': [1, 2, 2]}]))
  runs = sweep.plan_runs(DIGITS, _digits(), sweep.load_override_list(str(path)), str(tmp_path / 'root'))
  assert [r.overrides for r in runs] == [{'optim.lr': 1e-3}, {'model.nf': 16, 'model.ch_mult': (1, 2, 2)}]
  assert [r.name for r in runs] == ['lr=0.001', 'nf=16,ch_mult=1-2-2']
  path.write_text('{"optim.lr": 1e-3}')
  with pytest.raises(sweep.SweepError, match='expected a JSON list of objects'):
    sweep.load_override_list(str(path))
  with pytest.raises(sweep.SweepError, match='--list=.*missing.json'):
    sweep.load_override_list(str(tmp_path / 'missing.json'))


def test_slurm_time_limits():
  assert [sweep.slurm_minutes(t) for t in ['90', '01:30:00', '30:30', '1-00', '2-01:00:30']] == [
      90, 90, 31, 1440, 2941]
  with pytest.raises(sweep.SweepError, match='--slurm.time'):
    sweep.slurm_minutes('1h')


# ----------------------------------------------------------------------------------------------------
# TPU pods


def test_tpu_pod_script_runs_every_worker_with_jax_distributed_and_survives_quoting(tmp_path):
  tricky = "it's a \"b\" $HOME"
  overrides = [{'optim.lr': 1e-3, 'data.path': tricky, 'model.ch_mult': (1, 2, 2)},
               {'optim.lr': 2e-4, 'data.path': tricky, 'model.ch_mult': (1, 2, 2)}]
  root = ROOT / 'runs' / 'sweep_test_tpu'  # inside the repository: given relative to it on the pod
  runs = sweep.plan_runs(DIGITS, _digits(), overrides, str(root), then_eval=True)
  text = sweep.tpu_script(runs, str(ROOT / DIGITS), tpu_name='my-pod', zone='us-central2-b',
                          repo='~/score sde', project='proj')
  script = tmp_path / sweep.TPU_COMMANDS_FILE
  script.write_text(text)
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  record = tmp_path / 'calls.jsonl'
  (bin_dir / 'gcloud').write_text(f'#!{sys.executable}\nimport json, sys\n'
                                  f'open({str(record)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n')
  (bin_dir / 'gcloud').chmod(0o755)
  subprocess.run(['bash', str(script)], env={**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}'},
                 check=True, capture_output=True, timeout=60)
  calls = [json.loads(line) for line in record.read_text().splitlines()]
  assert len(calls) == 2
  for run, call in zip(runs, calls):
    assert call[:8] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod', '--zone=us-central2-b', '--worker=all',
                        '--project=proj']
    assert call[8].startswith('--command=cd ~/')
    remote = shlex.split(call[8][len('--command='):])
    assert remote[:3] == ['cd', '~/score sde', '&&']  # (the remote shell expands ~)
    train = remote[3:remote.index('&&', 3)]
    evaluate = remote[remote.index('&&', 3) + 1:]
    workdir = f'--workdir=runs/sweep_test_tpu/{run.name}'
    assert train == ['python3', 'main.py', f'--config={DIGITS}', f'--config.optim.lr={run.overrides["optim.lr"]!r}',
                     f'--config.data.path={tricky}', '--config.model.ch_mult=(1, 2, 2)', workdir, '--mode=train',
                     '--jax_distributed']
    assert evaluate == train[:-2] + ['--mode=eval', '--jax_distributed']
  assert not root.exists()


# ----------------------------------------------------------------------------------------------------
# Report


def _fake_run(root: pathlib.Path, name: str, losses, n_iters: int, eval_files=None, tail: str = ''):
  workdir = root / name
  (workdir / 'eval').mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps({'training': {'n_iters': n_iters}}))
  lines = [json.dumps({'step': s, 'training_loss': v, 'grad_norm': 1.}) for s, v in losses]
  (workdir / 'metrics.jsonl').write_text('\n'.join(lines) + '\n' + tail)
  for file, content in (eval_files or {}).items():
    (workdir / 'eval' / file).write_text(json.dumps(content))


def test_report_gathers_metrics_and_eval_results(tmp_path):
  root = tmp_path / 'sweep'
  runs = [sweep.Run(name, str(root / name), {'optim.lr': lr, 'model.nf': 8}, ('train',), ())
          for name, lr in [('lr=0.001', 1e-3), ('lr=0.0002', 2e-4), ('lr=5e-05', 5e-5)]]
  sweep.write_manifest(str(root), DIGITS, 'local', runs)
  # Resumed at step 10 (steps 10 and 20 logged again: the later records win), evaluated twice.
  _fake_run(root, 'lr=0.001', [(10, 3.0), (20, 2.5), (10, 2.9), (20, 2.4), (30, 2.0)], 30,
            {'ckpt_1_loss.json': {'ckpt': 1, 'mean_loss': 9.}, 'ckpt_3_loss.json': {'ckpt': 3, 'mean_loss': 2.1},
             'bpd_test_ckpt_3.json': {'bpd': 2.25, 'bpd_stderr': 0.01, 'deq_bpd': 2.1, 'settings': {'x': 1}},
             'report_ckpt_3.json': {'fid': 12.5, 'is': 3.1, 'kid': 0.02}})
  # Killed while writing a line: it is skipped.
  _fake_run(root, 'lr=0.0002', [(10, 4.0), (20, 3.5)], 30, tail='{"step": 30, "trai')
  rows, curves = sweep.gather(str(root))
  assert [r['status'] for r in rows] == ['finished', 'incomplete', 'not started']
  first = rows[0]
  assert first['step'] == 30 and first['training_loss'] == 2.0 and first['eval_ckpt'] == '3'
  assert (first['eval_mean_loss'], first['bpd'], first['bpd_stderr'], first['fid'], first['kid']) == (
      2.1, 2.25, 0.01, 12.5, 0.02)
  assert first['deq_bpd'] == 2.1 and 'elbo_bpd' not in first  # reported when the eval wrote it
  assert curves['lr=0.001'] == [(10, 2.9), (20, 2.4), (30, 2.0)]
  assert rows[1]['step'] == 20 and rows[1]['training_loss'] == 3.5 and 'bpd' not in rows[1]

  paths = sweep.write_report(str(root))
  with open(paths['csv'], encoding='utf-8') as f:
    table = list(csv.DictReader(f))
  assert [r['run'] for r in table] == ['lr=0.001', 'lr=0.0002', 'lr=5e-05']
  assert float(table[0]['bpd']) == 2.25 and float(table[1]['training_loss']) == 3.5 and table[2]['bpd'] == ''
  assert 'eval_loss' not in table[0]  # no run logged one: no empty column
  markdown = pathlib.Path(paths['md']).read_text()
  assert 'Common to all runs: `model.nf=8`' in markdown
  assert '| run | optim.lr | status |' in markdown and '| lr=0.001 | 0.001 | finished | 30 |' in markdown
  image = np.asarray(Image.open(paths['png']).convert('RGB'))
  for colour in sweep.PALETTE[:2]:  # one line per run that logged
    assert np.all(image == colour, axis=-1).sum() > 50
  assert not np.all(image == sweep.PALETTE[2], axis=-1).any()


def test_report_without_a_sweep_names_the_fix(tmp_path):
  with pytest.raises(sweep.SweepError, match='is .* the --root of a launched sweep'):
    sweep.gather(str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# The submitit job: requeue on preemption


def test_checkpoint_stops_the_training_process_and_requeues_the_same_job(tmp_path):
  submitit = pytest.importorskip('submitit', reason=SUBMITIT_MISSING)
  stopped = tmp_path / 'stopped'
  child = ('import pathlib, signal, sys, time\n'
           f'signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(stopped)!r}).write_text("saved"), '
           'sys.exit(0)))\n'
           'print("handler " + "set", flush=True)\n'  # (the log also holds the command, not this line)
           'time.sleep(120)\n')
  log = tmp_path / 'run' / sweep.CONSOLE_FILE
  job = sweep.SweepJob([[sys.executable, '-c', child]], str(log))
  result = {}
  thread = threading.Thread(target=lambda: result.update(code=job()))
  thread.start()
  for _ in range(600):  # until the child runs (seconds)
    if job._proc is not None and 'handler set' in (log.read_text() if log.exists() else ''):  # pylint: disable=protected-access
      break
    thread.join(0.1)
  requeued = job.checkpoint()
  thread.join(30)
  assert stopped.read_text() == 'saved' and result == {'code': 0}
  assert isinstance(requeued, submitit.helpers.DelayedSubmission)
  copy = pickle.loads(pickle.dumps(requeued.function))
  assert isinstance(copy, sweep.SweepJob) and copy.commands == job.commands and copy.log_path == str(log)
  assert copy._proc is None  # pylint: disable=protected-access


def test_a_failed_run_fails_its_job(tmp_path):
  job = sweep.SweepJob([[sys.executable, '-c', 'raise SystemExit(3)'], ['false']], str(tmp_path / 'log.txt'))
  with pytest.raises(RuntimeError, match='exited with code 3'):
    job()


# ----------------------------------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope='module')
def digits_sweep(tmp_path_factory):
  """The 2x2 sweep (learning rate x width) of the digits default, 2 runs at a time, and its report."""
  root = tmp_path_factory.mktemp('sweep') / 'digits'
  launch = _cli('launch', f'--config={DIGITS}', f'--root={root}', '--grid=optim.lr=[1e-3,2e-3]',
                '--grid=model.nf=[8,16]', *(f'--set={s}' for s in TINY), '--parallel=2')
  report = _cli('report', f'--root={root}', timeout=120)
  return root, launch, report


def test_local_sweep_runs_the_grid_and_reports_it(digits_sweep):
  root, launch, report = digits_sweep
  assert launch.returncode == 0, launch.stdout[-2000:] + launch.stderr[-3000:]
  assert '4/4 runs succeeded' in launch.stdout
  names = ['lr=0.001,nf=8', 'lr=0.001,nf=16', 'lr=0.002,nf=8', 'lr=0.002,nf=16']
  manifest = json.loads((root / sweep.MANIFEST_FILE).read_text())
  assert [r['name'] for r in manifest['runs']] == names
  for name in names:
    assert (root / name / 'checkpoints' / 'checkpoint_1').is_dir()
    assert '--mode=train' in (root / name / sweep.CONSOLE_FILE).read_text()
    config = json.loads((root / name / 'config.json').read_text())
    lr, nf = (part.split('=')[1] for part in name.split(','))
    assert config['training']['n_iters'] == 4 and config['model']['nf'] == int(nf)
    assert config['optim']['lr'] == float(lr) and config['optim']['warmup'] == 0

  assert report.returncode == 0, report.stderr[-3000:]
  with open(root / 'report.csv', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == names
  assert all(r['status'] == 'finished' and r['step'] == '4' for r in rows)
  losses = [float(r['training_loss']) for r in rows]
  assert all(np.isfinite(losses)) and len(set(losses)) == 4  # four different runs
  markdown = (root / 'report.md').read_text()
  assert markdown.count('| finished |') == 4 and '`training.n_iters=4`' in markdown
  assert Image.open(root / 'report.png').size == (900, 520)


def test_submitit_local_executor_runs_a_tiny_run(tmp_path, monkeypatch):
  pytest.importorskip('submitit', reason=SUBMITIT_MISSING)
  monkeypatch.chdir(ROOT)
  for key, value in _env().items():
    monkeypatch.setenv(key, value)
  root = tmp_path / 'toy'
  runs = sweep.plan_runs(TOY, sweep.load_config(str(ROOT / TOY)),
                         [{'training.n_iters': 3, 'training.snapshot_sampling': False, 'model.nf': 16,
                           'training.batch_size': 16}], str(root))
  jobs = sweep.launch_submitit(runs, str(root / 'submitit'), 'local', {'timeout_min': 15})
  assert sweep.wait_submitit(jobs) == [0], (root / runs[0].name / sweep.CONSOLE_FILE).read_text()[-3000:]
  workdir = pathlib.Path(runs[0].workdir)
  assert (workdir / 'checkpoints' / 'checkpoint_1').is_dir()
  assert sweep.read_metrics(str(workdir / 'metrics.jsonl'))['training_loss'][-1][0] == 3
