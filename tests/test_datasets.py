"""Data pipelines: scalers, digits, mock TFDS, image folders, toy samplers, resumability, sharding."""

import importlib.util
import io

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import default_cifar10_configs
from scoresde import datasets


def make_config(dataset='digits', image_size=8, num_channels=1, num_levels=17, batch_size=8,
                eval_batch_size=64, **data):
  config = default_cifar10_configs.get_default_configs()
  config.data.dataset = dataset
  config.data.image_size = image_size
  config.data.num_channels = num_channels
  config.data.num_levels = num_levels
  config.data.random_flip = False
  config.data.update(data)
  config.training.batch_size = batch_size
  config.eval.batch_size = eval_batch_size
  return config


def rgb_config(dataset, image_size, **data):
  return make_config(dataset, image_size, 3, 256, **data)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def eval_images(config, split='test', **kwargs):
  """The unpadded images of one eval pass, in order, and the number of batches."""
  batches = list(datasets.get_eval_iterator(config, split, process_count=1, process_index=0, **kwargs))
  return np.concatenate([b['image'][b['mask']] for b in batches]), batches


# ----------------------------------------------------------------------------------------------------
# Scalers


@pytest.mark.parametrize('centered', [False, True])
def test_scaler_round_trip_numpy_and_jax(centered):
  config = make_config(centered=centered)
  scaler, inverse = datasets.get_data_scaler(config), datasets.get_data_inverse_scaler(config)
  x = np.linspace(0., 1., 11, dtype=np.float32)
  expected = 2 * x - 1 if centered else x
  np.testing.assert_allclose(scaler(x), expected, atol=1e-7)
  np.testing.assert_allclose(np.asarray(scaler(jnp.asarray(x))), expected, atol=1e-7)
  np.testing.assert_allclose(inverse(scaler(x)), x, atol=1e-7)
  np.testing.assert_allclose(np.asarray(inverse(scaler(jnp.asarray(x)))), x, atol=1e-7)


def test_toy_scaler_is_identity_even_when_centered():
  config = make_config('moons', centered=True)
  x = np.array([[-3., 5.]], np.float32)
  np.testing.assert_array_equal(datasets.get_data_scaler(config)(x), x)
  np.testing.assert_array_equal(datasets.get_data_inverse_scaler(config)(x), x)


# ----------------------------------------------------------------------------------------------------
# Digits


def test_digits_split_sizes_levels_and_shapes():
  train, test = datasets.digits_split_indices('train'), datasets.digits_split_indices('test')
  assert (len(train), len(test)) == (1497, 300)
  assert np.intersect1d(train, test).size == 0
  np.testing.assert_array_equal(np.union1d(train, test), np.arange(1797))
  config = make_config()
  assert datasets.num_examples(config, 'train') == 1497
  assert datasets.num_examples(config, 'test') == 300
  batch = next(datasets.get_train_iterator(config, process_count=1, process_index=0))
  assert batch['image'].shape == (8, 8, 8, 1) and batch['image'].dtype == np.float32
  images, _ = eval_images(config, 'train')
  levels = images * 16
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)
  np.testing.assert_array_equal(np.unique(np.round(levels)), np.arange(17))


def test_digits_upsample_and_pad_layouts():
  native, _ = eval_images(make_config())
  up, _ = eval_images(make_config(image_size=16))
  assert up.shape == (300, 16, 16, 1)
  for di in (0, 1):
    for dj in (0, 1):
      np.testing.assert_array_equal(up[:, di::2, dj::2], native)
  padded, _ = eval_images(make_config(image_size=13))
  assert padded.shape == (300, 13, 13, 1)
  np.testing.assert_array_equal(padded[:, 2:10, 2:10], native)
  border = np.ones((13, 13), bool)
  border[2:10, 2:10] = False
  assert np.all(padded[:, border] == 0)
  padded16, _ = eval_images(make_config(image_size=16, digits_layout='pad'))
  np.testing.assert_array_equal(padded16[:, 4:12, 4:12], native)


def test_digits_test_set_is_independent_of_seed():
  config0, config1 = make_config(), make_config()
  config0.seed, config1.seed = 0, 1
  np.testing.assert_array_equal(eval_images(config0)[0], eval_images(config1)[0])
  first0 = next(datasets.get_train_iterator(config0, process_count=1, process_index=0))['image']
  first1 = next(datasets.get_train_iterator(config1, process_count=1, process_index=0))['image']
  assert not np.array_equal(first0, first1)


# ----------------------------------------------------------------------------------------------------
# Order, resumability, sharding


def test_each_epoch_is_a_permutation_fixed_by_seed():
  config = make_config()
  n = 1497
  epoch0 = datasets.train_indices(config, np.arange(n), n)
  epoch1 = datasets.train_indices(config, np.arange(n, 2 * n), n)
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
  assert not np.array_equal(epoch0, epoch1)
  config.seed += 1
  assert not np.array_equal(datasets.train_indices(config, np.arange(n), n), epoch0)


def test_train_batches_are_resumable_across_epochs():
  # 300 x 10 rows cross the 1497-example epoch boundary at step 4; flips and noise are on.
  config = make_config(batch_size=300, random_flip=True, uniform_dequantization=True)
  straight = take(datasets.get_train_iterator(config, process_count=1, process_index=0), 10)
  resumed = take(datasets.get_train_iterator(config, start_step=3, process_count=1, process_index=0), 7)
  for k, batch in enumerate(resumed, start=3):
    np.testing.assert_array_equal(batch['image'], straight[k]['image'])
  assert not np.array_equal(straight[3]['image'], straight[4]['image'])


@pytest.mark.parametrize('process_count', [2, 3])
def test_processes_split_each_global_batch_into_contiguous_blocks(process_count):
  config = make_config(batch_size=6, eval_batch_size=12, random_flip=True, uniform_dequantization=True)
  whole = take(datasets.get_train_iterator(config, process_count=1, process_index=0), 3)
  shards = [take(datasets.get_train_iterator(config, process_count=process_count, process_index=p), 3)
            for p in range(process_count)]
  for k in range(3):
    assert shards[0][k]['image'].shape == (6 // process_count, 8, 8, 1)
    np.testing.assert_array_equal(np.concatenate([s[k]['image'] for s in shards]), whole[k]['image'])
  reference, _ = eval_images(config, uniform_dequantization=True)
  parts = [list(datasets.get_eval_iterator(config, uniform_dequantization=True,
                                           process_count=process_count, process_index=p))
           for p in range(process_count)]
  assert len({len(p) for p in parts}) == 1  # every process runs the same number of batches
  joined = np.concatenate([np.concatenate([p[j]['image'][p[j]['mask']] for p in parts])
                           for j in range(len(parts[0]))])
  np.testing.assert_array_equal(joined, reference)


def test_random_flip_mirrors_about_half_the_rows():
  flipped_config = make_config(batch_size=500, random_flip=True)
  plain = next(datasets.get_train_iterator(make_config(batch_size=500), process_count=1,
                                           process_index=0))['image']
  flipped = next(datasets.get_train_iterator(flipped_config, process_count=1, process_index=0))['image']
  same = np.all(flipped == plain, axis=(1, 2, 3))
  mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  asymmetric = ~np.all(plain == plain[:, :, ::-1], axis=(1, 2, 3))
  fraction = mirrored[asymmetric & ~same].sum() / asymmetric.sum()
  n = asymmetric.sum()
  assert abs(fraction - 0.5) < 4 * np.sqrt(0.25 / n), (fraction, n)  # 4 binomial standard deviations
  eval_flip, _ = eval_images(flipped_config)
  np.testing.assert_array_equal(eval_flip, eval_images(make_config())[0])  # no flips at evaluation


def test_uniform_dequantization_stays_in_its_level_and_is_uniform():
  levels = 17
  plain = next(datasets.get_train_iterator(make_config(batch_size=1000, random_flip=True),
                                           process_count=1, process_index=0))['image']
  deq = next(datasets.get_train_iterator(
      make_config(batch_size=1000, random_flip=True, uniform_dequantization=True),
      process_count=1, process_index=0))['image']
  k = np.round(plain * (levels - 1))
  assert np.all(deq >= (k / levels).astype(np.float32))
  assert np.all(deq < ((k + 1) / levels).astype(np.float32))
  u = (deq.astype(np.float64) * levels - k).ravel()
  n = u.size  # 64,000 values: U[0,1) has mean 1/2 and variance 1/12
  assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n)
  assert abs(u.var() - 1 / 12) < 4 * np.sqrt(1 / 180 / n)
  counts = np.histogram(u, bins=10, range=(0, 1))[0]
  chi2 = np.sum((counts - n / 10)**2 / (n / 10))
  assert chi2 < 30, chi2  # 9 degrees of freedom: P(chi2 > 30) < 1e-3
  config = make_config()
  repeat0, _ = eval_images(config, uniform_dequantization=True)
  repeat1, _ = eval_images(config, uniform_dequantization=True, repeat=1)
  np.testing.assert_array_equal(repeat0, eval_images(config, uniform_dequantization=True)[0])
  assert not np.array_equal(repeat0, repeat1)
  np.testing.assert_array_equal(np.floor(repeat0 * levels), np.floor(repeat1 * levels))


def test_to_unit_interval_never_reaches_the_next_level():
  x = np.full((4,), 255, np.uint8)
  out = datasets.to_unit_interval(x, 256, np.full((4,), 1 - 2.**-40))
  assert np.all(out < np.float32(1.)) and np.all(out >= np.float32(255 / 256))
  np.testing.assert_array_equal(datasets.to_unit_interval(np.array([0, 255], np.uint8), 256), [0., 1.])


@pytest.mark.parametrize('levels', [17, 256])
def test_samples_to_levels_undoes_uniform_dequantization(levels):
  """Dequantized data mapped back give exactly the grid data; samples past [0, 1] clip to the end levels;
  a model trained on the grid (or toy points) keeps its samples as they are."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, levels, size=(64, 4, 4, 1))
  dequantized = datasets.to_unit_interval(x, levels, rng.uniform(size=x.shape))
  config = make_config(num_levels=levels, uniform_dequantization=True)
  np.testing.assert_array_equal(datasets.samples_to_levels(config, dequantized),
                                datasets.to_unit_interval(x, levels))
  np.testing.assert_array_equal(datasets.samples_to_levels(config, np.array([-0.2, 1.3])), [0., 1.])
  on_grid = rng.uniform(size=(3, 4, 4, 1)).astype(np.float32)
  assert datasets.samples_to_levels(make_config(num_levels=levels), on_grid) is on_grid
  toy = make_config('gmm', uniform_dequantization=True)
  np.testing.assert_array_equal(datasets.samples_to_levels(toy, on_grid[:, :, 0, 0]), on_grid[:, :, 0, 0])


def test_eval_iterator_covers_every_example_once_with_mask():
  config = make_config(eval_batch_size=64)
  images, batches = eval_images(config)
  assert len(batches) == 5  # ceil(300 / 64)
  assert [int(b['mask'].sum()) for b in batches] == [64, 64, 64, 64, 44]
  assert all(b['image'].shape == (64, 8, 8, 1) and b['mask'].dtype == bool for b in batches)
  assert np.all(batches[-1]['image'][44:] == 0)
  source = datasets.get_source(config, 'test')
  np.testing.assert_array_equal(images, source.images.astype(np.float32) / 16)


# ----------------------------------------------------------------------------------------------------
# TFDS (mock data)


@pytest.mark.parametrize('dataset,size', [('CIFAR10', 32), ('SVHN', 16), ('CELEBA', 16), ('LSUN', 16)])
def test_mock_tfds_pipelines(dataset, size):
  config = rgb_config(dataset, size, batch_size=4, eval_batch_size=4, random_flip=True,
                      category='church_outdoor')
  with tfds.testing.mock_data(num_examples=10):
    batch = next(datasets.get_train_iterator(config, process_count=1, process_index=0))
    images, batches = eval_images(config)
    assert datasets.num_examples(config, 'test') == 10
  assert batch['image'].shape == (4, size, size, 3) and batch['image'].dtype == np.float32
  assert batch['image'].min() >= 0 and batch['image'].max() <= 1
  np.testing.assert_allclose(batch['image'] * 255, np.round(batch['image'] * 255), atol=1e-4)
  assert len(batches) == 3 and [int(b['mask'].sum()) for b in batches] == [4, 4, 2]
  assert images.shape == (10, size, size, 3)


def test_mock_cifar10_batches_are_the_source_images():
  config = rgb_config('cifar10', 32, eval_batch_size=4)
  with tfds.testing.mock_data(num_examples=6):
    raw = tfds.data_source('cifar10', split='test')
    expected = np.stack([raw[i]['image'] for i in range(6)]).astype(np.float32) / 255
    images, _ = eval_images(config)
  np.testing.assert_array_equal(images, expected)


def test_mock_celeba_is_center_cropped_then_resized():
  config = rgb_config('celeba', 8, eval_batch_size=4)
  with tfds.testing.mock_data(num_examples=2):
    raw = tfds.data_source('celeb_a', split='validation')[1]['image']
    images, _ = eval_images(config)
  assert raw.shape == (218, 178, 3)
  crop = raw[39:179, 19:159]  # the central 140 x 140 window
  expected = np.asarray(Image.fromarray(crop).resize((8, 8), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(images[1], expected.astype(np.float32) / 255)


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) TFDS dataset built locally: 32x32 images filled with a per-example value."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'image': tfds.features.Image(shape=(32, 32, 3))}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, 20), 'test': self._generate_examples(100, 7)}

  def _generate_examples(self, first, n):
    for i in range(n):
      buffer = io.BytesIO()
      Image.new('RGB', (32, 32), (first + i, 2 * i, 255 - i)).save(buffer, format='PNG')
      yield i, {'image': buffer.getvalue()}


def test_prepared_array_record_dataset_is_read_without_tensorflow(tmp_path, monkeypatch):
  TinyImages(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  monkeypatch.setitem(datasets.TFDS_NAMES, 'cifar10', 'tiny_images')
  config = rgb_config('cifar10', 16, tfds_data_dir=str(tmp_path), batch_size=4, eval_batch_size=4)
  assert datasets.num_examples(config, 'train') == 20
  images, batches = eval_images(config)
  assert len(batches) == 2 and images.shape == (7, 16, 16, 3)
  colours = np.round(images[:, 0, 0] * 255).astype(int)
  assert np.all(images == images[:, :1, :1])  # solid colours stay solid through the resize
  assert sorted(map(tuple, colours)) == [(100 + i, 2 * i, 255 - i) for i in range(7)]
  train = take(datasets.get_train_iterator(config, process_count=1, process_index=0), 10)
  seen = np.concatenate([b['image'][:, 0, 0] for b in train])  # 40 rows = two epochs of 20
  for epoch in (seen[:20], seen[20:]):
    np.testing.assert_array_equal(np.sort(np.round(epoch[:, 0] * 255)), np.arange(20))


@pytest.mark.skipif(importlib.util.find_spec('importlib_resources') is not None
                    or importlib.util.find_spec('tensorflow') is not None,
                    reason='TFDS could try to download and prepare for real here')
def test_unprepared_tfds_dataset_explains_how_to_prepare(tmp_path):
  config = rgb_config('cifar10', 32, tfds_data_dir=str(tmp_path))
  with pytest.raises(RuntimeError, match='tfds build cifar10 --file_format=array_record'):
    datasets.get_train_iterator(config, process_count=1, process_index=0)


# ----------------------------------------------------------------------------------------------------
# Image folder


def _write_folder(root):
  """12 images in nested folders: solid colours of mixed sizes/formats, and a 8x16 striped PNG."""
  (root / 'a' / 'b').mkdir(parents=True)
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]
  for i in range(11):
    size = (5 + 3 * i, 7 + 2 * i)
    fmt, ext = ('PNG', '.png') if i % 3 else ('JPEG', '.JPG')
    sub = root if i < 4 else root / 'a' / 'b'
    Image.new('RGB', size, colours[i % 4]).save(sub / f'img{i:02d}{ext}', format=fmt, quality=100)
  stripes = np.zeros((8, 16, 3), np.uint8)
  stripes[:, :4] = (255, 0, 0)
  stripes[:, 4:12] = (0, 200, 0)
  stripes[:, 12:] = (0, 0, 255)
  Image.fromarray(stripes).save(root / 'a' / 'stripes.png')
  (root / 'notes.txt').write_text('not an image')


def test_folder_dataset_reads_resizes_and_crops(tmp_path):
  _write_folder(tmp_path)
  config = rgb_config('folder', 8, path=str(tmp_path), batch_size=4, eval_batch_size=4)
  assert datasets.num_examples(config, 'train') == 11
  assert datasets.num_examples(config, 'test') == 1
  files = datasets.folder_split_files(config, 'train') + datasets.folder_split_files(config, 'test')
  assert len(set(files)) == 12 and all(f.suffix.lower() in ('.png', '.jpg') for f in files)
  batch = next(datasets.get_train_iterator(config, process_count=1, process_index=0))
  assert batch['image'].shape == (4, 8, 8, 3) and batch['image'].dtype == np.float32
  assert 0 <= batch['image'].min() and batch['image'].max() <= 1
  stripes_path = tmp_path / 'a' / 'stripes.png'
  split = 'train' if stripes_path in datasets.folder_split_files(config, 'train') else 'test'
  index = datasets.folder_split_files(config, split).index(stripes_path)
  stripes = datasets.get_source(config, split).load(np.array([index]))[0]
  # The 8x16 image needs no resize; its central 8x8 window is exactly the green band.
  assert np.all(stripes == np.array([0, 200, 0], np.uint8))
  grey = make_config('folder', 6, 1, 256, path=str(tmp_path), batch_size=4, eval_batch_size=4)
  grey_batch = next(datasets.get_train_iterator(grey, process_count=1, process_index=0))
  assert grey_batch['image'].shape == (4, 6, 6, 1)


def test_folder_errors_name_the_path(tmp_path):
  with pytest.raises(ValueError, match='config.data.path is required'):
    datasets.validate_data_config(rgb_config('folder', 8), process_count=1)
  with pytest.raises(ValueError, match='is not a directory'):
    datasets.validate_data_config(rgb_config('folder', 8, path=str(tmp_path / 'nope')), process_count=1)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}.*holds no PNG/JPEG"):
    datasets.get_train_iterator(rgb_config('folder', 8, path=str(tmp_path / 'empty')),
                                process_count=1, process_index=0)


# ----------------------------------------------------------------------------------------------------
# Toy distributions


def test_toy_samplers_shapes_and_moments():
  n = 200_000
  rng = np.random.default_rng(0)
  gmm = datasets.sample_toy('gmm', rng, n)
  mix = datasets.toy_mixture(2)
  assert gmm.shape == (n, 2) and gmm.dtype == np.float32
  # Tolerances: ~5 Monte-Carlo standard errors (coordinate std <= 3.5, so 5 * 3.5 / sqrt(n) < 0.04).
  np.testing.assert_allclose(gmm.mean(0), np.asarray(mix.mean()), atol=0.04)
  np.testing.assert_allclose(np.cov(gmm.T), np.asarray(mix.cov()), atol=0.15)
  board = datasets.sample_toy('checkerboard', rng, n)
  np.testing.assert_allclose(board.mean(0), [0, 0], atol=0.03)
  np.testing.assert_allclose(board.var(0), [16 / 3, 16 / 3], rtol=0.02)
  cells = np.floor(board / 2).astype(int) + 2
  assert np.all((cells[:, 0] + cells[:, 1]) % 2 == 0) and np.all(np.abs(board) <= 4)
  roll = datasets.sample_toy('swissroll', rng, n)
  radius = np.linalg.norm(roll, axis=1)
  assert 0.94 - 0.6 < radius.min() and radius.max() < 2.83 + 0.6
  np.testing.assert_allclose(np.median(radius), (1.5 + 4.5) / 2 * np.pi / 5, atol=0.05)
  moons = datasets.sample_toy('moons', rng, n)
  np.testing.assert_allclose(moons.mean(0), [0, 0], atol=0.02)
  assert moons.shape == (n, 2)


@pytest.mark.parametrize('dataset', datasets.TOY_DATASETS)
def test_toy_iterators_are_resumable_and_sharded(dataset):
  config = make_config(dataset, batch_size=6, eval_batch_size=1000)
  straight = take(datasets.get_train_iterator(config, process_count=1, process_index=0), 4)
  resumed = take(datasets.get_train_iterator(config, start_step=2, process_count=1, process_index=0), 2)
  np.testing.assert_array_equal(resumed[0]['image'], straight[2]['image'])
  assert straight[0]['image'].shape == (6, 2)
  second = next(datasets.get_train_iterator(config, process_count=2, process_index=1))
  np.testing.assert_array_equal(second['image'], straight[0]['image'][3:])
  points, batches = eval_images(config)
  assert points.shape == (datasets.TOY_EVAL_SIZE, 2) and len(batches) == 5
  assert not np.array_equal(points, eval_images(config, 'train')[0])


# ----------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize('overrides,message', [
    (dict(dataset='mnist'), "config.data.dataset='mnist'.*CIFAR10, SVHN, CELEBA, LSUN, digits, folder"),
    (dict(image_size=0), 'config.data.image_size=0 must be a positive integer'),
    (dict(num_channels=2), 'config.data.num_channels=2 must be 1'),
    (dict(num_channels=3), 'digits are grey'),
    (dict(num_levels=256), 'config.data.num_levels=256.*--config.data.num_levels=17'),
    (dict(batch_size=6), r'config.training.batch_size=6 must be divisible by the number of processes \(4\)'),
    (dict(eval_batch_size=10), 'config.eval.batch_size=10 must be divisible'),
    (dict(image_size=12, digits_layout='upsample'), 'not a multiple of 8'),
    (dict(image_size=4), 'use image_size >= 8'),
    (dict(dataset='LSUN', num_channels=3, num_levels=256), 'config.data.category is required'),
    (dict(dataset='cifar10', num_channels=1, num_levels=256), 'is RGB'),
    (dict(dataset='moons', dim=3), 'config.data.dim=3'),
])
def test_bad_configs_raise_clear_errors(overrides, message):
  config = make_config(**overrides)
  with pytest.raises(ValueError, match=message):
    datasets.validate_data_config(config, process_count=4)


def test_bad_split_is_rejected():
  with pytest.raises(ValueError, match="split='valid' must be one of"):
    datasets.get_eval_iterator(make_config(), 'valid', process_count=1, process_index=0)
