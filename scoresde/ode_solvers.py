"""The adaptive ODE solvers that the probability-flow ODE (Song et al. 2021, eq. 13) is integrated with,
and how many vector-field evaluations a solve costs: one table for the ODE sampler (``sampling``) and the
likelihood (``likelihood``), so that a method name means the same solver, at the same price, in both.

The sampler's solve is ``diffrax.diffeqsolve`` with a ``PIDController`` and ``dt0=None``;
``num_evaluations`` is exact for that setting and is checked against vector fields that count their calls
in tests/test_sampling.py. The likelihood's solve is ``solve_with_quadrature``: the same method, step-size
control and first step on the state and the log-density together, but the log-density's integrand (the
divergence, a Jacobian-vector product) is computed only at the stages whose weights are not zero
(tests/test_ode_solvers.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

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
  belongs to the step's start point) plus one at (t0, y0), the first step's first stage; a method
  without that property costs s per step. (diffrax's first-step heuristic, which would cost two more,
  does not run inside ``diffeqsolve``: see ``DIFFRAX_FIRST_STEP``.)
  """
  tableau = SOLVERS[method].tableau
  stages = len(tableau.c) + 1
  fsal = int(bool(tableau.fsal))
  return (stages - fsal) * num_steps + fsal


class QuadratureSolution(NamedTuple):
  """Result of ``solve_with_quadrature`` at t1: the state y, the quadrature q = q0 + ∫ g(t, y(t)) dt,
  the attempted steps (accepted or rejected), the evaluations of f (the first-step heuristic's
  included), and whether t1 was reached."""
  y: Array
  q: Array
  num_steps: Array
  nfe: Array
  successful: Array


# diffrax's first trial step with dt0=None: its heuristic does not run inside diffeqsolve, which wraps the
# term whose type the heuristic checks for.
DIFFRAX_FIRST_STEP = 0.01
# field(t, y) -> (f(t, y), g): g() computes the quadrature's integrand at the same point, on demand.
QuadratureField = Callable[[Array, Array], tuple[Array, Callable[[], Array]]]


class _Tableau(NamedTuple):
  """A first-same-as-last explicit Runge-Kutta method as arrays over its s stages."""
  c: np.ndarray          # (s,) stage times as fractions of the step
  a: np.ndarray          # (s, s) strictly lower: stage i's state is y + h Σ_j a[i, j] k_j
  b: np.ndarray          # (s,) weights of the solution
  e: np.ndarray          # (s,) weights of the error estimate
  quadrature: np.ndarray  # (s,) bool: the stages whose integrand g is needed
  exponent: float        # of the controller: factor ∝ (1 / error) ** exponent


def _tableau(method: str) -> _Tableau:
  """``SOLVERS[method]``'s tableau and error order. g is needed where its weight in the solution or the
  error estimate is not zero, and at the last stage: it is the next step's first, whose weight is not."""
  solver = get_solver(method, 'method')
  tableau = solver.tableau
  if not (tableau.fsal and tableau.ssal):
    raise ValueError(f'{method}: solve_with_quadrature needs a first-same-as-last method.')
  stages = len(tableau.c) + 1
  a = np.zeros((stages, stages))
  for row, coefficients in enumerate(tableau.a_lower, start=1):
    a[row, :len(coefficients)] = coefficients
  b, e = np.asarray(tableau.b_sol), np.asarray(tableau.b_error)
  quadrature = (b != 0) | (e != 0)
  quadrature[-1] = True
  order = solver.error_order(diffrax.ODETerm(lambda t, y, args: y))
  return _Tableau(c=np.concatenate([[0.], np.asarray(tableau.c)]), a=a, b=b, e=e, quadrature=quadrature,
                  exponent=1. / float(order))


def _rms(*parts: Array) -> Array:
  """RMS over all entries of ``parts`` together (diffrax's default error norm over a pytree)."""
  squares = sum(jnp.sum(jnp.square(p)) for p in parts)
  return jnp.sqrt(squares / sum(p.size for p in parts))


def solve_with_quadrature(field: QuadratureField, t0: float, t1: float, y0: Array, q0: Array, *,
                          method: str, rtol: float, atol: float, max_steps: int,
                          first_step: float | None = None) -> QuadratureSolution:
  """Solves dy/dt = f(t, y) from t0 to t1 together with the quadrature dq/dt = g(t, y), which does not
  feed back into y; for one example (``vmap`` it over a batch).

  The method and the PID (integral-only) step-size controller are diffrax's ``diffeqsolve(ODETerm,
  SOLVERS[method](), PIDController(rtol, atol), dt0=first_step)`` on the joint state (y, q), error norm
  included: with ``first_step=DIFFRAX_FIRST_STEP`` (what diffrax does with ``dt0=None``) a solve attempts
  the same steps and returns the same values to float rounding (tests/test_ode_solvers.py). What differs
  is the price: g is computed only at the stages whose weight in the solution or in the error estimate
  is not zero. For the likelihood, g is the divergence and costs a Jacobian-vector product (about one
  more network pass, see BENCHMARKS "Likelihood"); Dopri5's second stage (c = 1/5) and four of Dopri8's
  stages have zero weights, so a Dopri5 step costs 6 network passes and 5 tangent passes, not 6 and 6.

  Args:
    field: ``field(t, y) -> (f, g_fn)`` with ``g_fn()`` the integrand (a scalar) at (t, y); it is called
      inside ``lax.cond`` on the stage, which skips it where it is not needed.
    t0, t1: the interval, t0 < t1.
    y0, q0: initial state (any shape) and quadrature (a scalar).
    method: one of ``SOLVERS``; all are first-same-as-last.
    rtol, atol: tolerances of the controller.
    max_steps: attempted steps allowed; an unfinished solve has ``successful`` False.
    first_step: the first trial step, or None for the heuristic of Hairer, Nørsett and Wanner (Sec. II.4,
      also scipy's; one more evaluation of f) capped at diffrax's 0.01. On the probability-flow
      likelihood the start matters: a first step is accepted on y's error, and the log-density's, one
      of D + 1 entries of the norm, can be large. Where the drift changes fast (VP: the score carries
      1/σ(t), σ(t)² ≈ β_min t) the heuristic picks a smaller step than 0.01 and the log-density gains
      (3e-4 against 8.6e-4 bits/dim per image at 1e-5, BENCHMARKS "Likelihood"); where it changes slowly
      (VE) it picks a larger one (0.046 on the digits model), which y's error allows but the
      log-density's start does not (7.5e-3 against 3.1e-3 per image): hence the cap.
  """
  tableau = _tableau(method)
  stages = tableau.c.size
  dtype = y0.dtype
  t0, t1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
  q0 = jnp.asarray(q0, dtype)

  def evaluate(t, y, needed):
    value, integrand = field(t, y)
    return value, jax.lax.cond(needed, lambda: jnp.asarray(integrand(), dtype), lambda: jnp.zeros((), dtype))

  def weighted(coefficients, ks):
    return jnp.tensordot(jnp.asarray(coefficients, dtype), ks, axes=1)

  f0, g0 = evaluate(t0, y0, True)
  if first_step is None:
    h = _hairer_first_step(lambda t, y: evaluate(t, y, False)[0], t0, t1, y0, f0, rtol, atol, tableau.exponent)
    h = jnp.minimum(h, DIFFRAX_FIRST_STEP)
  else:
    h = first_step
  t_next = jnp.minimum(t0 + h, t1)

  def step(state):
    t, t_end, y, q, f, g, num_steps = state
    h = t_end - t

    def stage(ks, row):
      ks_y, ks_q = ks
      i, c_i, a_i, need_i = row
      value, integrand = evaluate(t + c_i * h, y + h * weighted(a_i, ks_y), need_i)
      return (ks_y.at[i].set(value), ks_q.at[i].set(integrand)), None
    ks = (jnp.zeros((stages,) + y.shape, dtype).at[0].set(f), jnp.zeros((stages,), dtype).at[0].set(g))
    rows = (jnp.arange(1, stages), jnp.asarray(tableau.c[1:], dtype), jnp.asarray(tableau.a[1:], dtype),
            jnp.asarray(tableau.quadrature[1:]))
    (ks_y, ks_q), _ = jax.lax.scan(stage, ks, rows)
    y_new, q_new = y + h * weighted(tableau.b, ks_y), q + h * weighted(tableau.b, ks_q)
    error = _rms(_scaled_error(y, y_new, h * weighted(tableau.e, ks_y), rtol, atol),
                 _scaled_error(q, q_new, h * weighted(tableau.e, ks_q), rtol, atol))
    keep = error < 1
    t_start = jnp.minimum(jnp.where(keep, t_end, t), t1)
    t_next = _next_end(t_start, t1, h, error, keep, tableau.exponent)
    keep_or = lambda new, old: jnp.where(keep, new, old)
    return (t_start, t_next, keep_or(y_new, y), keep_or(q_new, q), keep_or(ks_y[-1], f),
            keep_or(ks_q[-1], g), num_steps + 1)

  def unfinished(state):
    return (state[0] < t1) & (state[6] < max_steps)

  t, _, y, q, _, _, num_steps = jax.lax.while_loop(
      unfinished, step, (t0, t_next, y0, q0, f0, g0, jnp.zeros((), jnp.int32)))
  nfe = num_evaluations(method, num_steps) + (1 if first_step is None else 0)
  return QuadratureSolution(y=y, q=q, num_steps=num_steps, nfe=nfe, successful=t >= t1)


def _scaled_error(y: Array, y_new: Array, error: Array, rtol: float, atol: float) -> Array:
  """The error estimate over atol + rtol max(|y|, |y_new|), as diffrax's controller: a NaN estimate
  becomes inf (the step is rejected and shrunk) and a NaN y_new is not used for the scale."""
  y_new = jnp.where(jnp.isnan(y_new).any(), y, y_new)
  return jnp.where(jnp.isnan(error), jnp.inf, error) / (atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new)))


def _next_end(t_start: Array, t1: Array, h: Array, error: Array, keep: Array, exponent: float) -> Array:
  """The end of the next step: diffrax's integral controller (safety 0.9, the step grows at most 10×
  after an accepted step and shrinks 0.2× to 0.9× after a rejected one), clipped to t1."""
  factor = jnp.clip(0.9 * (1 / error) ** exponent, jnp.where(keep, 1., 0.2), jnp.where(keep, 10., 0.9))
  t_next = t_start + h * factor
  return jnp.where(t_next > t1, jnp.where(keep, t1, t_start + 0.5 * (t1 - t_start)), t_next)


def _hairer_first_step(drift, t0, t1, y0, f0, rtol, atol, exponent) -> Array:
  """Hairer, Nørsett, Wanner (1993), Sec. II.4: a first step from the sizes of y0, f0 and the change of f
  over a trial step h0 (one more evaluation of the drift). The trial step stays inside [t0, t1] (as in
  scipy's version: beyond T a VE drift overflows), and a non-finite result falls back to h0."""
  scale = atol + rtol * jnp.abs(y0)
  d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
  tiny = (d0 < 1e-5) | (d1 < 1e-5)
  h0 = jnp.minimum(jnp.where(tiny, 1e-6, 0.01 * d0 / jnp.where(tiny, 1., d1)), t1 - t0)
  d2 = _rms((drift(t0 + h0, y0 + h0 * f0) - f0) / scale) / h0
  largest = jnp.maximum(d1, d2)
  h1 = jnp.where(largest <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / largest) ** exponent)
  h = jnp.minimum(100 * h0, h1)
  return jnp.where(jnp.isfinite(h), h, h0)
