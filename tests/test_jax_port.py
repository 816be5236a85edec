"""Released checkpoints of the original JAX reference (yang-song/score_sde) load, evaluate and resume.

The fixtures (tests/data/score_sde_jax, see tests/data/README.md) are flax msgpack checkpoints written
in the reference's format from the reference's own linen models, with the reference's scores on fixed
inputs. We load each without any of its code, run our model and ``get_score_fn``, and require
max |ours - theirs| / max |theirs| <= 1e-4 (achieved ~2e-7 on a 2-core CPU, once the reference's own
float32 error in the VP std at t = 1e-3 is taken out: ``_reference_vp_std_correction``). The refusals are
tested on edited copies of a fixture (written with ``flax.serialization``), and the import into a run
directory end to end: import, load as ``--mode=eval`` does, evaluate, train 3 steps from it, with the Adam
moments checked against the file's.
"""

import json
import logging
import os
import re
import subprocess
import sys

import flax
from flax import serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from scoresde import checkpointing
from scoresde import run_lib
from scoresde import sde_lib
from scoresde.models import utils
from scoresde.porting import jax_port

FIXTURES = os.path.join(os.path.dirname(__file__), 'data', 'score_sde_jax')
TORCH_FIXTURES = os.path.join(os.path.dirname(__file__), 'data', 'score_sde_pytorch')
CASES = ('jax_ncsnpp_ve_fourier', 'jax_ddpmpp_vp_continuous')
SMALL = 'jax_ddpmpp_vp_continuous'  # nf=8: the cheap one for refusals and the round trip
RTOL = 1e-4


def _max_rel_err(ours, theirs) -> float:
  theirs = np.asarray(theirs, np.float64)
  return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))


def _load_case(case):
  data = np.load(os.path.join(FIXTURES, case, 'outputs.npz'))
  config = ml_collections.ConfigDict(json.loads(str(data['config_json'])))
  return data, config, os.path.join(FIXTURES, case, 'checkpoint_1')


def _reference_state(path=os.path.join(FIXTURES, SMALL, 'checkpoint_1')) -> dict:
  with open(path, 'rb') as f:
    return serialization.msgpack_restore(f.read())


def _write(state: dict, path) -> str:
  with open(path, 'wb') as f:
    f.write(serialization.msgpack_serialize(state))
  return str(path)


def _reference_vp_std_correction(sde, t) -> np.ndarray:
  """(the reference's VP std) / (the exact one), per example.

  The reference computes the VP marginal std as sqrt(1 - exp(2L)) in float32, which cancels at small t
  (at t = 1e-3 it is 1.2e-4 off); ours uses -expm1 and is exact to float32 rounding. Its scores are
  -output / its std, so multiplying them by this ratio gives -output / exact std, the score our
  ``get_score_fn`` computes. The ratio is 1 to within 1e-8 at the fixture's other times."""
  t = np.asarray(t, np.float64)
  log_mean = -0.25 * t**2 * (sde.beta_1 - sde.beta_0) - 0.5 * t * sde.beta_0
  theirs = np.sqrt(1. - np.exp(2. * log_mean.astype(np.float32)))
  exact = np.sqrt(-np.expm1(2. * log_mean))
  return theirs / exact


@pytest.mark.parametrize('case', CASES)
def test_scores_match_the_reference(case):
  """EMA weights (``params_ema``) give ``score``, raw weights (``optimizer.target``) ``score_raw_params``."""
  data, config, path = _load_case(case)
  model = utils.create_model(config)
  sde = sde_lib.get_sde(config)
  score = jax.jit(lambda variables, x, t: utils.get_score_fn(
      sde, model, variables, train=False, continuous=config.training.continuous)(x, t))
  expected_factor = np.ones(len(data['t']))
  if isinstance(sde, sde_lib.VPSDE):
    expected_factor = _reference_vp_std_correction(sde, data['t'])
    assert abs(expected_factor[0] - 1) > 5e-5 and np.allclose(expected_factor[1:], 1., atol=1e-7)
  for ema, key in ((True, 'score'), (False, 'score_raw_params')):
    variables = jax_port.load_score_sde_jax(path, config, ema=ema)
    ours = score(variables, jnp.asarray(data['x']), jnp.asarray(data['t']))
    expected = data[key] * expected_factor[:, None, None, None]
    err = _max_rel_err(ours, expected)
    assert err <= RTOL, f'{case} {key}: max relative error {err:.2e}'
    if not isinstance(sde, sde_lib.VPSDE):
      assert _max_rel_err(ours, data[key]) <= RTOL


def test_ema_and_raw_weights_are_the_files_own():
  """The loader maps, it does not compute: every leaf is the file's array (renamed where the reference's
  names differ), and EMA and raw differ."""
  _, config, path = _load_case('jax_ncsnpp_ve_fourier')
  state = _reference_state(path)
  ema = jax_port.load_score_sde_jax(path, config, ema=True)['params']
  raw = jax_port.load_score_sde_jax(path, config, ema=False)['params']
  np.testing.assert_array_equal(ema['Downsample_0']['Conv2d_0']['kernel'],
                                state['params_ema']['Downsample_0']['Conv2d_0']['weight'])
  np.testing.assert_array_equal(raw['ResnetBlockBigGANpp_3']['Conv_1']['kernel'],
                                state['optimizer']['target']['ResnetBlockBigGANpp_3']['Conv_1']['kernel'])
  assert float(np.max(np.abs(ema['Conv_0']['kernel'] - raw['Conv_0']['kernel']))) > 0


# ----------------------------------------------------------------------------------------------------
# Refusals, each naming what is wrong


def test_missing_module_is_refused_naming_it(tmp_path):
  _, config, _ = _load_case(SMALL)
  state = _reference_state()
  del state['params_ema']['AttnBlockpp_2']
  path = _write(state, tmp_path / 'checkpoint_1')
  with pytest.raises(ValueError, match=re.escape(
      'params_ema does not fit the model: the ncsnpp model built from this config has parameters the '
      'checkpoint lacks: AttnBlockpp_2/GroupNorm_0/bias (16,)')):
    jax_port.load_score_sde_jax(path, config)
  jax_port.load_score_sde_jax(path, config, ema=False)  # the raw weights are complete


def test_extra_module_is_refused_naming_it(tmp_path):
  _, config, _ = _load_case(SMALL)
  state = _reference_state()
  state['optimizer']['target']['Conv_2'] = {'kernel': np.zeros((3, 3, 8, 3), np.float32),
                                            'bias': np.zeros((3,), np.float32)}
  path = _write(state, tmp_path / 'checkpoint_1')
  with pytest.raises(ValueError, match=re.escape(
      'the checkpoint has parameters the ncsnpp model built from this config lacks: Conv_2/bias (3,), '
      'Conv_2/kernel (3, 3, 8, 3)')):
    jax_port.load_score_sde_jax(path, config, ema=False)


def test_shape_mismatch_is_refused_naming_both_shapes(tmp_path):
  _, config, _ = _load_case(SMALL)
  state = _reference_state()
  state['params_ema']['ResnetBlockBigGANpp_2']['Conv_1']['kernel'] = np.zeros((3, 3, 16, 24), np.float32)
  path = _write(state, tmp_path / 'checkpoint_1')
  with pytest.raises(ValueError, match=re.escape(
      'params_ema/ResnetBlockBigGANpp_2/Conv_1/kernel has shape (3, 3, 16, 24), but the ncsnpp model built '
      'from this config expects (3, 3, 16, 16) at ResnetBlockBigGANpp_2/Conv_1/kernel')):
    jax_port.load_score_sde_jax(path, config)


def test_config_of_another_size_is_refused():
  _, config, path = _load_case(SMALL)
  config.model.nf = 16
  with pytest.raises(ValueError, match=re.escape(
      'params_ema/AttnBlockpp_0/GroupNorm_0/bias has shape (16,), but the ncsnpp model built from this '
      'config expects (32,) at AttnBlockpp_0/GroupNorm_0/bias')):
    jax_port.load_score_sde_jax(path, config)
  _, config, path = _load_case(SMALL)
  config.model.num_res_blocks = 2
  with pytest.raises(ValueError, match=re.escape(
      'has parameters the checkpoint lacks: AttnBlockpp_3/GroupNorm_0/bias (16,), ') + '.*' + re.escape(
          'and 52 more; the checkpoint has parameters the ncsnpp model built from this config lacks: '
          'ResnetBlockBigGANpp_1/Conv_2/bias (8,)')):
    jax_port.load_score_sde_jax(path, config)


def test_wrong_architecture_is_refused_naming_both():
  _, config, path = _load_case(SMALL)
  config.model.name = 'ddpm'
  with pytest.raises(ValueError, match=re.escape(
      "holds a ncsnpp network (top-level modules ['AttnBlockpp_0', 'AttnBlockpp_1', 'AttnBlockpp_2', "
      "'Conv_0', 'Conv_1', 'Dense_0']...) but config.model.name='ddpm'")):
    jax_port.load_score_sde_jax(path, config)
  config.model.name = 'mlp'
  with pytest.raises(ValueError, match="supports config.model.name in .*got 'mlp'"):
    jax_port.load_score_sde_jax(path, config)


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'not_a_state', 'oversized'])
def test_damaged_files_are_refused_before_anything_runs(tmp_path, damage):
  _, config, path = _load_case(SMALL)
  with open(path, 'rb') as f:
    data = f.read()
  bad = tmp_path / 'checkpoint_1'
  if damage == 'truncated':
    bad.write_bytes(data[:len(data) // 2])
    message = 'is not a readable flax msgpack checkpoint (truncated, damaged, or another format)'
  elif damage == 'garbage':
    bad.write_bytes(b'\x87' + np.random.default_rng(0).bytes(5000))
    message = 'is not a readable flax msgpack checkpoint'
  elif damage == 'not_a_state':
    _write({'params': {'Conv_0': {'kernel': np.zeros((3,), np.float32)}}}, bad)
    message = "is msgpack but not the state of a score_sde training run: expected the keys 'optimizer'"
  else:
    bad.write_bytes(data + bytes(3_000_000))
    message = 'a score_sde checkpoint of the model built from this config holds at most about'
  with pytest.raises(ValueError, match=re.escape(message)):
    jax_port.load_score_sde_jax(str(bad), config)


def test_format_detection_reads_the_first_bytes(tmp_path):
  assert checkpointing.checkpoint_format(os.path.join(FIXTURES, SMALL, 'checkpoint_1')) == \
      checkpointing.FLAX_MSGPACK
  assert checkpointing.checkpoint_format(os.path.join(TORCH_FIXTURES, 'ddpmpp_vp_continuous.pth')) == \
      checkpointing.PYTORCH
  assert checkpointing.checkpoint_format(str(tmp_path)) == checkpointing.ORBAX
  (tmp_path / 'notes.txt').write_text('hello')
  with pytest.raises(ValueError, match="its first bytes are b'hell'"):
    checkpointing.checkpoint_format(str(tmp_path / 'notes.txt'))
  with pytest.raises(FileNotFoundError):
    checkpointing.checkpoint_format(str(tmp_path / 'absent'))


def test_load_variables_detects_a_jax_checkpoint_and_says_so(caplog):
  """``--checkpoint=PATH`` for sample/eval: the port's EMA variables, step None, the format logged."""
  _, config, path = _load_case(SMALL)
  with caplog.at_level(logging.INFO):
    variables, step = checkpointing.load_variables(config, checkpoint=path)
  assert step is None
  assert f'loaded EMA weights of {path} (score_sde (JAX) flax msgpack)' in caplog.text
  expected = jax_port.load_score_sde_jax(path, config)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------------
# Import into a run directory: eval and train from it


def _run_config(image_dir):
  """Ours (configs/vp/cifar10_ddpmpp_continuous.py) with the fixture's overrides, on 16x16 images."""
  from configs.vp import cifar10_ddpmpp_continuous  # pylint: disable=import-outside-toplevel
  config = cifar10_ddpmpp_continuous.get_config()
  config.model.nf = 8
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.data.image_size = 16
  config.data.dataset = 'folder'
  config.data.path = str(image_dir)
  config.data.random_flip = False
  config.training.batch_size = 4
  config.training.n_jitted_steps = 1
  config.training.n_iters = 1003
  config.training.log_freq = 1
  config.training.eval_freq = 100_000
  config.training.snapshot_freq = 500
  config.training.snapshot_freq_for_preemption = 100_000
  config.training.snapshot_sampling = False
  config.eval.batch_size = 4
  config.eval.begin_ckpt = None  # the newest
  config.eval.end_ckpt = None
  config.eval.enable_loss = True
  config.eval.enable_bpd = False
  config.eval.enable_sampling = False
  return config


@pytest.fixture(name='image_dir')
def fixture_image_dir(tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / 'images'
  folder.mkdir()
  for i in range(10):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  return folder


def _with_random_moments(tmp_path) -> tuple[str, dict]:
  """The fixture with non-zero Adam moments (the fixture's are zero) and an Adam step of its own."""
  state = _reference_state()
  rng = np.random.default_rng(1)
  state['optimizer']['state']['param_states'] = jax.tree.map(
      lambda a: {'grad_ema': rng.normal(size=a.shape).astype(np.float32),
                 'grad_sq_ema': rng.uniform(size=a.shape).astype(np.float32)},
      state['optimizer']['target'])
  state['optimizer']['state']['step'] = 997
  return _write(state, tmp_path / 'checkpoint_2'), state


def _moment(state: dict, name: str) -> dict:
  """One of flax.optim.Adam's moments ('grad_ema', 'grad_sq_ema') as a parameter tree."""
  return jax.tree.map(lambda m: m[name], state['optimizer']['state']['param_states'],
                      is_leaf=lambda m: isinstance(m, dict) and 'grad_ema' in m)


def _adam_state(opt_state):
  import optax  # pylint: disable=import-outside-toplevel
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]


@pytest.fixture(name='fast_compile')
def fixture_fast_compile():
  """XLA without its expensive optimisations: compiling the NCSN++ training step drops from ~115 s to
  ~40 s on the shared 2-core CPU (measured), and these few steps run about as fast."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def test_import_then_eval_and_train_from_it(tmp_path, image_dir, caplog, fast_compile):
  del fast_compile
  config = _run_config(image_dir)
  path, state = _with_random_moments(tmp_path)
  workdir = str(tmp_path / 'run')
  written = run_lib.import_checkpoint(config, workdir, path)
  assert written == os.path.join(workdir, 'checkpoints', 'checkpoint_2')  # ⌈1000 / 500⌉
  assert os.path.exists(os.path.join(workdir, 'config.json'))

  # What was written: both weight sets, the step, Adam's moments and counts.
  manager = checkpointing.permanent_manager(workdir)
  restored, meta = checkpointing.restore(manager, 2, checkpointing.abstract_train_state(config)[1])
  manager.close()
  assert int(restored.step) == 1000 and meta['step'] == 1000 and meta['imported_from'] == path
  adam = _adam_state(restored.opt_state)
  assert int(adam.count) == 997
  flat = flax.traverse_util.flatten_dict
  for ours, theirs in ((restored.params, state['optimizer']['target']),
                       (restored.params_ema, state['params_ema']),
                       (adam.mu, _moment(state, 'grad_ema')), (adam.nu, _moment(state, 'grad_sq_ema'))):
    ours, theirs = flat(ours), flat(theirs)
    assert set(ours) == set(theirs)
    for key in theirs:
      np.testing.assert_array_equal(np.asarray(ours[key]), theirs[key], err_msg='/'.join(key))
  schedule_counts = [int(s.count) for s in jax.tree.leaves(
      restored.opt_state, is_leaf=lambda s: type(s).__name__ == 'ScaleByScheduleState')
      if type(s).__name__ == 'ScaleByScheduleState']
  assert schedule_counts == [1000]

  # --mode=eval: the newest checkpoint of the run is the imported one, with the file's EMA weights.
  variables, step = checkpointing.load_variables(config, workdir)
  assert step == 1000
  expected = jax_port.load_score_sde_jax(path, config)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)
  results = run_lib.evaluate(config, workdir)
  assert list(results) == [2] and results[2]['step'] == 1000 and np.isfinite(results[2]['loss'])
  # --mode=eval --checkpoint=FILE reads the file itself: the same weights, the same loss.
  direct = run_lib.evaluate(config, str(tmp_path / 'direct'), checkpoint=path)
  assert list(direct) == ['checkpoint_2'] and direct['checkpoint_2']['loss'] == results[2]['loss']

  # --mode=train: resumes at the file's step and trains on.
  with caplog.at_level(logging.INFO):
    final = run_lib.train(config, workdir)
  assert 'resumed from the permanent checkpoint 2 at step 1000' in caplog.text
  assert int(final.step) == 1003
  assert float(np.max(np.abs(np.asarray(final.params['Conv_0']['kernel'])
                             - restored.params['Conv_0']['kernel']))) > 0

  with pytest.raises(ValueError, match='already holds checkpoints; import into a new --workdir'):
    run_lib.import_checkpoint(config, workdir, path)


def test_import_of_a_pytorch_checkpoint(tmp_path, image_dir, caplog):
  """A score_sde_pytorch .pth imports its raw and EMA weights, its step, and torch Adam's state: mu, nu
  and count are the file's exp_avg, exp_avg_sq and step (the reference's own after its 3 steps, non-zero)
  exactly, each where the file's weight of the same parameter index went (``expected_adam`` finds that
  without the port's moment mapping), with the learning-rate schedule at the file's step."""
  from scoresde.porting import torch_pickle, torch_port  # pylint: disable=import-outside-toplevel
  from test_torch_port import expected_adam  # pylint: disable=import-outside-toplevel
  config = _run_config(image_dir)
  path = os.path.join(TORCH_FIXTURES, 'ddpmpp_vp_continuous.pth')
  config.optim.warmup = 0
  config.optim.lr = 1e-3
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.INFO):
    run_lib.import_checkpoint(config, workdir, path)
  assert 'training step 3, with its Adam moments)' in caplog.text
  step = int(torch_pickle.load(path)['step'])
  manager = checkpointing.permanent_manager(workdir)
  index = manager.latest_step()
  restored, _ = checkpointing.restore(manager, index, checkpointing.abstract_train_state(config)[1])
  manager.close()
  assert int(restored.step) == step
  for ours, ema in ((restored.params, False), (restored.params_ema, True)):
    want = torch_port.load_score_sde_pytorch(path, config, ema=ema)['params']
    for got, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
      np.testing.assert_array_equal(got, expected)
  adam = _adam_state(restored.opt_state)
  mu, nu, count = expected_adam(path, np.load(os.path.join(TORCH_FIXTURES, 'ddpmpp_vp_continuous.npz')),
                                restored.params)
  assert int(adam.count) == count == 3
  flat = flax.traverse_util.flatten_dict
  for ours, theirs in ((adam.mu, mu), (adam.nu, nu)):
    ours, theirs = flat(ours), flat(theirs)
    assert set(ours) == set(theirs) and all(np.any(v) for v in theirs.values())
    for key in theirs:
      np.testing.assert_array_equal(np.asarray(ours[key]), theirs[key], err_msg='/'.join(key))
  schedule_counts = [int(s.count) for s in jax.tree.leaves(
      restored.opt_state, is_leaf=lambda s: type(s).__name__ == 'ScaleByScheduleState')
      if type(s).__name__ == 'ScaleByScheduleState']
  assert schedule_counts == [step]


def test_main_import_mode(tmp_path):
  """``main.py --mode=import --checkpoint=FILE``: the command line writes the run directory and logs the
  format it read; without --checkpoint it is a usage error."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / 'run'
  path = os.path.join(FIXTURES, SMALL, 'checkpoint_1')
  cmd = ['timeout', '-s', 'KILL', '300', sys.executable, os.path.join(root, 'main.py'),
         f'--config={os.path.join(root, "configs/vp/cifar10_ddpmpp_continuous.py")}', f'--workdir={workdir}',
         '--mode=import', f'--checkpoint={path}', '--config.model.nf=8', '--config.model.ch_mult=(1, 2)',
         '--config.model.num_res_blocks=1', '--config.model.attn_resolutions=(8,)',
         '--config.data.image_size=16']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=310, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  log = (workdir / 'stdout.txt').read_text()
  assert f'imported {path} (score_sde (JAX) flax msgpack, training step 1000, with its Adam moments) as ' \
         f'{workdir}/checkpoints/checkpoint_1' in log
  assert (workdir / 'config.json').exists()

  proc = subprocess.run(cmd[:-6], cwd=root, env=env, capture_output=True, text=True, timeout=310,
                        check=False)
  assert proc.returncode != 0 and '--mode=import needs --checkpoint=PATH' in proc.stderr
