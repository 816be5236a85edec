"""Score-based anomaly detection: the denoising-score-matching residual of an input, and its threshold.

For an input x and a noise level σ, the residual is

    r_σ(x) = E_ε ‖a·s(a (x + σ ε), t_σ) + ε / σ‖²,   ε ~ N(0, I),

summed over the input's elements, with t_σ the time at which the SDE's noise-to-signal ratio s(t)/a(t) is
σ (``sde_lib.SDE.noise_level_time``) and a = a(t_σ) its mean coefficient (a = 1 for VE: the expression is
the plain ‖s(x + σε, σ) + ε/σ‖²). a·s is the score of the perturbed data x + σε in data units, whose
denoising target is -ε/σ (Vincent 2011), so r_σ is the DSM loss of the single input: near its floor for
inputs like the training data, large where the score model does not explain the input. Its floor, for data
N(μ, v I) in D dimensions and the exact score, is D v / (σ² (v + σ²)) (tests/test_anomaly.py checks this
and the residual of scaled and shifted inputs against their closed forms).

The expectation is estimated with K draws of ε per input (``num_draws``, default 8); each input's draws
come from ``fold_in(rng, index)``, its own position, so its estimate does not depend on the batch it is in.
The estimator's variance is Var_ε(‖·‖²) / K; ``score_se`` reports the per-input standard error from the
draws' spread (for the Gaussian case Var_ε = Σ_j 4 m_j² b² + 2 D b⁴, m the residual's mean, b = v/(σ(v+σ²))).

Inputs with a non-finite element are flagged ``non_finite``: they are scored with those elements set to 0,
the elements' map entries and so their channel's and the total score are +inf, never NaN (a score
network's own non-finite output is also reported as +inf). A detector rejects them whatever the threshold.

The threshold (``calibrate``) is an order statistic of held-out *clean* scores: the ⌈q (n+1)⌉-th smallest
of n, so that a fresh clean input exceeds it with probability at most 1 - q (exactly 1 - ⌈q(n+1)⌉/(n+1)
for continuous scores; the split-conformal argument). The multi-σ fused score standardises each σ's
residual by the clean calibration scores' mean and standard deviation and sums over σ.

Both are one-sided: an input is anomalous when the model explains it *worse* than clean data. Inputs that
remove content (a blank half, sparse strokes on a black background) are explained *better* than clean
data at every σ (flat regions are the easiest to denoise: the failure known for likelihood detectors,
Nalisnick et al. 2019, "Do deep generative models know what they don't know?"). The profile score is
two-sided: the Mahalanobis distance of the input's log residuals across σ from the clean calibration
set's mean, under their covariance, so too low, too high and a wrongly shaped profile across σ all count
(a Gaussian density on the multi-scale residuals, as Mahmood et al. 2021, "Multiscale score matching for
out-of-distribution detection", fit densities on multi-scale score norms). Logs, because residuals are
positive and right-skewed and their ratios across σ carry the profile's shape.

This module sees only ``score_fn(x, t)`` and the SDE (like the samplers): a trained detector, a generative
checkpoint, an imported one or an exact analytic score are interchangeable.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scoresde import sde_lib
from scoresde.infra import resumable

Array = jax.Array

ACCEPT, REJECT = 'accept', 'reject'
REASON_NON_FINITE = 'non_finite'  # the input has a NaN or an infinite element
REASON_ABOVE = 'above_threshold'  # its score exceeds the calibrated threshold
REASON_WITHIN = 'within_threshold'


def _per_input_noise(rng: Array, index: Array, num_draws: int, shape: tuple[int, ...]) -> Array:
  """ε (K, B, *shape): input i's K draws from fold_in(rng, index[i])."""
  draws = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(rng, i), (num_draws,) + shape))(index)
  return jnp.swapaxes(draws, 0, 1)


def dsm_residuals(score_fn: sde_lib.ScoreFn, sde: sde_lib.SDE, x: Array, sigmas: Sequence[float],
                  rng: Array, num_draws: int = 8, index: Array | None = None) -> dict[str, Array]:
  """The DSM residual of each input at each noise level in ``sigmas`` (S of them).

  Args:
    score_fn: ``score_fn(x, t)`` of the model (data in the space it was trained on).
    sde: the SDE whose times ``score_fn`` takes.
    x: inputs (B, ...), channels last (images (B, H, W, C); vectors (B, D) count each entry as a channel).
    sigmas: noise levels in data units, host floats (each must be reached by the SDE).
    rng: one PRNG key.
    num_draws: K, noise draws per input and σ (the same draws at every σ).
    index: (B,) integer positions of the inputs (default 0..B-1): input i's draws come from
      ``fold_in(rng, index[i])``.

  Returns a dict: ``score`` (S, B), the mean over draws of the squared residual summed over elements;
  ``score_se`` (S, B) its standard error over the draws; ``per_channel`` (S, B, C) summing to ``score``;
  ``map`` (S, B, ...) the per-element mean squared residual; ``non_finite`` (B,) bool.
  """
  sigmas = np.atleast_1d(np.asarray(sigmas, np.float64))
  if sigmas.ndim != 1 or sigmas.size == 0:
    raise ValueError(f'sigmas must be a non-empty list of noise levels, got {sigmas.tolist()}.')
  num_draws = int(num_draws)
  if num_draws < 1:
    raise ValueError(f'num_draws={num_draws} must be a positive integer.')
  times = sde.noise_level_time(sigmas)
  with jax.ensure_compile_time_eval():  # host constants, also when traced under jit
    scales = np.asarray(sde.marginal_coeffs(jnp.asarray(times, jnp.float32))[0], np.float64)

  x = jnp.asarray(x, jnp.float32)
  batch = x.shape[0]
  finite = jnp.isfinite(x)
  non_finite = ~jnp.all(finite.reshape(batch, -1), axis=1)
  x = jnp.where(finite, x, 0.)
  index = jnp.arange(batch) if index is None else jnp.asarray(index)
  eps = _per_input_noise(rng, index, num_draws, x.shape[1:])  # (K, B, ...)

  # One network call for every (σ, draw, input): (S, K, B, ...) flattened into its batch.
  shape = (sigmas.size, num_draws) + x.shape
  col = lambda v: jnp.asarray(v, jnp.float32).reshape((-1,) + (1,) * (len(shape) - 1))
  sigma, a = col(sigmas), col(scales)
  perturbed = a * (x[None, None] + sigma * eps[None])
  labels = jnp.broadcast_to(col(times), shape[:3] + (1,) * (x.ndim - 1)).reshape(-1)
  score = score_fn(perturbed.reshape((-1,) + x.shape[1:]), labels).reshape(shape)
  squared = jnp.square(a * score + eps[None] / sigma)  # (S, K, B, ...)
  squared = jnp.where(jnp.isnan(squared), jnp.inf, squared)
  element_map = jnp.where(finite[None], jnp.mean(squared, axis=1), jnp.inf)  # (S, B, ...)
  draws = jnp.sum(squared.reshape(shape[:3] + (-1,)), axis=-1)  # (S, K, B)
  per_channel = jnp.sum(element_map.reshape((sigmas.size, batch, -1, x.shape[-1])), axis=2)
  total = jnp.sum(per_channel, axis=-1)
  if num_draws > 1:
    spread = jnp.std(draws, axis=1, ddof=1) / math.sqrt(num_draws)
  else:
    spread = jnp.full_like(total, jnp.inf)
  return {'score': total, 'score_se': jnp.where(jnp.isfinite(total), spread, jnp.inf),
          'per_channel': per_channel, 'map': element_map, 'non_finite': non_finite}


def dsm_residual(score_fn: sde_lib.ScoreFn, sde: sde_lib.SDE, x: Array, sigma: float, rng: Array,
                 num_draws: int = 8, index: Array | None = None) -> dict[str, Array]:
  """``dsm_residuals`` at one σ: ``score`` (B,), ``score_se`` (B,), ``per_channel`` (B, C),
  ``map`` (B, ...), ``non_finite`` (B,)."""
  out = dsm_residuals(score_fn, sde, x, [float(sigma)], rng, num_draws, index)
  return {k: v if k == 'non_finite' else v[0] for k, v in out.items()}


def gaussian_expected_residual(x: np.ndarray, mean: np.ndarray, variance: float, sigma: float) -> np.ndarray:
  """The exact E_ε r_σ(x) for data N(mean, variance I) and its exact score: ‖x-μ‖²/w² + D v²/(σ² w²),
  w = v + σ², for x (B, ...). Its mean over clean x is D v / (σ² w), the DSM loss's floor."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  w = variance + sigma**2
  dim = x.shape[1]
  dist2 = np.sum((x - np.asarray(mean, np.float64).reshape(1, -1))**2, axis=1)
  return dist2 / w**2 + dim * variance**2 / (sigma**2 * w**2)


# ----------------------------------------------------------------------------------------------------
# Calibration and decisions


def threshold_at(scores: np.ndarray, percentile: float) -> float:
  """The ⌈q (n+1)⌉-th smallest clean score (q = percentile / 100), or the largest when n is too small
  for q (n + 1 < 1 / (1 - q)): a fresh clean score exceeds it with probability ≤ 1 - q."""
  scores = np.sort(np.asarray(scores, np.float64).ravel())
  if scores.size == 0:
    raise ValueError('calibration needs at least one clean score.')
  if not np.all(np.isfinite(scores)):
    raise ValueError(f'{int(np.sum(~np.isfinite(scores)))} of {scores.size} calibration scores are not '
                     'finite: the calibration set must be clean data (non-finite inputs are anomalies).')
  if not 0 < percentile < 100:
    raise ValueError(f'percentile={percentile} must lie in (0, 100).')
  rank = math.ceil(percentile / 100 * (scores.size + 1))
  return float(scores[min(rank, scores.size) - 1])


def fused_score(scores: np.ndarray, means: Sequence[float], stds: Sequence[float]) -> np.ndarray:
  """Σ_σ (r_σ - m_σ) / sd_σ for scores (S, B), with the clean calibration means and stds (S,); +inf where
  any r_σ is."""
  scores = np.asarray(scores, np.float64)
  means = np.asarray(means, np.float64)[:, None]
  stds = np.asarray(stds, np.float64)[:, None]
  with np.errstate(invalid='ignore'):
    z = (scores - means) / stds
  return np.where(np.all(np.isfinite(scores), axis=0), np.sum(np.where(np.isfinite(z), z, 0.), axis=0),
                  np.inf)


def log_profile(scores: np.ndarray) -> np.ndarray:
  """(B, S): each input's log residuals across σ, for scores (S, B); +inf where a score is not finite or
  not positive (never produced by finite inputs: a residual is a sum of squares)."""
  scores = np.asarray(scores, np.float64).T
  with np.errstate(divide='ignore', invalid='ignore'):
    logs = np.log(scores)
  return np.where(np.isfinite(logs), logs, np.inf)


def _ridged_precision(cov: np.ndarray) -> np.ndarray:
  """inv(cov + 1e-3 · mean variance · I), batched over leading axes of cov (..., S, S)."""
  dims = cov.shape[-1]
  ridge = 1e-3 * np.maximum(np.trace(cov, axis1=-2, axis2=-1) / dims, 1e-12)
  return np.linalg.inv(cov + ridge[..., None, None] * np.eye(dims))


def profile_moments(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The clean log profiles' mean (S,) and precision (S, S), for calibration scores (S, n).

  The residuals at neighbouring σ are strongly correlated (0.8–0.98 on digits), so the covariance is
  nearly singular: a ridge of 1e-3 of its mean variance keeps the precision finite. With n ≤ S profiles
  there is no covariance to estimate: the diagonal of the variances (or the identity for n = 1) is used.
  """
  profiles = log_profile(scores)
  if not np.all(np.isfinite(profiles)):
    raise ValueError('calibration scores must be finite and positive (clean data).')
  n, dims = profiles.shape
  mean = profiles.mean(axis=0)
  if n == 1:
    return mean, np.eye(dims)
  cov = np.atleast_2d(np.cov(profiles, rowvar=False))
  if n <= dims:
    cov = np.diag(np.diag(cov))
  return mean, _ridged_precision(cov)


def profile_score(scores: np.ndarray, mean: Sequence[float], precision: Sequence[Sequence[float]]) -> np.ndarray:
  """(B,): (p - m)ᵀ P (p - m) for each input's log profile p across σ (scores (S, B)), with the clean
  calibration's mean m and precision P; +inf where any residual is not finite."""
  profiles = log_profile(scores)
  finite = np.all(np.isfinite(profiles), axis=1)
  centred = np.where(finite[:, None], profiles - np.asarray(mean, np.float64), 0.)
  distance = np.einsum('bi,ij,bj->b', centred, np.asarray(precision, np.float64), centred)
  return np.where(finite, distance, np.inf)


def leave_one_out_profile_scores(scores: np.ndarray) -> np.ndarray:
  """(n,): each calibration input's profile score under the moments of the other n - 1.

  The threshold is an order statistic of these, not of the in-sample distances: a fresh input is scored
  by moments it did not shape, and in-sample distances are smaller (by about S / n on average), so a
  threshold on them would reject more than 1 - q of fresh clean inputs. Without input i the scatter
  matrix is the full one less n/(n-1) (p_i - m)(p_i - m)ᵀ, so all n covariances come in one pass.
  """
  profiles = log_profile(scores)
  n, dims = profiles.shape
  if n <= dims + 1:
    return profile_score(scores, *profile_moments(scores))
  mean = profiles.mean(axis=0)
  centred = profiles - mean
  scatter = centred.T @ centred
  outer = centred[:, :, None] * centred[:, None, :]
  covs = (scatter[None] - n / (n - 1) * outer) / (n - 2)
  loo_centred = centred * n / (n - 1)  # p_i minus the mean of the others
  return np.einsum('bi,bij,bj->b', loo_centred, _ridged_precision(covs), loo_centred)


@dataclasses.dataclass
class Calibration:
  """A detector's threshold and what it was computed from; saved beside its checkpoint as JSON.

  ``threshold`` applies to the single-σ score at ``sigma``; ``fused_threshold`` to ``fused_score`` over
  ``sigmas`` with ``sigma_means`` / ``sigma_stds``; ``profile_threshold`` to ``profile_score`` with
  ``profile_mean`` / ``profile_precision`` (absent, None, from calibrations made before it existed).
  """
  threshold: float
  percentile: float
  sigma: float
  num_draws: int
  num_examples: int
  config_hash: str
  sigmas: list[float]
  sigma_means: list[float]
  sigma_stds: list[float]
  fused_threshold: float
  checkpoint_step: int | None = None
  split: str = ''
  profile_mean: list[float] | None = None
  profile_precision: list[list[float]] | None = None
  profile_threshold: float | None = None

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def calibrate(scores: np.ndarray, sigmas: Sequence[float], sigma: float, percentile: float, num_draws: int,
              config_hash: str, **meta: Any) -> Calibration:
  """The calibration of clean held-out scores (S, n) at ``sigmas`` (``sigma`` among them)."""
  scores = np.asarray(scores, np.float64)
  sigmas = [float(s) for s in sigmas]
  if scores.ndim != 2 or scores.shape[0] != len(sigmas):
    raise ValueError(f'scores must be (len(sigmas)={len(sigmas)}, n), got {scores.shape}.')
  primary = sigma_index(sigmas, sigma)
  single = threshold_at(scores[primary], percentile)
  means, stds = scores.mean(axis=1), scores.std(axis=1, ddof=1) if scores.shape[1] > 1 else np.ones(len(sigmas))
  stds = np.where(stds > 0, stds, 1.)
  fused = threshold_at(fused_score(scores, means, stds), percentile)
  profile_mean, precision = profile_moments(scores)
  profile = threshold_at(leave_one_out_profile_scores(scores), percentile)
  return Calibration(threshold=single, percentile=float(percentile), sigma=float(sigma),
                     num_draws=int(num_draws), num_examples=int(scores.shape[1]), config_hash=config_hash,
                     sigmas=sigmas, sigma_means=[float(m) for m in means], sigma_stds=[float(s) for s in stds],
                     fused_threshold=fused, profile_mean=[float(m) for m in profile_mean],
                     profile_precision=[[float(v) for v in row] for row in precision],
                     profile_threshold=profile, **meta)


def sigma_index(sigmas: Sequence[float], sigma: float) -> int:
  """Where ``sigma`` is in ``sigmas`` (relative tolerance 1e-6); ValueError naming both otherwise."""
  for i, s in enumerate(sigmas):
    if abs(float(s) - float(sigma)) <= 1e-6 * abs(float(sigma)):
      return i
  raise ValueError(f'the QA noise level sigma={sigma} is not among sigmas={list(sigmas)}.')


def save_calibration(path: str, calibration: Calibration) -> None:
  resumable.atomic_write(path, lambda f: f.write(calibration.to_json().encode()))


def load_calibration(path: str) -> Calibration:
  with open(path, encoding='utf-8') as f:
    fields = json.load(f)
  known = {f.name for f in dataclasses.fields(Calibration)}
  required = {f.name for f in dataclasses.fields(Calibration)
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
  problem = ('not a JSON object' if not isinstance(fields, dict) else
             f'unexpected fields {sorted(set(fields) - known)}' if set(fields) - known else
             f'missing fields {sorted(required - set(fields))}' if required - set(fields) else '')
  if problem:
    raise ValueError(f'{path} is not a QA calibration written by this version ({problem}); re-run '
                     '--mode=qa_calibrate.')
  return Calibration(**fields)


def decide(score: np.ndarray, non_finite: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """Per input: ('accept' | 'reject', reason), non-finite inputs rejected whatever their score."""
  score = np.asarray(score, np.float64)
  non_finite = np.asarray(non_finite, bool)
  above = ~(score <= threshold)  # a NaN score (never produced here) would count as above
  reason = np.where(non_finite, REASON_NON_FINITE, np.where(above, REASON_ABOVE, REASON_WITHIN))
  decision = np.where(non_finite | above, REJECT, ACCEPT)
  return decision, reason
