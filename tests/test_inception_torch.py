"""Our Flax FID Inception-v3 against pytorch-fid's, on the same (random) weights read without PyTorch.

Optional dependencies (requirements-test.txt): torch, torchvision, pytorch-fid. The module is skipped
with the reason when they are absent. pytorch-fid builds its network from torchvision's Inception
blocks; on a CPU-only torch, PyPI's torchvision wheel (built for CUDA) fails to import its compiled
operators, which this network does not use, so the test then imports torchvision's pure-Python model
code without the package's operator registration (see ``_import_pytorch_fid``).
"""

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch is an optional test dependency (requirements-test.txt)')

from scoresde.porting import torch_pickle  # pylint: disable=wrong-import-position
from scoresde.evaluation import inception  # pylint: disable=wrong-import-position

# pytorch-fid (float32 on CPU) vs ours (float32, XLA CPU): the two differ only by summation order.
# Measured: max |Δ| 5.3e-6 on pool features of magnitude up to ~10 and 3.1e-6 on logits up to ~3
# (32×32 upsampled, 331×301 downsampled and 64×64 inputs).
ATOL = 1e-4
RTOL = 1e-4


def _import_pytorch_fid():
  if importlib.util.find_spec('pytorch_fid') is None or importlib.util.find_spec('torchvision') is None:
    pytest.skip('pytorch-fid and torchvision are optional test dependencies (requirements-test.txt)',
                allow_module_level=True)  # called while the module is imported, at collection
  try:
    import torchvision  # pylint: disable=import-outside-toplevel,unused-import
  except (RuntimeError, ImportError, OSError):
    # A CUDA torchvision wheel next to CPU torch: its C++ operators (nms, ...) cannot register. The
    # Inception model is plain Python, so load torchvision.models without the package __init__.
    spec = importlib.util.find_spec('torchvision')
    stub = types.ModuleType('torchvision')
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__version__ = importlib.metadata.version('torchvision')
    sys.modules['torchvision'] = stub
    importlib.import_module('torchvision.models.inception')
  return importlib.import_module('pytorch_fid.inception')


pfi = _import_pytorch_fid()


def _random_fid_state_dict(seed):
  """pytorch-fid's FID Inception architecture (as in ``fid_inception_v3``) with random weights.

  Conv weights get He initialisation and batch-norm statistics and affine parameters random values,
  so activations keep unit scale through all 94 convolutions and every parameter matters.
  """
  torch.manual_seed(seed)
  # pylint: disable-next=protected-access
  net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfi.FIDInceptionE_1(1280)
  net.Mixed_7c = pfi.FIDInceptionE_2(2048)
  state = net.state_dict()
  with torch.no_grad():
    for key, value in state.items():
      if key.endswith('conv.weight'):
        torch.nn.init.kaiming_normal_(value, nonlinearity='relu')
      elif key.endswith('bn.weight'):
        value.uniform_(0.5, 1.5)
      elif key.endswith(('bn.bias', 'running_mean')):
        value.normal_(0., 0.3)
      elif key.endswith('running_var'):
        value.uniform_(0.5, 2.)
  return state


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
  """(pytorch-fid's InceptionV3 and its fc layer, our variables read from the legacy-format file)."""
  state = _random_fid_state_dict(0)
  # pytorch-fid's own constructor builds the network and loads "the published weights": here ours.
  with mock.patch.object(pfi, 'load_state_dict_from_url', lambda *args, **kwargs: state):
    reference = pfi.InceptionV3([pfi.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
  path = tmp_path_factory.mktemp('inception') / 'random_inception.pth'
  # The published file predates PyTorch 1.6: legacy (non-zip) serialization.
  torch.save(state, path, _use_new_zipfile_serialization=False)
  return reference, state['fc.weight'], state['fc.bias'], inception.load_variables(str(path),
                                                                                      check_sha256=False)


@pytest.mark.parametrize('shape', [(2, 32, 32, 3), (1, 331, 301, 3)], ids=['upsample', 'downsample'])
def test_pool_features_and_logits_match_pytorch_fid(nets, shape):
  reference, fc_weight, fc_bias, variables = nets
  images = np.random.default_rng(1).uniform(size=shape).astype(np.float32)
  with torch.no_grad():
    pool_t = reference(torch.from_numpy(images).permute(0, 3, 1, 2))[0].flatten(1)
    logits_t = torch.nn.functional.linear(pool_t, fc_weight, fc_bias)
  pool, logits = inception.feature_fn(variables)(images)
  assert pool.shape == (shape[0], inception.POOL_DIM) and logits.shape == (shape[0], inception.NUM_LOGITS)
  assert float(pool_t.std()) > 0.1  # the random network is not degenerate
  np.testing.assert_allclose(np.asarray(pool), pool_t.numpy(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(logits), logits_t.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_torch_pickle_reads_both_serializations(tmp_path, zip_format):
  base = torch.randn(4, 6)
  state = {'plain': torch.randn(3, 5), 'transposed': base.t(), 'slice': base[1, 2:5],
           'scalar': torch.tensor(3), 'half': torch.randn(2, 2).half(), 'long': torch.arange(7),
           'param': torch.nn.Parameter(torch.randn(2))}
  path = tmp_path / 'state.pth'
  torch.save(state, path, _use_new_zipfile_serialization=zip_format)
  loaded = torch_pickle.load(path)
  assert sorted(loaded) == sorted(state)
  for key, value in state.items():
    expected = value.detach().numpy()
    assert loaded[key].dtype == expected.dtype and loaded[key].shape == expected.shape, key
    np.testing.assert_array_equal(loaded[key], expected)


def test_torch_pickle_refuses_arbitrary_globals(tmp_path):
  path = tmp_path / 'evil.pth'
  torch.save({'module': torch.nn.Linear(2, 2)}, path)  # pickles the class by reference
  with pytest.raises(Exception, match='not allowed'):
    torch_pickle.load(path)


def test_dataset_stats_of_an_image_folder_through_the_inception(tmp_path, nets, monkeypatch):
  # The whole image path: PNG files -> uint8 -> Inception features (our weights file, its SHA-256
  # standing in for the published one) -> stats file; the features equal pytorch-fid's on images / 255.
  from scoresde.evaluation import sample_quality  # pylint: disable=import-outside-toplevel
  from configs import default_cifar10_configs  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  reference, fc_weight, fc_bias, _ = nets
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(11, 16, 16, 3), dtype=np.uint8)
  for i, image in enumerate(images):
    Image.fromarray(image).save(tmp_path / f'{i:02d}.png')
  weights = tmp_path / 'weights.pth'
  torch.save(_random_fid_state_dict(0), weights, _use_new_zipfile_serialization=False)
  monkeypatch.setattr(inception, 'SHA256', inception.sha256_of(str(weights)))
  config = default_cifar10_configs.get_default_configs()
  config.data.update(dataset='folder', path=str(tmp_path), image_size=16, random_flip=False)
  config.eval.update(batch_size=4, inception_path=str(weights), feature_batch_size=4)
  out = sample_quality.compute_dataset_stats(config, str(tmp_path / 'stats.npz'))
  with np.load(out) as data:
    pool, logits = data['pool_3'], data['logits']
    assert str(data['feature_network']) == 'inception_v3_fid' and int(data['num_examples']) == 10
  train = [int(p.stem) for p in sample_quality.datasets.folder_split_files(config, 'train')]
  with torch.no_grad():
    x = torch.from_numpy(images[train].astype(np.float32) / 255.).permute(0, 3, 1, 2)
    pool_t = reference(x)[0].flatten(1)
    logits_t = torch.nn.functional.linear(pool_t, fc_weight, fc_bias)
  np.testing.assert_allclose(pool, pool_t.numpy(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(logits, logits_t.numpy(), rtol=RTOL, atol=ATOL)
