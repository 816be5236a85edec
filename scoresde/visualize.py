"""The toy lab (``--mode=visualize`` on the 2-D 'gmm' configs): score fields, their errors and Langevin.

PNGs written with PIL (no plotting library), each with the number it illustrates in ``summary.json``:

- ``score_field.png``: the score as arrows over the density p_t, the learned score (a checkpoint of
  ``workdir``) above the exact one (``gaussian_mixture``), at several t.
- ``error_field.png``: ‖s_θ(x, t) − ∇ log p_t(x)‖ as a heat map, titled with its p_t-weighted mean
  E_{p_t}‖s_θ − ∇ log p_t‖ (Monte Carlo over p_t), the quantity the likelihood weighting integrates.
- ``langevin.png``: plain Langevin dynamics at one noise level versus annealed Langevin (Song & Ermon
  2019, "Generative Modeling by Estimating Gradients of the Data Distribution", Sec. 3.2 and Alg. 1) on
  their mixture ⅕ N((−5,−5), I) + ⅘ N((5,5), I), both with the exact scores: the score of a mixture of
  separated modes does not see their weights where they do not overlap, so plain Langevin leaves each
  chain in the basin it started in (weights about ½/½), while annealing through large σ, where the modes
  overlap, recovers the weights. The measured weight error of each is reported.

- ``score_matching.png``: one density (the mixture perturbed by σ = 0.3) learned by a small MLP with
  denoising score matching (Vincent 2011), sliced score matching with and without variance reduction
  (Song, Garg, Shi, Ermon 2019) and exact score matching (Hyvärinen 2005, exact Jacobian trace in 2-D),
  each captioned with its Fisher divergence E_p‖s_θ − ∇ log p‖² to the truth.

- ``trajectories.png``: every sampler (PC, the probability-flow ODE, Heun, DPM-Solver++(2M), EDM's
  stochastic sampler) run on ``score_fn`` from the same prior points, drawn through the states at which
  it evaluated the score. Captioned with its evaluations (NFE) and the mean distance of its end points
  from the ODE's: the deterministic solvers discretise the same probability-flow map and land near the
  ODE's end points; the stochastic ones do not (their noise moves the samples between modes).
"""

from __future__ import annotations

import json
import os

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from PIL import ImageDraw

from scoresde import fast_samplers
from scoresde import gaussian_mixture
from scoresde import losses
from scoresde import sampling
from scoresde import sde_lib

Array = jax.Array

PANEL = 240  # pixels per panel side
ARROWS = 17  # arrows per panel side
TITLE = 28  # pixels above each panel for its caption
TIMES = (0.01, 0.1, 0.3, 0.7)  # fractions of T at which fields are shown
ERROR_SAMPLES = 4096  # Monte-Carlo draws of p_t for the weighted error
# Song & Ermon 2019 (Fig. 3): unequal weights, modes far apart relative to their width.
LANGEVIN_MIXTURE = dict(weights=[0.2, 0.8], means=[[-5., -5.], [5., 5.]], stds=[1., 1.])
LANGEVIN_SIGMAS = (10., 0.1)  # annealed: σ_1 > ... > σ_L geometric; plain Langevin runs at σ ≈ 0
LANGEVIN_LEVELS, LANGEVIN_STEPS, LANGEVIN_EPS = 10, 100, 5e-3  # L, T per level, ε (Alg. 1)
LANGEVIN_CHAINS = 4096
SM_SIGMA, SM_WIDTH, SM_STEPS, SM_BATCH, SM_LR = 0.3, 64, 2000, 256, 3e-3  # the objectives' comparison
TRAJECTORIES, TRAJECTORY_STEPS = 12, 18  # prior points; time points of the fixed-step samplers
TRAJECTORY_EPS = 1e-3  # the samplers' end time (config.sampling.eps of the toy configs)
_TRAJECTORY_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                       (140, 86, 75), (227, 119, 194), (90, 90, 90), (188, 189, 34), (23, 190, 207)]
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
  """[0, 1] → uint8 RGB along (an approximation of) viridis."""
  position = np.clip(values, 0., 1.) * (len(_VIRIDIS) - 1)
  low = np.minimum(position.astype(int), len(_VIRIDIS) - 2)
  frac = (position - low)[..., None]
  return np.round(_VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac).astype(np.uint8)


def extent_of(mixture: gaussian_mixture.GaussianMixture) -> float:
  """Half-width of a square holding every mode to 3.5 standard deviations."""
  stds = np.sqrt(np.asarray(mixture.covs)[:, 0, 0])
  return float(np.max(np.abs(np.asarray(mixture.means)) + 3.5 * stds[:, None]))


def grid(extent: float, n: int) -> np.ndarray:
  """(n*n, 2) pixel or cell centres of [−extent, extent]², rows from the top (y decreasing)."""
  centres = (np.arange(n) + 0.5) / n * 2 * extent - extent
  xs, ys = np.meshgrid(centres, centres[::-1])
  return np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)


def _to_pixel(points: np.ndarray, extent: float) -> np.ndarray:
  return np.stack([(points[:, 0] + extent) / (2 * extent) * PANEL,
                   (extent - points[:, 1]) / (2 * extent) * PANEL], -1)


def density_panel(mixture: gaussian_mixture.GaussianMixture, extent: float) -> Image.Image:
  """p on [−extent, extent]² in light shades of the colormap (square-root scaled)."""
  density = np.exp(np.asarray(mixture.log_prob(jnp.asarray(grid(extent, PANEL))))).reshape(PANEL, PANEL)
  shade = np.sqrt(density / density.max())
  rgb = 255 - (255 - colormap(shade).astype(np.float64)) * 0.6 * shade[..., None]
  return Image.fromarray(rgb.astype(np.uint8))


def draw_arrows(panel: Image.Image, points: np.ndarray, vectors: np.ndarray, extent: float) -> None:
  """Arrows of direction ``vectors`` at ``points``, longest one cell: lengths scaled by the 90th
  percentile of the norms (the field's scale varies by orders of magnitude between t)."""
  draw = ImageDraw.Draw(panel)
  norms = np.linalg.norm(vectors, axis=-1)
  reference = max(np.percentile(norms, 90), 1e-12)
  length = 0.9 * PANEL / ARROWS * np.minimum(norms / reference, 1.)
  direction = vectors / np.maximum(norms, 1e-12)[:, None] * np.array([1., -1.])  # pixel y points down
  for start, d, l in zip(_to_pixel(points, extent), direction, length):
    end = start + d * l
    draw.line([tuple(start), tuple(end)], fill=(20, 20, 20), width=1)
    for angle in (2.6, -2.6):
      rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
      draw.line([tuple(end), tuple(end + 0.35 * l * rotation @ d)], fill=(20, 20, 20), width=1)


def compose(panels: list[list[Image.Image]], captions: list[list[str]], path: str) -> None:
  """Writes rows of equally sized panels, each under its caption, as one PNG."""
  rows, cols = len(panels), len(panels[0])
  figure = Image.new('RGB', (cols * (PANEL + 8) + 8, rows * (PANEL + TITLE + 8) + 8), 'white')
  draw = ImageDraw.Draw(figure)
  for r, (row, row_captions) in enumerate(zip(panels, captions)):
    for c, (panel, caption) in enumerate(zip(row, row_captions)):
      left, top = 8 + c * (PANEL + 8), 8 + r * (PANEL + TITLE + 8)
      for i, line in enumerate(caption.split('\n')[:2]):
        draw.text((left, top + 12 * i), line, fill='black')
      figure.paste(panel.resize((PANEL, PANEL)), (left, top + TITLE))
  figure.save(path)


def weighted_error(rng: Array, score_fn: sde_lib.ScoreFn, exact_fn: sde_lib.ScoreFn, sde: sde_lib.SDE,
                   data: gaussian_mixture.GaussianMixture, t: float, n: int = ERROR_SAMPLES) -> float:
  """E_{x ~ p_t}‖s_θ(x, t) − ∇ log p_t(x)‖ by Monte Carlo over n draws of p_t."""
  x = gaussian_mixture.marginal(sde, data, t).sample(rng, n)
  times = jnp.full((n,), t, jnp.float32)
  return float(jnp.mean(jnp.linalg.norm(score_fn(x, times) - exact_fn(x, times), axis=-1)))


def field_figures(rng: Array, score_fn: sde_lib.ScoreFn, sde: sde_lib.SDE,
                  data: gaussian_mixture.GaussianMixture, out_dir: str) -> dict[str, float]:
  """``score_field.png`` and ``error_field.png``; returns {t: p_t-weighted error}."""
  exact_fn = gaussian_mixture.isotropic_score_fn(sde, data)
  field_rows, field_captions, error_row, error_captions, errors = [[], []], [[], []], [], [], {}
  for i, fraction in enumerate(TIMES):
    t = fraction * sde.T
    marginal = gaussian_mixture.marginal(sde, data, t)
    extent = extent_of(marginal)
    points = grid(extent, ARROWS)
    times = jnp.full((points.shape[0],), t, jnp.float32)
    for row, fn, name in ((0, score_fn, 'learned'), (1, exact_fn, 'exact')):
      panel = density_panel(marginal, extent)
      draw_arrows(panel, points, np.asarray(fn(jnp.asarray(points), times)), extent)
      field_rows[row].append(panel)
      field_captions[row].append(f'{name} score, t={t:.3g}\nextent +-{extent:.3g}')
    pixels = jnp.asarray(grid(extent, PANEL))
    pixel_times = jnp.full((pixels.shape[0],), t, jnp.float32)
    error = np.asarray(jnp.linalg.norm(score_fn(pixels, pixel_times) - exact_fn(pixels, pixel_times),
                                       axis=-1)).reshape(PANEL, PANEL)
    top = max(float(np.percentile(error, 99)), 1e-12)
    error_row.append(Image.fromarray(colormap(error / top)))
    errors[f'{t:.3g}'] = weighted_error(jax.random.fold_in(rng, i), score_fn, exact_fn, sde, data, t)
    error_captions.append(f't={t:.3g}: E_pt|s-grad log pt|={errors[f"{t:.3g}"]:.3g}\n'
                          f'colour scale 0..{top:.3g}')
  compose(field_rows, field_captions, os.path.join(out_dir, 'score_field.png'))
  compose([error_row], [error_captions], os.path.join(out_dir, 'error_field.png'))
  return errors


def langevin(rng: Array, annealed: bool, chains: int = LANGEVIN_CHAINS) -> np.ndarray:
  """Final states (chains, 2) of plain or annealed Langevin on ``LANGEVIN_MIXTURE`` with exact scores,
  from U([−8, 8]²) as Song & Ermon 2019. Step α_i = ε σ_i²/σ_L² at level σ_i (their Alg. 1); plain
  Langevin takes the L·T steps of size ε at σ_min = 10⁻³ (the data score, to 10⁻⁶ relative)."""
  data = gaussian_mixture.isotropic_mixture(**LANGEVIN_MIXTURE)
  sde = sde_lib.VESDE(sigma_min=1e-3, sigma_max=LANGEVIN_SIGMAS[0], N=LANGEVIN_LEVELS)
  score = gaussian_mixture.isotropic_score_fn(sde, data)
  sigma_top, sigma_low = LANGEVIN_SIGMAS
  if annealed:
    sigmas = np.geomspace(sigma_top, sigma_low, LANGEVIN_LEVELS)
    times = sde.noise_level_time(sigmas)
  else:
    sigmas, times = np.full(LANGEVIN_LEVELS, sigma_low), np.zeros(LANGEVIN_LEVELS)
  steps = LANGEVIN_EPS * (sigmas / sigma_low)**2
  rng, init_rng = jax.random.split(rng)
  x = jax.random.uniform(init_rng, (chains, 2), minval=-8., maxval=8.)

  def level(x, inputs):
    t, step, key = inputs

    def one(i, x):
      z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
      return x + 0.5 * step * score(x, jnp.full((chains,), t, jnp.float32)) + jnp.sqrt(step) * z
    return jax.lax.fori_loop(0, LANGEVIN_STEPS, one, x), None

  inputs = (jnp.asarray(times, jnp.float32), jnp.asarray(steps, jnp.float32),
            jax.random.split(rng, LANGEVIN_LEVELS))
  return np.asarray(jax.jit(lambda x, inputs: jax.lax.scan(level, x, inputs)[0])(x, inputs))


def mode_weights(samples: np.ndarray) -> np.ndarray:
  """Fraction of samples nearest each mode of ``LANGEVIN_MIXTURE``: (K,)."""
  means = np.asarray(LANGEVIN_MIXTURE['means'])
  nearest = np.argmin(np.sum((samples[:, None] - means[None])**2, -1), axis=1)
  return np.bincount(nearest, minlength=len(means)) / len(samples)


def langevin_figure(rng: Array, out_dir: str) -> dict[str, float]:
  """``langevin.png``; returns the weight error max_k |ŵ_k − w_k| of plain and annealed Langevin."""
  data = gaussian_mixture.isotropic_mixture(**LANGEVIN_MIXTURE)
  extent = 9.
  panels, captions, result = [], [], {}
  for name, annealed in (('plain', False), ('annealed', True)):
    samples = langevin(jax.random.fold_in(rng, int(annealed)), annealed)
    weights = mode_weights(samples)
    error = float(np.max(np.abs(weights - np.asarray(LANGEVIN_MIXTURE['weights']))))
    result[f'{name}_weight_error'] = error
    result[f'{name}_weights'] = weights.tolist()
    panel = density_panel(data, extent)
    draw = ImageDraw.Draw(panel)
    for px, py in _to_pixel(samples[:1500], extent):
      draw.point((px, py), fill=(200, 30, 30))
    panels.append(panel)
    captions.append(f'{name} Langevin: weights {weights[0]:.2f}/{weights[1]:.2f}\n'
                    f'(true 0.20/0.80), error {error:.3f}')
  compose([panels], [captions], os.path.join(out_dir, 'langevin.png'))
  return result


def trajectory_samplers(sde: sde_lib.SDE, batch: int) -> dict[str, Callable]:
  """The lab's samplers for ``batch`` 2-D points, each ``sampler(rng, score_fn, z) -> (x, nfe)``: the
  paper's PC (reverse diffusion + Langevin, snr 0.16), the dopri5 probability-flow ODE, and the fast
  samplers at ``TRAJECTORY_STEPS`` time points on their 'auto' schedules, with the default configs'
  settings (edm_sde: S_churn 10, S_noise 1)."""
  shape, eps = (batch, 2), TRAJECTORY_EPS
  view = fast_samplers.EDMView(sde)

  def fixed(method: str, build: Callable[[fast_samplers.Grid], fast_samplers.Solver]) -> Callable:
    schedule = fast_samplers.resolve_schedule(fast_samplers.AUTO_SCHEDULE, method, sde)
    grid = fast_samplers.time_grid(view, schedule, TRAJECTORY_STEPS, eps, 7.)
    return sampling.get_fast_sampler(sde, shape, build(grid))
  return {
      'pc': sampling.get_pc_sampler(sde, shape, 'reverse_diffusion', 'langevin', snr=0.16, n_steps=1,
                                    probability_flow=False, denoise=True, eps=eps,
                                    langevin_per_sample=False),
      # For one point at a time: see ``trace``.
      'ode': sampling.get_ode_sampler(sde, (1, 2), rtol=1e-5, atol=1e-5, method='dopri5', eps=eps,
                                      denoise=True),
      'heun': fixed('heun', fast_samplers.heun),
      'dpm_solver++': fixed('dpm_solver++', fast_samplers.dpm_solver_2m),
      'edm_sde': fixed('edm_sde', lambda grid: fast_samplers.edm_stochastic(
          view, grid, eps, s_churn=10., s_tmin=0.05, s_tmax=50., s_noise=1.)),
  }


class _Recorder:
  """``score_fn`` recording the states it is evaluated at, by a host callback inside the compiled sampler.
  One instance serves every call of a sampler, so the sampler compiles once."""

  def __init__(self, score_fn: sde_lib.ScoreFn):
    self.score_fn = score_fn
    self.rows: list[np.ndarray] = []

  def _record(self, x) -> None:
    self.rows.append(np.asarray(x).reshape(-1, 2))

  def __call__(self, x: Array, t: Array) -> Array:
    jax.debug.callback(self._record, x)
    return self.score_fn(x, t)


def trace(sampler: Callable, rng: Array, recorder: _Recorder, z: Array) -> tuple[np.ndarray, int]:
  """The paths of ``sampler`` from the points ``z`` (B, 2): (B, n, 2), the states at which it evaluated
  the score, in order, then its sample; and its nfe.

  Each evaluation passes the recorder the batch (B, 2), except in a ``vmap`` of per-sample solves (the
  ODE sampler), where it is called once per sample with (1, 2) in an order XLA may change: trace that
  sampler with B = 1.
  """
  recorder.rows = []
  x, nfe = sampler(rng, recorder, z)
  jax.effects_barrier()
  batch = z.shape[0]
  states = np.concatenate(recorder.rows).reshape(-1, batch, 2).transpose(1, 0, 2)
  return np.concatenate([states, np.asarray(x).reshape(batch, 1, 2)], axis=1), int(nfe)


def trajectory_figure(rng: Array, score_fn: sde_lib.ScoreFn, sde: sde_lib.SDE,
                      data: gaussian_mixture.GaussianMixture, out_dir: str) -> dict[str, dict[str, float]]:
  """``trajectories.png``; returns per sampler its nfe and the mean distance of its end points from the
  ODE's (``end_distance_to_ode``)."""
  rng_z, rng_run = jax.random.split(rng)
  prior = sde.prior_sampling(rng_z, (TRAJECTORIES, 2))
  paths: dict[str, np.ndarray] = {}
  result: dict[str, dict[str, float]] = {}
  for name, sampler in trajectory_samplers(sde, TRAJECTORIES).items():
    recorder = _Recorder(score_fn)
    if name == 'ode':
      traced = [trace(sampler, rng_run, recorder, prior[i:i + 1]) for i in range(TRAJECTORIES)]
      lengths = [path.shape[1] for path, _ in traced]
      # Pad each path with its end point to a common length (the lock-step batch run would do the same).
      paths[name] = np.concatenate([np.concatenate([path, np.repeat(path[:, -1:], max(lengths) - n, 1)], 1)
                                    for (path, _), n in zip(traced, lengths)])
      nfe = max(n for _, n in traced)
    else:
      paths[name], nfe = trace(sampler, rng_run, recorder, prior)
    result[name] = {'nfe': nfe}
  extent = max(extent_of(data), float(np.max(np.abs(np.asarray(prior)))) * 1.05)
  panels, captions = [], []
  for name, name_paths in paths.items():
    distance = np.linalg.norm(name_paths[:, -1] - paths['ode'][:, -1], axis=-1)
    result[name]['end_distance_to_ode'] = float(np.mean(distance))
    panel = density_panel(data, extent)
    draw = ImageDraw.Draw(panel)
    for i, path in enumerate(name_paths):
      colour = _TRAJECTORY_COLOURS[i % len(_TRAJECTORY_COLOURS)]
      pixels = [tuple(p) for p in _to_pixel(path, extent)]
      draw.line(pixels, fill=colour, width=1)
      for (px, py), radius, fill in ((pixels[0], 2, colour), (pixels[-1], 3, (0, 0, 0))):
        draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=fill)
    panels.append(panel)
    captions.append(f'{name}: {result[name]["nfe"]} NFE\n'
                    f'end to ODE end: {result[name]["end_distance_to_ode"]:.3g}')
  compose([panels], [captions], os.path.join(out_dir, 'trajectories.png'))
  return result


class _SmallScore(nn.Module):
  """A time-free score network for the score-matching comparison: 2 → 64 → 64 → 2, swish."""

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = nn.swish(nn.Dense(SM_WIDTH)(x))
    return nn.Dense(2)(x)


def exact_sm_loss(score_fn: Callable[[Array], Array], x: Array) -> Array:
  """Hyvärinen's objective tr ∇ₓs(x) + ½‖s(x)‖² per example (Hyvärinen 2005, eq. 4), with the exact
  Jacobian trace (2 forward-mode products in 2-D)."""
  jacobians = jax.vmap(jax.jacfwd(lambda y: score_fn(y[None])[0]))(x)
  return jnp.trace(jacobians, axis1=1, axis2=2) + 0.5 * jnp.sum(score_fn(x)**2, -1)


def compare_objectives(rng: Array, steps: int = SM_STEPS) -> tuple[dict[str, float], dict[str, Callable]]:
  """The Fisher divergence E_{p_σ}‖s_θ − ∇ log p_σ‖² to the truth after training ``_SmallScore`` on
  ``gaussian_mixture.default_mixture(2)`` perturbed by σ = ``SM_SIGMA`` with each objective: DSM (Vincent
  2011), sliced score matching with and without variance reduction (Song, Garg, Shi, Ermon 2019) and
  exact score matching (Hyvärinen 2005). DSM and SSM are ``losses``' own, at one noise level (a VE SDE
  whose σ(t) stays within 10⁻⁶ of σ); same seed, steps, batch and optimizer for all. Returns the
  divergences (and the untrained network's) and the learned score functions x (B, 2) -> (B, 2)."""
  data = gaussian_mixture.default_mixture(2)
  sde = sde_lib.VESDE(sigma_min=SM_SIGMA, sigma_max=SM_SIGMA * (1 + 1e-6), N=1)
  perturbed = data.diffuse(1., SM_SIGMA)
  exact = jax.jit(perturbed.score)
  model = _SmallScore()
  rng_init, rng_eval, rng = jax.random.split(rng, 3)
  params0 = model.init(rng_init, jnp.zeros((1, 2)))
  optimizer = optax.adam(SM_LR)

  def objective(name, key, params, x0):
    score_fn = lambda y, t=None: model.apply(params, y)
    rng_z, rng_loss = jax.random.split(key)
    if name == 'dsm':
      return losses.sde_loss(rng_loss, score_fn, sde, x0, reduce_mean=False)
    if name in ('ssm', 'ssm_vr'):
      return losses.ssm_loss(rng_loss, score_fn, sde, x0, reduce_mean=False,
                             variance_reduction=name == 'ssm_vr')
    return exact_sm_loss(score_fn, x0 + SM_SIGMA * jax.random.normal(rng_z, x0.shape))

  x_eval = perturbed.sample(rng_eval, ERROR_SAMPLES)
  truth = exact(x_eval)
  result, learned = {}, {}
  for name in ('dsm', 'ssm', 'ssm_vr', 'exact_sm'):
    @jax.jit
    def train(params, key, name=name):
      def step(carry, key):
        params, opt_state = carry
        rng_x, rng_o = jax.random.split(key)
        x0 = data.sample(rng_x, SM_BATCH)
        grads = jax.grad(lambda p: jnp.mean(objective(name, rng_o, p, x0)))(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None
      return jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, steps))[0][0]
    params = train(params0, rng)
    result[name] = float(jnp.mean(jnp.sum((model.apply(params, x_eval) - truth)**2, -1)))
    learned[name] = jax.jit(lambda x, params=params: model.apply(params, x))
  result['untrained'] = float(jnp.mean(jnp.sum((model.apply(params0, x_eval) - truth)**2, -1)))
  return result, learned


def score_matching_figure(rng: Array, out_dir: str, steps: int = SM_STEPS) -> dict[str, float]:
  """``score_matching.png``: each objective's learned score over p_σ, captioned with its Fisher
  divergence, and the exact score; returns the divergences."""
  divergences, learned = compare_objectives(rng, steps)
  perturbed = gaussian_mixture.default_mixture(2).diffuse(1., SM_SIGMA)
  extent = extent_of(perturbed)
  points = grid(extent, ARROWS)
  panels, captions = [], []
  for name, fn in list(learned.items()) + [('exact', jax.jit(perturbed.score))]:
    panel = density_panel(perturbed, extent)
    draw_arrows(panel, points, np.asarray(fn(jnp.asarray(points))), extent)
    panels.append(panel)
    caption = f'Fisher divergence {divergences[name]:.3g}' if name in divergences else 'truth'
    captions.append(f'{name}, sigma={SM_SIGMA}\n{caption}')
  compose([panels], [captions], os.path.join(out_dir, 'score_matching.png'))
  return divergences


def write_figures(rng: Array, score_fn: sde_lib.ScoreFn, sde: sde_lib.SDE,
                  data: gaussian_mixture.GaussianMixture, out_dir: str, sm_steps: int = SM_STEPS) -> dict:
  """Every figure of the lab for ``score_fn`` (learned) against the exact scores of ``data``; the
  numbers also go to ``out_dir/summary.json``. ``sm_steps``: training steps of each objective."""
  os.makedirs(out_dir, exist_ok=True)
  rng_field, rng_langevin, rng_sm, rng_paths = jax.random.split(rng, 4)
  summary = {'weighted_error': field_figures(rng_field, score_fn, sde, data, out_dir),
             'trajectories': trajectory_figure(rng_paths, score_fn, sde, data, out_dir),
             'langevin': langevin_figure(rng_langevin, out_dir),
             'fisher_divergence': score_matching_figure(rng_sm, out_dir, sm_steps)}
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return summary


def visualize(config, workdir: str, checkpoint: str | int | None = None) -> str:
  """``--mode=visualize``: the lab for the checkpoint of ``workdir`` (a 2-D 'gmm' config), into
  ``workdir/visualize``; returns that directory."""
  from scoresde import checkpointing  # pylint: disable=import-outside-toplevel  (orbax only here)
  from scoresde import datasets  # pylint: disable=import-outside-toplevel
  from scoresde.models import utils as mutils  # pylint: disable=import-outside-toplevel

  if str(config.data.dataset) != 'gmm' or int(config.data.dim) != 2:
    raise ValueError(f'--mode=visualize needs the exact truth of config.data.dataset=\'gmm\' in '
                     f'config.data.dim=2, got {config.data.dataset!r} in {config.data.dim}; use '
                     'configs/{ve,vp,subvp}/toy_gmm.py.')
  variables, _ = checkpointing.load_variables(config, workdir, checkpoint)
  sde = sde_lib.get_sde(config)
  score_fn = mutils.network_score_fn(config, sde, mutils.create_model(config), variables)
  out_dir = os.path.join(workdir, 'visualize')
  write_figures(jax.random.PRNGKey(int(config.seed)), score_fn, sde, datasets.toy_mixture(2), out_dir)
  return out_dir
