"""Controllable generation with an unconditional score model: inpainting, colorization and
class-conditional sampling.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021
(arXiv:2011.13456), Sec. 5 and App. I. For an observation y of x(0), sampling p_0(x | y) needs the score
of p_t(x(t) | y). Two cases are solved here without retraining the score model:

- **Class-conditional** (Sec. 5, eq. 14): ∇ log p_t(x | y) = ∇ log p_t(x) + ∇ log p_t(y | x), where
  p_t(y | x) is a classifier of noised data x(t) (trained with ``--mode=train_classifier``, or exact).
  ``guided_score_fn`` adds the classifier term with a guidance scale w (w = 1 is Bayes' rule; w > 1
  sharpens the class posterior, as in later classifier-guidance work). The result is an ordinary
  ``score_fn(x, t)``: every sampler takes it unchanged.
- **Inpainting and colorization** (App. I.2-I.3): the known part Ω of x(0) is noised to the current time,
  x_Ω(t) = a(t) x_Ω(0) + s(t) z, and substituted into the sample at every step, while the unknown part
  follows the unconditional reverse process. Colorization is inpainting in the paper's decoupled
  colour space: a fixed orthogonal 3×3 matrix maps RGB to (grey, two chroma) channels, and the grey
  channel is the known part. The SDEs' drift and noise are isotropic, so a sampler run on the decoupled
  coordinates, with the score mapped by the same matrix, is the sampler of the image.

How the substitution is done per sampler (``config.sampling.method``):

- ``pc`` (the paper's): after the corrector and after the predictor, the known part is replaced by a
  fresh draw of a(t) x_Ω(0) + s(t) z at the time the state then has (the reference re-noised at the time
  before the predictor's step).
- the fast samplers (``heun``, ``dpm_solver++``, ``edm_sde``, ``ggf``): the sampler runs with
  ``known_part_score_fn``, whose known coordinates carry the exact score of a point mass at the known
  value, -(x_Ω - a(t) x_Ω(0)) / s(t)². Under the probability-flow ODE that point mass moves along
  x_Ω(t) = a(t) x_Ω(0) + s(t) ε with ε fixed: the sampler itself keeps the known part noised to the current
  time, which is the substitution with a fixed noise draw, for any solver without a hook into its steps
  (the data-prediction solvers see D(x) = x_Ω(0) there, exactly).
- ``ode`` (diffrax, adaptive): as the fast samplers, with ``known_part_score_fn``. It solves each sample
  separately under ``vmap``; the score functions built here are ``sampling.ConditionalScore``s, whose
  per-sample conditions (known values and masks, class labels) it splits by row, so each sample's solve
  sees its own. They raise a ValueError if a sampler calls them on a batch other than theirs.

Each inpainter returns the **denoised mean** of its last step in the unknown part (the sampler's
``noise_removal``) and the known values exactly. The reference's ``get_pc_inpainter`` returned
``x_mean`` recomputed from the already-noised ``x`` (its unknown part kept the last step's noise): fixed
here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scoresde import sampling
from scoresde import sde_lib

Array = jax.Array
ScoreFn = sde_lib.ScoreFn
# classifier_logits_fn(x (B, ...), t (B,)) -> (B, K) logits of p_t(y | x).
LogitsFn = Callable[[Array, Array], Array]
# inpaint(rng, score_fn, known, mask, first_index=0) -> (samples, nfe per sample).
Inpainter = Callable[..., tuple[Array, int]]

CONDITIONS = ('none', 'inpaint', 'colorize', 'class')

# The reference's colour decoupling (controllable_generation.py, App. I.3): an orthonormal matrix whose
# first column is (1, 1, 1)/√3, so u = x M has the grey level √3·mean(x) in channel 0 and two chroma
# channels orthogonal to it. The reference typed it as float32 decimals; these are its exact values.
COLORIZATION_MATRIX = np.array([[1 / np.sqrt(3), -2 / np.sqrt(6), 0.],
                                [1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)],
                                [1 / np.sqrt(3), 1 / np.sqrt(6), -1 / np.sqrt(2)]], np.float32)


# ----------------------------------------------------------------------------------------------------
# Class-conditional scores (Sec. 5, eq. 14).


def _check_batch(x: Array, conditions: Array, what: str) -> None:
  """Row b of the conditions is sample b's: refuse at trace time, instead of broadcasting every sample's
  conditions over another batch (a sampler built for another batch size, or a score function nested
  inside another ``ConditionalScore``, whose rows the ODE sampler does not split)."""
  if x.shape[0] != conditions.shape[0]:
    raise ValueError(
        f'the score was called on a batch of {x.shape[0]} but holds {what} for {conditions.shape[0]} '
        'samples: build it with one row per sample of the sampler\'s batch (shape[0], '
        'config.eval.batch_size), and pass it to the sampler itself, not wrapped in another score function.')


def _guided_score(score_fn: ScoreFn, classifier_logits_fn: LogitsFn, scale: Array, x: Array, t: Array,
                  y: Array) -> Array:
  _check_batch(x, y, 'class labels')
  def log_likelihood(x):
    # A sum of per-example log p_t(y_b | x_b): its gradient is each example's own, as long as the
    # classifier treats examples independently (GroupNorm, or BatchNorm in eval mode).
    log_probs = jax.nn.log_softmax(classifier_logits_fn(x, t).astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=1))
  return score_fn(x, t) + scale * jax.grad(log_likelihood)(x).astype(x.dtype)


def guided_score_fn(score_fn: ScoreFn, classifier_logits_fn: LogitsFn, y, scale: float = 1.0
                    ) -> sampling.ConditionalScore:
  """The class-conditional score ∇ log p_t(x) + w ∇ₓ log p_t(y | x) (Song et al. 2021, eq. 14).

  Args:
    score_fn: the unconditional ``score_fn(x, t)``.
    classifier_logits_fn: ``(x (B, ...), t (B,)) -> (B, K)`` logits of a noise-conditional classifier
      p_t(y | x) (``classifier_logits_fn`` of ``models.utils``, or an exact one in tests).
    y: (B,) int, the class of each example; the samplers' batch must be B.
    scale: the guidance scale w; 1 is Bayes' rule, 0 unconditional sampling.

  Returns:
    ``score_fn(x, t)``, a ``sampling.ConditionalScore`` with the labels as its per-sample conditions (so
    every sampler, the per-sample ODE solves included, matches label b to sample b); its arrays (``y``,
    ``scale``, and those of the score and classifier functions when they are Partials) are ``jit``
    arguments: new labels, scales or weights reuse a compiled sampler. It costs one score and one
    classifier forward and backward pass.
  """
  y = jnp.asarray(y)
  if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f'y must be a (B,) integer array of class labels, got shape {y.shape} and dtype '
                     f'{y.dtype}.')
  return sampling.ConditionalScore(
      jax.tree_util.Partial(_guided_score, sampling.as_pytree(score_fn),
                            sampling.as_pytree(classifier_logits_fn), jnp.float32(scale)),
      y.astype(jnp.int32))


# ----------------------------------------------------------------------------------------------------
# Inpainting (App. I.2).


@dataclasses.dataclass(frozen=True)
class _KnownPartScore:
  """(score_fn, x, t, (known, mask)) -> score for one SDE; equal for the same SDE object, so ``jit``
  caches one program for all known values."""
  sde: sde_lib.SDE

  def __call__(self, score_fn: ScoreFn, x: Array, t: Array, conditions: tuple[Array, Array]) -> Array:
    known, mask = conditions
    _check_batch(x, known, 'known values')
    scale, std = self.sde.marginal_coeffs(t)
    point_mass = -sde_lib.batch_mul(1. / std**2, x - sde_lib.batch_mul(scale, known))
    return mask * point_mass + (1. - mask) * score_fn(x, t)


def known_part_score_fn(sde: sde_lib.SDE, score_fn: ScoreFn, known: Array, mask: Array
                        ) -> sampling.ConditionalScore:
  """``score_fn(x, t)`` with the known coordinates (``mask`` 1) scored as a point mass at ``known``:
  -(x_Ω - a(t) known) / s(t)², and the others by ``score_fn`` at the whole x (its known coordinates
  being the sampler's noised known values).

  The probability-flow ODE of a point mass moves x_Ω(t) = a(t) known + s(t) ε with ε constant, so a
  deterministic sampler run with this score keeps the known part noised to the current time: the
  paper's substitution (App. I.2) with a fixed noise draw, for samplers without a hook into their steps.
  ``known`` and ``mask`` are (B, ...) like x: the per-sample conditions of the returned
  ``sampling.ConditionalScore`` (``jit`` arguments).
  """
  return sampling.ConditionalScore(
      jax.tree_util.Partial(_KnownPartScore(sde), sampling.as_pytree(score_fn)),
      (jnp.asarray(known), jnp.asarray(mask)))


def _broadcast_inputs(shape: tuple[int, ...], known, mask) -> tuple[Array, Array]:
  known = jnp.asarray(known, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  if known.shape != shape:
    raise ValueError(f'known has shape {known.shape}; the inpainter was built for {shape}.')
  try:
    mask = jnp.broadcast_to(mask, shape)
  except ValueError as error:
    raise ValueError(f'mask of shape {mask.shape} does not broadcast to {shape}.') from error
  if not bool(jnp.all((mask == 0.) | (mask == 1.))):
    raise ValueError('mask must hold only 0 (unknown) and 1 (known).')
  return known, mask


def _pc_inpainter(config, sde: sde_lib.SDE, shape: tuple[int, ...], eps: float) -> Inpainter:
  """The paper's PC inpainter (App. I.2): PC sampling (``sampling.get_pc_sampler``'s loop, corrector
  then predictor) with the known part replaced by a fresh noised draw after each update."""
  cfg = config.sampling
  predictor = sampling.get_predictor(cfg.predictor)(sde, cfg.probability_flow)
  corrector = sampling.get_corrector(cfg.corrector)(sde, cfg.snr, cfg.n_steps_each, cfg.langevin_per_sample)
  base = sampling.ShardedSampler(sde, shape, None)
  timesteps = jnp.linspace(sde.T, eps, sde.N)
  # The time the state has after the predictor's step from timesteps[i]; the last one is replaced by
  # the known values themselves.
  next_times = jnp.concatenate([timesteps[1:], timesteps[-1:]])
  denoise = bool(cfg.noise_removal)

  @jax.jit
  def run(rng, score_tree, known, mask, first_index):
    keys = base.sample_keys(rng, first_index)
    known, mask = base.shard(known), base.shard(mask)

    def noised(keys, t):
      mean, std = sde.marginal_prob(known, jnp.full((shape[0],), t))
      return mean + sde_lib.batch_mul(std, sampling.normal_like(keys, known)), mean

    def substitute(x, known_part):
      return base.shard(mask * known_part + (1. - mask) * x)

    x_T, _ = noised(sampling.fold_in(keys, 2), timesteps[0])
    x = substitute(base.prior(sampling.fold_in(keys, 0)), x_T)
    loop_keys = sampling.fold_in(keys, 1)

    def body(i, carry):
      x, _ = carry
      t = jnp.full((shape[0],), timesteps[i])
      step_keys = sampling.fold_in(loop_keys, i)
      x, _ = corrector.update(sampling.fold_in(step_keys, 0), x, t, score_tree)
      x = substitute(x, noised(sampling.fold_in(step_keys, 1), timesteps[i])[0])
      x, x_mean = predictor.update(sampling.fold_in(step_keys, 2), x, t, score_tree)
      noisy, mean = noised(sampling.fold_in(step_keys, 3), next_times[i])
      return substitute(x, noisy), substitute(x_mean, mean)

    x, x_mean = jax.lax.fori_loop(0, sde.N, body, (x, x))
    return substitute(x_mean if denoise else x, known)

  nfe = sde.N * (predictor.nfe + corrector.nfe)

  def inpaint(rng: Array, score_fn: ScoreFn, known: Array, mask: Array,
              first_index: int = 0) -> tuple[Array, int]:
    known, mask = _broadcast_inputs(shape, known, mask)
    rng, score_tree, first = base.replicate((rng, sampling.as_pytree(score_fn), jnp.uint32(first_index)))
    return run(rng, score_tree, known, mask, first), nfe

  return inpaint


def _sampler_inpainter(config, sde: sde_lib.SDE, shape: tuple[int, ...], eps: float) -> Inpainter:
  """Any sampler of ``sampling.get_sampling_fn`` run with ``known_part_score_fn``."""
  sampler = sampling.get_sampling_fn(config, sde, shape, None, eps)

  def inpaint(rng: Array, score_fn: ScoreFn, known: Array, mask: Array,
              first_index: int = 0) -> tuple[Array, int]:
    known, mask = _broadcast_inputs(shape, known, mask)
    samples, nfe = sampler(rng, known_part_score_fn(sde, score_fn, known, mask), first_index=first_index)
    return mask * known + (1. - mask) * samples, nfe

  return inpaint


def _check_eps(config, sde: sde_lib.SDE, eps: float | None) -> float:
  eps = float(config.sampling.eps if eps is None else eps)
  if not 0 < eps < sde.T:
    raise ValueError(f'eps (config.sampling.eps) must lie in (0, T={sde.T}), got {eps}.')
  return eps


def get_inpainter(config, sde: sde_lib.SDE, shape, eps: float | None = None,
                  inverse_scaler: Callable[[Array], Array] | None = None) -> Inpainter:
  """Inpainting with an unconditional score model (Song et al. 2021, App. I.2).

  ``config.sampling.method`` picks the sampler and its ``config.sampling`` keys, as for unconditional
  sampling: ``pc`` substitutes a freshly noised known part after every corrector and predictor update;
  other methods run with ``known_part_score_fn`` (module docstring).

  Args:
    config: the experiment config (``config.sampling``).
    sde: the forward SDE.
    shape: (batch_size, *example_shape).
    eps: the last time step; default ``config.sampling.eps``.
    inverse_scaler: maps model space back to data space, applied to the result.

  Returns:
    ``inpaint(rng, score_fn, known, mask, first_index=0) -> (samples, nfe)``: ``known`` (like ``shape``,
    model space) holds the observed values where ``mask`` (broadcastable to ``shape``) is 1; the samples
    equal ``known`` there exactly and are the denoised mean of the last step elsewhere (when
    ``config.sampling.noise_removal``); nfe is the number of score evaluations per sample.
  """
  shape = sampling.check_shape(shape)
  eps = _check_eps(config, sde, eps)
  method = str(config.sampling.method).lower()
  inner = _pc_inpainter(config, sde, shape, eps) if method == 'pc' else _sampler_inpainter(
      config, sde, shape, eps)
  inverse_scaler = inverse_scaler if inverse_scaler is not None else (lambda x: x)

  def inpaint(rng: Array, score_fn: ScoreFn, known: Array, mask: Array,
              first_index: int = 0) -> tuple[Array, int]:
    samples, nfe = inner(rng, score_fn, known, mask, first_index)
    return inverse_scaler(samples), nfe

  return inpaint


# ----------------------------------------------------------------------------------------------------
# Colorization (App. I.3).


def decouple(x: Array) -> Array:
  """RGB (..., 3) -> (grey·√3, chroma, chroma) with ``COLORIZATION_MATRIX``."""
  return jnp.einsum('...k,kl->...l', x, COLORIZATION_MATRIX)


def couple(u: Array) -> Array:
  """The inverse of ``decouple`` (the matrix is orthogonal: its transpose)."""
  return jnp.einsum('...l,kl->...k', u, COLORIZATION_MATRIX)


def _decoupled_score(score_fn: ScoreFn, u: Array, t: Array) -> Array:
  return decouple(score_fn(couple(u), t))


def get_colorizer(config, sde: sde_lib.SDE, shape, eps: float | None = None,
                  inverse_scaler: Callable[[Array], Array] | None = None) -> Inpainter:
  """Colorization with an unconditional score model (Song et al. 2021, App. I.3).

  Inpainting (``get_inpainter``) of the decoupled image u = x M (``decouple``), whose channel 0, the
  grey level, is known: the sampler runs on u with the score ∇_u log p_t = (∇_x log p_t) M, which is the
  same process as on x because M is orthogonal and the SDEs are isotropic.

  Args:
    config, sde, eps, inverse_scaler: as ``get_inpainter``.
    shape: (batch_size, H, W, 3).

  Returns:
    ``colorize(rng, score_fn, grey, first_index=0) -> (samples, nfe)``: ``grey`` is (B, H, W, 1) or
    (B, H, W, 3) in model space (of 3 channels only their mean counts); the samples' channel mean equals
    it exactly.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'colorization needs RGB images, shape (B, H, W, 3); got {shape}.')
  inpaint = get_inpainter(config, sde, shape, eps)
  inverse_scaler = inverse_scaler if inverse_scaler is not None else (lambda x: x)
  mask = jnp.zeros(shape[1:], jnp.float32).at[..., 0].set(1.)

  def colorize(rng: Array, score_fn: ScoreFn, grey: Array, first_index: int = 0) -> tuple[Array, int]:
    grey = jnp.asarray(grey, jnp.float32)
    if grey.shape[:-1] != shape[:-1] or grey.shape[-1] not in (1, 3):
      raise ValueError(f'grey has shape {grey.shape}; expected {shape[:-1] + (1,)} or {shape}.')
    known = decouple(jnp.broadcast_to(jnp.mean(grey, -1, keepdims=True), shape))
    u, nfe = inpaint(rng, jax.tree_util.Partial(_decoupled_score, sampling.as_pytree(score_fn)),
                     known, mask, first_index)
    return inverse_scaler(couple(u)), nfe

  return colorize
