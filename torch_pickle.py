"""Reads PyTorch ``.pth``/``.pt`` state dicts into numpy arrays without importing PyTorch.

``torch.save`` writes one of two layouts (torch/serialization.py):

- zip (PyTorch >= 1.6): ``<prefix>/data.pkl`` is a pickle whose tensors point, through persistent ids
  ``('storage', StorageType, key, location, numel)``, at raw little-endian buffers ``<prefix>/data/<key>``;
- legacy (older files, e.g. pytorch-fid's Inception weights): a stream of pickles — magic number,
  protocol version, system info, the object (same persistent ids, plus an optional view), the list of
  storage keys — followed by each storage as an int64 element count and its raw bytes, in that order.

Only the classes a state dict needs are resolved (``OrderedDict``, tensor/parameter rebuild functions,
storage types); any other global in the pickle raises ``pickle.UnpicklingError``, so a ``.pth`` file
cannot run code here.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _StorageType:
  """Stands for ``torch.<Name>Storage`` in the pickle; only its dtype matters."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A flat buffer; filled immediately (zip) or after the object pickle (legacy)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, numel
    self.data: np.ndarray | None = None


class _Tensor:
  """A strided view into a storage, materialised once every storage is filled."""

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def numpy(self) -> np.ndarray:
    flat = self.storage.data
    if not self.size:
      return np.array(flat[self.offset])
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=[s * flat.itemsize for s in self.stride])
    return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals a state dict uses; storages come from ``storage_fn``."""

  def __init__(self, file, storage_fn):
    super().__init__(file)
    self._storage_fn = storage_fn

  def find_class(self, module, name):
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f'{module}.{name} is not allowed in a state-dict file (only tensors, parameters and dicts are).')

  def persistent_load(self, pid):
    if pid[0] != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {pid[0]!r} in the .pth file.')
    return self._storage_fn(*pid[1:])


def _materialise(obj: Any) -> Any:
  if isinstance(obj, _Tensor):
    return obj.numpy()
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    pkl = [n for n in archive.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkl) != 1:
      raise ValueError(f'{path}: zip archive without a single data.pkl; not a torch.save file.')
    prefix = pkl[0][:-len('data.pkl')]
    byteorder = prefix + 'byteorder'
    if byteorder in archive.namelist() and archive.read(byteorder).decode() != 'little':
      raise ValueError(f'{path}: big-endian tensors are not supported.')

    storages: dict[str, _Storage] = {}

    def storage_fn(storage_type, key, location, numel):
      del location
      if key not in storages:
        buf = archive.read(f'{prefix}data/{key}')
        storage = _Storage(storage_type.dtype, numel)
        storage.data = np.frombuffer(buf, dtype=storage_type.dtype)
        storages[key] = storage
      return storages[key]

    with archive.open(pkl[0]) as f:
      return _materialise(_Unpickler(f, storage_fn).load())


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise ValueError(f'{path}: not a PyTorch file (bad magic number).')
    protocol = pickle.load(f)
    if protocol != 1001:
      raise ValueError(f'{path}: unsupported legacy protocol {protocol}.')
    sys_info = pickle.load(f)
    if not sys_info.get('little_endian', True):
      raise ValueError(f'{path}: big-endian tensors are not supported.')

    storages: dict[str, _Storage] = {}

    def storage_fn(storage_type, key, location, numel, view_metadata=None):
      del location
      if key not in storages:
        storages[key] = _Storage(storage_type.dtype, numel)
      if view_metadata is not None:
        raise pickle.UnpicklingError(f'{path}: storage views are not supported.')
      return storages[key]

    obj = _Unpickler(f, storage_fn).load()
    for key in pickle.load(f):
      storage = storages[key]
      (numel,) = struct.unpack('<q', f.read(8))
      nbytes = numel * storage.dtype.itemsize
      buf = f.read(nbytes)
      if len(buf) != nbytes:
        raise ValueError(f'{path}: truncated (storage {key} needs {nbytes} bytes).')
      storage.data = np.frombuffer(buf, dtype=storage.dtype)
    return _materialise(obj)


def load(path: str | os.PathLike) -> Any:
  """The object saved by ``torch.save`` (typically a state dict), with tensors as numpy arrays."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)

