"""The adaptive ODE solvers that the probability-flow ODE (Song et al. 2021, eq. 13) is integrated with,
and how many vector-field evaluations a solve costs: one table for the ODE sampler (``sampling``) and the
likelihood (``likelihood``), so that a method name means the same solver, at the same price, in both.

Every solve is ``diffrax.diffeqsolve`` with a ``PIDController`` and ``dt0=None`` (the controller picks the
first step); ``num_evaluations`` is exact for that setting and is checked against vector fields that count
their calls in tests/test_sampling.py and tests/test_likelihood.py.
"""

from __future__ import annotations

import diffrax
import jax

Array = jax.Array

# Explicit adaptive Runge-Kutta methods by name; 'rk45' is scipy's name for Dormand-Prince 5(4), the
# reference's solver.
SOLVERS: dict[str, type[diffrax.AbstractAdaptiveSolver]] = {
    'dopri5': diffrax.Dopri5,
    'rk45': diffrax.Dopri5,
    'tsit5': diffrax.Tsit5,
    'dopri8': diffrax.Dopri8,
    'bosh3': diffrax.Bosh3,
}


def get_solver(method: str, config_key: str) -> diffrax.AbstractAdaptiveSolver:
  """The solver named ``method``; an unknown name raises ValueError naming ``config_key`` and the
  choices."""
  if method not in SOLVERS:
    raise ValueError(f'{config_key}={method!r} is not an adaptive ODE solver known here; choose one of '
                     f'{sorted(SOLVERS)}.')
  return SOLVERS[method]()


def num_evaluations(method: str, num_steps: Array) -> Array:
  """Vector-field evaluations of a solve that attempted ``num_steps`` steps (accepted or rejected).

  An s-stage first-same-as-last method costs s - 1 evaluations per attempted step (the reused stage
  belongs to the step's start point) plus one at (t0, y0), which the controller's initial-step heuristic
  and the first stage share; a method without that property costs s per step.
  """
  tableau = SOLVERS[method].tableau
  stages = len(tableau.c) + 1
  fsal = int(bool(tableau.fsal))
  return (stages - fsal) * num_steps + fsal
