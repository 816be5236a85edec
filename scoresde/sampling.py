"""Samplers of the reverse-time SDE and of the probability-flow ODE, run entirely on device.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021
(arXiv:2011.13456): predictor-corrector sampling (Alg. 1-3, appendix G) and the probability-flow ODE
(eq. 13, appendix D.3); annealed Langevin dynamics of NCSN (Song & Ermon 2019, Alg. 1). The fast samplers
(EDM's Heun and stochastic samplers, DPM-Solver++, Gotta Go Fast) are written in ``fast_samplers``; this
module compiles them like the others (``get_fast_sampler``, ``get_ggf_sampler``).

Every sampler takes any ``score_fn(x, t)``: an exact analytic score (``gaussian_mixture.score_fn``), a trained
network or an imported checkpoint (``models.utils.network_score_fn``). A plain Python callable is compiled once per
function object with whatever it closes over baked in as constants; a ``jax.tree_util.Partial`` is a
pytree, so its arguments (a network's variables) are ``jit`` arguments and new weights of the same shapes
reuse the compiled sampler. A ``ConditionalScore`` also declares per-sample conditions (class labels,
known values: ``controllable``), which every sampler, the per-sample ODE solves included, matches to
their samples.

Data parallelism and seeds: the batch is sharded over every device of every process (``parallel``), the
score function's arrays are replicated. Sample ``i`` draws all its randomness from
``fold_in(rng, first_index + i)``, so it depends only on ``(rng, first_index + i)``: not on the batch size
or device count, except through the batch-averaged Langevin step size (the reference's default, which
couples the samples of a batch; ``langevin_per_sample=True`` removes the coupling).
"""

from __future__ import annotations

import abc
import functools
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from scoresde import fast_samplers
from scoresde import ode_solvers
from scoresde.infra import parallel
from scoresde.infra import xla_cpu
from scoresde import sde_lib

Array = jax.Array
ScoreFn = sde_lib.ScoreFn
# sampler(rng, score_fn, ...) -> (samples, number of score-function evaluations per sample).
Sampler = Callable[..., tuple[Array, int]]


# ----------------------------------------------------------------------------------------------------
# Per-sample randomness.


def normal_like(rng: Array, x: Array) -> Array:
  """Standard normal noise like ``x`` (B, ...), row b drawn from the per-sample key ``rng[b]``."""
  return jax.vmap(lambda key: jax.random.normal(key, x.shape[1:], x.dtype))(rng)


def fold_in(rng: Array, data: int | Array) -> Array:
  """``jax.random.fold_in`` applied to each per-sample key of ``rng`` (B keys)."""
  return jax.vmap(lambda key: jax.random.fold_in(key, data))(rng)


def indexed_noise(keys: Array) -> fast_samplers.Noise:
  """``noise(index, like)``: standard normals like ``like`` (B, ...), row b from ``fold_in(keys[b],
  index[b])`` (``index`` a scalar or (B,)): the fast samplers' draws, per sample as every sampler's."""
  def noise(index: Array, like: Array) -> Array:
    index = jnp.broadcast_to(jnp.asarray(index, jnp.uint32), (keys.shape[0],))
    return normal_like(jax.vmap(jax.random.fold_in)(keys, index), like)
  return noise


def _batch_norm(x: Array) -> Array:
  """Euclidean norm of each example of ``x`` (B, ...): (B,)."""
  return jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1)


# ----------------------------------------------------------------------------------------------------
# Predictors: one step of a reverse-time SDE solver, t -> t - T/N.


class Predictor(abc.ABC):
  """One step of a numerical solver of the reverse-time SDE (the "P" of PC sampling).

  Subclass it, implement ``update`` and register it with ``@register_predictor('name')`` to make it
  available as ``config.sampling.predictor = 'name'``. It is built once per sampler, outside the traced
  loop; ``update`` is traced once and must be a pure JAX function.

  Attributes:
    nfe: score-function evaluations per ``update`` (counted in the sampler's NFE).
  """
  nfe: int = 1

  def __init__(self, sde: sde_lib.SDE, probability_flow: bool = False):
    self.sde = sde
    self.probability_flow = bool(probability_flow)

  @abc.abstractmethod
  def update(self, rng: Array, x: Array, t: Array, score_fn: ScoreFn) -> tuple[Array, Array]:
    """One step at time ``t`` (B,) from ``x`` (B, ...); ``rng`` holds one key per sample (draw noise
    with ``normal_like(rng, x)``). Returns ``(x_next, x_next_mean)``, the mean being the step without
    its noise (returned by the sampler when denoising)."""


class Corrector(abc.ABC):
  """MCMC steps towards p_t at a fixed time t (the "C" of PC sampling).

  Subclass it, implement ``update`` and register it with ``@register_corrector('name')``. Built once per
  sampler; ``update`` is traced once and must be a pure JAX function.

  Attributes:
    nfe: score-function evaluations per ``update`` (usually ``n_steps``).
  """

  def __init__(self, sde: sde_lib.SDE, snr: float, n_steps: int, per_sample: bool = False):
    self.sde = sde
    self.snr = float(snr)
    self.n_steps = int(n_steps)
    self.per_sample = bool(per_sample)

  @property
  def nfe(self) -> int:
    return self.n_steps

  @abc.abstractmethod
  def update(self, rng: Array, x: Array, t: Array, score_fn: ScoreFn) -> tuple[Array, Array]:
    """``n_steps`` MCMC steps at time ``t`` (B,) from ``x`` (B, ...), one key per sample in ``rng``.
    Returns ``(x, x_mean)``."""


_PREDICTORS: dict[str, type[Predictor]] = {}
_CORRECTORS: dict[str, type[Corrector]] = {}


def _registrar(registry: dict, kind: str, name: str):
  def register(cls):
    key = name.lower()
    if key in registry and registry[key] is not cls:
      raise ValueError(f'a {kind} named {name!r} is already registered ({registry[key].__name__}).')
    registry[key] = cls
    return cls
  return register


def register_predictor(name: str):
  """Class decorator: makes a ``Predictor`` subclass available under ``name``."""
  return _registrar(_PREDICTORS, 'predictor', name)


def register_corrector(name: str):
  """Class decorator: makes a ``Corrector`` subclass available under ``name``."""
  return _registrar(_CORRECTORS, 'corrector', name)


def get_predictor(name: str) -> type[Predictor]:
  key = str(name).lower()
  if key not in _PREDICTORS:
    raise ValueError(f'predictor {name!r} (config.sampling.predictor) is not known; '
                     f'choose one of {sorted(_PREDICTORS)}.')
  return _PREDICTORS[key]


def get_corrector(name: str) -> type[Corrector]:
  key = str(name).lower()
  if key not in _CORRECTORS:
    raise ValueError(f'corrector {name!r} (config.sampling.corrector) is not known; '
                     f'choose one of {sorted(_CORRECTORS)}.')
  return _CORRECTORS[key]


@register_predictor('euler_maruyama')
class EulerMaruyamaPredictor(Predictor):
  """x ← x + f̄(x, t) Δt + ḡ(t) √|Δt| z with Δt = -T/N, f̄, ḡ the reverse SDE's (eq. 6)."""

  def update(self, rng, x, t, score_fn):
    dt = -self.sde.T / self.sde.N
    drift, diffusion = self.sde.reverse(score_fn, self.probability_flow).sde(x, t)
    x_mean = x + drift * dt
    return x_mean + sde_lib.batch_mul(diffusion * np.sqrt(-dt), normal_like(rng, x)), x_mean


@register_predictor('reverse_diffusion')
class ReverseDiffusionPredictor(Predictor):
  """Reverse diffusion (eq. 46): x ← x - f_i + G_i² s + G_i z from the forward discretisation
  x_{i+1} = x_i + f_i + G_i z (SMLD for VE, DDPM for VP, Euler-Maruyama otherwise)."""

  def update(self, rng, x, t, score_fn):
    f, G = self.sde.reverse(score_fn, self.probability_flow).discretize(x, t)
    x_mean = x - f
    return x_mean + sde_lib.batch_mul(G, normal_like(rng, x)), x_mean


@register_predictor('ancestral_sampling')
class AncestralSamplingPredictor(Predictor):
  """Ancestral sampling of the discrete SMLD (eq. 47) or DDPM (eq. 4) chain:
  x_{i-1} = a_i (x_i + b_i s) + c_i z with the SDE's ``ancestral_coefficients``."""

  def __init__(self, sde, probability_flow=False):
    super().__init__(sde, probability_flow)
    if not isinstance(sde, (sde_lib.VESDE, sde_lib.VPSDE)):
      raise ValueError(f'predictor ancestral_sampling supports VESDE and VPSDE, not '
                       f'{type(sde).__name__}; use reverse_diffusion or euler_maruyama.')
    if self.probability_flow:
      raise ValueError('predictor ancestral_sampling has no probability-flow form; set '
                       'config.sampling.probability_flow=False or use reverse_diffusion.')

  def update(self, rng, x, t, score_fn):
    scale, score_coeff, std = self.sde.ancestral_coefficients(self.sde.timestep_index(t))
    x_mean = sde_lib.batch_mul(scale, x + sde_lib.batch_mul(score_coeff, score_fn(x, t)))
    return x_mean + sde_lib.batch_mul(std, normal_like(rng, x)), x_mean


@register_predictor('none')
class NonePredictor(Predictor):
  """No predictor: corrector-only sampling (e.g. annealed Langevin dynamics)."""
  nfe = 0

  def update(self, rng, x, t, score_fn):
    return x, x


def _langevin_alpha(sde: sde_lib.SDE, t: Array) -> Array:
  """The reference's α_i = 1 - β_i of the DDPM schedule for VP and sub-VP (the paper's Alg. 5), 1 for
  VE. Sub-VP has no discrete table of its own; the reference looked up ``sde.alphas``, which its
  subVPSDE lacks (an AttributeError), so we use the VP schedule with the same β range
  (``discrete_beta``)."""
  if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
    return 1. - sde.discrete_beta(sde.timestep_index(t))
  return jnp.ones_like(t)


class _LangevinBase(Corrector):
  """x ← x + ε s(x, t) + √(2ε) z, repeated ``n_steps`` times (Langevin MCMC with step ε)."""

  @abc.abstractmethod
  def step_size(self, t: Array, score: Array, noise: Array) -> Array:
    """ε, (B,) (identical entries when batch-coupled)."""

  def update(self, rng, x, t, score_fn):
    def body(j, carry):
      x, _ = carry
      score = score_fn(x, t)
      noise = normal_like(fold_in(rng, j), x)
      step = self.step_size(t, score, noise)
      x_mean = x + sde_lib.batch_mul(step, score)
      return x_mean + sde_lib.batch_mul(jnp.sqrt(2. * step), noise), x_mean
    return jax.lax.fori_loop(0, self.n_steps, body, (x, x))


@register_corrector('langevin')
class LangevinCorrector(_LangevinBase):
  """Langevin corrector (Alg. 4-5): ε = 2 α (snr ‖z‖ / ‖s‖)².

  By default, as the reference, ‖z‖ and ‖s‖ are averaged over the whole (global) batch before the
  ratio, one step size for every sample; under ``jit`` with the batch sharded, ``jnp.mean`` over the
  global batch already is the cross-device mean the reference took with ``pmean``. With ``per_sample``
  each sample uses its own norms, so samples are independent of each other and of the batch size.
  """

  def step_size(self, t, score, noise):
    grad_norm, noise_norm = _batch_norm(score), _batch_norm(noise)
    if not self.per_sample:
      grad_norm = jnp.full_like(grad_norm, jnp.mean(grad_norm))
      noise_norm = jnp.full_like(noise_norm, jnp.mean(noise_norm))
    return 2. * _langevin_alpha(self.sde, t) * (self.snr * noise_norm / grad_norm)**2


@register_corrector('ald')
class AnnealedLangevinDynamics(_LangevinBase):
  """Annealed Langevin dynamics of NCSN (Song & Ermon 2019, Alg. 1): ε = 2 α (snr σ_t)², σ_t the
  marginal std. The step size is per-sample by construction."""

  def step_size(self, t, score, noise):
    std = self.sde.marginal_coeffs(t)[1]
    return 2. * _langevin_alpha(self.sde, t) * (self.snr * std)**2


@register_corrector('none')
class NoneCorrector(Corrector):
  """No corrector: predictor-only sampling."""

  @property
  def nfe(self) -> int:
    return 0

  def update(self, rng, x, t, score_fn):
    return x, x


# ----------------------------------------------------------------------------------------------------
# Score functions as jit arguments.


@jax.tree_util.register_pytree_node_class
class ConditionalScore:
  """``score_fn(x, t) = conditional_fn(x, t, conditions)``, with ``conditions`` a pytree of per-sample
  arrays (B, ...): row b is sample b's class label, known values or mask.

  Every sampler calls it as a plain score function on the whole batch. Declaring which arrays belong to
  which sample is what lets the adaptive ODE sampler, which solves each sample separately under
  ``vmap``, hand each solve its own rows (as a batch of one) instead of the whole batch's. It is a
  pytree: ``conditions`` and the arrays of ``conditional_fn`` (a ``jax.tree_util.Partial``) are ``jit``
  arguments, so new conditions reuse a compiled sampler.
  """

  def __init__(self, conditional_fn: Callable[[Array, Array, object], Array], conditions):
    self.conditional_fn = as_pytree(conditional_fn)
    self.conditions = conditions

  def __call__(self, x: Array, t: Array) -> Array:
    return self.conditional_fn(x, t, self.conditions)

  def tree_flatten(self):
    return (self.conditional_fn, self.conditions), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    # Not through __init__: jax also unflattens with placeholders (vmap axes, tracers' avals).
    score = object.__new__(cls)
    score.conditional_fn, score.conditions = children
    return score


def as_pytree(score_fn: ScoreFn) -> jax.tree_util.Partial | ConditionalScore:
  """``score_fn`` as a pytree whose arrays are ``jit`` arguments: a Partial or ``ConditionalScore`` as
  it is, any other callable as a Partial (compiled with whatever it closes over as constants)."""
  if isinstance(score_fn, (jax.tree_util.Partial, ConditionalScore)):
    return score_fn
  if not callable(score_fn):
    raise TypeError(f'score_fn must be a callable score_fn(x, t), got {type(score_fn).__name__}.')
  return jax.tree_util.Partial(score_fn)


def _per_sample_rows(score_tree, batch_size: int):
  """(score_tree with each condition reshaped to (B, 1, ...), its ``vmap`` axes): mapped over a batch,
  each sample's solve sees a ``ConditionalScore`` holding only its own conditions, as a batch of one
  like its state; any other score function is shared (axes None)."""
  if not isinstance(score_tree, ConditionalScore):
    return score_tree, None
  def rows(condition):
    if jnp.ndim(condition) == 0 or jnp.shape(condition)[0] != batch_size:
      raise ValueError(f'a ConditionalScore condition has shape {jnp.shape(condition)}; the sampler was '
                       f'built for a batch of {batch_size}: every condition needs one row per sample.')
    return jnp.reshape(condition, (batch_size, 1) + jnp.shape(condition)[1:])
  axes = ConditionalScore.tree_unflatten(None, (None, 0))
  return ConditionalScore.tree_unflatten(None, (score_tree.conditional_fn,
                                               jax.tree_util.tree_map(rows, score_tree.conditions))), axes


# ----------------------------------------------------------------------------------------------------
# Samplers.


def check_shape(shape) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2 or min(shape) < 1:
    raise ValueError(f'shape must be (batch_size, *example_shape) with positive sizes, got {shape}.')
  parallel.check_batch_size(shape[0], 'the sampling batch size shape[0]')
  return shape


def _check_eps(sde: sde_lib.SDE, eps: float) -> float:
  if not 0 < float(eps) < sde.T:
    raise ValueError(f'eps (config.sampling.eps) must lie in (0, T={sde.T}), got {eps}.')
  return float(eps)


class ShardedSampler:
  """Shared plumbing: per-sample keys and prior draws, batch sharding, replicated score arrays."""

  def __init__(self, sde: sde_lib.SDE, shape: tuple[int, ...], inverse_scaler):
    self.sde = sde
    self.shape = shape
    self.inverse_scaler = inverse_scaler if inverse_scaler is not None else (lambda x: x)
    self.mesh = parallel.data_mesh()

  def shard(self, x: Array) -> Array:
    return jax.lax.with_sharding_constraint(x, parallel.batch_sharding(self.mesh, x.ndim))

  def sample_keys(self, rng: Array, first_index: Array) -> Array:
    """One key per sample, fold_in(rng, global index): what makes sample i depend only on (rng, i)."""
    index = first_index + jnp.arange(self.shape[0], dtype=jnp.uint32)
    return self.shard(jax.vmap(jax.random.fold_in, (None, 0))(rng, index))

  def prior(self, keys: Array) -> Array:
    one = (1,) + self.shape[1:]
    return self.shard(jax.vmap(lambda key: self.sde.prior_sampling(key, one)[0])(keys))

  def initial(self, keys: Array, z: Array | None) -> Array:
    """x_T: the prior draw of each sample's key, or the given latent ``z``."""
    return self.prior(keys) if z is None else self.shard(z)

  def check_z(self, z: Array | None) -> None:
    if z is not None and tuple(z.shape) != self.shape:
      raise ValueError(f'z has shape {tuple(z.shape)}; the sampler was built for {self.shape}.')

  def replicate(self, tree):
    return parallel.replicate(self.mesh, tree)


def get_pc_sampler(sde: sde_lib.SDE, shape, predictor: str | type[Predictor],
                   corrector: str | type[Corrector], *, snr: float, n_steps: int, probability_flow: bool,
                   denoise: bool, eps: float, langevin_per_sample: bool,
                   inverse_scaler: Callable[[Array], Array] | None = None) -> Sampler:
  """Predictor-corrector sampler (Alg. 1 of Song et al. 2021), compiled once per score function.

  From x ~ p_T, at each t of linspace(T, eps, N) (N = sde.N): ``corrector`` then ``predictor`` (the
  reference's order). Returns ``inverse_scaler`` of the last predictor's noise-free mean when
  ``denoise`` (the reference's noise removal: the last step without its noise), else of the last
  sample. The settings have no defaults here: theirs live in the default configs (``config.sampling``).

  Args:
    sde: the forward SDE; ``sde.N`` sets the number of steps.
    shape: (batch_size, *example_shape); batch_size must divide over the devices.
    predictor, corrector: registered names (or ``Predictor``/``Corrector`` subclasses).
    snr: signal-to-noise ratio of the Langevin correctors (config.sampling.snr).
    n_steps: corrector steps per noise level (config.sampling.n_steps_each).
    probability_flow: predict with the probability-flow ODE instead of the reverse SDE.
    denoise: return the noise-free mean of the last predictor step (config.sampling.noise_removal).
    eps: the last time step (config.sampling.eps; the reference uses 1e-3 for VP/sub-VP, 1e-5 for VE).
    langevin_per_sample: per-sample Langevin step sizes instead of the batch average.
    inverse_scaler: maps model space back to data space, traceable.

  Returns:
    ``sampler(rng, score_fn, z=None, first_index=0) -> (samples, nfe)``: samples like ``shape``, sharded
    over the batch; nfe the exact number of score evaluations per sample; ``z`` (like ``shape``) the
    initial state x_T instead of prior draws. Sample i uses the key ``fold_in(rng, first_index + i)``, so
    rounds of a long run continue the same sequence.
  """
  shape = check_shape(shape)
  eps = _check_eps(sde, eps)
  if float(snr) <= 0:
    raise ValueError(f'snr (config.sampling.snr) must be positive, got {snr}.')
  if int(n_steps) < 0:
    raise ValueError(f'n_steps (config.sampling.n_steps_each) must be >= 0, got {n_steps}.')
  predictor_cls = get_predictor(predictor) if isinstance(predictor, str) else predictor
  corrector_cls = get_corrector(corrector) if isinstance(corrector, str) else corrector
  predictor_obj = predictor_cls(sde, probability_flow)
  corrector_obj = corrector_cls(sde, snr, n_steps, langevin_per_sample)
  base = ShardedSampler(sde, shape, inverse_scaler)
  timesteps = jnp.linspace(sde.T, eps, sde.N)

  @functools.partial(xla_cpu.jit, program='inference')
  def run(rng, score_tree, z, first_index):
    keys = base.sample_keys(rng, first_index)
    prior_keys, loop_keys = fold_in(keys, 0), fold_in(keys, 1)
    x = base.initial(prior_keys, z)

    def body(i, carry):
      x, _ = carry
      t = jnp.full((shape[0],), timesteps[i])
      step_keys = fold_in(loop_keys, i)
      x, _ = corrector_obj.update(fold_in(step_keys, 0), x, t, score_tree)
      x, x_mean = predictor_obj.update(fold_in(step_keys, 1), x, t, score_tree)
      return base.shard(x), base.shard(x_mean)

    x, x_mean = jax.lax.fori_loop(0, sde.N, body, (x, x))
    return base.inverse_scaler(x_mean if denoise else x)

  nfe = sde.N * (predictor_obj.nfe + corrector_obj.nfe)

  def sampler(rng: Array, score_fn: ScoreFn, z: Array | None = None,
              first_index: int = 0) -> tuple[Array, int]:
    base.check_z(z)
    rng, score_tree, first = base.replicate((rng, as_pytree(score_fn), jnp.uint32(first_index)))
    return run(rng, score_tree, z, first), nfe

  return sampler


def get_ode_sampler(sde: sde_lib.SDE, shape, *, rtol: float, atol: float, method: str, eps: float,
                    denoise: bool, inverse_scaler: Callable[[Array], Array] | None = None,
                    max_steps: int = 16384) -> Sampler:
  """Probability-flow ODE sampler (eq. 13): dx/dt = f(x, t) - ½ g(t)² s(x, t), integrated from T to
  ``eps`` on device with a diffrax adaptive Runge-Kutta solver and a PID step-size controller.

  Each sample is solved separately (``vmap`` of one solve), with its own steps and error control. The
  reference integrated the whole batch as one flat system, whose shared RMS error norm and step sizes
  make each sample depend on the rest of the batch; per-sample solves make sample i a function of its
  latent alone (reproducible across batch sizes and device counts) at the cost of every solver
  iteration evaluating the network on the whole batch until the slowest sample has finished.
  Per-sample conditions (class labels, known values) reach their own sample's solve when the score
  function is a ``ConditionalScore``; a score function that holds them otherwise (closed over, or as
  arguments of a Partial) sees a single sample with the whole batch's conditions.
  The settings have no defaults here: theirs live in the default configs (``config.sampling``).

  Args:
    sde: the forward SDE.
    shape: (batch_size, *example_shape).
    rtol, atol: solver tolerances (config.sampling.ode_rtol / ode_atol).
    method: one of ``ode_solvers.SOLVERS`` (config.sampling.ode_method).
    eps: the end time (config.sampling.eps).
    denoise: finish with one noise-free reverse-diffusion step at t = eps (+1 NFE), as the reference
      (config.sampling.noise_removal).
    inverse_scaler: maps model space back to data space, traceable.
    max_steps: solver step limit per sample (a solve that needs more raises).

  Returns:
    ``sampler(rng, score_fn, z=None, first_index=0) -> (samples, nfe)``: ``z`` (like ``shape``) is a
    latent to decode instead of prior draws; nfe is the number of batched score evaluations (the most
    any sample needed: the solves run in lock-step).
  """
  shape = check_shape(shape)
  eps = _check_eps(sde, eps)
  method = str(method).lower()
  solver = ode_solvers.get_solver(method, 'config.sampling.ode_method')
  if not (float(rtol) > 0 and float(atol) > 0):
    raise ValueError(f'ODE tolerances must be positive, got rtol={rtol}, atol={atol} '
                     f'(config.sampling.ode_rtol / ode_atol).')
  controller = diffrax.PIDController(rtol=float(rtol), atol=float(atol))
  base = ShardedSampler(sde, shape, inverse_scaler)
  denoiser = ReverseDiffusionPredictor(sde, probability_flow=False)

  def vector_field(t, y, score_tree):
    drift, _ = sde.reverse(score_tree, probability_flow=True).sde(y[None], jnp.full((1,), t))
    return drift[0]

  term = diffrax.ODETerm(vector_field)

  def solve_one(y0, score_tree):
    solution = diffrax.diffeqsolve(term, solver, t0=sde.T, t1=eps, dt0=None, y0=y0,
                                   args=score_tree, stepsize_controller=controller,
                                   max_steps=int(max_steps))
    return solution.ys[-1], solution.stats['num_steps']

  @functools.partial(xla_cpu.jit, program='inference')
  def run(rng, score_tree, z, first_index):
    keys = base.sample_keys(rng, first_index)
    x = base.initial(fold_in(keys, 0), z)
    rows, axes = _per_sample_rows(score_tree, shape[0])
    x, num_steps = jax.vmap(solve_one, (0, axes))(x, rows)
    x = base.shard(x)
    nfe = ode_solvers.num_evaluations(method, jnp.max(num_steps))
    if denoise:
      _, x = denoiser.update(fold_in(keys, 1), x, jnp.full((shape[0],), eps), score_tree)
      nfe = nfe + 1
    return base.inverse_scaler(x), nfe

  def sampler(rng: Array, score_fn: ScoreFn, z: Array | None = None,
              first_index: int = 0) -> tuple[Array, int]:
    base.check_z(z)
    rng, score_tree, first = base.replicate((rng, as_pytree(score_fn), jnp.uint32(first_index)))
    x, nfe = run(rng, score_tree, z, first)
    return x, int(nfe)

  return sampler


def get_fast_sampler(sde: sde_lib.SDE, shape, solver: fast_samplers.Solver,
                     inverse_scaler: Callable[[Array], Array] | None = None) -> Sampler:
  """A fixed-step fast sampler (``fast_samplers.heun``, ``edm_stochastic``, ``dpm_solver_2m``,
  ``dpm_solver_3s``) compiled once per score function: x_T ~ p_T (or ``z``), mapped to EDM's x̂ = x / s(T),
  solved, and returned as ``inverse_scaler`` of the denoised mean D(x; eps) (the last step to σ̃ = 0).

  Returns:
    ``sampler(rng, score_fn, z=None, first_index=0) -> (samples, nfe)``; deterministic solvers make the
    samples a pure function of ``z``; a stochastic one draws step i's noise for sample b from
    ``fold_in(fold_in(rng, first_index + b), 1)`` folded with i.
  """
  shape = check_shape(shape)
  base = ShardedSampler(sde, shape, inverse_scaler)
  view = fast_samplers.EDMView(sde)
  scale_T = view.coeffs(sde.T)[0]

  @functools.partial(xla_cpu.jit, program='inference')
  def run(rng, score_tree, z, first_index):
    keys = base.sample_keys(rng, first_index)
    x = base.initial(fold_in(keys, 0), z)
    denoiser = view.denoiser(score_tree)
    x0 = solver.solve(lambda x_hat, t: base.shard(denoiser(x_hat, t)), indexed_noise(fold_in(keys, 1)),
                      x / scale_T)
    return base.inverse_scaler(base.shard(x0))

  def sampler(rng: Array, score_fn: ScoreFn, z: Array | None = None,
              first_index: int = 0) -> tuple[Array, int]:
    base.check_z(z)
    rng, score_tree, first = base.replicate((rng, as_pytree(score_fn), jnp.uint32(first_index)))
    return run(rng, score_tree, z, first), solver.nfe

  return sampler


def get_ggf_sampler(sde: sde_lib.SDE, shape, *, atol: float, rtol: float, h_init: float, eps: float,
                    inverse_scaler: Callable[[Array], Array] | None = None, max_steps: int = 10_000,
                    nfe_per_sample: bool = False) -> Sampler:
  """Gotta Go Fast's adaptive reverse-SDE sampler (``fast_samplers.ggf``), compiled once per score
  function. Every sample takes its own steps (lock-step over the batch until the slowest finishes).

  Args:
    atol, rtol, h_init: tolerances and first step (config.sampling.ggf_atol / ggf_rtol / ggf_h_init).
    eps: the end time (config.sampling.eps).
    max_steps: attempted steps per sample before the sampler raises.
    nfe_per_sample: return each sample's evaluations (B,) instead of the batch's (their maximum).

  Returns:
    ``sampler(rng, score_fn, z=None, first_index=0) -> (samples, nfe)``.
  """
  shape = check_shape(shape)
  eps = _check_eps(sde, eps)
  if not (float(atol) > 0 and float(rtol) > 0 and 0 < float(h_init) <= sde.T - eps):
    raise ValueError(f'ggf needs atol > 0, rtol > 0 and 0 < h_init <= T - eps, got atol={atol}, '
                     f'rtol={rtol}, h_init={h_init} (config.sampling.ggf_atol / ggf_rtol / ggf_h_init).')
  base = ShardedSampler(sde, shape, inverse_scaler)

  @functools.partial(xla_cpu.jit, program='inference')
  def run(rng, score_tree, z, first_index):
    keys = base.sample_keys(rng, first_index)
    x = base.initial(fold_in(keys, 0), z)
    x0, nfe, done = fast_samplers.ggf(sde, score_tree, indexed_noise(fold_in(keys, 1)), x, eps,
                                      atol=float(atol), rtol=float(rtol), h_init=float(h_init),
                                      max_steps=int(max_steps))
    return base.inverse_scaler(base.shard(x0)), nfe, jnp.all(done)

  def sampler(rng: Array, score_fn: ScoreFn, z: Array | None = None,
              first_index: int = 0) -> tuple[Array, int | np.ndarray]:
    base.check_z(z)
    rng, score_tree, first = base.replicate((rng, as_pytree(score_fn), jnp.uint32(first_index)))
    x, nfe, done = run(rng, score_tree, z, first)
    if not bool(done):
      raise RuntimeError(f'ggf: a sample did not reach t = eps within {max_steps} steps; raise '
                         f'config.sampling.ggf_rtol / ggf_atol.')
    nfe = np.asarray(parallel.to_host(nfe))
    return x, (nfe if nfe_per_sample else int(nfe.max()))

  return sampler


METHODS = ('pc', 'ode', 'heun', 'edm_sde', 'dpm_solver++', 'ggf')


def validate_config(config) -> None:
  """Raises ValueError naming the ``config.sampling`` key whose value the configured method cannot use."""
  cfg = config.sampling
  method = str(cfg.method).lower()
  if method not in METHODS:
    raise ValueError(f'config.sampling.method={cfg.method!r} is not known; choose one of {list(METHODS)}.')
  if method == 'pc':
    get_predictor(cfg.predictor)
    get_corrector(cfg.corrector)
  elif method == 'ode':
    ode_solvers.get_solver(str(cfg.ode_method).lower(), 'config.sampling.ode_method')
  elif method == 'ggf':
    for key in ('ggf_atol', 'ggf_rtol', 'ggf_h_init'):
      if not float(cfg[key]) > 0:
        raise ValueError(f'config.sampling.{key}={cfg[key]!r} must be positive.')
  else:
    if cfg.schedule not in fast_samplers.SCHEDULES and cfg.schedule != fast_samplers.AUTO_SCHEDULE:
      raise ValueError(f'config.sampling.schedule={cfg.schedule!r} is not known; choose one of '
                       f'{[fast_samplers.AUTO_SCHEDULE] + sorted(fast_samplers.SCHEDULES)}.')
    if not (isinstance(cfg.num_steps, int) and cfg.num_steps >= 2):
      raise ValueError(f'config.sampling.num_steps={cfg.num_steps!r} must be an integer >= 2 (it counts '
                       f'the last step to σ = 0).')
    if not float(cfg.rho) > 0:
      raise ValueError(f'config.sampling.rho={cfg.rho!r} must be positive.')
    if method == 'dpm_solver++' and cfg.dpm_order not in (2, 3):
      raise ValueError(f'config.sampling.dpm_order={cfg.dpm_order!r} must be 2 (DPM-Solver++(2M)) or 3 '
                       f'(third-order single-step).')
    if method == 'edm_sde' and not (float(cfg.s_churn) >= 0 and float(cfg.s_noise) > 0
                                    and 0 <= float(cfg.s_tmin) <= float(cfg.s_tmax)):
      raise ValueError(f'edm_sde needs s_churn >= 0, s_noise > 0 and 0 <= s_tmin <= s_tmax; got '
                       f's_churn={cfg.s_churn}, s_noise={cfg.s_noise}, s_tmin={cfg.s_tmin}, '
                       f's_tmax={cfg.s_tmax} (config.sampling.*).')


def fixed_step_solver(config, sde: sde_lib.SDE, eps: float) -> fast_samplers.Solver:
  """The ``fast_samplers.Solver`` of a fixed-step ``config.sampling.method`` on its time grid."""
  cfg = config.sampling
  method = str(cfg.method).lower()
  view = fast_samplers.EDMView(sde)
  schedule = fast_samplers.resolve_schedule(cfg.schedule, method, sde)
  grid = fast_samplers.time_grid(view, schedule, cfg.num_steps, eps, cfg.rho)
  if method == 'heun':
    return fast_samplers.heun(grid)
  if method == 'edm_sde':
    return fast_samplers.edm_stochastic(view, grid, eps, s_churn=cfg.s_churn, s_tmin=cfg.s_tmin,
                                        s_tmax=cfg.s_tmax, s_noise=cfg.s_noise)
  if method == 'dpm_solver++':
    return fast_samplers.dpm_solver_2m(grid) if cfg.dpm_order == 2 else fast_samplers.dpm_solver_3s(
        view, grid, eps)
  raise ValueError(f'config.sampling.method={cfg.method!r} is not a fixed-step fast sampler.')


def get_sampling_fn(config, sde: sde_lib.SDE, shape, inverse_scaler=None,
                    eps: float | None = None) -> Sampler:
  """The sampler named by ``config.sampling.method`` (one of ``METHODS``) with its ``config.sampling``
  keys, validated first (``validate_config``).

  ``eps`` defaults to ``config.sampling.eps``. Returns ``sampler(rng, score_fn, z=None, first_index=0) ->
  (samples, nfe)``; see ``get_pc_sampler``, ``get_ode_sampler``, ``get_fast_sampler`` and
  ``get_ggf_sampler``. Every sampler returns the denoised mean at the end (PC and ODE when
  ``noise_removal``).
  """
  validate_config(config)
  cfg = config.sampling
  eps = _check_eps(sde, float(cfg.eps if eps is None else eps))
  method = str(cfg.method).lower()
  if method == 'ode':
    return get_ode_sampler(sde, shape, rtol=cfg.ode_rtol, atol=cfg.ode_atol, method=cfg.ode_method, eps=eps,
                           denoise=cfg.noise_removal, inverse_scaler=inverse_scaler)
  if method == 'pc':
    return get_pc_sampler(sde, shape, cfg.predictor, cfg.corrector, snr=cfg.snr,
                          n_steps=cfg.n_steps_each, probability_flow=cfg.probability_flow,
                          denoise=cfg.noise_removal, eps=eps, inverse_scaler=inverse_scaler,
                          langevin_per_sample=cfg.langevin_per_sample)
  if method == 'ggf':
    return get_ggf_sampler(sde, shape, atol=cfg.ggf_atol, rtol=cfg.ggf_rtol, h_init=cfg.ggf_h_init,
                           eps=eps, inverse_scaler=inverse_scaler)
  return get_fast_sampler(sde, shape, fixed_step_solver(config, sde, eps), inverse_scaler)
