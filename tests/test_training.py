"""Sharded training end to end, on a toy MLP so that it stays fast.

Runs ``run_lib.train`` in subprocesses (tests/training_worker.py) with 1 or 4 CPU devices, with two
processes on 127.0.0.1, and killed/terminated mid-run and resumed, and compares the final parameters:

- 1 vs 4 devices, same global batch: equal to within a relative error of 1e-5 (float32 reductions are
  re-associated across devices; measured ~1.5e-6);
- two processes: bit-identical on both processes, and within 1e-5 of the one-process run;
- SIGTERM saves and exits 0 (with two processes, a SIGTERM to one stops both at the same step);
  SIGKILL then resume: bit-identical to the uninterrupted run (same device count, same compiled
  program, same data and keys).
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from scoresde import checkpointing
from scoresde import datasets
from scoresde import run_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / 'tests' / 'training_worker.py'
sys.path.insert(0, str(ROOT / 'tests'))
import training_worker  # pylint: disable=wrong-import-position

TIMEOUT = 240
REL_TOL = 1e-5


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _start(workdir, out, devices=1, overrides=None, extra=(), env=None):
  """The worker in a subprocess; ``env`` adds environment variables (e.g. its fault hooks)."""
  cmd = ['timeout', '-s', 'KILL', str(TIMEOUT), sys.executable, str(WORKER), f'--workdir={workdir}',
         f'--out={out}', f'--overrides={json.dumps(overrides or {})}', *extra]
  log = open(str(out) + '.log', 'w', encoding='utf-8')  # pylint: disable=consider-using-with
  return subprocess.Popen(cmd, cwd=ROOT, env={**_env(devices), **(env or {})}, stdout=log,
                          stderr=subprocess.STDOUT)


def _finish(proc, out):
  rc = proc.wait(TIMEOUT + 10)
  assert rc == 0, f'worker exited {rc}:\n' + pathlib.Path(str(out) + '.log').read_text()[-4000:]
  return dict(np.load(out))


def _run(workdir, out, devices=1, overrides=None):
  return _finish(_start(workdir, out, devices, overrides), out)


def _max_rel_diff(a, b):
  keys = [k for k in a if k != 'step']
  assert sorted(keys) == sorted(k for k in b if k != 'step')
  return max(float(np.max(np.abs(a[k] - b[k])) / (np.max(np.abs(a[k])) + 1e-12)) for k in keys)


def _assert_identical(a, b):
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted one-device run, with snapshot sampling on."""
  tmp = tmp_path_factory.mktemp('reference')
  out = _run(tmp / 'work', tmp / 'params.npz', overrides={'training.snapshot_sampling': True})
  return tmp / 'work', out


def test_reference_run_outputs(reference):
  workdir, out = reference
  assert int(out['step']) == 60
  for k in (30, 60):
    assert (workdir / 'samples' / f'iter_{k}' / 'sample.png').exists()
    samples = np.load(workdir / 'samples' / f'iter_{k}' / 'samples.npz')['samples']
    assert samples.shape == (64, 2) and np.all(np.isfinite(samples))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['checkpoint_1', 'checkpoint_2']
  assert [p.name for p in (workdir / 'checkpoints-meta').iterdir()] == ['checkpoint_60']
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines if 'training_loss' in l] == [10, 20, 30, 40, 50, 60]
  assert [l['step'] for l in lines if 'eval_loss' in l] == [20, 40, 60]
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))


def test_one_vs_four_devices_same_parameters(reference, tmp_path):
  _, one = reference
  four = _run(tmp_path / 'work', tmp_path / 'params.npz', devices=4)
  report = json.loads((tmp_path / 'params.npz.json').read_text())
  assert report['device_count'] == 4
  assert report['bad_batch_error'] == ('config.training.batch_size=6 must be divisible by the number of '
                                       'devices (4); use a multiple of 4.')
  assert _max_rel_diff(one, four) < REL_TOL


@pytest.mark.multiprocess
def test_two_processes_identical_parameters(reference, tmp_path):
  _, one = reference
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [_start(tmp_path / 'work', tmp_path / f'params{i}.npz', devices=2,
                  extra=('--num_processes=2', f'--process_id={i}', f'--port={port}')) for i in range(2)]
  outs = [_finish(p, tmp_path / f'params{i}.npz') for i, p in enumerate(procs)]
  assert json.loads((tmp_path / 'params0.npz.json').read_text())['process_count'] == 2
  _assert_identical(outs[0], outs[1])
  assert _max_rel_diff(one, outs[0]) < REL_TOL


def _wait_for_checkpoint(directory: pathlib.Path, newer_than: int, proc) -> int:
  deadline = time.time() + TIMEOUT
  while time.time() < deadline:
    steps = [int(p.name.split('_')[1]) for p in directory.glob('checkpoint_*')
             if re.fullmatch(r'checkpoint_\d+', p.name)] if directory.exists() else []
    if steps and max(steps) > newer_than:
      return max(steps)
    assert proc.poll() is None, 'the worker ended before it could be interrupted'
    time.sleep(0.02)
  raise TimeoutError(f'no checkpoint in {directory}')


def _meta_steps(workdir):
  return sorted(int(p.name.split('_')[1]) for p in (workdir / 'checkpoints-meta').iterdir()
                if re.fullmatch(r'checkpoint_\d+', p.name))


def test_sigterm_saves_and_kill9_resumes_exactly(reference, tmp_path):
  _, uninterrupted = reference
  workdir, out = tmp_path / 'work', tmp_path / 'params.npz'

  proc = _start(workdir, out)
  _wait_for_checkpoint(workdir / 'checkpoints-meta', 0, proc)
  proc.send_signal(signal.SIGTERM)
  stopped = _finish(proc, out)  # exit status 0
  stopped_at = int(stopped['step'])
  assert 0 < stopped_at < 60
  assert _meta_steps(workdir) == [stopped_at]
  log = pathlib.Path(str(out) + '.log').read_text()
  assert f'saved the preemption checkpoint at step {stopped_at}' in log

  proc = _start(workdir, out)
  killed_after = _wait_for_checkpoint(workdir / 'checkpoints-meta', stopped_at, proc)
  proc.kill()
  proc.wait()
  assert not out.exists() or int(np.load(out)['step']) == stopped_at  # the killed run wrote nothing
  assert killed_after < 60

  resumed = _run(workdir, out)
  log = pathlib.Path(str(out) + '.log').read_text()
  assert re.search(r'resumed from the preemption checkpoint \d+ at step (\d+)', log)
  assert int(resumed['step']) == 60
  _assert_identical(uninterrupted, resumed)


def test_non_finite_loss_stops_without_overwriting(tmp_path, monkeypatch):
  config = training_worker.tiny_toy_config({'training.n_iters': 20})
  real_iterator = datasets.get_train_iterator

  def poisoned(cfg, start_step=0, **kwargs):
    for k, batch in enumerate(real_iterator(cfg, start_step, **kwargs), start=start_step):
      if k == 7:
        batch = {'image': np.full_like(batch['image'], np.nan)}
      yield batch
  monkeypatch.setattr(datasets, 'get_train_iterator', poisoned)
  with pytest.raises(FloatingPointError, match=r'non-finite training loss \(nan\).*at step 8 '
                     r'\(the update from state.step=7\)'):
    run_lib.train(config, str(tmp_path))
  assert _meta_steps(tmp_path) == [5]
  assert not list((tmp_path / 'checkpoints').glob('checkpoint_*'))
  manager = checkpointing.preemption_manager(str(tmp_path))
  assert checkpointing.read_meta(manager, 5)['step'] == 5
  manager.close()


def test_evaluate_and_load_variables(reference):
  workdir, out = reference
  config = training_worker.tiny_toy_config({'eval.batch_size': 1000})  # 4096 = 4·1000 + a padded 96
  variables, step = checkpointing.load_variables(config, str(workdir))
  assert step == 60
  ema = {k[len('ema'):]: v for k, v in out.items() if k.startswith('ema')}
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(variables['params'])[0]}
  assert sorted(flat) == sorted(ema)
  for k, v in flat.items():
    np.testing.assert_array_equal(v, ema[k])
  _, step1 = checkpointing.load_variables(config, str(workdir), checkpoint=1, ema=False)
  assert step1 == 30

  config.eval.begin_ckpt, config.eval.end_ckpt = 1, 2
  results = run_lib.evaluate(config, str(workdir), 'eval')
  assert sorted(results) == [1, 2]
  for k in (1, 2):
    saved = np.load(workdir / 'eval' / f'ckpt_{k}_loss.npz')
    summary = json.loads((workdir / 'eval' / f'ckpt_{k}_loss.json').read_text())
    assert saved['all_losses'].shape == (datasets.TOY_EVAL_SIZE,)
    assert summary['num_examples'] == datasets.TOY_EVAL_SIZE
    assert summary['mean_loss'] == pytest.approx(float(np.mean(saved['all_losses'])), rel=1e-5)
  with pytest.raises(FileNotFoundError, match='checkpoint 7 not found'):
    checkpointing.load_variables(config, str(workdir), checkpoint=7)


@pytest.mark.multiprocess
def test_two_processes_sigterm_to_one_stops_both_at_the_same_step(tmp_path):
  """JAX's preemption sync point: SIGTERM reaches process 0 only; both save at the same step, exit 0."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'work'
  procs = [_start(workdir, tmp_path / f'params{i}.npz', overrides={'training.n_iters': 400},
                  extra=('--num_processes=2', f'--process_id={i}', f'--port={port}')) for i in range(2)]
  _wait_for_checkpoint(workdir / 'checkpoints-meta', 0, procs[1])
  procs[0].send_signal(signal.SIGTERM)
  outs = [_finish(p, tmp_path / f'params{i}.npz') for i, p in enumerate(procs)]
  stopped_at = int(outs[0]['step'])
  assert 0 < stopped_at < 400
  _assert_identical(outs[0], outs[1])
  assert _meta_steps(workdir) == [stopped_at]
