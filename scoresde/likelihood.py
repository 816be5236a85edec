"""Exact log-likelihoods and bits/dim through the probability-flow ODE, solved on device; and the
ELBO bound on bits/dim (``get_elbo_bpd_fn``, Song, Durkan, Murray, Ermon 2021).

Song et al. 2021 (arXiv:2011.13456), Sec. 4.3 and App. D.2: the probability-flow ODE (eq. 13)
dx/dt = f̃(x, t) = f(x, t) - g(t)²/2 ∇ₓ log p_t(x) transports p_eps to p_T, and along a trajectory the
instantaneous change of variables (Chen et al. 2018, "Neural ODEs", Thm. 1) gives
d log p_t(x(t))/dt = -∇·f̃(x(t), t). Hence, solving from x(eps) = x up to T,

  log p_eps(x) = log p_T(x(T)) + ∫_eps^T ∇·f̃(x(t), t) dt                                   (D.2)

with log p_T the SDE's prior (``sde.prior_logp``) and x(T) =: z the latent code of x.

The divergence is exact (D forward-mode products with the basis vectors: for small D and for
validation) or the Skilling-Hutchinson estimate ∇·f̃ ≈ (1/P) Σ_p ε_pᵀ (∂f̃/∂x) ε_p with Rademacher or
Gaussian probes ε_p drawn once per example and held fixed along the trajectory, so that the integral
is an unbiased estimate of the exact one (it is ε_pᵀ [∫ ∂f̃/∂x dt] ε_p). Products use ``jax.linearize``:
one primal evaluation and P Jacobian-vector products per ODE evaluation, no reverse-mode memory.

Solver: ``ode_solvers.solve_with_quadrature``, diffrax's adaptive Runge-Kutta methods and PID step-size
controller with the log-density as a quadrature: the divergence is computed only at the stages whose
weight is not zero (Dopri5: 5 of its 6 evaluations per step), and the first step is Hairer's heuristic
(as scipy's RK45, the reference's solver) capped at diffrax's fixed 0.01, which alone leaves a fast
start of the log-density's integrand under-resolved (see ``ode_solvers.solve_with_quadrature``); jitted
and run on the device that holds the batch (the reference calls scipy on the host at every evaluation).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scoresde import likelihood_weighting
from scoresde import ode_solvers
from scoresde.infra import parallel
from scoresde.infra import xla_cpu
from scoresde import sde_lib

Array = jax.Array
ScoreFn = sde_lib.ScoreFn
# fn(rng, score_fn, x) -> (values (B,), z like x, nfe (B,)).
LikelihoodFn = Callable[[Array, ScoreFn, Array], tuple[Array, Array, Array]]
# dequantizer(rng, levels) -> (u in [0, 1) like levels, log q(u | levels) (B,) nats): see ``dequantize``.
Dequantizer = Callable[[Array, Array], tuple[Array, Array]]

HUTCHINSON_TYPES = ('rademacher', 'gaussian', 'exact')


def as_pytree(score_fn: ScoreFn) -> jax.tree_util.Partial:
  """``score_fn`` as a pytree whose arrays (if a ``Partial``) are jit arguments, not constants."""
  if isinstance(score_fn, jax.tree_util.Partial):
    return score_fn
  if not callable(score_fn):
    raise TypeError(f'score_fn must be a callable score_fn(x, t), got {type(score_fn).__name__}.')
  return jax.tree_util.Partial(score_fn)


def _check_options(sde: sde_lib.SDE, hutchinson_type: str, num_probes: int, rtol: float, atol: float,
                   eps: float, method: str, max_steps: int) -> None:
  if hutchinson_type not in HUTCHINSON_TYPES:
    raise ValueError(f'hutchinson_type (config.eval.hutchinson_type)={hutchinson_type!r} is not known; '
                     f'choose one of {HUTCHINSON_TYPES}.')
  if int(num_probes) < 1:
    raise ValueError(f'num_probes (config.eval.num_probes) must be >= 1, got {num_probes}.')
  ode_solvers.get_solver(method, 'config.eval.ode_method')  # raises for an unknown method
  if not (rtol > 0 and atol > 0):
    raise ValueError(f'rtol and atol (config.eval.ode_rtol/ode_atol) must be positive, got {rtol}, {atol}.')
  if not 0 < eps < sde.T:
    raise ValueError(f'eps (config.eval.likelihood_eps) must lie in (0, T={sde.T}), got {eps}.')
  if int(max_steps) < 1:
    raise ValueError(f'max_steps must be a positive integer, got {max_steps}.')


def check_finite_data(x, what: str = 'the data') -> None:
  """Raises ValueError if ``x`` (concrete: numpy or a jax array, not a tracer) holds NaN or Inf: the
  ODE solve would turn them into NaN log-likelihoods, or an integer cast into arbitrary levels."""
  if isinstance(x, jax.core.Tracer) or not jnp.issubdtype(x.dtype, jnp.inexact):
    return
  count = int(jnp.sum(~jnp.isfinite(x))) if isinstance(x, jax.Array) else int(np.sum(~np.isfinite(x)))
  if count:
    raise ValueError(f'{what} has {count} non-finite values (NaN or Inf) among {x.size}; a log-likelihood '
                     '(bits/dim) of them is undefined: check the data pipeline.')


def _draw_probes(rng: Array, hutchinson_type: str, shape: tuple[int, ...], num_probes: int) -> Array:
  """(B, P, ...) probes with E[ε εᵀ] = I; for 'exact', a placeholder of P = 0 probes."""
  batch, example = shape[0], shape[1:]
  if hutchinson_type == 'exact':
    return jnp.zeros((batch, 0) + example, jnp.float32)
  probe_shape = (batch, num_probes) + example
  if hutchinson_type == 'gaussian':
    return jax.random.normal(rng, probe_shape, jnp.float32)
  return jax.random.rademacher(rng, probe_shape, jnp.float32)


def _divergence(jvp: Callable[[Array], Array], y: Array, probes: Array, exact: bool) -> Array:
  """The divergence of the map whose Jacobian-vector product is ``jvp`` at y (one example): exact, or
  the probes' Hutchinson average."""
  if exact:
    dim = y.size
    basis = jnp.eye(dim, dtype=y.dtype).reshape((dim,) + y.shape)
    # Row i of the stacked products is J e_i, whose i-th entry is ∂f̃_i/∂y_i.
    columns = jax.vmap(jvp)(basis).reshape(dim, dim)
    return jnp.trace(columns)
  products = jax.vmap(jvp)(probes)
  quadratic = jnp.sum((products * probes).reshape(probes.shape[0], -1), axis=1)
  return jnp.mean(quadratic)


def _log_likelihood(sde: sde_lib.SDE, rng: Array, score_fn: ScoreFn, x: Array, *,
                    hutchinson_type: str, num_probes: int, rtol: float, atol: float, eps: float,
                    method: str, max_steps: int, mesh) -> tuple[Array, Array, Array]:
  """Traceable core of ``get_log_likelihood_fn`` (see there)."""
  x = jnp.asarray(x, jnp.float32)
  probes = _draw_probes(rng, hutchinson_type, x.shape, num_probes)
  if mesh is not None:
    x = jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh, x.ndim))
    probes = jax.lax.with_sharding_constraint(probes, parallel.batch_sharding(mesh, probes.ndim))
  pf_ode = sde.reverse(score_fn, probability_flow=True)
  exact = hutchinson_type == 'exact'

  def solve_one(x_i: Array, probes_i: Array):
    def field(t, y):
      def drift(v):
        return pf_ode.sde(v[None], jnp.reshape(t, (1,)).astype(jnp.float32))[0][0]
      value, jvp = jax.linearize(drift, y)
      return value, lambda: _divergence(jvp, y, probes_i, exact)

    solution = ode_solvers.solve_with_quadrature(
        field, eps, sde.T, x_i, jnp.zeros((), jnp.float32), method=method, rtol=rtol, atol=atol,
        max_steps=max_steps)
    return solution.y, jnp.where(solution.successful, solution.q, jnp.nan), solution.nfe

  # One solve per example: each gets the step sizes its own error estimate asks for (see docstring).
  z, delta_logp, nfe = jax.vmap(solve_one)(x, probes)
  logp = sde.prior_logp(z) + delta_logp
  if mesh is not None:
    logp, nfe = (jax.lax.with_sharding_constraint(a, parallel.batch_sharding(mesh, 1)) for a in (logp, nfe))
    z = jax.lax.with_sharding_constraint(z, parallel.batch_sharding(mesh, z.ndim))
  return logp, z, nfe


def get_log_likelihood_fn(sde: sde_lib.SDE, hutchinson_type: str, *, num_probes: int, rtol: float,
                          atol: float, eps: float, method: str, max_steps: int = 4096) -> LikelihoodFn:
  """``fn(rng, score_fn, x) -> (logp (B,) nats, z like x, nfe (B,) int32)``: log p_eps(x) by eq. (D.2).

  The settings have no defaults here: theirs live in the default configs (``config.eval``).

  Args:
    sde: the forward SDE whose probability-flow ODE (and prior) defines the model.
    hutchinson_type: 'rademacher' or 'gaussian' probes (Hutchinson estimate), or 'exact' (D
      Jacobian-vector products per evaluation: for small D and for checking the estimator).
    num_probes: probes per example, averaged (the estimate's variance falls as 1/num_probes).
    rtol, atol: tolerances of the PID step-size controller.
    eps: start time of the ODE (the density is that of x(eps); the reference's 1e-5).
    method: adaptive solver, one of ``ode_solvers.SOLVERS``.
    max_steps: solver steps allowed per example; an example that needs more gets logp = NaN.

  Returns a function of ``rng`` (probes), ``score_fn(x, t)`` and ``x`` (B, ...) in the model's data
  space (after the data scaler) whose ``nfe`` counts the ODE evaluations each example needed; each
  evaluation is one score-network call, plus ``num_probes`` (or D) Jacobian-vector products where the
  solver uses the divergence (Dopri5: 5 of the 6 evaluations of a step).

  Each example is solved with its own adaptive steps (``vmap`` over per-example solves), not one joint
  system for the batch as in the reference: an example's log-likelihood then meets the tolerance on its
  own error estimate and does not depend on which other examples share its batch (or on the device
  count), and a joint solve would dilute a hard example's error in the batch norm. It costs nothing
  extra: the batched network is evaluated max(nfe) times either way, finished examples idling.

  The batch is split over all devices (``parallel.data_mesh``): B must be divisible by the device
  count. The solve is jitted with ``score_fn`` as an argument: a ``jax.tree_util.Partial`` (e.g.
  ``models.utils.network_score_fn(config, sde, model, variables)``) has its arrays traced, so new weights reuse the
  compiled program; any other callable is a static part of the program (compiled once per function
  object, its closed-over arrays baked in as constants).
  """
  _check_options(sde, hutchinson_type, num_probes, rtol, atol, eps, method, max_steps)
  mesh = parallel.data_mesh() if jax.device_count() > 1 else None
  options = dict(hutchinson_type=hutchinson_type, num_probes=int(num_probes), rtol=float(rtol),
                 atol=float(atol), eps=float(eps), method=method, max_steps=int(max_steps), mesh=mesh)
  jitted = xla_cpu.jit(lambda rng, score_tree, x: _log_likelihood(sde, rng, score_tree, x, **options),
                       'inference')

  def log_likelihood_fn(rng: Array, score_fn: ScoreFn, x: Array) -> tuple[Array, Array, Array]:
    check_finite_data(x, 'the input x of the log-likelihood')
    parallel.check_batch_size(x.shape[0], 'the batch size of x')
    score_tree = as_pytree(score_fn)
    if mesh is not None:
      score_tree = parallel.replicate(mesh, score_tree)
    return jitted(rng, score_tree, x)
  return log_likelihood_fn


def affine_coefficients(inverse_scaler: Callable) -> tuple[float, float]:
  """(shift, scale) with inverse_scaler(y) = shift + scale · y, checked to be elementwise affine."""
  probe = np.array([0., 0.5, 1., -1.], np.float32)
  values = np.asarray(inverse_scaler(probe), np.float64)
  shift, scale = values[0], values[2] - values[0]
  if values.shape != probe.shape or not np.allclose(values, shift + scale * probe, atol=1e-6) or scale == 0:
    raise ValueError('inverse_scaler must be an invertible elementwise affine map (as datasets.'
                     'get_data_inverse_scaler gives); bits/dim needs the Jacobian of the data scaler.')
  return float(shift), float(scale)


def dequantization_offset_bits(inverse_scaler: Callable, num_levels: int) -> float:
  """log2(num_levels) + log2|d inverse_scaler / dy|: bits per dimension added to -log2 p_model / D.

  The reference's offset (8 for [0, 1] data, 7 for centred data, 8-bit only) generalised to any
  number of levels; see ``get_likelihood_fn``.
  """
  return math.log2(num_levels) + math.log2(abs(affine_coefficients(inverse_scaler)[1]))


def uniform_dequantizer(rng: Array, levels: Array) -> tuple[Array, Array]:
  """u ~ U[0, 1) like ``levels`` and its log-density, 0: the default dequantizer of the bits/dim functions."""
  return jax.random.uniform(rng, levels.shape, jnp.float32), jnp.zeros((levels.shape[0],), jnp.float32)


def _dequantized(dequantizer: Dequantizer, rng: Array, levels: Array,
                 num_levels: int) -> tuple[Array, Array]:
  """(v = (levels + u) / L, log q(u | levels)) with u from ``dequantizer(split(rng)[0], levels)``."""
  u, log_q = dequantizer(jax.random.split(rng)[0], levels)
  return (levels.astype(jnp.float32) + u) / num_levels, log_q


def dequantize(rng: Array, levels: Array, num_levels: int) -> Array:
  """v = (levels + u) / L with u ~ U[0, 1) from ``jax.random.split(rng)[0]``: the points at which
  ``get_likelihood_fn(...)(rng, ...)`` evaluates the density (its probes use ``split(rng)[1]``)."""
  return _dequantized(uniform_dequantizer, rng, levels, num_levels)[0]


def _dequantizer_tree(dequantizer: Dequantizer | None) -> jax.tree_util.Partial:
  """``dequantizer`` (default ``uniform_dequantizer``) as a pytree, like ``as_pytree``."""
  if dequantizer is None:
    return jax.tree_util.Partial(uniform_dequantizer)
  if isinstance(dequantizer, jax.tree_util.Partial):
    return dequantizer
  if not callable(dequantizer):
    raise TypeError(f'dequantizer must be a callable dequantizer(rng, levels) -> (u, log_q), got '
                    f'{type(dequantizer).__name__}.')
  return jax.tree_util.Partial(dequantizer)


def get_likelihood_fn(sde: sde_lib.SDE, inverse_scaler: Callable, *, num_levels: int,
                      hutchinson_type: str, num_probes: int, rtol: float, atol: float, eps: float,
                      method: str, max_steps: int = 4096) -> LikelihoodFn:
  """``fn(rng, score_fn, levels, dequantizer=None) -> (bpd (B,), z, nfe (B,))``: bits/dim of discrete data.

  ``levels`` are the data's integer values in {0, ..., L-1} (L = ``num_levels``: 256 for 8-bit
  images, 17 for sklearn digits), e.g. uint8 pixels; float input is refused, because this function
  dequantizes itself and a density evaluated at undequantized grid points is meaningless (score_sde
  issue #24: negative bits/dim). With u ~ U[0, 1)^D drawn from ``rng`` (``dequantize``):

    v = (levels + u) / L ∈ [0, 1)^D,  y = scaler(v) = (v - shift) / scale  (model space, where
    inverse_scaler(y) = shift + scale · y, e.g. scale = 1/2 for centred data),

    bpd = -log2 p_model(y) / D + log2|scale| + log2 L.

  Why: the discrete model P(levels) = ∫_cell p_V(v) dv over the cell of volume L^{-D}, with
  p_V(v) = p_model(y) |scale|^{-D}; by Jensen, -log2 P(levels) ≤ E_u[-log2 p_V(v)] + D log2 L, so the
  expectation over u of this bpd bounds the discrete model's bits/dim from above (Theis et al. 2016;
  Ho et al. 2019). A density uniform on [0, 1]^D scores log2 L (8 bits for 8-bit data, log2 17 ≈ 4.09
  for digits). The reference's ``offset = log2(inverse_scaler'(0)) + 8`` (score_sde_pytorch issue #51)
  is the last two terms for L = 256.

  Variational dequantization (Ho et al. 2019; Song, Durkan, Murray, Ermon 2021): pass
  ``dequantizer(rng, levels) -> (u, log q(u | levels))`` (e.g. ``dequantization.as_dequantizer``) and
  u ~ q replaces U[0, 1)^D, bpd gaining log q / (D ln 2); -log2 P(levels) / D ≤ E_q[bpd] holds for any q.
  The default (None) is ``uniform_dequantizer`` (log q = 0): the formula above. A ``Partial``'s arrays
  are traced, as ``score_fn``'s.

  Other arguments as in ``get_log_likelihood_fn``; ``inverse_scaler`` must be elementwise affine.
  """
  _check_options(sde, hutchinson_type, num_probes, rtol, atol, eps, method, max_steps)
  num_levels = int(num_levels)
  if num_levels < 2:
    raise ValueError(f'num_levels (config.data.num_levels) must be >= 2, got {num_levels}.')
  shift, scale = affine_coefficients(inverse_scaler)
  offset = dequantization_offset_bits(inverse_scaler, num_levels)
  mesh = parallel.data_mesh() if jax.device_count() > 1 else None
  options = dict(hutchinson_type=hutchinson_type, num_probes=int(num_probes), rtol=float(rtol),
                 atol=float(atol), eps=float(eps), method=method, max_steps=int(max_steps), mesh=mesh)

  def bits_per_dim(rng, score_fn, levels, dequantizer):
    v, log_q = _dequantized(dequantizer, rng, levels, num_levels)
    logp, z, nfe = _log_likelihood(sde, jax.random.split(rng)[1], score_fn, (v - shift) / scale,
                                   **options)
    dim = math.prod(levels.shape[1:])
    return (-logp + log_q) / (dim * math.log(2.)) + offset, z, nfe
  jitted = xla_cpu.jit(bits_per_dim, 'inference')

  def likelihood_fn(rng: Array, score_fn: ScoreFn, levels: Array,
                    dequantizer: Dequantizer | None = None) -> tuple[Array, Array, Array]:
    check_finite_data(levels, 'the data given to bits/dim')
    if not jnp.issubdtype(levels.dtype, jnp.integer):
      raise TypeError(
          f'get_likelihood_fn expects integer data levels in [0, {num_levels - 1}] (e.g. uint8 pixels), '
          f'got dtype {levels.dtype}: it dequantizes them itself. Images x in [0, 1] from a pipeline '
          f'without dequantization are levels = round(x * {num_levels - 1}); for a density of '
          f'continuous data use get_log_likelihood_fn.')
    if not isinstance(levels, jax.core.Tracer):
      low, high = int(jnp.min(levels)), int(jnp.max(levels))
      if low < 0 or high >= num_levels:
        raise ValueError(f'data levels must lie in [0, {num_levels - 1}] (num_levels={num_levels}, '
                         f'config.data.num_levels), got values in [{low}, {high}].')
    parallel.check_batch_size(levels.shape[0], 'the batch size of the data')
    score_tree, deq_tree = as_pytree(score_fn), _dequantizer_tree(dequantizer)
    if mesh is not None:
      score_tree, deq_tree = parallel.replicate(mesh, (score_tree, deq_tree))
    return jitted(rng, score_tree, levels, deq_tree)
  return likelihood_fn


def get_elbo_bpd_fn(sde: sde_lib.SDE, inverse_scaler: Callable, *, num_levels: int, eps: float,
                    num_samples: int) -> Callable[..., Array]:
  """``fn(rng, score_fn, levels, dequantizer=None) -> bpd (B,)``: the ELBO bound on bits/dim of discrete
  data.

  As ``get_likelihood_fn``, with -log p_model(y) replaced by its upper bound L(y) of Song, Durkan,
  Murray, Ermon 2021 (``likelihood_weighting.elbo``, ``num_samples`` importance-sampled times per
  example): the data are dequantized the same way (``dequantizer``, default uniform), so the two
  bits/dim compare directly, the bound's being the larger in expectation. Differentiable in the
  dequantizer's parameters (what ``dequantization_training`` minimises).
  """
  num_levels = int(num_levels)
  if num_levels < 2:
    raise ValueError(f'num_levels (config.data.num_levels) must be >= 2, got {num_levels}.')
  if not 0 < eps < sde.T:
    raise ValueError(f'eps must lie in (0, T={sde.T}), got {eps}.')
  if int(num_samples) < 1:
    raise ValueError(f'num_samples must be a positive integer, got {num_samples}.')
  shift, scale = affine_coefficients(inverse_scaler)
  offset = dequantization_offset_bits(inverse_scaler, num_levels)

  @functools.partial(xla_cpu.jit, program='inference')
  def bound(rng, score_tree, levels, deq_tree):
    v, log_q = _dequantized(deq_tree, rng, levels, num_levels)
    nats = likelihood_weighting.elbo(jax.random.split(rng)[1], score_tree, sde, (v - shift) / scale,
                                     eps=float(eps), num_samples=int(num_samples))
    return (nats + log_q) / (math.prod(levels.shape[1:]) * math.log(2.)) + offset

  def elbo_bpd_fn(rng: Array, score_fn: ScoreFn, levels: Array,
                  dequantizer: Dequantizer | None = None) -> Array:
    if not jnp.issubdtype(levels.dtype, jnp.integer):
      raise TypeError(f'get_elbo_bpd_fn expects integer data levels in [0, {num_levels - 1}], got dtype '
                      f'{levels.dtype}: it dequantizes them itself.')
    return bound(rng, as_pytree(score_fn), levels, _dequantizer_tree(dequantizer))
  return elbo_bpd_fn


def levels_from_unit_interval(images: np.ndarray, num_levels: int,
                              what: str = 'the image batch') -> np.ndarray:
  """Integer levels from images k / (L - 1) in [0, 1] (a pipeline without dequantization).

  Raises ValueError, naming them as ``what``, if the images hold NaN or Inf or are not on that grid
  (already dequantized or differently scaled).
  """
  check_finite_data(np.asarray(images), what)
  scaled = np.asarray(images, np.float64) * (num_levels - 1)
  levels = np.rint(scaled)
  off_grid = scaled.size and np.max(np.abs(scaled - levels)) > 1e-3
  if off_grid or (scaled.size and (levels.min() < 0 or levels.max() >= num_levels)):
    raise ValueError(f'images are not on the grid k / {num_levels - 1}, k in [0, {num_levels - 1}]: '
                     f'load them with uniform_dequantization=False and check config.data.num_levels.')
  return levels.astype(np.int32)

