"""ode_solvers.solve_with_quadrature: the same solve as diffrax on the joint state, at a lower price."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresde import gaussian_mixture
from scoresde import ode_solvers
from scoresde import sde_lib

EPS = 1e-5


def _divergence_field(sde, data):
  """The probability-flow drift of exact mixture scores, and its exact divergence on demand (D = 3)."""
  pf_ode = sde.reverse(gaussian_mixture.score_fn(sde, data), probability_flow=True)

  def field(t, y):
    value, jvp = jax.linearize(lambda v: pf_ode.sde(v[None], jnp.reshape(t, (1,)))[0][0], y)
    return value, lambda: jnp.trace(jax.vmap(jvp)(jnp.eye(y.size)))
  return field


def _diffrax_joint_solve(field, method, tol):
  """diffrax on the joint state (y, q) with q' = g: what the likelihood solved before."""
  def vector_field(t, state, args):
    del args
    value, integrand = field(t, state[0])
    return value, integrand()

  def solve(y0):
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), ode_solvers.get_solver(method, 'method'), t0=EPS, t1=1., dt0=None,
        y0=(y0, jnp.zeros(())), stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
        saveat=diffrax.SaveAt(t1=True), max_steps=4096)
    return solution.ys[0][0], solution.ys[1][0], solution.stats['num_steps']
  return jax.jit(jax.vmap(solve))


def _quadrature_solve(field, method, tol, max_steps=4096, first_step=None):
  return jax.jit(jax.vmap(lambda y0: ode_solvers.solve_with_quadrature(
      field, EPS, 1., y0, jnp.zeros(()), method=method, rtol=tol, atol=tol, max_steps=max_steps,
      first_step=first_step)))


@pytest.mark.parametrize('method', ['dopri5', 'bosh3'])
def test_quadrature_solve_takes_diffrax_steps_and_values(method):
  """With diffrax's first step: the same attempted steps per example and the same y(1), ∫ div to
  float32 rounding as diffrax's Dopri5 / Bosh3 with its PID controller on (y, q); measured: |Δq| ≤
  2.1e-6, |Δy| ≤ 1.1e-6.

  Tsit5 and Dopri8 are left out: their error estimates on the first, tiny steps are at the level of
  rounding, so a different summation order can accept or reject a step differently (in float64 Tsit5
  matches at 1e-3 and Dopri8 differs by one step in some examples); their accuracy is checked against
  closed forms in tests/test_likelihood.py."""
  sde, data = sde_lib.VPSDE(0.1, 20.), gaussian_mixture.default_mixture(3)
  field = _divergence_field(sde, data)
  x = data.sample(jax.random.PRNGKey(1), 6)
  for tol in (1e-5, 1e-3):
    ours = _quadrature_solve(field, method, tol, first_step=ode_solvers.DIFFRAX_FIRST_STEP)(x)
    y, q, num_steps = _diffrax_joint_solve(field, method, tol)(x)
    np.testing.assert_array_equal(ours.num_steps, num_steps)
    np.testing.assert_allclose(ours.q, q, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(ours.y, y, atol=1e-5, rtol=1e-6)
    assert bool(jnp.all(ours.successful))
    assert np.all(np.asarray(ours.nfe) == (6 if method == 'dopri5' else 3) * np.asarray(num_steps) + 1)


def test_integrand_is_computed_only_where_its_weight_is_not_zero():
  """Dopri5: the drift at all 6 evaluations of a step, the integrand at 5 (its second stage has zero
  weight in the solution and the error estimate), plus f and g at t0 and f once more for the first
  step; also inside vmap, whose batched loop keeps the stage's cond a real branch. Counted by
  callbacks, so the skipping cannot be an accounting fiction."""
  calls = {'f': 0, 'g': 0}

  def count(name):
    calls[name] += 1

  def field(t, y):
    jax.debug.callback(count, 'f')

    def integrand():
      jax.debug.callback(count, 'g')
      return jnp.sum(y ** 2) * jnp.cos(t)
    return jnp.sin(t) - y, integrand

  result = _quadrature_solve(field, 'dopri5', 1e-5)(jnp.array([[1., 0.5], [-2., 3.]]))
  jax.effects_barrier()
  steps = int(jnp.max(result.num_steps))
  assert calls == {'f': 6 * steps + 2, 'g': 5 * steps + 1}, (calls, steps)
  assert np.all(np.asarray(result.nfe) == 6 * np.asarray(result.num_steps) + 2)


@pytest.mark.parametrize('lam,tol,expected', [
    # d1 = 500/s, h0 = 0.01/500, d2 = 500²/s: 100 h0 = 0.002 is the smaller bound.
    (-500., 1e-3, 0.002),
    # d1 = 2/s, d2 = 4/s with s = 2e-5: (0.01 s / 4)^(1/5) = 0.0347, above the cap of 0.01.
    (-2., 1e-5, ode_solvers.DIFFRAX_FIRST_STEP),
])
def test_first_step_is_hairers_heuristic_capped(lam, tol, expected):
  """y' = λy from y0 = 1 (D entries), scale s = atol + rtol: d0 = 1/s, d1 = |λ|/s, h0 = 0.01/|λ|,
  d2 = λ²/s, first step min(100 h0, (0.01 / max(d1, d2))^(1/5), 0.01). One accepted step gives
  y = e^{λh}, from which h is read back (to 5e-3: at λh = -1 one Dopri5 step is off by ~1e-3 of h)."""
  result = ode_solvers.solve_with_quadrature(lambda t, y: (lam * y, lambda: jnp.zeros(())), 0., 1., jnp.ones(4),
                                             jnp.zeros(()), method='dopri5', rtol=tol, atol=tol, max_steps=1)
  assert int(result.num_steps) == 1 and int(result.nfe) == 6 + 2
  np.testing.assert_allclose(np.log(np.asarray(result.y)) / lam, expected, rtol=5e-3)


def test_quadrature_solve_is_exact_on_a_closed_form():
  """y' = -y, q' = y²: y(1) = y0 e^{-1}, q(1) = y0² (1 - e^{-2}) / 2, for every method."""
  def field(t, y):
    del t
    return -y, lambda: jnp.sum(y ** 2)
  y0 = jnp.array([[1.5], [-0.3]])
  for method in sorted(ode_solvers.SOLVERS):
    result = jax.jit(jax.vmap(lambda v: ode_solvers.solve_with_quadrature(
        field, 0., 1., v, jnp.zeros(()), method=method, rtol=1e-6, atol=1e-6, max_steps=4096)))(y0)
    np.testing.assert_allclose(result.y, y0 * np.exp(-1.), rtol=2e-5, err_msg=method)
    np.testing.assert_allclose(result.q, y0[:, 0] ** 2 * (1 - np.exp(-2.)) / 2, rtol=2e-5, err_msg=method)


def test_unfinished_solve_is_reported():
  """A solve cut by max_steps says so (the likelihood turns it into NaN) and stops there."""
  field = _divergence_field(sde_lib.VESDE(0.01, 50.), gaussian_mixture.default_mixture(3))
  result = _quadrature_solve(field, 'dopri5', 1e-5, max_steps=3)(jnp.array([[4.3, -0.4, 0.2]]))
  assert not bool(result.successful[0])
  assert int(result.num_steps[0]) == 3 and int(result.nfe[0]) == 20


def test_methods_without_first_same_as_last_are_refused(monkeypatch):
  monkeypatch.setitem(ode_solvers.SOLVERS, 'heun', diffrax.Heun)
  with pytest.raises(ValueError, match='first-same-as-last'):
    ode_solvers.solve_with_quadrature(lambda t, y: (-y, lambda: jnp.sum(y)), 0., 1., jnp.ones(2),
                                      jnp.zeros(()), method='heun', rtol=1e-5, atol=1e-5, max_steps=10)
