"""XLA:CPU compiler options per kind of program and CPU vendor, chosen by measurement.

On the CPU backend, XLA (jax 0.10) hands some fusions to the YNNPACK library by default; which set is
fastest depends on the CPU. Measured on the CIFAR-10 NCSN++ and DDPM++ at batch 4 and the digits NCSN++
at 64 on 2-core CPUs (``benchmarks/cpu_flags.py``, BENCHMARKS.md "Where the CPU time goes"):

- Intel (a Sapphire Rapids): a program that only runs the network forward (samplers, likelihoods, the
  eval loss, the anomaly residual) is fastest with no YNNPACK fusions (XLA's own convolutions): 0.71-0.88x
  the time. The training step's gradient is fastest with YNNPACK for elementwise fusions and matrix
  products only, but that set slows the optimizer and EMA update of the parameters (0.25 vs 0.14 s for
  62M parameters), which keeps XLA's defaults: on CPU the trainer runs them as two programs (``run_lib``).
- AMD (an EPYC, Zen 4): that table made the DDPM++ step 3-10% slower than XLA's defaults; YNNPACK for
  reductions only (which also keeps the convolutions in XLA) is the fastest set found for every program,
  so the step stays one program (``split_training``).

Other vendors (Arm, ...) get the Intel table, unmeasured. The options go to ``jax.jit``'s
``compiler_options`` of each program (``jit`` below), so one process holds every kind.

Only the CPU backend is affected. ``SCORESDE_XLA_CPU_TUNING=0`` turns the choice off (XLA's defaults, and
the trainer's step as one program), and an ``xla_cpu_experimental_ynn_fusion_type`` given in
``XLA_FLAGS`` is the user's choice and wins.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Any, Callable, Literal

import jax

Program = Literal['inference', 'gradient', 'update', 'training']

_YNN = 'xla_cpu_experimental_ynn_fusion_type'
_REDUCE_ONLY = {_YNN: 'LIBRARY_FUSION_TYPE_REDUCE'}
# CPU vendor (``vendor_id`` of /proc/cpuinfo) -> program -> options; ``{}`` is XLA's defaults.
OPTIONS_BY_VENDOR: dict[str, dict[str, dict[str, str]]] = {
    'GenuineIntel': {
        'gradient': {_YNN: 'LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_DOT'},
        'update': {},
        'training': {},  # the one-program step: with the gradient's set no faster, more memory
        'inference': {_YNN: ''},
    },
    'AuthenticAMD': {program: _REDUCE_ONLY for program in ('gradient', 'update', 'training', 'inference')},
}
_FALLBACK_VENDOR = 'GenuineIntel'
ENV_SWITCH = 'SCORESDE_XLA_CPU_TUNING'


@functools.cache
def cpu_vendor() -> str:
  """The CPU's ``vendor_id`` from /proc/cpuinfo ('GenuineIntel', 'AuthenticAMD'), '' where unknown."""
  try:
    with open('/proc/cpuinfo', encoding='ascii', errors='replace') as f:
      for line in itertools.islice(f, 64):  # vendor_id is among the first lines of the first CPU
        key, _, value = line.partition(':')
        if key.strip() == 'vendor_id':
          return value.strip()
  except OSError:
    pass
  return ''


def table() -> dict[str, dict[str, str]]:
  """This CPU's program -> options table (the live entry of ``OPTIONS_BY_VENDOR``)."""
  return OPTIONS_BY_VENDOR.get(cpu_vendor(), OPTIONS_BY_VENDOR[_FALLBACK_VENDOR])


def compiler_options(program: Program) -> dict[str, str] | None:
  """The ``compiler_options`` for a ``jax.jit`` of ``program`` on this CPU; None (XLA's defaults) off
  the CPU.

  Read when the program is built, so the switch can differ between programs of one process (the
  benchmark compares both ways in one run).
  """
  options = table()
  if program not in options:
    raise ValueError(f'program must be one of {sorted(options)}, got {program!r}.')
  if not enabled():
    return None
  return dict(options[program]) or None


def enabled() -> bool:
  """Whether programs get this module's options: on the CPU backend, unless ``SCORESDE_XLA_CPU_TUNING=0``
  or the user's ``XLA_FLAGS`` sets the option for every program."""
  if os.environ.get(ENV_SWITCH, '1') == '0' or _YNN in os.environ.get('XLA_FLAGS', ''):
    return False
  return jax.default_backend() == 'cpu'


def split_training() -> bool:
  """Whether the CPU trainer should run its step as a gradient and an update program: only when the
  options are on and differ between the two (otherwise a split only adds a program boundary)."""
  options = table()
  return enabled() and options['gradient'] != options['update']


def _has_tracer(tree: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def jit(fun: Callable, program: Program, **jit_kwargs) -> Callable:
  """``jax.jit(fun, **jit_kwargs)``, compiled with ``program``'s options when called at top level.

  XLA takes ``compiler_options`` only for a top-level program: called inside another transformation
  (``jit``, ``vmap``, ``grad`` of a caller: its arguments are tracers, or an enclosing ``jit`` is being
  traced), ``fun`` runs as a plain nested ``jit`` and the enclosing program's options apply.
  ``.lower`` is the tuned program's, so that ahead-of-time analyses (``benchmarks/memory_plan.py``)
  see what runs.
  """
  options = compiler_options(program)
  plain = jax.jit(fun, **jit_kwargs)
  if options is None:
    return plain
  tuned = jax.jit(fun, compiler_options=options, **jit_kwargs)

  @functools.wraps(fun)
  def call(*args, **kwargs):
    if _has_tracer((args, kwargs)):
      return plain(*args, **kwargs)
    try:
      return tuned(*args, **kwargs)
    except ValueError as err:  # an enclosing jit traces us with constant arguments
      if 'compiler_options' not in str(err):
        raise
      return plain(*args, **kwargs)
  call.lower = tuned.lower
  return call
