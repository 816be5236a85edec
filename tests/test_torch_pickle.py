"""torch_pickle reads valid .pth files exactly and refuses crafted ones before anything runs or reads past a
storage.

The files are written here without PyTorch: ``_Writer`` emits torch's globals (``torch._utils
._rebuild_tensor_v2``, ``torch.FloatStorage``) by name and storages as persistent ids, in the zip layout
(``archive/data.pkl``, ``archive/data/<key>``) or the legacy stream (five pickles, then the storages).
Only the last test needs torch, and skips without it.
"""

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from scoresde.porting import torch_pickle

_MAGIC = 0x1950a86a20f9469cfc6c
_SYS_INFO = {'protocol_version': 1001, 'little_endian': True, 'type_sizes': {'short': 2, 'int': 4, 'long': 4}}
_DTYPE_STORAGES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.int64): 'LongStorage'}


class _Global:
  """A global written by name (``GLOBAL module name``), so torch need not be importable."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError('only written, never called')  # pickle requires reduce functions be callable


class _Call:
  """Pickles as ``fn(*args)`` (opcode REDUCE)."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


class _StorageRef:
  """Written as torch's persistent id ``('storage', type, key, 'cpu', numel[, None])``."""

  def __init__(self, key: str, numel: int, dtype=np.float32):
    self.key, self.numel, self.type = key, numel, _DTYPE_STORAGES[np.dtype(dtype)]


class _RawPid:
  """A persistent id written as given, however malformed."""

  def __init__(self, pid: tuple):
    self.pid = pid


class _Writer(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler, whose ``save`` can emit globals that do not exist here."""

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self._legacy = legacy

  def persistent_id(self, obj):
    if isinstance(obj, _RawPid):
      return obj.pid
    if isinstance(obj, _StorageRef):
      pid = ('storage', _Global('torch', obj.type), obj.key, 'cpu', obj.numel)
      return pid + (None,) if self._legacy else pid
    return None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, _Global):
      self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
    else:
      super().save(obj, save_persistent_id)


def _dumps(obj, legacy: bool) -> bytes:
  buf = io.BytesIO()
  _Writer(buf, legacy).dump(obj)
  return buf.getvalue()


def _tensor(storage, offset, size, stride):
  hooks = _Call(_Global('collections', 'OrderedDict'))
  return _Call(_Global('torch._utils', '_rebuild_tensor_v2'), storage, offset, size, stride, False, hooks)


def _parameter(tensor):
  hooks = _Call(_Global('collections', 'OrderedDict'))
  return _Call(_Global('torch._utils', '_rebuild_parameter'), tensor, True, hooks)


def _write_zip(path, obj, data: dict[str, bytes], pkl: bytes | None = None):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', _dumps(obj, legacy=False) if pkl is None else pkl)
    archive.writestr('archive/byteorder', 'little')
    for key, raw in data.items():
      archive.writestr(f'archive/data/{key}', raw)
  return path


def _legacy_pickles(obj, keys: list[str]) -> list[bytes]:
  """magic, protocol, system info, object, storage keys: the five pickles of a legacy file."""
  return [pickle.dumps(_MAGIC, 2), pickle.dumps(1001, 2), pickle.dumps(_SYS_INFO, 2),
          _dumps(obj, legacy=True), pickle.dumps(keys, 2)]


def _legacy_storage(count: int, raw: bytes) -> bytes:
  return struct.pack('<q', count) + raw


def _write_legacy(path, pickles: list[bytes], storages: bytes):
  path.write_bytes(b''.join(pickles) + storages)
  return path


def _write(path, fmt: str, obj, arrays: dict[str, np.ndarray]):
  """``obj`` saved in ``fmt`` ('zip' or 'legacy') with storages ``arrays`` written as they are."""
  if fmt == 'zip':
    return _write_zip(path, obj, {key: arr.tobytes() for key, arr in arrays.items()})
  storages = b''.join(_legacy_storage(arr.size, arr.tobytes()) for arr in arrays.values())
  return _write_legacy(path, _legacy_pickles(obj, list(arrays)), storages)


def _refused(path, match: str):
  with pytest.raises(torch_pickle.UnsafeOrCorruptFile, match=match) as info:
    torch_pickle.load(path)
  assert str(path) in str(info.value)
  return info.value


FORMATS = ['zip', 'legacy']


@pytest.mark.parametrize('fmt', FORMATS)
def test_crafted_valid_file_round_trips(tmp_path, fmt):
  s0, s1, s2, s3 = (_StorageRef('0', 6), _StorageRef('1', 1, np.int64), _StorageRef('2', 4),
                    _StorageRef('3', 0))
  w = _tensor(s0, 0, (2, 3), (3, 1))
  state = collections.OrderedDict(
      w=w, w_again=w, transposed=_tensor(s0, 0, (3, 2), (1, 3)), row=_tensor(s0, 3, (3,), (1,)),
      every_other=_tensor(s0, 1, (3,), (2,)), scalar=_tensor(s1, 0, (), ()),
      param=_parameter(_tensor(s2, 0, (2, 2), (2, 1))), empty=_tensor(s3, 0, (0, 4), (4, 1)))
  arrays = {'0': np.arange(6, dtype=np.float32), '1': np.array([7]), '2': np.arange(4, dtype=np.float32) / 4,
            '3': np.zeros(0, np.float32)}
  path = _write(tmp_path / 'ok.pth', fmt, {'model': state, 'step': 5, 'names': ['a', 'b']}, arrays)

  loaded = torch_pickle.load(path)

  base = np.arange(6, dtype=np.float32).reshape(2, 3)
  expected = {'w': base, 'w_again': base, 'transposed': base.T, 'row': base[1],
              'every_other': base.ravel()[1::2],
              'scalar': np.array(7), 'param': np.arange(4, dtype=np.float32).reshape(2, 2) / 4,
              'empty': np.zeros((0, 4), np.float32)}
  model = loaded['model']
  assert isinstance(model, collections.OrderedDict) and list(model) == list(expected)
  for key, want in expected.items():
    assert model[key].dtype == want.dtype and model[key].shape == want.shape, key
    np.testing.assert_array_equal(model[key], want)
  assert loaded['step'] == 5 and loaded['names'] == ['a', 'b']


@pytest.mark.parametrize('fmt', FORMATS)
def test_size_one_dimensions_ignore_their_stride(tmp_path, fmt):
  # Such a dimension never steps, so torch may leave any stride there; numpy must not see it (int64 overflow).
  state = {'x': _tensor(_StorageRef('0', 4), 1, (1, 2), (2**62, 1))}
  path = _write(tmp_path / 'unit.pth', fmt, state, {'0': np.arange(4, dtype=np.float32)})
  np.testing.assert_array_equal(torch_pickle.load(path)['x'], [[1., 2.]])


class _Evil:
  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return self.fn, (self.arg,)


def _evil_payloads(marker):
  return {'os.system': _Evil(os.system, f'touch {marker}'),
          'builtins.eval': _Evil(eval, f'__import__("pathlib").Path({str(marker)!r}).touch()')}


@pytest.mark.parametrize('payload', ['os.system', 'builtins.eval'])
@pytest.mark.parametrize('where', ['zip data.pkl', 'legacy magic', 'legacy protocol', 'legacy sys_info',
                                   'legacy object', 'legacy key list'])
def test_code_in_any_pickle_is_refused_before_it_runs(tmp_path, where, payload):
  marker = tmp_path / 'MARKER'
  evil = pickle.dumps(_evil_payloads(marker)[payload], protocol=2)
  path = tmp_path / 'evil.pth'
  if where == 'zip data.pkl':
    _write_zip(path, None, {}, pkl=evil)
  else:
    pickles = _legacy_pickles({}, [])
    pickles[['legacy magic', 'legacy protocol', 'legacy sys_info', 'legacy object',
             'legacy key list'].index(where)] = evil
    _write_legacy(path, pickles, b'')
  error = _refused(path, r'(system|eval) is not allowed')
  assert isinstance(error, ValueError) and isinstance(error, pickle.UnpicklingError)
  assert not marker.exists()


def test_unknown_storage_type_is_refused(tmp_path):
  storage = _RawPid(('storage', _Global('torch', 'ComplexFloatStorage'), '0', 'cpu', 2))
  path = _write_zip(tmp_path / 'complex.pth', {'x': _tensor(storage, 0, (2,), (1,))}, {'0': bytes(16)})
  _refused(path, r'torch\.ComplexFloatStorage is not allowed')


@pytest.mark.parametrize('target', [('torch._utils', '_rebuild_parameter'), ('torch', 'FloatStorage')])
def test_pickle_cannot_rewrite_allowed_objects(tmp_path, target):
  # GLOBAL target; BUILD (None, {'__defaults__': (1,)}): plain objects would take the attribute.
  pkl = (b'\x80\x02' + f'c{target[0]}\n{target[1]}\n'.encode()
         + b'N}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b.')
  path = _write_zip(tmp_path / 'build.pth', None, {}, pkl=pkl)
  _refused(path, 'set the state')


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('case', ['offset', 'stride', 'negative stride', 'negative offset', 'negative size'])
def test_views_past_their_storage_are_refused(tmp_path, fmt, case):
  offset, size, stride = {'offset': (3, (2,), (1,)), 'stride': (0, (2, 2), (10, 1)),
                          'negative stride': (3, (4,), (-1,)), 'negative offset': (-2, (2,), (1,)),
                          'negative size': (0, (-1,), (1,))}[case]
  state = {'weight': _tensor(_StorageRef('0', 4), offset, size, stride)}
  path = _write(tmp_path / 'view.pth', fmt, state, {'0': np.arange(4, dtype=np.float32)})
  _refused(path, r"tensor \['weight'\].*(past the end|negative)")


@pytest.mark.parametrize('fmt', FORMATS)
def test_stride_zero_views_cannot_amplify_memory(tmp_path, fmt):
  state = {'huge': _tensor(_StorageRef('0', 1), 0, (2**20, 2**20), (0, 0))}  # 4 TiB from 4 bytes
  path = _write(tmp_path / 'expand.pth', fmt, state, {'0': np.ones(1, np.float32)})
  _refused(path, r'copying this view needs 4398046511104 bytes')


def test_huge_numel_is_refused_before_allocation_zip(tmp_path):
  state = {'x': _tensor(_StorageRef('0', 2**62), 0, (2,), (1,))}
  path = _write_zip(tmp_path / 'huge.pth', state, {'0': np.zeros(2, np.float32).tobytes()})
  _refused(path, r"storage '0' declares 4611686018427387904 float32 elements .* holds 8 bytes")


def test_huge_numel_is_refused_before_allocation_legacy(tmp_path):
  state = {'x': _tensor(_StorageRef('0', 2**62), 0, (2,), (1,))}
  pickles = _legacy_pickles(state, ['0'])
  path = _write_legacy(tmp_path / 'huge.pth', pickles, _legacy_storage(2**62, bytes(8)))
  _refused(path, r"storage '0' declares 4611686018427387904 .* more than the whole file")


@pytest.mark.parametrize('stored', [4, 8], ids=['shorter', 'longer'])
def test_zip_storage_of_the_wrong_length_is_refused(tmp_path, stored):
  state = {'x': _tensor(_StorageRef('0', 6), 0, (6,), (1,))}
  path = _write_zip(tmp_path / 'short.pth', state, {'0': np.zeros(stored, np.float32).tobytes()})
  _refused(path, rf"storage '0' declares 6 float32 elements \(24 bytes\) but .* holds {4 * stored} bytes")


def test_legacy_storage_count_must_match_its_references(tmp_path):
  state = {'x': _tensor(_StorageRef('0', 6), 0, (6,), (1,))}
  pickles = _legacy_pickles(state, ['0'])
  path = _write_legacy(tmp_path / 'short.pth', pickles, _legacy_storage(4, bytes(16)))
  _refused(path, r"storage '0' holds 4 elements but its references declare 6")


def test_legacy_truncated_storage_is_refused(tmp_path):
  state = {'x': _tensor(_StorageRef('0', 6), 0, (6,), (1,))}
  pickles = _legacy_pickles(state, ['0'])
  path = _write_legacy(tmp_path / 'cut.pth', pickles, _legacy_storage(6, bytes(16)))
  _refused(path, r"truncated \(storage '0' needs 24 bytes, 16 remain\)")


def test_zip_missing_storage_is_refused(tmp_path):
  state = {'x': _tensor(_StorageRef('7', 2), 0, (2,), (1,))}
  path = _write_zip(tmp_path / 'missing.pth', state, {})
  _refused(path, r"storage '7' is referenced but the archive has no member archive/data/7")


def test_legacy_missing_storage_is_refused(tmp_path):
  state = {'x': _tensor(_StorageRef('7', 2), 0, (2,), (1,))}
  path = _write_legacy(tmp_path / 'missing.pth', _legacy_pickles(state, []), b'')
  _refused(path, r"storages \['7'\] are referenced but have no data")


@pytest.mark.parametrize('pid', [('storage', _Global('torch', 'FloatStorage'), '0'),
                                 ('storage', _Global('torch', 'FloatStorage'), 0, 'cpu', 2),
                                 ('storage', _Global('torch', 'FloatStorage'), '0', 'cpu', -2),
                                 ('module', _Global('torch', 'FloatStorage'), '0', 'cpu', 2)],
                         ids=['short', 'int key', 'negative numel', 'not storage'])
def test_malformed_persistent_ids_are_refused(tmp_path, pid):
  path = _write_zip(tmp_path / 'pid.pth', {'x': _tensor(_RawPid(pid), 0, (2,), (1,))}, {'0': bytes(8)})
  _refused(path, 'persistent id')


def test_truncated_zip_is_refused(tmp_path):
  state = {'x': _tensor(_StorageRef('0', 256), 0, (256,), (1,))}
  path = _write_zip(tmp_path / 'cut.pth', state, {'0': bytes(1024)})
  path.write_bytes(path.read_bytes()[:600])
  _refused(path, 'starts like a zip archive .* truncated or damaged')


def test_wrong_magic_is_refused(tmp_path):
  pickles = _legacy_pickles({}, [])
  pickles[0] = pickle.dumps(12345, 2)
  _refused(_write_legacy(tmp_path / 'magic.pth', pickles, b''), 'not a PyTorch file')
  _refused(tmp_path / 'magic.pth', 'bad magic number 12345')
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'\x00not a pickle at all')
  _refused(garbage, 'not a PyTorch file')


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_torch_save_round_trips_exactly(tmp_path, zip_format):
  torch = pytest.importorskip('torch', reason='torch is an optional test dependency (requirements-test.txt)')
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = collections.OrderedDict(
      plain=torch.randn(3, 5), transposed=base.t(), strided=base[::2, 1::3], scalar=torch.tensor(3.5),
      long=torch.arange(7), half=torch.randn(2, 2).half(), bfloat16=torch.randn(3).bfloat16(),
      boolean=torch.tensor([True, False]), expanded=torch.arange(3.).expand(2, 3), empty=torch.zeros(0, 3),
      param=torch.nn.Parameter(torch.randn(2)))
  path = tmp_path / 'state.pth'
  torch.save({'model': state, 'step': 3}, path, _use_new_zipfile_serialization=zip_format)

  loaded = torch_pickle.load(path)

  assert loaded['step'] == 3 and list(loaded['model']) == list(state)
  for key, value in state.items():
    got, want = loaded['model'][key], value.detach()
    if want.dtype == torch.bfloat16:
      got, want = got.astype(np.float32), want.float()
    want = want.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape, key
    np.testing.assert_array_equal(got, want)
