"""Data pipelines: scalers, dequantization, TFDS/folder/digits/toy datasets (see get_dataset)."""

from __future__ import annotations

TOY_DATASETS = ('gmm', 'checkerboard', 'swissroll', 'moons')


def data_shape(config) -> tuple[int, ...]:
  """Shape of one example: (dim,) for 2-D toy data, (H, W, C) for images."""
  if str(config.data.dataset).lower() in TOY_DATASETS:
    return (int(config.data.dim),)
  return (int(config.data.image_size), int(config.data.image_size), int(config.data.num_channels))
