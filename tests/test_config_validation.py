"""Bad settings fail before anything is compiled, with a message naming the key (run_lib.validate_config);
every training config this repo ships for CPU validates."""

import importlib

import pytest

from scoresde import run_lib


def _config(name='ve/toy_gmm'):
  return importlib.import_module('configs.' + name.replace('/', '.')).get_config()


@pytest.mark.parametrize('name', ['ve/toy_gmm', 'vp/toy_gmm', 'subvp/toy_gmm', 've/digits_ncsnpp_continuous',
                                  'vp/digits_ncsnpp_continuous', 'subvp/digits_ncsnpp_continuous'])
def test_shipped_configs_validate(name):
  run_lib.validate_config(_config(name))
  run_lib.validate_config(_config(name), mode='eval')


@pytest.mark.parametrize('name', ['qa/digits', 'qa/digits_generative'])
def test_shipped_detector_configs_validate(name):
  run_lib.validate_config(_config(name))
  run_lib.validate_config(_config(name), mode='qa')


def _set(config, key, value):
  group, name = key.split('.')
  config[group][name] = value


@pytest.mark.parametrize('config_name,changes,match', [
    ('ve/toy_gmm', {'training.sde': 'foosde'}, r"config.training.sde='foosde' is not known.*'vesde'"),
    ('ve/toy_gmm', {'model.name': 'unet9'}, r"config.model.name='unet9' is not a known model.*'mlp'"),
    ('ve/toy_gmm', {'sampling.predictor': 'leapfrog'}, r"leapfrog.*reverse_diffusion"),
    ('ve/toy_gmm', {'sampling.corrector': 'hmc'}, r"hmc.*langevin"),
    ('ve/toy_gmm', {'sampling.method': 'magic'}, r"config.sampling.method='magic' is not known"),
    ('ve/toy_gmm', {'training.log_freq': 12}, r'config.training.log_freq=12 must be divisible by '
                                              r'config.training.n_jitted_steps=5'),
    ('ve/toy_gmm', {'training.snapshot_freq_for_preemption': 0}, r'snapshot_freq_for_preemption=0 must be '
                                                                 'a positive'),
    ('ve/toy_gmm', {'training.n_jitted_steps': 0}, r'n_jitted_steps=0 must be a positive integer'),
    ('ve/toy_gmm', {'optim.grad_clip': 0.}, r'config.optim.grad_clip=0 would zero every gradient'),
    ('ve/toy_gmm', {'optim.optimizer': 'SGD'}, r"config.optim.optimizer='SGD' is not supported"),
    ('ve/toy_gmm', {'optim.lr': float('nan')}, r'config.optim.lr=nan must be a positive finite number'),
    ('ve/toy_gmm', {'model.ema_rate': 1.}, r'config.model.ema_rate=1.0 must lie in \[0, 1\)'),
    ('ve/toy_gmm', {'data.dataset': 'imagenet'}, r"config.data.dataset='imagenet' is not a known dataset"),
    ('ve/toy_gmm', {'model.embedding_type': 'rope'}, r"config.model.embedding_type='rope' is not known"),
    ('ve/digits_ncsnpp_continuous', {'model.name': 'mlp', 'model.num_layers': 2},
     r"config.model.name='mlp' is for vector data"),
    ('ve/digits_ncsnpp_continuous', {'data.image_size': 9, 'data.digits_layout': 'pad'},
     r'config.data.image_size=9 must be divisible'),
    ('ve/digits_ncsnpp_continuous', {'data.digits_layout': 'stretch'},
     r"config.data.digits_layout='stretch' must be one of \('upsample', 'pad'\) or ''"),
    ('ve/toy_gmm', {'data.num_workers': -1}, r'config.data.num_workers=-1 must be an integer >= 0'),
    ('subvp/toy_gmm', {'training.continuous': False}, r"discrete training.*'subvpsde'"),
    ('ve/toy_gmm', {'training.continuous': False, 'training.likelihood_weighting': True},
     r'likelihood_weighting=True is only defined for continuous training'),
    ('ve/toy_gmm', {'data.dataset': 'folder', 'data.path': '/nonexistent/images'}, r'/nonexistent/images'),
])
def test_bad_config_message(config_name, changes, match):
  config = _config(config_name)
  for key, value in changes.items():
    _set(config, key, value)
  with pytest.raises(ValueError, match=match):
    run_lib.validate_config(config)
