"""``generate.generate`` (``main.py --mode=sample``): rounds, files, seeds, with tiny models whose
variables stand in for a checkpoint (``checkpointing.load_variables`` is replaced)."""

import os

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

from scoresde import checkpointing
from scoresde import generate
from configs.ve import digits_ncsnpp_continuous
from configs.ve import toy_gmm
from scoresde.models import utils as mutils


class _PixelScore(nn.Module):
  """A per-pixel affine 'score network' with the zoo's calling convention (NHWC in, NHWC out)."""
  config: object = None

  @nn.compact
  def __call__(self, x, labels, train=False):
    return nn.Dense(x.shape[-1])(x) - x / labels.reshape(-1, 1, 1, 1)**2


def _fake_checkpoint(monkeypatch, config, model):
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1,) + _shape(config), np.float32),
                         np.ones((1,), np.float32), train=False)
  calls = []

  def load_variables(cfg, workdir=None, checkpoint=None, ema=True):
    calls.append((workdir, checkpoint, ema))
    return variables, 7
  monkeypatch.setattr(checkpointing, 'load_variables', load_variables)
  return calls


def _shape(config):
  from scoresde import datasets  # pylint: disable=import-outside-toplevel
  return tuple(datasets.data_shape(config))


def test_generate_images_in_rounds(tmp_path, monkeypatch):
  config = digits_ncsnpp_continuous.get_config()
  config.model.num_scales = 10
  config.sampling.langevin_per_sample = True  # the batch-averaged default couples a round's samples
  model = _PixelScore()
  monkeypatch.setattr(mutils, 'create_model', lambda cfg: model)
  calls = _fake_checkpoint(monkeypatch, config, model)
  out = generate.generate(config, str(tmp_path), num_samples=20, batch_size=8)
  assert calls == [(str(tmp_path), None, True)]
  assert out == os.path.join(str(tmp_path), 'samples', 'ckpt_7')
  rounds = [np.load(os.path.join(out, f'samples_{r}.npz'))['samples'] for r in range(3)]
  assert [r.shape for r in rounds] == [(8, 8, 8, 1), (8, 8, 8, 1), (4, 8, 8, 1)]
  assert all(r.dtype == np.uint8 for r in rounds)
  grid = np.asarray(Image.open(os.path.join(out, 'samples.png')))
  # 20 images: 4 rows of 5 tiles of 8 + 2 pixels, enlarged 8x to reach 384 pixels.
  assert grid.shape == (8 * (4 * 10 + 2), 8 * (5 * 10 + 2))

  # Sample i depends only on (seed, i): one round of 16 reproduces the first two rounds of 8.
  again = generate.generate(config, str(tmp_path), num_samples=16, batch_size=16,
                            out_dir=str(tmp_path / 'again'))
  np.testing.assert_array_equal(np.load(os.path.join(again, 'samples_0.npz'))['samples'],
                                np.concatenate(rounds[:2]))


def test_generate_toy_points(tmp_path, monkeypatch):
  config = toy_gmm.get_config()
  config.model.num_scales = 10
  config.model.nf = 8
  config.model.num_layers = 1
  config.sampling.method = 'ode'
  config.sampling.ode_rtol = config.sampling.ode_atol = 1e-2
  _fake_checkpoint(monkeypatch, config, mutils.create_model(config))
  out = generate.generate(config, str(tmp_path), checkpoint='3', num_samples=16, batch_size=16)
  samples = np.load(os.path.join(out, 'samples_0.npz'))['samples']
  assert samples.shape == (16, 2) and samples.dtype == np.float32 and np.all(np.isfinite(samples))
  assert os.path.exists(os.path.join(out, 'samples.png'))


def test_generate_rejects_bad_sizes(tmp_path):
  config = toy_gmm.get_config()
  with pytest.raises(ValueError, match='config.eval.num_samples'):
    generate.generate(config, str(tmp_path), num_samples=0)
