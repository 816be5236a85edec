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


def test_this_process_runs_on_glibc_unless_preloaded():
  if 'LD_PRELOAD' in os.environ:
    pytest.skip('an allocator is preloaded into the test process')
  assert host_allocator.allocator() == 'glibc malloc'


@pytest.mark.skipif(not os.path.exists(TCMALLOC), reason='tcmalloc is not installed (apt install libtcmalloc-minimal4)')
def test_a_preloaded_tcmalloc_is_seen():
  code = 'from scoresde.infra import host_allocator; print(host_allocator.allocator())'
  result = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'LD_PRELOAD': TCMALLOC},
                          capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout.strip() == 'tcmalloc'


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
