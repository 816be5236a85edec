"""The config tree: the paper's configs are all there, with the reference's hyper-parameters (REFERENCE
§2); the reference's defects are fixed. (That every config validates and builds its model, reading only
keys it declares, is test_config_keys.py.)"""

import glob
import importlib
import os

import pytest

from scoresde.models import normalization
from scoresde.models import utils

CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'configs')
ALL_CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR)[:-len('.py')]
    for p in glob.glob(os.path.join(CONFIG_DIR, '**', '*.py'), recursive=True)
    if not os.path.basename(p).startswith(('default_', '_')))


def load(name):
  return importlib.import_module('configs.' + name.replace(os.sep, '.').replace('/', '.')).get_config()


def test_the_paper_tree_is_complete():
  expected = {
      've/cifar10', 've/cifar10_ddpm', 've/cifar10_ncsnpp', 've/cifar10_ncsnpp_continuous',
      've/cifar10_ncsnpp_deep_continuous', 've/celeba_ncsnpp', 've/bedroom_ncsnpp_continuous',
      've/church_ncsnpp_continuous', 've/celebahq_256_ncsnpp_continuous', 've/ffhq_256_ncsnpp_continuous',
      've/celebahq_ncsnpp_continuous', 've/ffhq_ncsnpp_continuous',
      *(f've/ncsn/{d}{s}' for d in ('cifar10', 'celeba') for s in ('', '_5', '_124', '_1245')),
      've/ncsnv2/cifar10', 've/ncsnv2/celeba', 've/ncsnv2/bedroom',
      *(f'vp/cifar10_{m}' for m in ('ddpmpp', 'ddpmpp_continuous', 'ddpmpp_deep_continuous', 'ncsnpp',
                                    'ncsnpp_continuous', 'ncsnpp_deep_continuous')),
      *(f'vp/ddpm/{d}' for d in ('cifar10', 'cifar10_continuous', 'cifar10_unconditional', 'bedroom',
                                 'church', 'celebahq')),
      *(f'subvp/cifar10_{m}' for m in ('ddpm_continuous', 'ddpmpp_continuous', 'ddpmpp_deep_continuous',
                                       'ncsnpp_continuous', 'ncsnpp_deep_continuous')),
  }
  assert expected <= set(ALL_CONFIGS), sorted(expected - set(ALL_CONFIGS))


@pytest.mark.parametrize('name', ALL_CONFIGS)
def test_config_files_are_portable(name):
  with open(os.path.join(CONFIG_DIR, name + '.py')) as f:
    text = f.read()
  assert 'import torch' not in text
  for prefix in ('/home/', '/atlas/', '/raid/'):
    assert prefix not in text, f'personal path in {name}'


# (config, sde, continuous, model, num_res_blocks, fir, progressive_input, embedding, scale_by_sigma,
#  centered, reduce_mean, ema_rate, n_iters, predictor, corrector): REFERENCE §2.3.
CIFAR10_TABLE = [
    ('ve/cifar10_ncsnpp', 'vesde', False, 'ncsnpp', 4, True, 'residual', 'positional', True, False, False,
     0.999, 1300001, 'reverse_diffusion', 'langevin'),
    ('ve/cifar10_ncsnpp_continuous', 'vesde', True, 'ncsnpp', 4, True, 'residual', 'fourier', True, False,
     False, 0.999, 1300001, 'reverse_diffusion', 'langevin'),
    ('ve/cifar10_ncsnpp_deep_continuous', 'vesde', True, 'ncsnpp', 8, True, 'residual', 'fourier', True,
     False, False, 0.999, 950001, 'reverse_diffusion', 'langevin'),
    ('vp/cifar10_ddpmpp', 'vpsde', False, 'ncsnpp', 4, False, 'none', 'positional', False, True, True,
     0.9999, 1300001, 'ancestral_sampling', 'none'),
    ('vp/cifar10_ddpmpp_continuous', 'vpsde', True, 'ncsnpp', 4, False, 'none', 'positional', False, True,
     True, 0.9999, 1300001, 'euler_maruyama', 'none'),
    ('vp/cifar10_ddpmpp_deep_continuous', 'vpsde', True, 'ncsnpp', 8, False, 'none', 'positional', False,
     True, True, 0.9999, 950001, 'euler_maruyama', 'none'),
    ('vp/cifar10_ncsnpp', 'vpsde', False, 'ncsnpp', 4, True, 'residual', 'positional', False, True, True,
     0.9999, 1300001, 'reverse_diffusion', 'none'),
    ('vp/cifar10_ncsnpp_continuous', 'vpsde', True, 'ncsnpp', 4, True, 'residual', 'positional', False,
     True, True, 0.9999, 1300001, 'euler_maruyama', 'none'),
    ('vp/cifar10_ncsnpp_deep_continuous', 'vpsde', True, 'ncsnpp', 8, True, 'residual', 'positional',
     False, True, True, 0.9999, 950001, 'euler_maruyama', 'none'),
    ('subvp/cifar10_ddpmpp_continuous', 'subvpsde', True, 'ncsnpp', 4, False, 'none', 'positional', False,
     True, True, 0.9999, 1300001, 'euler_maruyama', 'none'),
    ('subvp/cifar10_ddpmpp_deep_continuous', 'subvpsde', True, 'ncsnpp', 8, False, 'none', 'positional',
     False, True, True, 0.9999, 950001, 'euler_maruyama', 'none'),
    ('subvp/cifar10_ncsnpp_continuous', 'subvpsde', True, 'ncsnpp', 4, True, 'residual', 'positional',
     False, True, True, 0.9999, 1300001, 'euler_maruyama', 'none'),
    ('subvp/cifar10_ncsnpp_deep_continuous', 'subvpsde', True, 'ncsnpp', 8, True, 'residual', 'positional',
     False, True, True, 0.9999, 950001, 'euler_maruyama', 'none'),
]


@pytest.mark.parametrize('row', CIFAR10_TABLE, ids=[r[0] for r in CIFAR10_TABLE])
def test_cifar10_hyperparameters_are_the_references(row):
  (name, sde, continuous, model, blocks, fir, prog_input, embedding, scale_by_sigma, centered,
   reduce_mean, ema, n_iters, predictor, corrector) = row
  c = load(name)
  got = (c.training.sde, c.training.continuous, c.model.name, c.model.num_res_blocks, c.model.fir,
         c.model.progressive_input, c.model.embedding_type, c.model.scale_by_sigma, c.data.centered,
         c.training.reduce_mean, c.model.ema_rate, c.training.n_iters, c.sampling.predictor,
         c.sampling.corrector)
  assert got == row[1:]
  assert (c.model.nf, tuple(c.model.ch_mult), tuple(c.model.attn_resolutions)) == (128, (1, 2, 2, 2), (16,))
  assert (c.training.batch_size, c.optim.lr, c.optim.warmup, c.optim.grad_clip, c.sampling.snr) == (
      128, 2e-4, 5000, 1., 0.16)


def test_short_name_is_the_headline_model():
  assert load('ve/cifar10').to_dict() == load('ve/cifar10_ncsnpp_deep_continuous').to_dict()


def test_reference_defects_are_fixed():
  assert load('ve/ncsn/celeba').training.sde == 'vesde'
  assert load('ve/ncsnv2/bedroom').training.continuous is False
  for name in ('ve/ncsn/cifar10', 've/ncsn/cifar10_124', 've/ncsn/celeba_1245'):
    config = load(name)
    assert normalization.num_classes(config) == config.model.num_scales
    config.model.num_scales = 7  # num_classes follows num_scales
    assert normalization.num_classes(config) == 7
    utils.validate_model_config(config)


@pytest.mark.parametrize('name,key,value,match', [
    ('ve/cifar10_ncsnpp_continuous', 'data.image_size', 36, 'config.data.image_size'),
    ('vp/ddpm/cifar10', 'data.image_size', 20, 'config.data.image_size'),
    ('vp/cifar10_ddpmpp_continuous', 'model.nf', 18, 'config.model.nf'),
    ('vp/ddpm/cifar10', 'model.nf', 48, 'config.model.nf'),
    ('ve/ncsnv2/bedroom', 'data.image_size', 30, 'config.data.image_size'),
    ('ve/ncsn/cifar10', 'model.normalization', 'GroupNorm', 'config.model.normalization'),
    ('ve/ncsnv2/cifar10', 'model.interpolation', 'bicubic', 'config.model.interpolation'),
    ('ve/cifar10_ncsnpp', 'model.embedding_type', 'fourier', 'embedding_type'),
    ('ve/cifar10_ncsnpp', 'model.resblock_type', 'resnet', 'config.model.resblock_type'),
])
def test_validator_names_the_key(name, key, value, match):
  config = load(name)
  group, field = key.split('.')
  setattr(config[group], field, value)
  with pytest.raises(ValueError, match=match):
    utils.validate_model_config(config)
