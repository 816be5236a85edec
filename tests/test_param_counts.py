"""Parameter counts of every config in the tree, computed abstractly (jax.eval_shape: no memory, no
compilation): one table of our counts, equal to the reference implementation's wherever REFERENCE §3.7
counted it, and the README's parameter-count table checked against it, figure by figure."""

import functools
import glob
import importlib
import os
import re

import jax
import jax.numpy as jnp
import pytest

from scoresde import datasets
from scoresde.models import utils

ROOT = os.path.join(os.path.dirname(__file__), '..')
CONFIG_DIR = os.path.join(ROOT, 'configs')


def _is_config(path):
  with open(path) as f:
    return 'def get_config(' in f.read()


# Every file that defines get_config(): a new config without an entry below fails.
ALL_CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR)[:-len('.py')].replace(os.sep, '/')
    for p in glob.glob(os.path.join(CONFIG_DIR, '**', '*.py'), recursive=True) if _is_config(p))

PARAM_COUNTS = {
    # NCSN++ / DDPM++ (models/ncsnpp.py)
    've/cifar10': 107_587_075,
    've/cifar10_ncsnpp': 62_693_251,
    've/cifar10_ncsnpp_continuous': 62_758_915,
    've/cifar10_ncsnpp_deep_continuous': 107_587_075,
    've/celeba_ncsnpp': 62_693_251,
    've/bedroom_ncsnpp_continuous': 65_574_549,
    've/church_ncsnpp_continuous': 65_574_549,
    've/celebahq_256_ncsnpp_continuous': 65_574_549,
    've/ffhq_256_ncsnpp_continuous': 65_574_549,
    've/celebahq_ncsnpp_continuous': 105_785_896,
    've/ffhq_ncsnpp_continuous': 105_785_896,
    'vp/cifar10_ddpmpp': 61_804_419,
    'vp/cifar10_ddpmpp_continuous': 61_804_419,
    'vp/cifar10_ddpmpp_deep_continuous': 106_632_579,
    'vp/cifar10_ncsnpp': 62_693_251,
    'vp/cifar10_ncsnpp_continuous': 62_693_251,
    'vp/cifar10_ncsnpp_deep_continuous': 107_521_411,
    'subvp/cifar10_ddpmpp_continuous': 61_804_419,
    'subvp/cifar10_ddpmpp_deep_continuous': 106_632_579,
    'subvp/cifar10_ncsnpp_continuous': 62_693_251,
    'subvp/cifar10_ncsnpp_deep_continuous': 107_521_411,
    've/digits_ncsnpp_continuous': 752_865,
    'vp/digits_ncsnpp_continuous': 748_737,
    'subvp/digits_ncsnpp_continuous': 748_737,
    'vp/digits_likelihood': 748_737,
    've/digits_likelihood': 752_865,
    # DDPM (models/ddpm.py)
    've/cifar10_ddpm': 35_218_947,
    'vp/ddpm/cifar10': 35_218_947,
    'vp/ddpm/cifar10_continuous': 35_218_947,
    'vp/ddpm/cifar10_unconditional': 32_329_347,  # no time embedding: see the hand count below
    'subvp/cifar10_ddpm_continuous': 35_218_947,
    'vp/ddpm/bedroom': 111_569_923,
    'vp/ddpm/church': 111_569_923,
    'vp/ddpm/celebahq': 111_569_923,
    # NCSNv2 and NCSN v1 (models/ncsnv2.py); NCSN v1 grows with the number of noise levels
    've/ncsnv2/cifar10': 33_970_563,
    've/ncsnv2/celeba': 33_970_563,
    've/ncsnv2/bedroom': 83_445_379,
    've/ncsn/cifar10': 34_428_675,
    've/ncsn/cifar10_5': 34_428_675,
    've/ncsn/cifar10_124': 44_828_931,
    've/ncsn/cifar10_1245': 44_828_931,
    've/ncsn/celeba': 34_428_675,
    've/ncsn/celeba_5': 34_428_675,
    've/ncsn/celeba_124': 57_384_195,
    've/ncsn/celeba_1245': 57_384_195,
    # MLP on 2-D toy data (models/mlp.py)
    've/toy_gmm': 215_234,
    'vp/toy_gmm': 215_170,
    'subvp/toy_gmm': 215_170,
    # Anomaly detectors (configs/qa; NCSN++ at discrete noise levels, or the demo's generative model)
    'qa/digits': 986_177,
    'qa/digits_generative': 752_865,
    'qa/latents': 1_742_372,
}

# REFERENCE §3.7, row by row: the reference implementation's counts (jax.eval_shape of its modules).
# Its row "vp/ddpm/cifar10*" means the time-conditioned DDPM configs; the reference's
# cifar10_unconditional (model.conditional = False) skips the time embedding exactly as ours does, so
# its count is not that row's (test_unconditional_ddpm_drops_exactly_the_time_conditioning).
REFERENCE_COUNTS = {
    **dict.fromkeys(('ve/cifar10_ncsnpp', 'vp/cifar10_ncsnpp', 'vp/cifar10_ncsnpp_continuous',
                     'subvp/cifar10_ncsnpp_continuous', 've/celeba_ncsnpp'), 62_693_251),
    've/cifar10_ncsnpp_continuous': 62_758_915,
    've/cifar10_ncsnpp_deep_continuous': 107_587_075,
    **dict.fromkeys(('vp/cifar10_ncsnpp_deep_continuous', 'subvp/cifar10_ncsnpp_deep_continuous'),
                    107_521_411),
    **dict.fromkeys(('vp/cifar10_ddpmpp', 'vp/cifar10_ddpmpp_continuous',
                     'subvp/cifar10_ddpmpp_continuous'), 61_804_419),
    **dict.fromkeys(('vp/cifar10_ddpmpp_deep_continuous', 'subvp/cifar10_ddpmpp_deep_continuous'),
                    106_632_579),
    **dict.fromkeys(('vp/ddpm/cifar10', 'vp/ddpm/cifar10_continuous', 'subvp/cifar10_ddpm_continuous',
                     've/cifar10_ddpm'), 35_218_947),
    **dict.fromkeys(('ve/ncsnv2/cifar10', 've/ncsnv2/celeba'), 33_970_563),
    've/ncsnv2/bedroom': 83_445_379,
    've/ncsn/cifar10': 34_428_675,
    've/ncsn/cifar10_124': 44_828_931,
    **dict.fromkeys(('ve/bedroom_ncsnpp_continuous', 've/church_ncsnpp_continuous',
                     've/ffhq_256_ncsnpp_continuous'), 65_574_549),
    'vp/ddpm/bedroom': 111_569_923,
}


def load(name):
  return importlib.import_module('configs.' + name.replace('/', '.')).get_config()


def abstract_param_count(config):
  model = utils.create_model(config)
  x = jnp.zeros((1,) + tuple(datasets.data_shape(config)), jnp.float32)
  labels = jnp.ones((1,), jnp.float32 if config.training.continuous else jnp.int32)
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                                             x, labels, train=False))
  return utils.param_count(shapes)


@functools.cache
def counted(name):
  return abstract_param_count(load(name))


@pytest.mark.parametrize('name', ALL_CONFIGS)
def test_parameter_count(name):
  assert name in PARAM_COUNTS, f'{name} has no entry in PARAM_COUNTS (its count is {counted(name):_})'
  assert counted(name) == PARAM_COUNTS[name]


def test_table_lists_only_existing_configs():
  assert not set(PARAM_COUNTS) - set(ALL_CONFIGS), sorted(set(PARAM_COUNTS) - set(ALL_CONFIGS))


def test_counts_equal_the_reference():
  assert {name: PARAM_COUNTS[name] for name in REFERENCE_COUNTS} == REFERENCE_COUNTS


def ddpm_time_conditioning_params(m):
  """What ``model.conditional`` adds to the DDPM U-Net, counted by hand: the embedding MLP
  (Dense nf → 4nf, Dense 4nf → 4nf) and, in every ResnetBlockDDPM, the Dense 4nf → out_ch that adds
  the embedding to its feature maps (num_res_blocks per level down, two in the middle,
  num_res_blocks + 1 per level up)."""
  nf, temb = m.nf, 4 * m.nf
  embedding = (nf + 1) * temb + (temb + 1) * temb
  out_channels = ([nf * mult for mult in m.ch_mult for _ in range(m.num_res_blocks)]
                  + 2 * [nf * m.ch_mult[-1]]
                  + [nf * mult for mult in m.ch_mult for _ in range(m.num_res_blocks + 1)])
  return embedding + sum((temb + 1) * c for c in out_channels)


def test_unconditional_ddpm_drops_exactly_the_time_conditioning():
  conditional, unconditional = load('vp/ddpm/cifar10'), load('vp/ddpm/cifar10_unconditional')
  assert unconditional.model.conditional is False
  unconditional.model.conditional = True
  assert unconditional.to_dict() == conditional.to_dict()  # the only difference
  # nf = 128, ch_mult (1, 2, 2, 2), 2 blocks: 20·128² + 8·128 = 328,704 in the embedding and
  # 513 · 128 · (5·7 + 2·2) = 2,560,896 in the 22 blocks.
  assert ddpm_time_conditioning_params(conditional.model) == 2_889_600
  assert (counted('vp/ddpm/cifar10') - counted('vp/ddpm/cifar10_unconditional')
          == ddpm_time_conditioning_params(conditional.model))


def test_time_conditioning_hand_count_on_another_geometry():
  """The hand count is not fitted to one configuration: three levels of unequal width, one block each."""
  config = load('vp/ddpm/cifar10')
  config.data.image_size = 8
  m = config.model
  m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2, 3), 1, (4,)
  with_time = abstract_param_count(config)
  m.conditional = False
  assert with_time - abstract_param_count(config) == ddpm_time_conditioning_params(m)


def test_ncsn_grows_by_one_conditional_norm_row_per_noise_level():
  """NCSN v1's counts at 10 and 232 levels are the reference's; its other configs follow the same line."""
  per_level = (REFERENCE_COUNTS['ve/ncsn/cifar10_124'] - REFERENCE_COUNTS['ve/ncsn/cifar10']) // (232 - 10)
  for name in (n for n in ALL_CONFIGS if n.startswith('ve/ncsn/')):
    assert PARAM_COUNTS[name] == REFERENCE_COUNTS['ve/ncsn/cifar10'] + per_level * (
        load(name).model.num_scales - 10), name


# ----------------------------------------------------------------------------------------------------
# README: the "params" column of the config table ("`ve/{a,b}_x.py`" names several configs).


def expand_braces(pattern):
  match = re.search(r'\{([^{}]*)\}', pattern)
  if not match:
    return [pattern]
  return [name for alternative in match.group(1).split(',')
          for name in expand_braces(pattern[:match.start()] + alternative + pattern[match.end():])]


def readme_param_table(text):
  """[(config names, params cell)] of the README table whose header starts "| config |" and has "params"."""
  cells = lambda line: [c.strip() for c in line.strip().strip('|').split('|')]
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines)
               if line.startswith('| config |') and 'params' in cells(line))
  column = cells(lines[start]).index('params')
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith('|'):
      break
    row = cells(line)
    names = [path[:-len('.py')] for item in re.findall(r'`([^`]+\.py)`', row[0])
             for path in expand_braces(item)]
    rows.append((names, row[column]))
  return rows


def readme_mismatches(text):
  problems, listed = [], []
  for names, figure in readme_param_table(text):
    for name in names:
      listed.append(name)
      if name not in PARAM_COUNTS:
        problems.append(f'{name}: listed in the README but not a config')
      elif figure != f'{PARAM_COUNTS[name] / 1e6:.2f}M':
        problems.append(f'{name}: README says {figure!r}, the model has {PARAM_COUNTS[name]:,} '
                        f'({PARAM_COUNTS[name] / 1e6:.2f}M)')
  problems += [f'{name}: listed more than once' for name in sorted({n for n in listed
                                                                   if listed.count(n) > 1})]
  problems += [f'{name}: missing from the README table' for name in sorted(set(ALL_CONFIGS) - set(listed))]
  return problems


def test_readme_parameter_table_matches_the_models():
  with open(os.path.join(ROOT, 'README.md')) as f:
    assert readme_mismatches(f.read()) == []
