"""The process's C allocator, and why it matters for XLA on the CPU.

XLA:CPU allocates a program's temporary buffers at every call: 738 MiB for the CIFAR-10 DDPM++ training
step at batch 4 (its compiled memory analysis). glibc's malloc serves an allocation that large with
fresh pages from the kernel (``mmap``; from a worker thread's arena it always does), so every step
page-faults and zeroes them again (about 190,000 faults) and unmaps them afterwards. tcmalloc keeps
freed memory for reuse: preloaded, the CIFAR-10 NCSN++ and DDPM++ steps took 0.87-0.91x the time on a
2-core AMD EPYC, the PyTorch reference's DDPM++ step 0.94-0.95x (BENCHMARKS.md, "Where the CPU time
goes"). glibc tunables that keep the memory (one arena, no mmap) removed the faults but not the time,
and jemalloc's defaults return the memory as glibc does; neither helped. tcmalloc holds on to the peak:
the process's resident memory does not shrink between steps.

The allocator is chosen when the process starts, so the library can only say which one runs
(``allocator``) and suggest the other (``advice``, logged when CPU training starts).
"""

from __future__ import annotations

import jax

TCMALLOC_LINE = ('LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 '
                 '(Debian/Ubuntu: apt install libtcmalloc-minimal4)')
_KNOWN = ('tcmalloc', 'jemalloc', 'mimalloc')


def allocator_in(maps: str) -> str:
  """The allocator named by a ``/proc/<pid>/maps`` text: a mapped tcmalloc, jemalloc or mimalloc
  library, else 'glibc malloc'."""
  for name in _KNOWN:
    if f'lib{name}' in maps:
      return name
  return 'glibc malloc'


def allocator() -> str:
  """This process's allocator (``allocator_in`` of its maps); 'unknown' where /proc is not readable."""
  try:
    with open('/proc/self/maps', encoding='ascii', errors='replace') as maps:
      return allocator_in(maps.read())
  except OSError:
    return 'unknown'


def advice() -> str | None:
  """A line for the log where the CPU backend runs on glibc's malloc (None elsewhere): how to start the
  process with tcmalloc instead."""
  if jax.default_backend() != 'cpu' or allocator() != 'glibc malloc':
    return None
  return ('XLA:CPU allocates each step\'s temporaries afresh, and glibc\'s malloc returns them to the '
          'kernel after every step; started with tcmalloc, CIFAR-10 training steps took 0.87-0.91x the '
          f'time (README, "Performance"): {TCMALLOC_LINE}.')
