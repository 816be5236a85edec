"""infra/host_allocator: which C allocator runs, XLA:CPU's temporaries kept between calls under glibc
(in fresh interpreters: the inline setting only takes effect before jax starts its backends), and the
advice logged when CPU training starts without that."""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import jax
import pytest

from scoresde.infra import host_allocator

TCMALLOC = '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4'
MAPS_LINE = '7f3a1c000000-7f3a1c021000 r-xp 00000000 08:01 1234 {}\n'
ROOT = pathlib.Path(__file__).resolve().parents[1]
# A program whose temporaries (~100 MiB in one block: a reversed copy and a cumulative sum of a 32 MiB
# array, kept apart by a sort) are too large for any glibc arena's heap or mmap threshold; called eight
# times, the faults of the last five counted (the kept heap may still grow once in the first few calls).
# Prints JSON: the temporaries' bytes, faults per call, and whether keep_freed_memory took effect.
FAULTS_PROGRAM = '''
import json, resource, sys
import jax, jax.numpy as jnp
from scoresde.infra import host_allocator
if sys.argv[1] == 'keep':
  host_allocator.inline_cpu_programs()
x = jnp.arange(2**23, dtype=jnp.float32).reshape(2**11, 2**12)
kept = host_allocator.keep_freed_memory()
f = jax.jit(lambda x: (jnp.sort(jnp.cumsum(x[::-1], axis=0), axis=1) * jnp.cumsum(x, axis=1)).sum(0))
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'temp': temp, 'faults': faults[3:], 'kept': kept}))
'''


@pytest.mark.parametrize('library,expected', [
    ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10', 'tcmalloc'),
    ('/usr/lib/x86_64-linux-gnu/libjemalloc.so.2', 'jemalloc'),
    ('/usr/lib/x86_64-linux-gnu/libc.so.6', 'glibc malloc'),
])
def test_allocator_is_read_from_the_mapped_libraries(library, expected):
  maps = MAPS_LINE.format('/usr/bin/python3.11') + MAPS_LINE.format(library)
  assert host_allocator.allocator_in(maps) == expected


def _fresh_python(code: str, *args: str, preload: str | None = None) -> str:
  """The standard output of ``code`` run by a fresh interpreter on one CPU device, LD_PRELOAD set to
  ``preload`` or unset."""
  env = {key: value for key, value in os.environ.items() if key not in ('LD_PRELOAD', 'XLA_FLAGS')}
  env |= {'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(ROOT)}
  if preload is not None:
    env['LD_PRELOAD'] = preload
  result = subprocess.run([sys.executable, '-c', code, *args], env=env, capture_output=True, text=True,
                          timeout=300, check=True, cwd=ROOT)
  return result.stdout.strip()


def _allocator_of_a_python_started_with(preload: str | None) -> str:
  code = 'from scoresde.infra import host_allocator; print(host_allocator.allocator())'
  return _fresh_python(code, preload=preload)


def test_a_plain_python_runs_on_glibc():
  assert _allocator_of_a_python_started_with(None) == 'glibc malloc'


@pytest.mark.skipif(not os.path.exists(TCMALLOC),
                    reason='tcmalloc is not installed (apt install libtcmalloc-minimal4)')
def test_a_preloaded_tcmalloc_is_seen():
  assert _allocator_of_a_python_started_with(TCMALLOC) == 'tcmalloc'


def test_advice_names_tcmalloc_only_for_glibc_on_the_cpu(monkeypatch):
  monkeypatch.setattr(host_allocator, 'allocator', lambda: 'glibc malloc')
  advice = host_allocator.advice()
  assert jax.default_backend() == 'cpu'
  assert advice is not None and 'LD_PRELOAD=' in advice and 'libtcmalloc' in advice
  monkeypatch.setattr(host_allocator, 'allocator', lambda: 'tcmalloc')
  assert host_allocator.advice() is None
  monkeypatch.setattr(host_allocator, 'allocator', lambda: 'glibc malloc')
  monkeypatch.setitem(host_allocator._state, 'kept', True)  # pylint: disable=protected-access
  assert host_allocator.advice() is None
  monkeypatch.setitem(host_allocator._state, 'kept', False)  # pylint: disable=protected-access
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert host_allocator.advice() is None


def test_kept_memory_removes_the_page_faults_of_each_call():
  """Under glibc, a program's 100 MiB of temporaries are faulted in afresh at every call (one fault per
  4 KiB page); run inline with freed memory kept, they are reused: next to no faults."""
  default = json.loads(_fresh_python(FAULTS_PROGRAM, 'default'))
  kept = json.loads(_fresh_python(FAULTS_PROGRAM, 'keep'))
  pages = default['temp'] // 4096
  assert pages > 16_000, default  # the program still has temporaries too large for an arena
  assert not default['kept'] and kept['kept']
  assert statistics.median(default['faults']) > pages // 2, (pages, default)
  assert statistics.median(kept['faults']) < pages // 20, (pages, kept)


def test_keep_freed_memory_needs_inline_programs_on_one_cpu_device_on_glibc():
  """This test process started jax's backends with asynchronous dispatch (pytest), so keeping freed
  memory would not help: it declines and the advice stays."""
  assert jax.config.read('jax_cpu_enable_async_dispatch')
  assert not host_allocator.keep_freed_memory()
  assert host_allocator.advice() is not None or host_allocator.allocator() != 'glibc malloc'


def test_main_starts_no_backend_before_it_inlines_cpu_programs():
  """main.py inlines CPU programs first thing in ``main``: nothing its imports or its config loading do
  may have started jax's backends by then (the setting would silently not apply)."""
  code = (
      'import sys; sys.argv = ["main.py", "--config=configs/ve/digits_ncsnpp_continuous.py", "--workdir=w"]\n'
      'import main\n'
      'from jax._src import xla_bridge\n'
      'main.FLAGS(sys.argv); print(main.FLAGS.config.training.batch_size > 0, '
      'xla_bridge.backends_are_initialized())\n')
  assert _fresh_python(code) == 'True False'
