"""The process's C allocator, and how XLA on the CPU reuses its temporaries under glibc.

XLA:CPU allocates a program's temporary buffers at every call: 738 MiB for the CIFAR-10 DDPM++ training
step at batch 4 (its compiled memory analysis). glibc's malloc serves an allocation that large with
fresh pages from the kernel (``mmap``) and unmaps them when it is freed, so every step page-faults and
zeroes them again: about 190,000 faults; kept, the CIFAR-10 DDPM++ step took 0.84-0.90x the time on a
2-core AMD EPYC, NCSN++'s 0.90-1.00x (BENCHMARKS.md, "Where the CPU time goes"). glibc keeps memory
only in its main arena: in a worker thread's arena (where jax runs a CPU program by default, dispatched
asynchronously) an allocation larger than the arena's 64 MiB heap is always mmapped, whatever mallopt
says. Hence two steps, both taken by ``main.py``:

- ``inline_cpu_programs``, before jax starts its backends: the CPU client runs single-device programs on
  the calling thread (``jax_cpu_enable_async_dispatch=False``), so their temporaries come from the main
  arena. Python then waits for each program where it would have queued the next; the training loop reads
  every step's loss anyway.
- ``keep_freed_memory``, once the backend is known to be one CPU device: mallopt turns off mmap for the
  main arena and raises its trim threshold to 2 GiB, so a freed block stays in the heap for the next call.

The process's resident memory then stays at its peak between calls. The alternatives measured: glibc
tunables that force one arena for every thread (no faults, but the threads contend for its lock: no
faster); tcmalloc preloaded (``LD_PRELOAD``), which keeps freed memory in every thread and is as fast,
but is chosen before the process starts; jemalloc's defaults, which return the memory as glibc does.
"""

from __future__ import annotations

import ctypes

import jax

TCMALLOC_LINE = ('LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 '
                 '(Debian/Ubuntu: apt install libtcmalloc-minimal4)')
_KNOWN = ('tcmalloc', 'jemalloc', 'mimalloc')
# mallopt's parameters (glibc's malloc.h). The trim threshold is a C int: 2 GiB - 1 at most.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_TOP_BYTES = 2**31 - 1
_state = {'kept': False}


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


def inline_cpu_programs() -> bool:
  """Under glibc's malloc, run single-device XLA:CPU programs on the calling thread (elsewhere the
  allocator keeps freed memory without it: returns False). Takes effect only if called before jax creates
  its backends (the first array, device query or ``jit`` call): ``main.py`` calls it first."""
  if allocator() != 'glibc malloc':
    return False
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True


def keep_freed_memory() -> bool:
  """Make glibc's main arena keep freed memory (no mmap, a 2 GiB trim threshold) where that lets XLA:CPU
  reuse its temporaries: the default backend is one CPU device, its programs run inline
  (``inline_cpu_programs`` before the backends started) and the allocator is glibc's. Returns whether it
  did; ``advice`` says what to do where it did not."""
  if _state['kept']:
    return True
  inline = not jax.config.read('jax_cpu_enable_async_dispatch')
  if jax.default_backend() != 'cpu' or jax.device_count() != 1 or not inline or allocator() != 'glibc malloc':
    return False
  mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
  if mallopt is None or mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, _KEEP_TOP_BYTES) != 1:
    return False  # not glibc after all (musl's mallopt is a stub returning 0)
  _state['kept'] = True
  return True


def advice() -> str | None:
  """A line for the log where the CPU backend runs on glibc's malloc without ``keep_freed_memory`` in
  effect (None elsewhere): how to have XLA:CPU's temporaries reused."""
  if jax.default_backend() != 'cpu' or allocator() != 'glibc malloc' or _state['kept']:
    return None
  return ('XLA:CPU allocates each step\'s temporaries afresh, and glibc\'s malloc returns them to the '
          'kernel after every step (README, "Performance": kept, CIFAR-10 steps took 0.84-1.00x the time). '
          'main.py keeps them on one CPU device; from Python, call host_allocator.inline_cpu_programs() '
          'before jax starts and keep_freed_memory() after, or start the process with tcmalloc: '
          f'{TCMALLOC_LINE}.')
