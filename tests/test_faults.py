"""Faults survived, as tests: a training run killed, its checkpoints damaged, its disk full, its config
changed on resume, and non-finite weights or data given to sampling and bits/dim.

- SIGKILL at 5 steps drawn by a seeded generator (alternately between steps and inside a checkpoint
  write), each followed by a resume: the final parameters equal the uninterrupted run's bit for bit;
- the newest checkpoints truncated and garbled: the resume falls back to the newest good one with
  warnings naming the bad ones, which are renamed ``*.corrupt``, and training continues exactly; when
  none restores, a clear error and nothing renamed;
- disk full or read-only during a save (an OSError injected where orbax renames its finished temporary
  directory): an OSError naming the cause, the checkpoint, the directory and the previous checkpoint,
  which restores; replacing a checkpoint of the same index keeps the old one until the new one is whole;
- resuming with a changed config: refused naming the keys, allowed for n_iters, frequencies, eval.* and
  sampling.*, and with ``--allow_config_change`` (main.py);
- non-finite weights to ``--mode=sample`` and non-finite data to bits/dim: ValueErrors naming the cause,
  raised before anything is compiled.

Subprocesses run tests/training_worker.py (its ``WORKER_KILL_*`` hooks) and main.py; the rest trains the
toy MLP in this process.
"""

import errno
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scoresde import gaussian_mixture
from scoresde import checkpointing
from scoresde import datasets
from scoresde.evaluation import bits_per_dim
from scoresde import generate
from scoresde import likelihood
from scoresde import losses
from scoresde import run_lib
from scoresde import sde_lib
from scoresde.models import utils as mutils
from orbax.checkpoint._src.path import atomicity

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
import training_worker  # pylint: disable=wrong-import-position
from test_training import (  # pylint: disable=wrong-import-position
    TIMEOUT, _assert_identical, _env, _finish, _start)


def _config(**overrides):
  """The worker's toy config without eval-loss evaluations (one compile fewer per run)."""
  return training_worker.tiny_toy_config({'training.eval_freq': 1000, **overrides})


def _assert_same_tree(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _garble(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xff for b in data[middle:middle + 64])
  path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
  os.truncate(path, path.stat().st_size // 2)


# ----------------------------------------------------------------------------------------------------
# SIGKILL anywhere


KILL_RUN = {'training.n_iters': 24, 'training.n_jitted_steps': 1, 'training.snapshot_freq_for_preemption': 3,
            'training.snapshot_freq': 8, 'training.log_freq': 4, 'training.eval_freq': 1000}


@pytest.mark.slow
def test_sigkill_at_seeded_random_steps_resumes_bit_exactly(tmp_path):
  """Kills at steps [12, 15, 18]: after batch k is fetched, or inside the first checkpoint write of a
  step >= k (before orbax renames it into place), alternately. (Three kills, not more: each is a process
  start and a compile, the slowest part of the suite.)"""
  kills = sorted(int(k) for k in np.random.default_rng(0).choice(np.arange(1, 24), 3, replace=False))
  hooks = ['WORKER_KILL_AT_STEP', 'WORKER_KILL_IN_SAVE', 'WORKER_KILL_AT_STEP']
  reference = _start(tmp_path / 'reference', tmp_path / 'reference.npz', overrides=KILL_RUN)  # meanwhile
  workdir, out = tmp_path / 'work', tmp_path / 'params.npz'
  resumed_at = []
  for k, hook in zip(kills, hooks):
    proc = _start(workdir, out, overrides=KILL_RUN, env={hook: str(k)})
    rc = proc.wait(TIMEOUT + 10)
    log = pathlib.Path(str(out) + '.log').read_text()
    killed = rc in (-signal.SIGKILL, 128 + signal.SIGKILL)  # `timeout` re-raises its child's signal
    assert killed and f'{hook}: killing myself' in log, f'rc {rc}:\n{log[-4000:]}'
    assert not out.exists()
    resumed = re.search(r'resumed from the \w+ checkpoint \d+ at step (\d+)', log)
    resumed_at.append(int(resumed.group(1)) if resumed else 0)
    assert resumed_at[-1] <= k
  print(f'killed at {list(zip(kills, hooks))}; the runs started at steps {resumed_at}')
  assert resumed_at[0] == 0 and all(s > 0 for s in resumed_at[1:])

  final = _finish(_start(workdir, out, overrides=KILL_RUN), out)
  assert int(final['step']) == 24
  _assert_identical(_finish(reference, tmp_path / 'reference.npz'), final)


# ----------------------------------------------------------------------------------------------------
# Damaged checkpoints


def test_damaged_newest_checkpoints_fall_back_to_the_newest_good_one(tmp_path, caplog):
  workdir = tmp_path / 'work'
  run_lib.train(_config(**{'training.n_iters': 15, 'training.snapshot_freq': 10}), str(workdir))
  # Step 15 is in the preemption checkpoint 15 and the permanent 2; step 10 in the permanent 1.
  preemption = workdir / 'checkpoints-meta' / 'checkpoint_15'
  permanent = workdir / 'checkpoints' / 'checkpoint_2'
  truncated = _largest_file(preemption)
  _truncate(truncated)
  _garble(_largest_file(permanent))  # orbax restores this without complaint: only the checksums notice

  config = _config(**{'training.n_iters': 25, 'training.snapshot_freq': 10})
  with caplog.at_level(logging.INFO):
    state = run_lib.train(config, str(workdir))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  for bad in (preemption, permanent):
    assert any(w.startswith(f'could not restore the checkpoint {bad} ') for w in warnings), warnings
    moved = f'moved the checkpoint {bad}, which could not be restored, aside to {bad}.corrupt'
    assert any(w.startswith(moved) for w in warnings), warnings
  assert any('is corrupt: the restored state.' in w and 'checksum' in w for w in warnings), warnings
  assert 'resumed from the permanent checkpoint 1 at step 10' in caplog.text
  set_aside = pathlib.Path(str(preemption) + '.corrupt')
  assert (set_aside / truncated.relative_to(preemption)).exists()  # kept, not deleted
  assert pathlib.Path(str(permanent) + '.corrupt').is_dir()
  assert int(state.step) == 25
  _assert_same_tree(state, run_lib.train(config, str(tmp_path / 'uninterrupted')))


def test_no_restorable_checkpoint_is_a_clear_error_and_renames_nothing(tmp_path):
  workdir = tmp_path / 'work'
  config = _config(**{'training.n_iters': 5})
  run_lib.train(config, str(workdir))
  checkpoints = sorted(workdir.glob('checkpoints*/checkpoint_*'))
  assert [p.name for p in checkpoints] == ['checkpoint_1', 'checkpoint_5']
  for path in checkpoints:
    _truncate(_largest_file(path))
  newest = workdir / 'checkpoints-meta' / 'checkpoint_5'
  with pytest.raises(RuntimeError, match=rf'none of the 2 checkpoints in {re.escape(str(workdir))} could be '
                     rf'restored; the newest, {re.escape(str(newest))}, failed with '):
    run_lib.train(config, str(workdir))
  assert sorted(workdir.glob('checkpoints*/checkpoint_*')) == checkpoints


# ----------------------------------------------------------------------------------------------------
# Disk full, read-only


def _fail_when_renaming(monkeypatch, name: str, error: Exception) -> None:
  """Raises ``error`` where orbax would rename the finished temporary directory of ``name`` into place
  (its data all written): a full disk or a read-only file system at the last moment."""
  real = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get_final().name == name:
      raise error
    return await real(self)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', finalize)


def test_disk_full_during_a_save_names_the_cause_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                     caplog):
  workdir = tmp_path / 'work'
  meta_dir = workdir / 'checkpoints-meta'
  config = _config(**{'training.n_iters': 15, 'training.snapshot_freq': 10})
  _fail_when_renaming(monkeypatch, 'checkpoint_10', OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
  with pytest.raises(OSError) as info:
    run_lib.train(config, str(workdir))
  assert info.value.errno == errno.ENOSPC
  assert (f'no space left on device while saving checkpoint 10 (training step 10) to {meta_dir}; the '
          f'previous checkpoint 5 ({meta_dir / "checkpoint_5"}) is intact.') in str(info.value)
  assert sorted(os.listdir(meta_dir)) == ['checkpoint_5']  # the partial checkpoint 10 is cleaned up

  monkeypatch.undo()  # space again
  _, target = checkpointing.abstract_train_state(config)
  previous = checkpointing.restore_newest(str(workdir), target)
  assert (previous.kind, previous.index, int(previous.state.step)) == ('preemption', 5, 5)
  _assert_same_tree(previous.state, run_lib.train(_config(**{'training.n_iters': 5}), str(tmp_path / 'five')))
  with caplog.at_level(logging.INFO):
    assert int(run_lib.train(config, str(workdir)).step) == 15
  assert 'resumed from the preemption checkpoint 5 at step 5' in caplog.text


@pytest.mark.parametrize('error, cause', [
    (ValueError('OUT_OF_RANGE: Error writing "params.Dense_0.kernel/0" in OCDBT database: Failed to write '
                "11959 bytes to file 17: No space left on device [os_error_code='28']"),
     'no space left on device'),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), 'read-only file system'),
], ids=['tensorstore-enospc', 'erofs'])
def test_a_failed_save_replacing_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch, error, cause):
  config = _config()
  _, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  optimizer = losses.get_optimizer(config)
  old, new = (losses.init_train_state(jax.random.PRNGKey(i), variables['params'], optimizer).replace(
      step=jnp.asarray(s, jnp.int32)) for i, s in ((1, 10), (2, 20)))
  directory = tmp_path / 'checkpoints'
  manager = checkpointing.make_manager(str(directory), max_to_keep=None)
  checkpointing.save(manager, 1, old, {'step': 10})

  _fail_when_renaming(monkeypatch, 'checkpoint_1', error)
  where = re.escape(str(directory))
  with pytest.raises(OSError, match=rf'^\[Errno \d+\] {cause} while saving checkpoint 1 \(training step 20\) '
                     rf'to {where}; the previous checkpoint 1 \({where}/checkpoint_1\) is intact\.'):
    checkpointing.save(manager, 1, new, {'step': 20})
  assert sorted(os.listdir(directory)) == ['checkpoint_1']
  restored, meta = checkpointing.restore(manager, 1, old)
  assert meta['step'] == 10
  _assert_same_tree(restored, old)

  monkeypatch.undo()
  checkpointing.save(manager, 1, new, {'step': 20})
  assert sorted(os.listdir(directory)) == ['checkpoint_1']
  _assert_same_tree(checkpointing.restore(manager, 1, old)[0], new)
  manager.close()


def test_a_checkpoint_set_aside_for_a_replacement_that_never_completed_is_recovered(tmp_path):
  """A run killed inside ``save`` after moving checkpoint 1 aside (to be replaced) and before the new
  one was renamed into place: the next resume moves it back."""
  config = _config()
  _, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  state = losses.init_train_state(jax.random.PRNGKey(1), variables['params'], losses.get_optimizer(config))
  directory = tmp_path / 'checkpoints'
  manager = checkpointing.permanent_manager(str(tmp_path))
  checkpointing.save(manager, 1, state, {'step': 0})
  manager.close()
  os.rename(directory / 'checkpoint_1', directory / 'checkpoint_1.replaced')
  restored = checkpointing.restore_newest(str(tmp_path), state)
  assert (restored.kind, restored.index) == ('permanent', 1)
  assert sorted(os.listdir(directory)) == ['checkpoint_1']


# ----------------------------------------------------------------------------------------------------
# Config changes on resume


def test_resuming_with_another_config_is_refused_naming_the_keys(tmp_path, caplog):
  workdir = tmp_path / 'work'
  run_lib.train(_config(**{'training.n_iters': 5}), str(workdir))
  assert json.loads((workdir / 'config.json').read_text())['model']['nf'] == 32

  changed = _config(**{'training.n_iters': 10, 'model.nf': 16, 'training.likelihood_weighting': True})
  with pytest.raises(ValueError) as info:
    run_lib.train(changed, str(workdir))
  message = str(info.value)
  assert f'{workdir} holds checkpoints trained with another config ({workdir / "config.json"}); changed: ' \
         'model.nf: 32 -> 16; training.likelihood_weighting: False -> True. ' in message
  assert '--allow_config_change' in message

  # What only changes when things happen, or how the run is evaluated and sampled, may change.
  extended = _config(**{'training.n_iters': 10, 'training.log_freq': 5, 'eval.batch_size': 256,
                        'training.snapshot_freq_for_preemption': 10, 'sampling.snr': 0.1})
  assert int(run_lib.train(extended, str(workdir)).step) == 10

  lower_lr = _config(**{'training.n_iters': 15, 'optim.lr': 5e-3})
  with caplog.at_level(logging.WARNING):
    assert int(run_lib.train(lower_lr, str(workdir), allow_config_change=True).step) == 15
  assert 'with a changed config (--allow_config_change): optim.lr: 0.01 -> 0.005' in caplog.text
  assert json.loads((workdir / 'config.json').read_text())['optim']['lr'] == 5e-3


def test_main_allow_config_change_flag(tmp_path):
  workdir = tmp_path / 'work'
  flags = ['--config.training.n_iters=5', '--config.training.snapshot_sampling=False',
           '--config.model.nf=16', '--config.training.batch_size=16']
  run_lib.train(_main_config(flags), str(workdir))

  cmd = ['timeout', '-s', 'KILL', str(TIMEOUT), sys.executable, str(ROOT / 'main.py'),
         f'--config={ROOT / "configs/ve/toy_gmm.py"}', f'--workdir={workdir}', '--mode=train',
         *flags, '--config.training.n_iters=10', '--config.optim.lr=0.0005', '--allow_config_change']
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=TIMEOUT + 10,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  log = (workdir / 'stdout.txt').read_text()
  assert 'with a changed config (--allow_config_change): optim.lr: 0.001 -> 0.0005' in log
  assert 'resumed from the permanent checkpoint 1 at step 5' in log


def _main_config(flags):
  """configs/ve/toy_gmm.py with main.py's ``--config.a.b=v`` overrides."""
  from configs.ve import toy_gmm  # pylint: disable=import-outside-toplevel
  config = toy_gmm.get_config()
  for flag in flags:
    key, value = flag[len('--config.'):].split('=')
    group, name = key.split('.')
    config[group][name] = type(config[group][name])(value == 'True' if value in ('True', 'False') else value)
  return config


# ----------------------------------------------------------------------------------------------------
# Non-finite weights and data


def test_sampling_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
  config = _config()
  _, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  state = losses.init_train_state(jax.random.PRNGKey(1), variables['params'], losses.get_optimizer(config))
  kernel = np.array(state.params_ema['Dense_0']['kernel'])
  kernel.flat[[0, 5, 9]] = np.nan
  kernel.flat[11] = np.inf
  params_ema = jax.tree.map(lambda x: x, state.params_ema)
  params_ema['Dense_0']['kernel'] = jnp.asarray(kernel)
  manager = checkpointing.permanent_manager(str(tmp_path))
  checkpointing.save(manager, 1, state.replace(params_ema=params_ema, step=jnp.asarray(30, jnp.int32)),
                     {'step': 30})
  manager.close()

  with pytest.raises(ValueError, match=re.escape(
      f'the checkpoint {tmp_path}/checkpoints/checkpoint_1 (training step 30) has non-finite EMA weights in '
      f'params/Dense_0/kernel (3 NaN, 1 Inf of {kernel.size}); sampling or evaluating it would give NaN.')):
    generate.generate(config, str(tmp_path), num_samples=16, batch_size=16)
  assert not (tmp_path / 'samples').exists()
  variables, step = checkpointing.load_variables(config, str(tmp_path), ema=False)  # the raw weights are fine
  assert step == 30


def _bpd_config():
  config = ml_collections.ConfigDict()
  config.seed = 7
  config.training = ml_collections.ConfigDict({'sde': 'vesde', 'continuous': True})
  config.model = ml_collections.ConfigDict({'sigma_min': 0.01, 'sigma_max': 50., 'num_scales': 1000})
  config.data = ml_collections.ConfigDict({
      'dataset': 'digits', 'image_size': 2, 'num_channels': 1, 'centered': True, 'num_levels': 17})
  config.eval = ml_collections.ConfigDict({
      'batch_size': 4, 'bpd_dataset': 'test', 'bpd_num_repeats': 1, 'likelihood_eps': 1e-5,
      'hutchinson_type': 'exact', 'num_probes': 1, 'ode_method': 'dopri5', 'ode_rtol': 1e-5,
      'ode_atol': 1e-5})
  return config


def test_bits_per_dim_of_non_finite_data_is_refused(tmp_path, monkeypatch):
  """evaluate_bpd names the batch (batches 0 and 1 go through a stand-in for the ODE solve)."""
  def get_eval_iterator(config, split='test', uniform_dequantization=False):
    del config, split, uniform_dequantization
    for index in range(3):
      image = np.full((4, 2, 2, 1), 8 / 16, np.float32)
      if index == 2:
        image.flat[[0, 3, 6, 9]] = np.nan
        image.flat[12] = -np.inf
      yield {'image': image, 'mask': np.ones(4, bool)}
  monkeypatch.setattr(datasets, 'get_eval_iterator', get_eval_iterator)
  monkeypatch.setattr(datasets, 'num_examples', lambda config, split: 12)
  solved = []

  def get_likelihood_fn(*args, **kwargs):
    del args, kwargs

    def fn(rng, score_fn, levels):
      solved.append(np.asarray(levels))
      return jnp.zeros(levels.shape[0]), levels, jnp.ones(levels.shape[0], jnp.int32)
    return fn
  monkeypatch.setattr(likelihood, 'get_likelihood_fn', get_likelihood_fn)
  config = _bpd_config()
  sde = sde_lib.get_sde(config)
  with pytest.raises(ValueError, match=re.escape(
      'bits/dim input batch 2 (repeat 0) of the test split has 5 non-finite values (NaN or Inf) among 16')):
    bits_per_dim.evaluate_bpd(config, str(tmp_path), 3, _Zero(), {'params': {}}, sde, show_progress=False)
  assert len(solved) == 2


class _Zero:
  """A stand-in model; the stand-in solve never calls it."""

  def apply(self, *args, **kwargs):
    raise AssertionError('not called')


def test_likelihood_functions_refuse_non_finite_data_before_compiling():
  sde = sde_lib.VESDE()
  score = gaussian_mixture.score_fn(sde, gaussian_mixture.default_mixture(3))
  settings = dict(num_probes=1, rtol=1e-5, atol=1e-5, eps=1e-5, method='dopri5')
  bpd = likelihood.get_likelihood_fn(sde, lambda y: y, num_levels=17, hutchinson_type='rademacher', **settings)
  with pytest.raises(ValueError, match=r'^the data given to bits/dim has 2 non-finite values \(NaN or Inf\)'):
    bpd(jax.random.PRNGKey(0), score, jnp.array([[0.5, np.nan], [np.inf, 0.5]]))
  log_likelihood = likelihood.get_log_likelihood_fn(sde, 'rademacher', **settings)
  with pytest.raises(ValueError, match=r'^the input x of the log-likelihood has 1 non-finite values'):
    log_likelihood(jax.random.PRNGKey(0), score, jnp.array([[0.5, 0.5], [np.nan, 0.5]]))
  with pytest.raises(ValueError, match=r'^the image batch has 1 non-finite'):
    likelihood.levels_from_unit_interval(np.array([[0., np.nan]]), 17)
