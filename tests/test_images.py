"""infra/images.py: uint8 conversion, grids and scatter PNGs."""

import numpy as np
from PIL import Image
import pytest

from scoresde.infra import images


def test_to_uint8_rounds_levels_exactly():
  levels = np.arange(256) / 255.
  np.testing.assert_array_equal(images.to_uint8(levels), np.arange(256))
  np.testing.assert_array_equal(images.to_uint8(np.array([-0.2, 1.3, 0.5 / 255. + 1e-9])), [0, 255, 1])


def test_image_grid_layout():
  tiles = np.full((3, 2, 2, 3), 255, np.uint8)
  grid = images.image_grid(tiles, padding=1)
  assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 3)  # 3 images: 2 columns, 2 rows
  assert grid[1:3, 1:3].min() == 255 and grid[1:3, 4:6].min() == 255 and grid[4:6, 1:3].min() == 255
  # Gutters and the unused fourth cell are mid-grey.
  assert np.all(grid[0] == images.GUTTER) and np.all(grid[:, 3] == images.GUTTER)
  assert np.all(grid[4:6, 4:6] == images.GUTTER)


def test_image_grid_rejects_floats():
  with pytest.raises(ValueError, match='to_uint8'):
    images.image_grid(np.zeros((2, 4, 4, 1), np.float32))


def test_save_grid_enlarges_small_images(tmp_path):
  digits = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8, 1)
  images.save_grid(digits, str(tmp_path / 'grid.png'), min_size=100)
  saved = np.asarray(Image.open(tmp_path / 'grid.png'))
  # 2x2 tiles of 8 + 2 pixels is 22 pixels, enlarged 5x by pixel repetition to reach 100.
  assert saved.shape == (110, 110)
  np.testing.assert_array_equal(saved[::5, ::5], images.image_grid(digits)[..., 0])


def test_save_scatter_marks_dense_regions(tmp_path):
  points = np.random.default_rng(0).normal(size=(2000, 2)) * 0.1 + np.array([1., 1.])
  points = np.concatenate([points, -points])  # two blobs, at (1, 1) and (-1, -1)
  images.save_scatter(points, str(tmp_path / 'scatter.png'), size=64)
  picture = np.asarray(Image.open(tmp_path / 'scatter.png'))
  assert picture.shape == (64, 64)
  # Image rows run top to bottom: (1, 1) is upper right, (-1, -1) lower left; the origin is empty.
  assert picture[:32, 32:].min() < 64 and picture[32:, :32].min() < 64
  assert picture[28:36, 28:36].min() == 255


def test_snapshot_samples_are_uint8_images_and_float32_points(tmp_path):
  from scoresde import run_lib  # pylint: disable=import-outside-toplevel  (heavy: orbax)
  pixels = np.random.default_rng(0).uniform(size=(4, 8, 8, 1))
  run_lib.save_samples(pixels, str(tmp_path / 'images'))
  saved = np.load(tmp_path / 'images' / 'samples.npz')['samples']
  assert saved.dtype == np.uint8
  np.testing.assert_array_equal(saved, images.to_uint8(pixels))
  assert (tmp_path / 'images' / 'sample.png').exists()
  points = np.random.default_rng(0).normal(size=(100, 2))
  run_lib.save_samples(points, str(tmp_path / 'points'))
  saved = np.load(tmp_path / 'points' / 'samples.npz')['samples']
  assert saved.dtype == np.float32
  np.testing.assert_allclose(saved, points, rtol=1e-6)
