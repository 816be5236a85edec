"""Released-checkpoint import: our models on score_sde_pytorch checkpoints give the reference's numbers.

The fixtures (tests/data/score_sde_pytorch, see tests/data/README.md) were written by the PyTorch
reference itself: a checkpoint after 3 training steps (EMA != raw weights) and the reference's network
outputs and scores on fixed inputs. We load each checkpoint without PyTorch, run our model and
``get_score_fn``, and require max |ours - theirs| / max |theirs| <= 1e-4 (float32; achieved ~1e-6 on a
2-core CPU). The refusals are tested on edited copies of those state dicts, made in memory (no PyTorch).

Adam: the fixtures' optimizer states hold the reference's own moments after its 3 steps (non-zero); we
check that torch's parameter indices, moments and step land where, and as, the file's own weights land
(``expected_adam``, which does not use the port's moment mapping), and the refusals.
"""

import json
import logging
import os
import re

import flax
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


# ----------------------------------------------------------------------------------------------------
# Adam's state: torch's exp_avg / exp_avg_sq / step as optax's mu / nu / count


def _layouts(weight):
  """The layouts a torch tensor may have in ours (identity, or torch_port's transposes by rank)."""
  yield lambda a: a
  if weight.ndim == 2:
    yield lambda a: a.T
  if weight.ndim == 4:
    yield lambda a: np.transpose(a, (2, 3, 1, 0))


def expected_adam(path, npz, raw_params):
  """torch Adam's moments and step from the .pth at ``path``, placed in our layout without the port's
  moment mapping: optimizer index i is ``npz['optimizer_param_keys'][i]`` (the reference's own list of
  ``model.parameters()``), that key's weight is searched for in ``raw_params`` (our import of the raw
  weights, which the tests above prove equal to the reference's network), and its moments go to the leaf
  where the weight went, in the layout it took there. Leaves with no state (the frozen Fourier W) are
  zero. Returns (mu, nu, count)."""
  checkpoint = torch_pickle.load(path)
  names = [str(k) for k in npz['optimizer_param_keys']]
  flat = flax.traverse_util.flatten_dict(raw_params)
  moments = {m: {leaf: np.zeros_like(np.asarray(v)) for leaf, v in flat.items()}
             for m in ('exp_avg', 'exp_avg_sq')}
  steps = set()
  for index, entry in checkpoint['optimizer']['state'].items():
    weight = np.asarray(checkpoint['model'][names[index]])
    found = {leaf: layout for leaf, value in flat.items() for layout in _layouts(weight)
             if layout(weight).shape == value.shape and np.array_equal(layout(weight), np.asarray(value))}
    assert len(found) == 1, f'{names[index]} found at {sorted(found)}'
    (leaf, layout), = found.items()
    for m, tree in moments.items():
      tree[leaf] = layout(np.asarray(entry[m]))
    steps.add(int(entry['step']))
  assert len(steps) == 1
  unflat = flax.traverse_util.unflatten_dict
  return unflat(moments['exp_avg']), unflat(moments['exp_avg_sq']), steps.pop()


def _assert_trees_equal(ours, theirs):
  ours, theirs = flax.traverse_util.flatten_dict(ours), flax.traverse_util.flatten_dict(theirs)
  assert set(ours) == set(theirs)
  for key in theirs:
    np.testing.assert_array_equal(np.asarray(ours[key]), theirs[key], err_msg='/'.join(key))


@pytest.mark.parametrize('case', CASES)
def test_adam_moments_map_like_their_weights(case):
  """torch's model.parameters() order is the state dict's without its buffers (checked against the
  reference's own list); mu/nu/count are the file's exp_avg/exp_avg_sq/step, exactly, where the weights
  went. ncsnpp_ve_fourier's frozen Fourier W is parameter 0 with no state: every index is off by one
  from the trainable list, and W's moments are zero."""
  data, config, path = _load_case(case)
  checkpoint = torch_pickle.load(path)
  assert [k for k in checkpoint['model'] if k != 'module.sigmas'] == [str(k) for k in
                                                                         data['optimizer_param_keys']]
  source = torch_port.read_score_sde_pytorch(path, config)
  assert source.step == int(data['step']) == 3 and source.format == 'score_sde_pytorch .pth'
  _assert_trees_equal(source.params, torch_port.load_score_sde_pytorch(path, config, ema=False)['params'])
  _assert_trees_equal(source.params_ema, torch_port.load_score_sde_pytorch(path, config)['params'])
  mu, nu, count = expected_adam(path, data, source.params)
  assert source.adam[2] == count == 3
  _assert_trees_equal(source.adam[0], mu)
  _assert_trees_equal(source.adam[1], nu)
  leaves = jax.tree.leaves(source.adam[:2])
  assert all(a.dtype == np.float32 for a in leaves)
  frozen = [str(k) for k in data['frozen_param_keys']]
  assert sum(bool(np.any(a)) for a in leaves) == len(leaves) - 2 * len(frozen)  # the file's are non-zero
  if frozen:
    assert not np.any(source.adam[0]['GaussianFourierProjection_0']['W'])


def _edit_optimizer(monkeypatch, edit):
  """Makes the port read every checkpoint's optimizer state_dict through ``edit`` (on a copy)."""
  load = torch_pickle.load

  def edited(path):
    checkpoint = load(path)
    optimizer = checkpoint['optimizer']
    optimizer = {'state': {i: dict(e) for i, e in optimizer['state'].items()},
                 'param_groups': [dict(g) for g in optimizer['param_groups']]}
    edit(optimizer)
    return {**checkpoint, 'optimizer': optimizer}

  monkeypatch.setattr(torch_pickle, 'load', edited)


def _set(d, key, value):
  d[key] = value


@pytest.mark.parametrize('edit, message', [
    (lambda o: _set(o['state'], 154, o['state'][3]),
     'optimizer/state has an entry for parameter index 154, but the model\'s state dict has 154 parameters '
     '(indices 0 to 153): the optimizer state does not belong to these weights.'),
    (lambda o: _set(o['state'][5], 'exp_avg_sq', np.zeros((3, 8), np.float32)),
     "optimizer/state[5]['exp_avg_sq'] has shape (3, 8), but parameter 5 (all_modules.2.bias) has shape "
     '(8,): the optimizer state does not belong to these weights.'),
    (lambda o: _set(o['param_groups'][0], 'params', o['param_groups'][0]['params'][:-1]),
     "the optimizer's param_groups list 153 parameter indices (153 distinct, from 0 to 152); the model's "
     'state dict has 154 parameters (indices 0 to 153)'),
    (lambda o: _set(o['param_groups'][0], 'amsgrad', True),
     'its Adam (optimizer/param_groups[0]) has amsgrad=True (optax.adam keeps no max_exp_avg_sq): these '
     'moments cannot be imported into our optax Adam.'),
    (lambda o: _set(o['state'][2], 'max_exp_avg_sq', o['state'][2]['exp_avg_sq']),
     "optimizer/state[2] (all_modules.1.weight) also holds ['max_exp_avg_sq'] (amsgrad?)"),
    (lambda o: _set(o['param_groups'][0], 'weight_decay', 1e-4),
     'has weight_decay=0.0001 (torch Adam adds it to the gradient, so its moments include that L2 term'),
    (lambda o: _set(o['param_groups'][0], 'maximize', True), 'maximize=True'),
    (lambda o: _set(o['state'][7], 'step', np.asarray(2., np.float32)),
     'its Adam state counts different numbers of updates per parameter: 2 (parameters [7]), 3 (parameters '
     "[0, 1, 2]...); optax's Adam has one count for all."),
    (lambda o: _set(o['state'], 0, {'momentum_buffer': o['state'][0]['exp_avg']}),
     "optimizer/state[0] (all_modules.0.weight) holds ['momentum_buffer'], not Adam's exp_avg and "
     'exp_avg_sq: only torch.optim.Adam states can be imported.'),
], ids=['index_out_of_range', 'shape_mismatch', 'param_groups_count', 'amsgrad', 'amsgrad_state',
        'coupled_weight_decay', 'maximize', 'steps_disagree', 'not_adam'])
def test_adam_state_that_cannot_be_mapped_is_refused(monkeypatch, edit, message):
  _, config, path = _load_case('ddpmpp_vp_continuous')
  _edit_optimizer(monkeypatch, edit)
  with pytest.raises(ValueError, match=re.escape(message)):
    torch_port.read_score_sde_pytorch(path, config)
  torch_port.load_score_sde_pytorch(path, config)  # the weights alone still load


def test_decoupled_weight_decay_and_missing_optimizer_state(monkeypatch):
  """torch's decoupled weight decay (AdamW) is ours, so its moments import; a file whose optimizer
  state is empty (never stepped) gives no moments."""
  _, config, path = _load_case('ddpmpp_vp_continuous')
  _edit_optimizer(monkeypatch, lambda o: o['param_groups'][0].update(weight_decay=1e-4,
                                                                     decoupled_weight_decay=True))
  assert torch_port.read_score_sde_pytorch(path, config).adam[2] == 3
  monkeypatch.undo()
  _edit_optimizer(monkeypatch, lambda o: o['state'].clear())
  assert torch_port.read_score_sde_pytorch(path, config).adam is None


def test_adam_state_saved_by_torch_itself(tmp_path):
  """A .pth that torch.save writes with an Adam state of older torch versions (integer steps, no
  maximize/decoupled_weight_decay keys) and moments of our own choosing imports them exactly."""
  torch = pytest.importorskip('torch')
  data, config, path = _load_case('ncsnpp_ve_fourier')
  checkpoint = torch_pickle.load(path)
  rng = np.random.default_rng(0)
  state = {}
  for index, entry in checkpoint['optimizer']['state'].items():
    shape = entry['exp_avg'].shape
    state[index] = {'step': 41, 'exp_avg': torch.from_numpy(rng.normal(size=shape).astype(np.float32)),
                    'exp_avg_sq': torch.from_numpy(rng.uniform(size=shape).astype(np.float32))}
  group = {'lr': 2e-4, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': 0, 'amsgrad': False,
           'params': list(checkpoint['optimizer']['param_groups'][0]['params'])}
  crafted = {'optimizer': {'state': state, 'param_groups': [group]},
             'model': {k: torch.from_numpy(np.array(v)) for k, v in checkpoint['model'].items()},
             'ema': {**checkpoint['ema'], 'shadow_params': [torch.from_numpy(np.array(v)) for v in
                                                            checkpoint['ema']['shadow_params']]},
             'step': 1000}
  crafted_path = str(tmp_path / 'crafted.pth')
  torch.save(crafted, crafted_path)
  source = torch_port.read_score_sde_pytorch(crafted_path, config)
  assert source.step == 1000
  mu, nu, count = expected_adam(crafted_path, data, source.params)
  assert source.adam[2] == count == 41
  _assert_trees_equal(source.adam[0], mu)
  _assert_trees_equal(source.adam[1], nu)
