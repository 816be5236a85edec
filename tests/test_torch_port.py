"""Released-checkpoint import: our models on score_sde_pytorch checkpoints give the reference's numbers.

The fixtures (tests/data/score_sde_pytorch, see tests/data/README.md) were written by the PyTorch
reference itself: a checkpoint after 3 training steps (EMA != raw weights) and the reference's network
outputs and scores on fixed inputs. We load each checkpoint without PyTorch, run our model and
``get_score_fn``, and require max |ours - theirs| / max |theirs| <= 1e-4 (float32; achieved ~1e-6 on a
2-core CPU). The refusals are tested on edited copies of those state dicts, made in memory (no PyTorch).
"""

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scoresde import sde_lib
from scoresde.porting import torch_pickle
from scoresde.porting import torch_port
from scoresde.models import utils

FIXTURES = os.path.join(os.path.dirname(__file__), 'data', 'score_sde_pytorch')
CASES = ('ncsnpp_ve_fourier', 'ddpmpp_vp_continuous', 'ddpm_vp_discrete')
RTOL = 1e-4


def _max_rel_err(ours, theirs) -> float:
  theirs = np.asarray(theirs, np.float64)
  return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))


def _load_case(case):
  data = np.load(os.path.join(FIXTURES, case + '.npz'))
  config = ml_collections.ConfigDict(json.loads(str(data['config_json'])))
  return data, config, os.path.join(FIXTURES, case + '.pth')


@pytest.mark.parametrize('ema', [True, False], ids=['ema', 'raw'])
@pytest.mark.parametrize('case', CASES)
def test_matches_reference_outputs(case, ema):
  data, config, path = _load_case(case)
  suffix = '' if ema else '_raw_params'
  variables = torch_port.load_score_sde_pytorch(path, config, ema=ema)
  model = utils.create_model(config)
  x = jnp.asarray(data['x'])

  model_out = model.apply(variables, x, jnp.asarray(data['labels']), train=False)
  err = _max_rel_err(model_out, data['model_out' + suffix])
  assert err <= RTOL, f'{case} model_out{suffix}: max relative error {err:.2e}'

  sde = sde_lib.get_sde(config)
  score_fn = utils.get_score_fn(sde, model, variables, train=False,
                                continuous=config.training.continuous)
  score = score_fn(x, jnp.asarray(data['t']))
  err = _max_rel_err(score, data['score' + suffix])
  assert err <= RTOL, f'{case} score{suffix}: max relative error {err:.2e}'


def test_ema_and_raw_weights_differ_and_fourier_w_is_shared():
  """EMA shadow params go to the trainable params in order; the frozen Fourier W is the same in both."""
  _, config, path = _load_case('ncsnpp_ve_fourier')
  ema = torch_port.load_score_sde_pytorch(path, config, ema=True)['params']
  raw = torch_port.load_score_sde_pytorch(path, config, ema=False)['params']
  np.testing.assert_array_equal(ema['GaussianFourierProjection_0']['W'],
                                raw['GaussianFourierProjection_0']['W'])
  diffs = [float(np.max(np.abs(ema[m][p] - raw[m][p]))) for m in ('Dense_0', 'Conv_0') for p in ema[m]]
  assert min(diffs) > 0


def test_mismatched_config_is_a_clear_error():
  _, config, path = _load_case('ddpmpp_vp_continuous')
  config.model.nf = 16
  with pytest.raises(ValueError, match='shape'):
    torch_port.load_score_sde_pytorch(path, config)
  _, config, path = _load_case('ddpmpp_vp_continuous')
  config.model.num_res_blocks = 2
  with pytest.raises(ValueError, match='does not describe this checkpoint'):
    torch_port.load_score_sde_pytorch(path, config)


def test_unsupported_model_is_a_clear_error():
  _, config, path = _load_case('ddpm_vp_discrete')
  config.model.name = 'ncsnv2_64'
  with pytest.raises(ValueError, match='config.model.name'):
    torch_port.load_score_sde_pytorch(path, config)


def test_checkpointing_imports_pth_files_through_the_port():
  """`--checkpoint=path.pth` (checkpointing.load_variables) gives the port's EMA variables, step None."""
  from scoresde import checkpointing  # pylint: disable=import-outside-toplevel
  _, config, path = _load_case('ddpm_vp_discrete')
  variables, step = checkpointing.load_variables(config, checkpoint=path)
  expected = torch_port.load_score_sde_pytorch(path, config, ema=True)
  assert step is None
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)


def _edit_checkpoints(monkeypatch, edit):
  """Makes the port read every checkpoint's state dict through ``edit`` (returning a modified copy)."""
  load = torch_pickle.load

  def edited(path):
    checkpoint = load(path)
    return {**checkpoint, 'model': edit(dict(checkpoint['model']))}

  monkeypatch.setattr(torch_pickle, 'load', edited)


def _geometric(sigma_max, sigma_min, n):
  return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))


@pytest.mark.parametrize('stored, message', [
    (_geometric(378., 0.01, 1000),
     'sigma_max=378 (sigmas[0]) but config.model.sigma_max=50; set --config.model.sigma_max=378'),
    (_geometric(50., 0.002, 1000),
     'sigma_min=0.002 (sigmas[-1]) but config.model.sigma_min=0.01; set --config.model.sigma_min=0.002'),
    (_geometric(50., 0.01, 2000),
     'num_scales=2000 (len(sigmas)) but config.model.num_scales=1000; set --config.model.num_scales=2000'),
], ids=['sigma_max', 'sigma_min', 'num_scales'])
def test_noise_schedule_mismatch_is_refused_naming_both_values(monkeypatch, stored, message):
  _, config, path = _load_case('ncsnpp_ve_fourier')
  _edit_checkpoints(monkeypatch, lambda state: {**state, 'module.sigmas': stored})
  with pytest.raises(ValueError, match=re.escape(message)):
    torch_port.load_score_sde_pytorch(path, config)


def test_checkpoint_without_noise_schedule_loads_with_a_warning(monkeypatch, caplog):
  data, config, path = _load_case('ddpm_vp_discrete')
  _edit_checkpoints(monkeypatch, lambda state: {k: v for k, v in state.items() if k != 'module.sigmas'})
  with caplog.at_level(logging.WARNING):
    variables = torch_port.load_score_sde_pytorch(path, config)
  assert 'noise schedule cannot be checked' in caplog.text
  model_out = utils.create_model(config).apply(variables, jnp.asarray(data['x']),
                                               jnp.asarray(data['labels']), train=False)
  assert _max_rel_err(model_out, data['model_out']) <= RTOL


def test_swapped_modules_of_different_kind_are_refused(monkeypatch):
  """all_modules.3 (the first Conv) and .6 (the input pyramid's Downsample) hold tensors of the same
  shapes; swapped, call order and shapes alone would load each into the other's place."""
  _, config, path = _load_case('ncsnpp_ve_fourier')
  swap = {'3': '6', '6': '3'}

  def swapped(state):
    out = {}
    for key, value in state.items():
      parts = key.split('.')
      if parts[1] == 'all_modules':
        parts[2] = swap.get(parts[2], parts[2])
      out['.'.join(parts)] = value
    return out

  state = torch_pickle.load(path)['model']
  shapes = [sorted(v.shape for k, v in state.items() if k.startswith(f'module.all_modules.{i}.'))
            for i in (3, 6)]
  assert shapes[0] == shapes[1]
  _edit_checkpoints(monkeypatch, swapped)
  with pytest.raises(ValueError, match=re.escape(
      'checkpoint module all_modules.3 (single-convolution block: {Conv2d_0/bias (16,), Conv2d_0/kernel '
      '(3, 3, 3, 16)}) cannot be loaded into Conv_0 (Conv: {bias (16,), kernel (3, 3, 3, 16)})')):
    torch_port.load_score_sde_pytorch(path, config, ema=False)
