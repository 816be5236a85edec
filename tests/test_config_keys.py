"""Every key the code reads is declared in the configs, so every key can be overridden on the command line.

absl's ``config_flags`` locks the config: ``--config.data.digits_layout=pad`` fails with AttributeError
unless some config declares ``data.digits_layout``, and a ``config.get(key, default)`` in the code would
hide such a key from users and shadow the configs' values. So each config is locked and wrapped in a
recorder that logs every key read and refuses ``.get``, then run through validation → data shape → model
init → loss, train step and sampler construction (``jax.eval_shape``: nothing compiles); the cheap configs
(toy, digits) also draw data and trace one train step. Plus a static check of the library's source, and
every ``--config.…`` override in README.md parsed with absl as ``main.py`` parses it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import re
import types

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image
import pytest

from scoresde import datasets
from scoresde.evaluation import sample_quality
from scoresde import losses
from scoresde import run_lib
from scoresde import sampling
from scoresde import sde_lib
from scoresde.models import utils

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
CONFIG_DIR = os.path.join(REPO, 'configs')
ALL_CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR)[:-len('.py')]
    for p in glob.glob(os.path.join(CONFIG_DIR, '**', '*.py'), recursive=True)
    if not os.path.basename(p).startswith(('default_', '_')))
CHEAP_CONFIGS = [n for n in ALL_CONFIGS if os.path.basename(n).startswith(('toy_', 'digits_'))]
PREDICTORS = ('euler_maruyama', 'reverse_diffusion', 'ancestral_sampling', 'none')
CORRECTORS = ('langevin', 'ald', 'none')
DROPPED_KEYS = {'model': ('attention_type', 'conv_size', 'sigma_begin'), 'optim': ('amsgrad',),
                'training': ('loss', 'continuouse')}
# config_flags loads config files with importlib's deprecated load_module().
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')


def load(name: str) -> ml_collections.ConfigDict:
  config = importlib.import_module('configs.' + name.replace(os.sep, '.').replace('/', '.')).get_config()
  config.lock()  # as main.py's config_flags.DEFINE_config_file(lock_config=True)
  return config


@dataclasses.dataclass
class Log:
  reads: set[str] = dataclasses.field(default_factory=set)
  missing: set[str] = dataclasses.field(default_factory=set)  # undeclared keys read
  gets: set[str] = dataclasses.field(default_factory=set)  # keys read with .get


class Recorder:
  """A read-only view of a ConfigDict that logs the keys read (attribute, item or ``in``) and fails on
  ``.get`` and on undeclared keys, even where the caller would catch the error."""

  def __init__(self, config: ml_collections.ConfigDict, log: Log, prefix: str = ''):
    object.__setattr__(self, '_config', config)
    object.__setattr__(self, '_log', log)
    object.__setattr__(self, '_prefix', prefix)

  def _read(self, key):
    path = self._prefix + str(key)
    if key not in self._config:
      self._log.missing.add(path)
      raise KeyError(f'config.{path} is declared in no config')
    self._log.reads.add(path)
    value = self._config[key]
    return Recorder(value, self._log, path + '.') if isinstance(value, ml_collections.ConfigDict) else value

  def __getattr__(self, name):
    if name.startswith('__') or (hasattr(ml_collections.ConfigDict, name) and name not in self._config):
      return getattr(self._config, name)  # to_dict, keys, items, ...
    try:
      return self._read(name)
    except KeyError as e:
      raise AttributeError(str(e)) from None

  def __getitem__(self, key):
    return self._read(key)

  def __contains__(self, key):
    self._log.reads.add(self._prefix + str(key) + ' (in)')
    return key in self._config

  def __iter__(self):
    return iter(self._config)

  def get(self, key, default=None):
    del default
    self._log.gets.add(self._prefix + str(key))
    raise AssertionError(f'config.{self._prefix}get({key!r}, ...): read declared keys as attributes')

  def __setattr__(self, name, value):
    raise AssertionError(f'the code wrote config.{self._prefix}{name}')

  __setitem__ = __setattr__


def _labels(config):
  return jnp.ones((1,), jnp.float32 if config.training.continuous else jnp.int32)


def _build(config, log: Log, train_step: bool):
  """Validation → shapes → model → loss / train step → sampler, on a recorded view of ``config``."""
  cfg = Recorder(config, log)
  run_lib.validate_config(cfg, mode='train')
  run_lib.validate_config(cfg, mode='eval')
  sde = sde_lib.get_sde(cfg)
  shape = tuple(datasets.data_shape(cfg))
  scaler, inverse_scaler = datasets.get_data_scaler(cfg), datasets.get_data_inverse_scaler(cfg)
  model = utils.create_model(cfg)
  x = jnp.zeros((1,) + shape, jnp.float32)
  keys = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  optimizer = losses.get_optimizer(cfg)
  step = losses.get_train_step(cfg, losses.get_loss_fn(cfg, sde, model, train=True), optimizer)

  def one_step():
    variables = model.init(keys, x, _labels(cfg), train=False)
    state = losses.init_train_state(jax.random.key(2), variables['params'], optimizer)
    return step(state, scaler(x))

  out, variables = jax.eval_shape(lambda: model.init_with_output(keys, x, _labels(cfg), train=False))
  if train_step:
    new_state, metrics = jax.eval_shape(one_step)
    assert metrics['loss'].shape == () and jax.tree.structure(new_state.params) == jax.tree.structure(
        variables['params'])
  sampling.get_sampling_fn(cfg, sde, (2,) + shape, inverse_scaler)
  if datasets.dataset_name(cfg) not in datasets.TOY_DATASETS:
    sample_quality.stats_path(cfg)
    sample_quality.sample_settings(cfg, 'features')
  return sde, out, variables


def _check(log: Log, name: str):
  assert not log.gets, f'{name}: the code read {sorted(log.gets)} with .get(key, default)'
  assert not log.missing, f'{name}: the code read {sorted(log.missing)}, which the config does not declare'


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """For the data.dataset='folder' configs (CelebA-HQ, FFHQ), whose validation lists data.path."""
  path = tmp_path_factory.mktemp('images')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path / 'a.png')
  return str(path)


@pytest.mark.parametrize('name', ALL_CONFIGS)
def test_config_declares_every_key_the_code_reads(name, image_folder):
  config, log = load(name), Log()
  if config.data.dataset == 'folder':
    config.data.path = image_folder
  sde, out, variables = _build(config, log, train_step=name in CHEAP_CONFIGS)
  if name in CHEAP_CONFIGS:
    cfg = Recorder(config, log)
    next(datasets.get_train_iterator(cfg, process_count=1, process_index=0))
    next(datasets.get_eval_iterator(cfg, process_count=1, process_index=0))
  _check(log, name)
  assert utils.param_count(variables) > 0
  assert out.shape == (1,) + tuple(datasets.data_shape(config))

  # Sampling defaults per SDE (the reference hard-codes them): eps = 1e-5 for VE, 1e-3 for VP / sub-VP.
  assert config.sampling.eps == (1e-5 if isinstance(sde, sde_lib.VESDE) else 1e-3)
  assert config.sampling.predictor in PREDICTORS and config.sampling.corrector in CORRECTORS
  for group, keys in DROPPED_KEYS.items():
    for key in keys:
      assert key not in config[group], f'config.{group}.{key} is read nowhere'


# The branches the shipped configs leave off, on the toy configs (one abstract train step each).
@pytest.mark.parametrize('name,changes', [
    ('ve/toy_gmm', {'training.continuous': False, 'model.embedding_type': 'positional'}),
    ('vp/toy_gmm', {'training.continuous': False, 'model.embedding_type': 'positional'}),
    ('ve/toy_gmm', {'training.sliced_score_matching': True, 'training.ssm_n_projections': 2}),
    ('subvp/toy_gmm', {'training.likelihood_weighting': True, 'model.ema_warmup': True}),
    ('vp/toy_gmm', {'sampling.method': 'ode', 'training.snapshot_batch_size': 16}),
])
def test_config_declares_the_keys_of_other_branches(name, changes):
  config, log = load(name), Log()
  for key, value in changes.items():
    group, field = key.split('.')
    config[group][field] = value
  _build(config, log, train_step=True)
  _check(log, name)
  assert set(changes) <= log.reads


def test_recorder_sees_the_keys_of_the_issue():
  config, log = load('ve/digits_ncsnpp_continuous'), Log()
  _build(config, log, train_step=False)
  issue_keys = {'data.digits_layout', 'model.ema_warmup', 'training.snapshot_batch_size', 'sampling.eps'}
  assert issue_keys <= log.reads
  with pytest.raises(AssertionError, match='get'):
    Recorder(config, log).model.get('nf', 1)
  with pytest.raises(AttributeError):
    Recorder(config, Log()).model.no_such_key  # pylint: disable=expression-not-assigned


# ----------------------------------------------------------------------------------------------------
# Static: no call-site defaults in the library's source.

LIBRARY_FILES = sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, '**', '*.py'), recursive=True)
    if not os.path.relpath(p, REPO).startswith(('tests' + os.sep, 'configs' + os.sep, '.')))
# config.x.get(...), cfg.get(...), and the usual aliases of a config group (m = config.model, ...).
CONFIG_GET = re.compile(r'\b(?:config|cfg|m|training|sampling|evaluate|optim|model|data)(?:\.\w+)*\.get\(|'
                        r'getattr\((?:self\.)?(?:config|cfg)\b')
CONFIG_KEY = re.compile(r'\bconfig\.(training|sampling|eval|data|model|optim)\.([A-Za-z_]\w*)')


def _source_lines():
  assert os.path.join('scoresde', 'datasets.py') in LIBRARY_FILES
  assert os.path.join('scoresde', 'models', 'ncsnpp.py') in LIBRARY_FILES
  for path in LIBRARY_FILES:
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        yield f'{path}:{number}', line


def test_library_reads_no_config_key_with_a_default():
  found = [f'{where}: {line.strip()}' for where, line in _source_lines() if CONFIG_GET.search(line)]
  assert not found, 'read these keys as attributes and declare them in configs/:\n' + '\n'.join(found)


def test_every_key_named_in_the_library_is_declared():
  declared = set()
  for name in ALL_CONFIGS:
    config = load(name)
    declared |= {(group, key) for group, sub in config.items() if isinstance(sub, ml_collections.ConfigDict)
                 for key in sub}
  undeclared = sorted({f'{where}: config.{g}.{k}' for where, line in _source_lines()
                       for g, k in CONFIG_KEY.findall(line)
                       if (g, k) not in declared and not hasattr(ml_collections.ConfigDict, k)})
  assert not undeclared, 'declared in no config:\n' + '\n'.join(undeclared)


# ----------------------------------------------------------------------------------------------------
# The overrides README.md shows parse as main.py parses them (absl, lock_config=True).

HEADLINE_CONFIGS = ('ve/cifar10', 've/digits_ncsnpp_continuous')  # the configs README's commands use


def _readme_overrides():
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  return sorted(set(re.findall(r'--config\.([\w.]+)=([^\s`\]\)\'"]+)', text)))


def parse(name: str, *overrides: str) -> ml_collections.ConfigDict:
  argv = ['main.py', f'--config={os.path.join(CONFIG_DIR, name + ".py")}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', lock_config=True, flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def _field(config, path):
  for part in path.split('.'):
    config = config[part]
  return config


def test_readme_shows_overrides():
  keys = {k for k, _ in _readme_overrides()}
  assert {'data.digits_layout', 'model.ema_warmup', 'eval.enable_bpd', 'training.batch_size'} <= keys


def _has(config, path):
  try:
    _field(config, path)
  except (KeyError, AttributeError):
    return False
  return True


@pytest.mark.parametrize('key,value', _readme_overrides())
def test_readme_override_parses(key, value):
  """On the configs README's commands use, and on every other config that declares the key."""
  for name in ALL_CONFIGS:
    if name in HEADLINE_CONFIGS or _has(load(name), key):
      config = parse(name, f'--config.{key}={value}')
      assert str(_field(config, key)) == value, (name, key)


def test_digits_layout_pad_override_pads():
  config = parse('ve/digits_ncsnpp_continuous', '--config.data.digits_layout=pad',
                 '--config.data.image_size=16')
  run_lib.validate_config(config)
  batch = next(datasets.get_eval_iterator(config, process_count=1, process_index=0))['image']
  assert batch.shape[1:] == (16, 16, 1)
  border = np.ones((16, 16), bool)
  border[4:12, 4:12] = False
  assert np.all(batch[:, border] == 0) and np.any(batch[:, 4:12, 4:12] > 0)
  # '' (the default) resolves by size: a multiple of 8 upsamples, other sizes pad.
  for size, layout in ((8, 'upsample'), (16, 'upsample'), (12, 'pad')):
    config = parse('ve/digits_ncsnpp_continuous', f'--config.data.image_size={size}')
    assert datasets._digits_layout(config) == layout  # pylint: disable=protected-access


def test_auto_defaults_resolve():
  config = parse('ve/cifar10')
  assert config.training.snapshot_batch_size == 0 and config.data.num_workers == 0
  assert run_lib._snapshot_batch_size(config) == config.training.batch_size  # pylint: disable=protected-access
  config = parse('ve/cifar10', '--config.training.snapshot_batch_size=16', '--config.data.num_workers=3',
                 '--config.training.ssm_n_projections=4')
  assert run_lib._snapshot_batch_size(config) == 16  # pylint: disable=protected-access
  threaded = types.SimpleNamespace(parallel=True)  # a source read by a thread pool (files, TFDS)
  for workers, expected in ((3, 3), (0, min(8, os.cpu_count() or 1))):
    config.data.num_workers = workers
    pool = datasets._loader_pool(config, threaded)  # pylint: disable=protected-access
    assert pool._max_workers == expected  # pylint: disable=protected-access
    pool.shutdown()
