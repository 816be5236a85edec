"""XLA:CPU compiler options per kind of program, chosen by measurement.

On the CPU backend, XLA (jax 0.10) hands some fusions to the YNNPACK library by default. Measured on the
CIFAR-10 NCSN++ and DDPM++ at batch 4 and the digits NCSN++ at 64 on a 2-core CPU
(``benchmarks/cpu_flags.py``, BENCHMARKS.md "Where the CPU time goes"): a program that only runs the
network forward (samplers, likelihoods, the eval loss, the anomaly residual) is fastest with no YNNPACK
fusions (XLA's own convolutions): 0.71-0.88x the time. The training step's gradient is fastest with
YNNPACK for elementwise fusions and matrix products only, but that set slows the optimizer and EMA
update of the parameters (0.25 vs 0.14 s for 62M parameters), which keeps XLA's defaults: on CPU the
trainer runs them as two programs (``run_lib``). The options go to ``jax.jit``'s ``compiler_options`` of
each program (``jit`` below), so one process holds every kind. ``training`` is the one-program step
(XLA's defaults: with the gradient's set it is no faster and takes more memory).

Only the CPU backend is affected. ``SCORESDE_XLA_CPU_TUNING=0`` turns the choice off (XLA's defaults, and
the trainer's step as one program again), and an ``xla_cpu_experimental_ynn_fusion_type`` given in
``XLA_FLAGS`` is the user's choice and wins. The gain depends on the CPU: on an AMD Zen 4 the options
change little and the split costs the DDPM++ step 10% (BENCHMARKS.md), where the switch helps.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Literal

import jax

Program = Literal['inference', 'gradient', 'update', 'training']

_YNN = 'xla_cpu_experimental_ynn_fusion_type'
OPTIONS: dict[str, dict[str, str]] = {
    'gradient': {_YNN: 'LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_DOT'},
    'update': {},  # XLA's defaults
    'training': {},  # XLA's defaults
    'inference': {_YNN: ''},
}
ENV_SWITCH = 'SCORESDE_XLA_CPU_TUNING'


def compiler_options(program: Program) -> dict[str, str] | None:
  """The ``compiler_options`` for a ``jax.jit`` of ``program``; None (XLA's defaults) off the CPU.

  Read when the program is built, so the switch can differ between programs of one process (the
  benchmark compares both ways in one run).
  """
  if program not in OPTIONS:
    raise ValueError(f'program must be one of {sorted(OPTIONS)}, got {program!r}.')
  if not enabled():
    return None
  return dict(OPTIONS[program]) or None


def enabled() -> bool:
  """Whether programs get this module's options: on the CPU backend, unless ``SCORESDE_XLA_CPU_TUNING=0``
  or the user's ``XLA_FLAGS`` sets the option for every program."""
  if os.environ.get(ENV_SWITCH, '1') == '0' or _YNN in os.environ.get('XLA_FLAGS', ''):
    return False
  return jax.default_backend() == 'cpu'


def _has_tracer(tree: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def jit(fun: Callable, program: Program, **jit_kwargs) -> Callable:
  """``jax.jit(fun, **jit_kwargs)``, compiled with ``program``'s options when called at top level.

  XLA takes ``compiler_options`` only for a top-level program: called inside another transformation
  (``jit``, ``vmap``, ``grad`` of a caller: its arguments are tracers, or an enclosing ``jit`` is being
  traced), ``fun`` runs as a plain nested ``jit`` and the enclosing program's options apply.
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
  return call
