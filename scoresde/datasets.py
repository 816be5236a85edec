"""Data pipelines: scalers, flips, dequantization, and the digits/TFDS/folder/toy datasets.

Every image dataset is a random-access source of uint8 examples (H, W, C) with integer values in
``0 .. num_levels - 1``. Batches are plain numpy index arithmetic over such a source, so each batch is a
pure function of (config.seed, step) and training resumes exactly:

- Training: the infinite stream of examples is the concatenation of one permutation of the train split
  per epoch (permutation e drawn from (seed, e)). Global batch k holds stream positions
  ``[k B, (k+1) B)``; batches straddle epoch boundaries and nothing is dropped.
- Process p of P gets the contiguous block ``[p B/P, (p+1) B/P)`` of each global batch: the rows its
  devices hold when ``parallel.shard_batch`` assembles the global array on the 1-D data mesh.
- The random flip and dequantization noise of a row come from a generator keyed by (seed, stream
  position), so a batch does not depend on where training restarted or on the number of processes.
- Evaluation: one pass over the split in its natural order, ``ceil(N / B)`` global batches, the last
  one padded with zero images marked ``mask=False`` (every example is seen exactly once).

Pixel values (uniform dequantization: Uria et al. 2013; Theis et al. 2016): an integer x in
``{0, ..., L-1}`` (L = ``config.data.num_levels``: 256 for 8-bit images, 17 for digits) maps to
``x / (L-1)`` in [0, 1], or, with uniform dequantization, to ``(x + u) / L`` with u ~ U[0, 1), a value in
``[x/L, (x+1)/L)``. The reference hard-codes L = 256.

User arrays (``data.dataset='arrays'``, .npy/.npz under ``config.data.path``) are float32 examples of any
channel count, used as they are (no quantisation, no scaling); ``config.data.holdout_fraction`` of them
(a fixed permutation) form the held-out 'test' split, e.g. for calibrating an anomaly detector.

The toy 2-D distributions are sampled freshly for each batch from a generator keyed by (seed, step).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import math
import os
import pathlib
import zlib
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import jax
import numpy as np
from PIL import Image, ImageOps

from scoresde import gaussian_mixture

TOY_DATASETS = ('gmm', 'checkerboard', 'swissroll', 'moons')
# Our dataset name (lower case) -> TFDS name, as in the reference.
TFDS_NAMES = {'cifar10': 'cifar10', 'svhn': 'svhn_cropped', 'celeba': 'celeb_a', 'lsun': 'lsun'}
IMAGE_DATASETS = ('digits', 'folder') + tuple(TFDS_NAMES)
# User arrays (.npy / .npz: float latents or images of any channel count, read as they are, no
# quantisation); a fixed fraction (config.data.holdout_fraction) is held out as the 'test' split.
ARRAY_DATASETS = ('arrays',)
ARRAY_EXTENSIONS = ('.npy', '.npz')
DATASETS = IMAGE_DATASETS + ARRAY_DATASETS + TOY_DATASETS
SPLITS = ('train', 'test')
# Datasets whose batches can carry class labels (config.data.labels): digits and the labelled TFDS sets.
LABELLED_DATASETS = ('digits', 'cifar10', 'svhn')

DIGITS_SIZE = 8
DIGITS_NUM_LEVELS = 17
DIGITS_NUM_TEST = 300
DIGITS_LAYOUTS = ('upsample', 'pad')
FOLDER_TEST_FRACTION = 0.1
FOLDER_EXTENSIONS = ('.png', '.jpg', '.jpeg')
CELEBA_CROP = 140
TOY_EVAL_SIZE = 4096
# Held-out splits (digits, folder, toy eval sets) are drawn with this constant, not config.seed, so that
# runs with different seeds are evaluated on the same examples.
SPLIT_SEED = 20210226
_PREFETCH = 2

# Stream tags keep the generators of different purposes independent.
_TAG_EPOCH, _TAG_TRAIN_ROW, _TAG_EVAL_ROW, _TAG_TOY_TRAIN, _TAG_TOY_EVAL, _TAG_SPLIT = range(6)

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------
# Config


def dataset_name(config) -> str:
  """The canonical (lower-case) name of ``config.data.dataset``."""
  return str(config.data.dataset).lower()


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate_data_config(config, process_count: int | None = None) -> None:
  """Raises ValueError naming the offending key for data settings that cannot work.

  Cheap: touches no data except listing ``config.data.path`` for the folder dataset. Call it after
  ``jax.distributed.initialize`` (it reads ``jax.process_count()`` unless ``process_count`` is given).
  """
  name = dataset_name(config)
  if name not in DATASETS:
    raise ValueError(
        f'config.data.dataset={config.data.dataset!r} is not a known dataset; choose one of '
        f'CIFAR10, SVHN, CELEBA, LSUN, digits, folder, arrays, {", ".join(TOY_DATASETS)} (case-insensitive). '
        'For other image collections (e.g. FFHQ, CelebA-HQ) export the images as PNG/JPEG files and '
        "use data.dataset='folder' with data.path=DIR.")
  if process_count is None:
    process_count = jax.process_count()
  for key, size in (('config.training.batch_size', config.training.batch_size),
                    ('config.eval.batch_size', config.eval.batch_size)):
    if not _is_int(size) or size <= 0:
      raise ValueError(f'{key}={size!r} must be a positive integer.')
    if size % process_count:
      raise ValueError(f'{key}={size} must be divisible by the number of processes ({process_count}); '
                       f'use a multiple of {process_count}.')
  workers = config.data.num_workers
  if not _is_int(workers) or workers < 0:
    raise ValueError(f'config.data.num_workers={workers!r} must be an integer >= 0 (0 = min(8, CPU count)).')
  if config.data.labels and name not in LABELLED_DATASETS:
    raise ValueError(f'config.data.labels=True, but {config.data.dataset!r} has no class labels here; '
                     f'labelled datasets: {", ".join(LABELLED_DATASETS)}.')
  if name in TOY_DATASETS:
    dim = config.data.dim
    if not _is_int(dim) or dim <= 0:
      raise ValueError(f'config.data.dim={dim!r} must be a positive integer.')
    if name != 'gmm' and dim != 2:
      raise ValueError(f"config.data.dim={dim}: the {name!r} toy distribution is 2-D; set "
                       "--config.data.dim=2 (only 'gmm' works in any dimension).")
    return
  if name in ARRAY_DATASETS:
    _validate_arrays_config(config)
    return
  size, channels, levels = config.data.image_size, config.data.num_channels, config.data.num_levels
  if not _is_int(size) or size <= 0:
    raise ValueError(f'config.data.image_size={size!r} must be a positive integer.')
  if channels not in (1, 3):
    raise ValueError(f'config.data.num_channels={channels!r} must be 1 (grey) or 3 (RGB).')
  if not _is_int(levels) or levels < 2:
    raise ValueError(f'config.data.num_levels={levels!r} must be an integer >= 2.')
  expected_levels = DIGITS_NUM_LEVELS if name == 'digits' else 256
  if levels != expected_levels:
    raise ValueError(f'config.data.num_levels={levels}, but {name!r} images have {expected_levels} '
                     f'levels per pixel; set --config.data.num_levels={expected_levels}.')
  if name == 'digits':
    if channels != 1:
      raise ValueError(f'config.data.num_channels={channels}: digits are grey; set '
                       '--config.data.num_channels=1.')
    _digits_layout(config)
  elif name in TFDS_NAMES:
    if channels != 3:
      raise ValueError(f'config.data.num_channels={channels}: {config.data.dataset} is RGB; set '
                       '--config.data.num_channels=3.')
    if name == 'lsun' and not config.data.category:
      raise ValueError("config.data.category is required for LSUN (e.g. 'bedroom', 'church_outdoor'; "
                       'the TFDS name is lsun/{category}).')
  elif name == 'folder':
    _folder_files(config)


# ----------------------------------------------------------------------------------------------------
# Scalers and shapes


def get_data_scaler(config) -> Callable[[Any], Any]:
  """Data in [0, 1] -> model space: 2x - 1 when ``config.data.centered``, else identity (numpy or jax).

  Toy data are raw coordinates and are never rescaled.
  """
  if dataset_name(config) not in TOY_DATASETS and config.data.centered:
    return lambda x: x * 2. - 1.
  return lambda x: x


def get_data_inverse_scaler(config) -> Callable[[Any], Any]:
  """Inverse of ``get_data_scaler``: (x + 1) / 2 when centered, else identity."""
  if dataset_name(config) not in TOY_DATASETS and config.data.centered:
    return lambda x: (x + 1.) / 2.
  return lambda x: x


def data_shape(config) -> tuple[int, ...]:
  """Shape of one example: (dim,) for 2-D toy data, (H, W, C) for images."""
  if str(config.data.dataset).lower() in TOY_DATASETS:
    return (int(config.data.dim),)
  return (int(config.data.image_size), int(config.data.image_size), int(config.data.num_channels))


# ----------------------------------------------------------------------------------------------------
# Image geometry (PIL resampling filters widen with the scale factor, so downsizing is antialiased)


def _resize(img: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
  """Resizes a uint8 (H, W, C) image, rounding back to uint8 so pixel levels stay integers."""
  if img.shape[:2] == (height, width):
    return img
  channels = img.shape[2]
  pil = Image.fromarray(img[..., 0] if channels == 1 else img)
  out = np.asarray(pil.resize((width, height), resample=resample))
  return out.reshape(height, width, channels)


def center_crop(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """The central (height, width) window of an (H, W, C) image (the reference's ``central_crop``)."""
  top, left = (img.shape[0] - height) // 2, (img.shape[1] - width) // 2
  return img[top:top + height, left:left + width]


def resize_shorter_and_crop(img: np.ndarray, size: int,
                            resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
  """Resizes the shorter side to ``size`` (keeping the aspect ratio), then center-crops size x size."""
  h, w = img.shape[:2]
  scale = size / min(h, w)
  img = _resize(img, max(size, round(h * scale)), max(size, round(w * scale)), resample)
  return center_crop(img, size, size)


def _tfds_preprocess(name: str, size: int) -> Callable[[np.ndarray], np.ndarray]:
  """The reference's per-dataset geometry, on uint8 images."""
  bilinear = Image.Resampling.BILINEAR
  if name in ('cifar10', 'svhn'):
    return lambda img: _resize(img, size, size, bilinear)
  if name == 'celeba':
    return lambda img: _resize(center_crop(img, CELEBA_CROP, CELEBA_CROP), size, size, bilinear)
  return lambda img: resize_shorter_and_crop(img, size)


# ----------------------------------------------------------------------------------------------------
# Sources: random access to preprocessed uint8 examples


class ArraySource:
  """An in-memory uint8 array (N, H, W, C), and its class labels (N,) where the dataset has them."""

  parallel = False

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
    self.images = images
    self.labels = labels

  def load_labels(self, indices: np.ndarray) -> np.ndarray:
    return np.asarray(self.labels[indices], np.int32)

  def __len__(self) -> int:
    return len(self.images)

  def load(self, indices: np.ndarray, pool=None) -> np.ndarray:
    del pool
    return self.images[indices]


class _ItemSource:
  """Examples read one at a time by ``get(i)`` (TFDS records, image files), in a thread pool."""

  parallel = True

  def __init__(self, length: int, get: Callable[[int], np.ndarray],
               get_label: Callable[[int], int] | None = None):
    self._length, self.get, self.get_label = length, get, get_label

  def load_labels(self, indices: np.ndarray) -> np.ndarray:
    return np.array([self.get_label(int(i)) for i in indices], np.int32)

  def __len__(self) -> int:
    return self._length

  def load(self, indices: np.ndarray, pool=None) -> np.ndarray:
    indices = [int(i) for i in indices]
    items = pool.map(self.get, indices) if pool is not None else map(self.get, indices)
    return np.stack(list(items))


@functools.lru_cache(maxsize=1)
def _digits_raw() -> np.ndarray:
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top  (slow import)
  images = sk_datasets.load_digits().images.astype(np.uint8)  # (1797, 8, 8), values 0..16
  images.setflags(write=False)
  return images


@functools.lru_cache(maxsize=1)
def _digits_labels() -> np.ndarray:
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top  (slow import)
  return sk_datasets.load_digits().target.astype(np.int32)  # (1797,), 0..9


def digits_split_indices(split: str) -> np.ndarray:
  """Sorted indices of the digits split: a fixed permutation (constant seed) puts 300 in 'test'."""
  n = len(_digits_raw())
  perm = np.random.default_rng([SPLIT_SEED, _TAG_SPLIT]).permutation(n)
  return np.sort(perm[:DIGITS_NUM_TEST] if split == 'test' else perm[DIGITS_NUM_TEST:])


def _digits_layout(config) -> str:
  size = config.data.image_size
  layout = str(config.data.digits_layout) or ('upsample' if size % DIGITS_SIZE == 0 else 'pad')
  if layout not in DIGITS_LAYOUTS:
    raise ValueError(f"config.data.digits_layout={layout!r} must be one of {DIGITS_LAYOUTS} or '' (upsample "
                     f'when image_size is a multiple of {DIGITS_SIZE}, else pad).')
  if size < DIGITS_SIZE:
    raise ValueError(f'config.data.image_size={size}: digits are {DIGITS_SIZE}x{DIGITS_SIZE}; use '
                     f'image_size >= {DIGITS_SIZE} (a multiple of {DIGITS_SIZE} upsamples, others pad).')
  if layout == 'upsample' and size % DIGITS_SIZE:
    raise ValueError(f"config.data.image_size={size} is not a multiple of {DIGITS_SIZE}: "
                     "set --config.data.digits_layout=pad or a multiple of 8.")
  return layout


def layout_digits(images: np.ndarray, size: int, layout: str) -> np.ndarray:
  """(N, 8, 8) uint8 -> (N, size, size, 1): nearest-neighbour upsampling by size/8 ('upsample') or
  centred zero padding, the extra row/column going bottom/right ('pad'). Both keep the 17 levels."""
  if layout == 'upsample':
    factor = size // DIGITS_SIZE
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
  else:
    before = (size - DIGITS_SIZE) // 2
    after = size - DIGITS_SIZE - before
    images = np.pad(images, ((0, 0), (before, after), (before, after)))
  return np.ascontiguousarray(images[..., None])


def _folder_files(config) -> list[pathlib.Path]:
  """Sorted PNG/JPEG files under ``config.data.path`` (recursive)."""
  path = config.data.path
  if not path:
    raise ValueError("config.data.path is required for data.dataset='folder': a directory of PNG/JPEG "
                     'images (searched recursively).')
  root = pathlib.Path(os.path.expanduser(str(path)))
  if not root.is_dir():
    raise ValueError(f'config.data.path={str(path)!r} is not a directory.')
  files = sorted(p for p in root.rglob('*') if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file())
  if not files:
    raise ValueError(f'config.data.path={str(path)!r} holds no PNG/JPEG files '
                     f'({", ".join(FOLDER_EXTENSIONS)}, searched recursively).')
  return files


def folder_split_files(config, split: str) -> list[pathlib.Path]:
  """A fixed permutation (constant seed) of the sorted files puts the last 10% (at least one file
  when there are two or more) in 'test'."""
  files = _folder_files(config)
  n = len(files)
  num_test = max(1, round(FOLDER_TEST_FRACTION * n)) if n >= 2 else 0
  perm = np.random.default_rng([SPLIT_SEED, _TAG_SPLIT]).permutation(n)
  chosen = perm[n - num_test:] if split == 'test' else perm[:n - num_test]
  return [files[i] for i in np.sort(chosen)]


def _validate_arrays_config(config) -> None:
  size, channels = config.data.image_size, config.data.num_channels
  if not _is_int(size) or size <= 0:
    raise ValueError(f'config.data.image_size={size!r} must be a positive integer (arrays are H = W = '
                     'image_size).')
  if not _is_int(channels) or channels <= 0:
    raise ValueError(f'config.data.num_channels={channels!r} must be a positive integer.')
  for key in ('uniform_dequantization', 'centered'):
    if config.data[key]:
      raise ValueError(f"config.data.{key}=True: data.dataset='arrays' holds continuous values, used as "
                       f'they are (no dequantization, no rescaling); set --config.data.{key}=False.')
  fraction = config.data.holdout_fraction
  if not 0 < float(fraction) < 1:
    raise ValueError(f'config.data.holdout_fraction={fraction!r} must lie in (0, 1).')


def array_files(path: str) -> list[pathlib.Path]:
  """``path`` itself (a .npy or .npz file) or the sorted .npy/.npz files under it (recursive)."""
  if not path:
    raise ValueError("config.data.path is required for data.dataset='arrays': a .npy/.npz file or a "
                     'directory of them.')
  root = pathlib.Path(os.path.expanduser(str(path)))
  if root.is_file() and root.suffix.lower() in ARRAY_EXTENSIONS:
    return [root]
  if not root.is_dir():
    raise ValueError(f'{str(path)!r} is neither a .npy/.npz file nor a directory.')
  files = sorted(p for p in root.rglob('*') if p.suffix.lower() in ARRAY_EXTENSIONS and p.is_file())
  if not files:
    raise ValueError(f'{str(path)!r} holds no .npy/.npz files (searched recursively).')
  return files


def read_arrays(path: str) -> list[tuple[str, np.ndarray]]:
  """(name, float32 (N, ...)) for each .npy file and each array of each .npz file under ``path``, in
  order; a name is the file's path relative to ``path`` (``file.npz:key`` for .npz arrays). An array of
  rank 3 is one example (H, W, C) and becomes (1, H, W, C)."""
  root = pathlib.Path(os.path.expanduser(str(path)))
  out = []
  for file in array_files(path):
    name = file.name if root.is_file() else str(file.relative_to(root))
    if file.suffix.lower() == '.npy':
      items = [(name, np.load(file, allow_pickle=False))]
    else:
      with np.load(file, allow_pickle=False) as loaded:
        items = [(f'{name}:{key}', loaded[key]) for key in loaded.files]
    for item_name, array in items:
      array = np.asarray(array, np.float32)
      out.append((item_name, array[None] if array.ndim == 3 else array))
  return out


@functools.lru_cache(maxsize=2)
def _arrays_all(path: str, shape: tuple[int, ...]) -> np.ndarray:
  """Every example under ``path`` (read-only float32 (N, *shape)); raises on a shape mismatch and on
  non-finite values (training and calibration data must be clean)."""
  parts = []
  for name, array in read_arrays(path):
    if array.shape[1:] != shape:
      raise ValueError(f'{name} holds examples of shape {array.shape[1:]}; config.data.image_size and '
                       f'num_channels ask for {shape} (arrays are (N, H, W, C), H = W = image_size).')
    bad = int(np.sum(~np.isfinite(array)))
    if bad:
      raise ValueError(f'{name} holds {bad} non-finite values; data.dataset=\'arrays\' trains and '
                       'calibrates on clean data only.')
    parts.append(array)
  data = np.concatenate(parts)
  data.setflags(write=False)
  return data


def arrays_split_indices(n: int, fraction: float, split: str) -> np.ndarray:
  """Sorted indices of the split among n examples: a fixed permutation (constant seed) puts
  round(fraction n) (at least one when n >= 2) in 'test'."""
  num_test = max(1, round(fraction * n)) if n >= 2 else 0
  perm = np.random.default_rng([SPLIT_SEED, _TAG_SPLIT]).permutation(n)
  return np.sort(perm[n - num_test:] if split == 'test' else perm[:n - num_test])


def _arrays_split(config, split: str) -> np.ndarray:
  data = _arrays_all(str(config.data.path), data_shape(config))
  return data[arrays_split_indices(len(data), float(config.data.holdout_fraction), split)]


def _read_image(path: pathlib.Path, size: int, channels: int) -> np.ndarray:
  with Image.open(path) as pil:
    pil = ImageOps.exif_transpose(pil).convert('L' if channels == 1 else 'RGB')
    img = np.asarray(pil).reshape(pil.height, pil.width, channels)
  return resize_shorter_and_crop(img, size)


def _tfds_source(config, split: str):
  """``tfds.data_source`` of the dataset's split (array_record files, no TensorFlow at read time)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (only for TFDS data)
  name = dataset_name(config)
  tfds_name = TFDS_NAMES[name]
  if name == 'lsun':
    tfds_name = f'lsun/{config.data.category}'
  tfds_split = 'validation' if split == 'test' and name in ('celeba', 'lsun') else split
  data_dir = config.data.tfds_data_dir or None
  try:
    return tfds.data_source(tfds_name, split=tfds_split, data_dir=data_dir)
  except ModuleNotFoundError as e:
    raise RuntimeError(
        f'TFDS dataset {tfds_name!r} is not prepared under data_dir={data_dir or "~/tensorflow_datasets"} '
        f'and preparing it needs a package that is not installed ({e.name}). TFDS builders read the '
        'downloaded archives with TensorFlow, once: pip install tensorflow-cpu importlib_resources, '
        f'then run tfds build {tfds_name} --file_format=array_record (add --data_dir=DIR to match '
        'config.data.tfds_data_dir). Training then reads the array_record files without TensorFlow.'
    ) from e


def get_source(config, split: str) -> ArraySource | _ItemSource:
  """The split's uint8 examples, already at (image_size, image_size, num_channels)."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r} must be one of {SPLITS}.')
  name = dataset_name(config)
  size, channels = config.data.image_size, config.data.num_channels
  if name == 'digits':
    indices = digits_split_indices(split)
    return ArraySource(layout_digits(_digits_raw()[indices], size, _digits_layout(config)),
                       _digits_labels()[indices])
  if name in ARRAY_DATASETS:
    return ArraySource(_arrays_split(config, split))
  if name == 'folder':
    files = folder_split_files(config, split)
    return _ItemSource(len(files), lambda i: _read_image(files[i], size, channels))
  source = _tfds_source(config, split)
  preprocess = _tfds_preprocess(name, size)
  # One index at a time: the batched __getitems__ of tfds's mock sources fails.
  return _ItemSource(len(source), lambda i: preprocess(source[i]['image']),
                     lambda i: int(source[i]['label']))


def num_examples(config, split: str) -> int:
  """Examples in one pass over the split (toy data: the size of the fixed evaluation sample)."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r} must be one of {SPLITS}.')
  name = dataset_name(config)
  if name in TOY_DATASETS:
    return TOY_EVAL_SIZE
  if name == 'digits':
    return len(digits_split_indices(split))
  if name == 'folder':
    return len(folder_split_files(config, split))
  if name in ARRAY_DATASETS:
    return len(_arrays_split(config, split))
  return len(_tfds_source(config, split))


# ----------------------------------------------------------------------------------------------------
# Pixel values


def to_unit_interval(images: np.ndarray, num_levels: int, noise: np.ndarray | None = None) -> np.ndarray:
  """Integer levels -> float32 in [0, 1]: x / (L-1), or (x + u) / L with u = ``noise`` in [0, 1).

  The dequantized value is kept strictly below the float32 value of (x+1)/L (a float32 sum x + u can
  round up to x + 1).
  """
  x = images.astype(np.float64)
  if noise is None:
    return (x / (num_levels - 1)).astype(np.float32)
  out = ((x + noise) / num_levels).astype(np.float32)
  upper = ((x + 1) / num_levels).astype(np.float32)
  return np.minimum(out, np.nextafter(upper, np.float32(0)))


def samples_to_levels(config, samples: np.ndarray) -> np.ndarray:
  """Generated images in [0, 1] -> the values the data take, before they are compared with data or saved.

  A model trained on uniformly dequantized data, ``(x + u) / L``, generates values spread over each
  level's cell ``[x/L, (x+1)/L)``; the inverse of that map is ``floor(L s) / (L-1)``. Without it its
  samples are shrunk towards grey against the data ``x / (L-1)`` the metrics compare them with (by up to
  half a level at the ends: 0.03 for the 17 digit levels), which inflates their FID. Samples of a model
  trained on the grid itself pass unchanged (``images.to_uint8`` rounds them), as do toy points.
  """
  if dataset_name(config) in TOY_DATASETS or not config.data.uniform_dequantization:
    return samples
  levels = int(config.data.num_levels)
  grid = np.clip(np.floor(np.asarray(samples, np.float64) * levels), 0, levels - 1)
  return (grid / (levels - 1)).astype(np.float32)


def _finish(images: np.ndarray, row_keys: Sequence[Sequence[int]], flip: bool, dequantize: bool,
            num_levels: int) -> np.ndarray:
  """Flips and dequantizes each row with its own generator (keyed by ``row_keys``), then scales.
  Float rows (data.dataset='arrays') are only flipped."""
  if not (flip or dequantize):
    return images.astype(np.float32) if _is_float(images) else to_unit_interval(images, num_levels)
  noise = np.empty(images.shape, np.float64) if dequantize else None
  images = images.copy() if flip else images
  for r, key in enumerate(row_keys):
    rng = np.random.default_rng(key)
    # The flip is drawn first, so turning dequantization on or off keeps the same flips.
    if flip and rng.random() < 0.5:
      images[r] = images[r, :, ::-1]
    if dequantize:
      noise[r] = rng.random(images.shape[1:])
  return images.astype(np.float32) if _is_float(images) else to_unit_interval(images, num_levels, noise)


def _is_float(images: np.ndarray) -> bool:
  return np.issubdtype(images.dtype, np.floating)


# ----------------------------------------------------------------------------------------------------
# Toy 2-D distributions


def toy_mixture(dim: int = 2):
  """The 'gmm' toy distribution: ``gaussian_mixture.default_mixture(dim)``, whose exact scores are known."""
  return gaussian_mixture.default_mixture(dim)


@functools.lru_cache(maxsize=8)
def _mixture_arrays(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  mix = toy_mixture(dim)
  weights = np.asarray(mix.weights, np.float64)
  return weights / weights.sum(), np.asarray(mix.means, np.float64), np.linalg.cholesky(
      np.asarray(mix.covs, np.float64))


def sample_toy(name: str, rng: np.random.Generator, n: int, dim: int = 2) -> np.ndarray:
  """n float32 samples (n, dim) of a toy distribution.

  - gmm: ``toy_mixture(dim)`` (three isotropic modes).
  - checkerboard: uniform on the 8 dark squares of a 4x4 board covering [-4, 4]^2 (cells of side 2,
    dark where the column and row indices have the same parity); each coordinate is U[-4, 4].
  - swissroll: (t cos t, t sin t) / 5 + N(0, 0.1^2 I), t ~ U[1.5 pi, 4.5 pi].
  - moons: two interleaved half circles (upper (cos a, sin a), lower (1 - cos a, 1/2 - sin a),
    a ~ U[0, pi], each with probability 1/2) + N(0, 0.1^2 I), shifted by (-1/2, -1/4) and scaled by 2
    (mean zero).
  """
  if name == 'gmm':
    weights, means, chol = _mixture_arrays(dim)
    k = rng.choice(len(weights), size=n, p=weights)
    x = means[k] + np.einsum('nij,nj->ni', chol[k], rng.standard_normal((n, dim)))
  elif name == 'checkerboard':
    col = rng.integers(0, 4, n)
    row = 2 * rng.integers(0, 2, n) + col % 2
    x = 2. * (np.stack([col, row], axis=1) + rng.random((n, 2)) - 2.)
  elif name == 'swissroll':
    t = 1.5 * np.pi * (1. + 2. * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 5. + 0.1 * rng.standard_normal((n, 2))
  elif name == 'moons':
    a = np.pi * rng.random(n)
    upper = rng.random(n) < 0.5
    x = np.where(upper[:, None], np.stack([np.cos(a), np.sin(a)], 1),
                 np.stack([1. - np.cos(a), 0.5 - np.sin(a)], 1))
    x = 2. * (x + 0.1 * rng.standard_normal((n, 2)) - np.array([0.5, 0.25]))
  else:
    raise ValueError(f'unknown toy distribution {name!r}; choose one of {TOY_DATASETS}.')
  return x.astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Iterators


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count}).')
  return process_index, process_count


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  perm = np.random.default_rng([seed, _TAG_EPOCH, epoch]).permutation(n)
  perm.setflags(write=False)
  return perm


def train_positions(config, step: int, process_index: int = 0,
                    process_count: int = 1) -> np.ndarray:
  """Stream positions of this process's rows of global batch ``step``."""
  local = config.training.batch_size // process_count
  return step * config.training.batch_size + process_index * local + np.arange(local)


def train_indices(config, positions: np.ndarray, n: int) -> np.ndarray:
  """Example indices (into the train split of size n) at the given stream positions."""
  seed = int(config.seed)
  epochs = positions // n
  out = np.empty_like(positions)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = _epoch_permutation(seed, int(e), n)[positions[sel] % n]
  return out


def _prefetched(make: Callable[[int], Batch], steps: Iterator[int], threaded: bool) -> Iterator[Batch]:
  """Yields make(s) for s in steps, computing up to _PREFETCH batches ahead in a thread."""
  if not threaded:
    yield from map(make, steps)
    return
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='data-prefetch') as ex:
    pending = collections.deque()
    for s in steps:
      pending.append(ex.submit(make, s))
      if len(pending) > _PREFETCH:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _loader_pool(config, source) -> concurrent.futures.ThreadPoolExecutor | None:
  if not source.parallel:
    return None
  workers = int(config.data.num_workers) or min(8, os.cpu_count() or 1)
  return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='data-load')


def get_train_iterator(config, start_step: int = 0, *, process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[Batch]:
  """Infinite iterator of this process's training batches, starting with global batch ``start_step``.

  Yields ``{'image': float32 (B / P, *data_shape(config))}`` (and ``'label'``, int32 (B / P,), when
  ``config.data.labels``), images in [0, 1] (dequantized when
  ``config.data.uniform_dequantization``, left-right flipped with probability 1/2 when
  ``config.data.random_flip``), toy data as raw coordinates. Batch k depends only on (config, k): pass the
  number of batches already consumed (the train state's step) as ``start_step`` to resume exactly.
  Errors in the config are raised here, before any data is read.
  """
  validate_data_config(config, process_count)
  pidx, pcount = _process(process_index, process_count)
  start_step = int(start_step)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  name, seed = dataset_name(config), int(config.seed)
  local = config.training.batch_size // pcount
  if name in TOY_DATASETS:
    dim = int(config.data.dim)

    def make_toy(step: int) -> Batch:
      rng = np.random.default_rng([seed, _TAG_TOY_TRAIN, step])
      batch = sample_toy(name, rng, config.training.batch_size, dim)
      return {'image': batch[pidx * local:(pidx + 1) * local]}
    return map(make_toy, itertools.count(start_step))

  source = get_source(config, 'train')
  n = len(source)
  if n == 0:
    raise ValueError(f'the train split of {config.data.dataset!r} is empty.')
  logging.info('train data: %s, %d examples, %d per process batch', config.data.dataset, n, local)
  pool = _loader_pool(config, source)
  flip, dequantize = bool(config.data.random_flip), bool(config.data.uniform_dequantization)

  def make(step: int) -> Batch:
    positions = train_positions(config, step, pidx, pcount)
    images = source.load(train_indices(config, positions, n), pool)
    keys = [(seed, _TAG_TRAIN_ROW, int(q)) for q in positions]
    batch = {'image': _finish(images, keys, flip, dequantize, config.data.num_levels)}
    if config.data.labels:
      batch['label'] = source.load_labels(train_indices(config, positions, n))
    return batch
  return _prefetched(make, itertools.count(start_step), source.parallel)


def get_eval_iterator(config, split: str = 'test', uniform_dequantization: bool = False, *,
                      repeat: int = 0, process_index: int | None = None,
                      process_count: int | None = None) -> Iterator[Batch]:
  """One pass over ``split`` ('train' or 'test': the dataset's held-out split) without flips.

  Yields ``ceil(N / config.eval.batch_size)`` batches ``{'image': float32 (B / P, ...), 'mask': bool
  (B / P,)}`` (and ``'label'``, int32, when ``config.data.labels``); the global batch j holds examples
  ``[j B, (j+1) B)`` in the split's order, each process its contiguous block, the rows past the end zero
  images (label 0) with ``mask=False``. Every process yields the
  same number of batches. The dequantization noise of an example is fixed by (config.seed, split,
  ``repeat``, index): pass a different ``repeat`` for each repeated bits/dim pass. Toy datasets give a
  fixed sample of TOY_EVAL_SIZE points per split (drawn with SPLIT_SEED, not config.seed).
  """
  validate_data_config(config, process_count)
  if split not in SPLITS:
    raise ValueError(f'split={split!r} must be one of {SPLITS}.')
  pidx, pcount = _process(process_index, process_count)
  name, seed = dataset_name(config), int(config.seed)
  global_batch = config.eval.batch_size
  local = global_batch // pcount
  split_code = zlib.crc32(split.encode())
  if name in TOY_DATASETS:
    rng = np.random.default_rng([SPLIT_SEED, _TAG_TOY_EVAL, split_code])
    source = ArraySource(sample_toy(name, rng, TOY_EVAL_SIZE, int(config.data.dim)))
  else:
    source = get_source(config, split)
  n = len(source)
  pool = _loader_pool(config, source)
  dequantize = bool(uniform_dequantization) and name not in TOY_DATASETS
  example_shape = data_shape(config)
  logging.info('eval data: %s/%s, %d examples in %d batches', config.data.dataset, split, n,
               math.ceil(n / global_batch))

  def make(j: int) -> Batch:
    rows = j * global_batch + pidx * local + np.arange(local)
    mask = rows < n
    valid = rows[mask]
    loaded = source.load(valid, pool) if len(valid) else None
    if name in TOY_DATASETS:
      values = loaded
    else:
      keys = [(seed, _TAG_EVAL_ROW, split_code, int(repeat), int(i)) for i in valid]
      values = (_finish(loaded, keys, False, dequantize, config.data.num_levels)
                if loaded is not None else None)
    image = np.zeros((local,) + example_shape, np.float32)
    if values is not None:
      image[:len(valid)] = values
    batch = {'image': image, 'mask': mask}
    if config.data.labels:
      batch['label'] = np.zeros((local,), np.int32)
      batch['label'][:len(valid)] = source.load_labels(valid)
    return batch
  return _prefetched(make, iter(range(math.ceil(n / global_batch))), source.parallel)
