"""infra/host_allocator: which C allocator runs, and the advice logged when CPU training starts."""

import os
import subprocess
import sys

import jax
import pytest

from scoresde.infra import host_allocator

TCMALLOC = '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4'
MAPS_LINE = '7f3a1c000000-7f3a1c021000 r-xp 00000000 08:01 1234 {}\n'


@pytest.mark.parametrize('library,expected', [
    ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10', 'tcmalloc'),
    ('/usr/lib/x86_64-linux-gnu/libjemalloc.so.2', 'jemalloc'),
    ('/usr/lib/x86_64-linux-gnu/libc.so.6', 'glibc malloc'),
])
def test_allocator_is_read_from_the_mapped_libraries(library, expected):
  maps = MAPS_LINE.format('/usr/bin/python3.11') + MAPS_LINE.format(library)
  assert host_allocator.allocator_in(maps) == expected


def _allocator_of_a_python_started_with(preload: str | None) -> str:
  """``host_allocator.allocator()`` in a fresh interpreter, LD_PRELOAD set to ``preload`` or unset."""
  env = {key: value for key, value in os.environ.items() if key != 'LD_PRELOAD'}
  if preload is not None:
    env['LD_PRELOAD'] = preload
  code = 'from scoresde.infra import host_allocator; print(host_allocator.allocator())'
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
  return result.stdout.strip()


def test_a_plain_python_runs_on_glibc():
  assert _allocator_of_a_python_started_with(None) == 'glibc malloc'


@pytest.mark.skipif(not os.path.exists(TCMALLOC), reason='tcmalloc is not installed (apt install libtcmalloc-minimal4)')
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
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert host_allocator.advice() is None
