"""Reads PyTorch ``.pth``/``.pt`` state dicts into numpy arrays without importing PyTorch.

``torch.save`` writes one of two layouts (torch/serialization.py):

- zip (PyTorch >= 1.6): ``<prefix>/data.pkl`` is a pickle whose tensors point, through persistent ids
  ``('storage', StorageType, key, location, numel)``, at raw little-endian buffers ``<prefix>/data/<key>``;
- legacy (older files, e.g. pytorch-fid's Inception weights): a stream of pickles — magic number,
  protocol version, system info, the object (same persistent ids, plus an optional view), the list of
  storage keys — followed by each storage as an int64 element count and its raw bytes, in that order.

A ``.pth`` file is untrusted input, so every pickle in it goes through one restricted unpickler
(``_unpickle``): the object pickle may name only ``collections.OrderedDict``, the tensor and parameter
rebuild functions and the ``torch.<Type>Storage`` classes, the header pickles nothing at all; any other
global is refused before anything runs. Every tensor view is checked against its storage (offset, sizes,
strides, element counts, byte lengths) before numpy touches memory. Whatever the file gets wrong raises
``UnsafeOrCorruptFile`` naming the file and the offending entry.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import reprlib
import struct
import zipfile
import zlib
from typing import Any, BinaryIO, Callable

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b'PK\x03\x04'  # torch.load tells the layouts apart by these first bytes too

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class UnsafeOrCorruptFile(pickle.UnpicklingError, ValueError):
  """A ``.pth`` file this reader refuses: a global outside the allow-list, or inconsistent tensor data.

  Both a ``pickle.UnpicklingError`` and a ``ValueError``, so callers catching either see it.
  """


class _Sealed:
  """Base of every object the pickle can reach: pickle's BUILD opcode would otherwise let the file
  rewrite attributes (a checked storage's size, a function's defaults) after they were resolved."""

  __slots__ = ()

  def __setstate__(self, state):
    raise UnsafeOrCorruptFile(f'the pickle tries to set the state of a {type(self).__name__.lstrip("_")}.')


class _StorageType(_Sealed):
  """Stands for ``torch.<Name>Storage`` in the pickle; only its dtype matters."""

  __slots__ = ('name', 'dtype')

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])

  def __repr__(self) -> str:
    return f'torch.{self.name}'


_STORAGE_TYPES = {name: _StorageType(name) for name in _STORAGE_DTYPES}


class _Storage(_Sealed):
  """A flat buffer of ``numel`` elements; filled immediately (zip) or after the object pickle (legacy)."""

  __slots__ = ('key', 'dtype', 'numel', 'data')

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.data: np.ndarray | None = None

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize


class _Tensor(_Sealed):
  """A strided view into a storage, materialised once every storage is filled."""

  __slots__ = ('storage', 'offset', 'size', 'stride')

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Rebuild(_Sealed):
  """An allow-listed torch function, sealed so the pickle cannot alter it (plain functions accept BUILD)."""

  __slots__ = ('_fn',)

  def __init__(self, fn: Callable[..., Any]):
    self._fn = fn

  def __call__(self, *args):
    return self._fn(*args)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _Tensor:
  """``torch._utils._rebuild_tensor{,_v2}``: types only; bounds wait for the storage's data."""
  if not isinstance(storage, _Storage):
    raise UnsafeOrCorruptFile(f'a tensor is built on a {type(storage).__name__}, not on a storage.')
  if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) == len(stride)
          and all(map(_is_int, (storage_offset, *size, *stride)))):
    raise UnsafeOrCorruptFile(
        f'a tensor on storage {storage.key!r} has offset {reprlib.repr(storage_offset)}, size '
        f'{reprlib.repr(size)} and stride {reprlib.repr(stride)}; expected an int and two int tuples of '
        f'equal length.')
  return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused) -> _Tensor:
  if not isinstance(data, _Tensor):
    raise UnsafeOrCorruptFile(f'a parameter wraps a {type(data).__name__}, not a tensor.')
  return data


_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _Rebuild(_rebuild_tensor),
    ('torch._utils', '_rebuild_tensor_v2'): _Rebuild(_rebuild_tensor),
    ('torch._utils', '_rebuild_parameter'): _Rebuild(_rebuild_parameter),
    ('torch._utils', '_rebuild_parameter_with_state'): _Rebuild(_rebuild_parameter),
}


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals a state dict uses (none without ``storage_fn``)."""

  def __init__(self, file: BinaryIO, storage_fn: Callable[[Any], _Storage] | None):
    super().__init__(file)
    self._storage_fn = storage_fn

  def find_class(self, module, name):
    if self._storage_fn is not None:
      if (module, name) in _GLOBALS:
        return _GLOBALS[(module, name)]
      if module == 'torch' and name in _STORAGE_TYPES:
        return _STORAGE_TYPES[name]
      allowed = 'collections.OrderedDict, torch._utils tensor/parameter rebuilds and torch.*Storage'
    else:
      allowed = 'none in a header pickle'
    raise UnsafeOrCorruptFile(f'global {module}.{name} is not allowed (allowed: {allowed}).')

  def persistent_load(self, pid):
    if self._storage_fn is None:
      raise UnsafeOrCorruptFile(f'persistent id {reprlib.repr(pid)} is not allowed in a header pickle.')
    return self._storage_fn(pid)


def _unpickle(file: BinaryIO, path: str, entry: str,
              storage_fn: Callable[[Any], _Storage] | None = None) -> Any:
  """The next pickle in ``file``, through the restricted unpickler; any failure names file and entry."""
  try:
    return _Unpickler(file, storage_fn).load()
  except Exception as err:  # malformed pickles raise many types (EOFError, TypeError, KeyError, ...)
    raise UnsafeOrCorruptFile(f'{path}: {entry}: {err}') from err


def _storage_id(pid: Any, arity: int) -> tuple[np.dtype, str, int]:
  """(dtype, key, numel) of a persistent id ``('storage', StorageType, key, location, numel[, view])``."""
  if not (isinstance(pid, tuple) and len(pid) == arity and pid[0] == 'storage'):
    raise UnsafeOrCorruptFile(
        f'persistent id {reprlib.repr(pid)} is not a {arity}-tuple ("storage", type, key, location, numel'
        f'{", view" if arity == 6 else ""}).')
  _, storage_type, key, location, numel = pid[:5]
  if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and isinstance(location, str)
          and _is_int(numel) and numel >= 0):
    raise UnsafeOrCorruptFile(
        f'persistent id {reprlib.repr(pid)} needs a torch.*Storage type, a str key, a str location and a '
        f'non-negative int element count.')
  if arity == 6 and pid[5] is not None:
    raise UnsafeOrCorruptFile(f'storage {key!r} is a view of another storage, which is not supported.')
  return storage_type.dtype, key, numel


def _shared_storage(storages: dict[str, _Storage], dtype: np.dtype, key: str, numel: int) -> _Storage | None:
  """The storage already loaded under ``key``, if any; it must agree with this reference to it."""
  storage = storages.get(key)
  if storage is not None and (storage.dtype, storage.numel) != (dtype, numel):
    raise UnsafeOrCorruptFile(
        f'storage {key!r} is referenced as {numel} {dtype} elements and as {storage.numel} '
        f'{storage.dtype} elements.')
  return storage


def _is_c_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
  expected = 1
  for n, s in zip(reversed(size), reversed(stride)):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


class _Arrays:
  """Turns the unpickled object's tensors into numpy arrays, checking each view against its storage.

  Contiguous views come back as (read-only) views of the storage; others are copied. Copies may total at
  most the storages' bytes, so stride-0 or overlapping views cannot make a small file allocate terabytes;
  a tensor the pickle shares is materialised once.
  """

  def __init__(self, path: str, storages: dict[str, _Storage]):
    self._path = path
    self._copy_budget = sum(storage.nbytes for storage in storages.values())
    self._done: dict[int, np.ndarray] = {}

  def __call__(self, obj: Any) -> Any:
    try:
      return self._walk(obj, '')
    except RecursionError as err:
      raise UnsafeOrCorruptFile(f'{self._path}: the object is nested too deeply or contains itself.') from err

  def _walk(self, obj: Any, where: str) -> Any:
    if isinstance(obj, _Tensor):
      if id(obj) not in self._done:
        self._done[id(obj)] = self._array(obj, where or 'the top-level tensor')
      return self._done[id(obj)]
    if isinstance(obj, dict):
      return type(obj)((k, self._walk(v, f'{where}[{k!r}]')) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
      return type(obj)(self._walk(v, f'{where}[{i}]') for i, v in enumerate(obj))
    return obj

  def _refuse(self, where: str, tensor: _Tensor, problem: str) -> UnsafeOrCorruptFile:
    return UnsafeOrCorruptFile(
        f'{self._path}: tensor {where} (offset {tensor.offset}, size {reprlib.repr(tensor.size)}, stride '
        f'{reprlib.repr(tensor.stride)}) '
        f'on storage {tensor.storage.key!r} of {tensor.storage.numel} {tensor.storage.dtype} elements: '
        f'{problem}.')

  def _array(self, tensor: _Tensor, where: str) -> np.ndarray:
    storage, offset, size, stride = tensor.storage, tensor.offset, tensor.size, tensor.stride
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
      raise self._refuse(where, tensor, 'negative offsets, sizes and strides are not supported')
    numel = math.prod(size)
    if numel == 0:
      try:
        return np.empty(size, storage.dtype)
      except ValueError as err:
        raise self._refuse(where, tensor, f'{err}') from err
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.numel:
      raise self._refuse(where, tensor, f'the view reaches element {last}, past the end of its storage')
    contiguous = _is_c_contiguous(size, stride)
    if not contiguous:
      nbytes = numel * storage.dtype.itemsize
      if nbytes > self._copy_budget:
        raise self._refuse(
            where, tensor, f'copying this view needs {nbytes} bytes, more than the file\'s storages hold '
            f'beyond earlier copies ({self._copy_budget}); save such tensors with .contiguous()')
      self._copy_budget -= nbytes
    itemsize = storage.dtype.itemsize
    # A size-1 dimension never steps, so its stride (which may be any int) is irrelevant.
    strides = [s * itemsize if n > 1 else 0 for n, s in zip(size, stride)]
    try:
      view = np.lib.stride_tricks.as_strided(storage.data[offset:], shape=size, strides=strides)
    except ValueError as err:  # e.g. more dimensions than numpy supports
      raise self._refuse(where, tensor, f'{err}') from err
    return view if contiguous else np.ascontiguousarray(view)


def _read_member(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
  try:
    return archive.read(name)
  except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as err:
    raise UnsafeOrCorruptFile(
        f'{path}: archive member {name} cannot be read ({err}); the file is damaged.') from err


def _load_zip(path: str) -> Any:
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, EOFError, ValueError) as err:
    raise UnsafeOrCorruptFile(
        f'{path}: starts like a zip archive (torch.save since PyTorch 1.6) but cannot be read as one '
        f'({err}); it is probably truncated or damaged, download or save it again.') from err
  with archive:
    pkl = [n for n in archive.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkl) != 1:
      raise UnsafeOrCorruptFile(f'{path}: zip archive without a single data.pkl; not a torch.save file.')
    prefix = pkl[0][:-len('data.pkl')]
    byteorder = prefix + 'byteorder'
    if byteorder in archive.namelist() and _read_member(archive, byteorder, path) != b'little':
      raise UnsafeOrCorruptFile(f'{path}: big-endian tensors are not supported.')

    storages: dict[str, _Storage] = {}

    def storage_fn(pid: Any) -> _Storage:
      dtype, key, numel = _storage_id(pid, arity=5)
      storage = _shared_storage(storages, dtype, key, numel)
      if storage is not None:
        return storage
      name = f'{prefix}data/{key}'
      try:
        info = archive.getinfo(name)
      except KeyError:
        raise UnsafeOrCorruptFile(
            f'storage {key!r} is referenced but the archive has no member {name}.') from None
      storage = _Storage(key, dtype, numel)
      if info.file_size != storage.nbytes:  # checked before reading: numel may be absurd (2**62)
        raise UnsafeOrCorruptFile(
            f'storage {key!r} declares {numel} {dtype} elements ({storage.nbytes} bytes) but archive member '
            f'{name} holds {info.file_size} bytes.')
      storage.data = np.frombuffer(_read_member(archive, name, path), dtype)
      storages[key] = storage
      return storage

    obj = _unpickle(io.BytesIO(_read_member(archive, pkl[0], path)), path, pkl[0], storage_fn)
    return _Arrays(path, storages)(obj)


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    data = f.read()  # the storages are all read anyway; reading once bounds every count by len(data)
  stream = io.BytesIO(data)
  try:
    magic = _unpickle(stream, path, 'magic number')
  except UnsafeOrCorruptFile as err:
    raise UnsafeOrCorruptFile(
        f'{path}: not a PyTorch file (its first pickle, the magic number, is unreadable: '
        f'{str(err.__cause__).rstrip(".")}).'
    ) from err.__cause__
  if not (_is_int(magic) and magic == _LEGACY_MAGIC):
    raise UnsafeOrCorruptFile(f'{path}: not a PyTorch file (bad magic number {reprlib.repr(magic)}).')
  protocol = _unpickle(stream, path, 'protocol version')
  if not (_is_int(protocol) and protocol == _LEGACY_PROTOCOL):
    raise UnsafeOrCorruptFile(f'{path}: unsupported legacy protocol {reprlib.repr(protocol)}.')
  sys_info = _unpickle(stream, path, 'system info')
  if not isinstance(sys_info, dict):
    raise UnsafeOrCorruptFile(f'{path}: system info is a {type(sys_info).__name__}, not a dict.')
  if not sys_info.get('little_endian', True):
    raise UnsafeOrCorruptFile(f'{path}: big-endian tensors are not supported.')

  storages: dict[str, _Storage] = {}

  def storage_fn(pid: Any) -> _Storage:
    dtype, key, numel = _storage_id(pid, arity=6)
    storage = _shared_storage(storages, dtype, key, numel)
    if storage is None:
      storage = storages[key] = _Storage(key, dtype, numel)
      if storage.nbytes > len(data):
        raise UnsafeOrCorruptFile(
            f'storage {key!r} declares {numel} {dtype} elements ({storage.nbytes} bytes), more than the '
            f'whole file ({len(data)} bytes).')
    return storage

  obj = _unpickle(stream, path, 'object pickle', storage_fn)
  keys = _unpickle(stream, path, 'storage key list')
  if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
    raise UnsafeOrCorruptFile(f'{path}: the storage key list is {reprlib.repr(keys)}, not a list of str.')
  offset = stream.tell()
  for key in keys:
    storage = storages.get(key)
    if storage is None:
      raise UnsafeOrCorruptFile(f'{path}: storage {key!r} is listed but no tensor references it.')
    if storage.data is not None:
      raise UnsafeOrCorruptFile(f'{path}: storage {key!r} is listed twice.')
    if offset + 8 > len(data):
      raise UnsafeOrCorruptFile(f'{path}: truncated before the element count of storage {key!r}.')
    (count,) = struct.unpack_from('<q', data, offset)
    offset += 8
    if count != storage.numel:
      raise UnsafeOrCorruptFile(
          f'{path}: storage {key!r} holds {count} elements but its references declare {storage.numel}.')
    if offset + storage.nbytes > len(data):
      raise UnsafeOrCorruptFile(
          f'{path}: truncated (storage {key!r} needs {storage.nbytes} bytes, {len(data) - offset} remain).')
    storage.data = np.frombuffer(data, storage.dtype, count=count, offset=offset)
    offset += storage.nbytes
  missing = [key for key, storage in storages.items() if storage.data is None]
  if missing:
    raise UnsafeOrCorruptFile(f'{path}: storages {missing} are referenced but have no data in the file.')
  return _Arrays(path, storages)(obj)


def load(path: str | os.PathLike) -> Any:
  """The object saved by ``torch.save`` (typically a state dict), with tensors as numpy arrays.

  Raises:
    UnsafeOrCorruptFile: the file names a global outside the allow-list, or its tensors do not fit their
      storages, or it is truncated or not a torch.save file.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    is_zip = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
  return _load_zip(path) if is_zip else _load_legacy(path)
