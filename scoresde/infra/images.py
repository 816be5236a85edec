"""Image output: [0, 1] floats to uint8, sample grids and 2-D scatter plots as PNGs.

Every PNG the code writes (training snapshots, ``--mode=sample``, evaluation grids) goes through here,
so they share one look: near-square grids with mid-grey gutters, which separate both black-background
digits and photos, enlarged by pixel repetition so that 8×8 images are visible.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

GUTTER = 128  # mid-grey: visible against black digit backgrounds and against photos


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [0, 1] → uint8 in [0, 255], rounding to the nearest level (out-of-range values clipped).

  The reference truncates (``astype(uint8)`` of x·255), which biases every generated pixel by −½ level
  relative to the data; rounding is unbiased and exact for 8-bit data that went through x/255.
  """
  return np.clip(np.round(np.asarray(images, np.float64) * 255.), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, padding: int = 2) -> np.ndarray:
  """uint8 images (N, H, W, C) tiled row-major into one uint8 (rows·(H+p)+p, cols·(W+p)+p, C) image.

  cols = ⌈√N⌉ and rows = ⌈N / cols⌉; gutters and unused cells are mid-grey (``GUTTER``).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f'image_grid needs uint8 images (N, H, W, C); got {images.dtype} {images.shape} '
                     f'(convert [0, 1] floats with images.to_uint8).')
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), GUTTER, np.uint8)
  for i, image in enumerate(images):
    r, k = divmod(i, cols)
    top, left = padding + r * (h + padding), padding + k * (w + padding)
    grid[top:top + h, left:left + w] = image
  return grid


def _save(picture: np.ndarray, path: str) -> None:
  Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(path)


def save_grid(images: np.ndarray, path: str, min_size: int = 384) -> None:
  """Writes uint8 images (N, H, W, C) as one PNG grid (``image_grid``), enlarged by an integer factor
  of pixel repetition until its longer side is at least ``min_size`` pixels."""
  grid = image_grid(images)
  factor = max(1, math.ceil(min_size / max(grid.shape[:2])))
  _save(np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1), path)


def scatter_image(points: np.ndarray, size: int = 512, extent: float | None = None) -> np.ndarray:
  """2-D points (N, 2) → a uint8 (size, size, 1) density image: a log-scaled histogram, dark = dense.

  The square [-extent, extent]² is shown, by default 1.1 × the 99.5th percentile of |coordinate|, so a
  few diverged samples do not shrink the rest to a dot.
  """
  points = np.asarray(points, np.float64)[:, :2]
  extent = float(extent or max(1e-6, np.percentile(np.abs(points), 99.5) * 1.1))
  hist, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size, range=[[-extent, extent]] * 2)
  density = np.log1p(hist[::-1]) / max(np.log1p(hist.max()), 1e-12)
  return np.round((1. - density) * 255).astype(np.uint8)[..., None]


def save_scatter(points: np.ndarray, path: str, size: int = 512) -> None:
  """Writes 2-D samples (N, ≥2; the first two coordinates) as a density PNG (``scatter_image``)."""
  _save(scatter_image(points, size), path)
