"""What one likelihood ODE evaluation costs, and how many the time variable needs.

Part 1 (``--part=eval``): the probability-flow drift of a network (default the CIFAR-shaped DDPM++ at
nf 32, random init, batch 4) timed alone and with the divergence probe product three ways: ``jax.linearize``
then one JVP (what the likelihood's vector field does), ``jax.jvp``, and ``jax.vjp`` (the reference's
autograd formulation, grad of ε·f). Medians of interleaved calls, printed as ratios to the forward pass.

Part 2 (``--part=time``): the adaptive likelihood solve (Dopri5 + PID, one Rademacher probe) of a 64-D
Gaussian mixture with its exact score under VP, sub-VP and VE, in the time t and in the log
noise-to-signal ratio u = log(σ(t)/a(t)); mean/max NFE and the bits/dim error against rtol = atol = 1e-8.

Part 3 (``--part=solvers``): fewer evaluations from the solver and tolerance. ``likelihood.get_log_likelihood_fn``
(the library's solve: per-example adaptive steps, one Rademacher probe, eps = 1e-5) with each adaptive
solver of ``ode_solvers.SOLVERS`` at rtol = atol ∈ {1e-5, 1e-4, 1e-3}: mean/max NFE, wall time of the
batch, and the bits/dim error against Dopri8 at 1e-8 (mixture) / 1e-6 (network), same probes: the
largest per example and that of the batch's mean. On the
64-D mixture (exact score) under VP, sub-VP and VE, and, with ``--workdir`` (a digits checkpoint of
``--digits_config``, e.g. ``make demo``'s runs/digits_ve), on 32 uniformly dequantized test digits through
the trained network.

Part 4 (``--part=control``, needs ``--workdir``): fewer evaluations at the same tolerance from the step-size
control. On the same 32 digits, Dopri5 at rtol = atol = ``--control_tol`` solved by diffrax on the joint state
(the library's solve before 2026-12-07, ``ode_solvers.solve_with_quadrature`` now takes the same steps), its
``diffrax.PIDController`` replaced by one with other coefficients (I: the default; PI settings from
diffrax's guide) or another error norm (RMS over image and log-density, the default; the max of the
image's RMS and the log-density's error, so that it is not one of D + 1 components; the log-density
alone; the max over all components); then the default control at looser tolerances.

  .venv/bin/python benchmarks/likelihood_cost.py [--part=eval|time|solvers|control|both] [--config=vp.cifar10_ddpmpp_continuous]
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
import time

from absl import app
from absl import flags
import diffrax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scoresde import checkpointing  # pylint: disable=g-import-not-at-top
from scoresde import datasets
from scoresde import gaussian_mixture
from scoresde import likelihood
from scoresde import likelihood_weighting
from scoresde import ode_solvers
from scoresde import sde_lib
from scoresde.models import utils as mutils

FLAGS = flags.FLAGS
flags.DEFINE_enum('part', 'both', ['eval', 'time', 'solvers', 'control', 'both'],
                  'Which measurement to run (both: eval and time).')
flags.DEFINE_string('workdir', '', 'Part 3: a trained digits workdir (e.g. runs/digits_ve).')
flags.DEFINE_string('digits_config', 've.digits_ncsnpp_continuous', 'Part 3: configs.<this> of --workdir.')
flags.DEFINE_bool('mixture', True, 'Part 3: include the 64-D mixture rows.')
flags.DEFINE_float('control_tol', 1e-5, 'Part 4: rtol = atol of the step-size control variants.')
flags.DEFINE_list('control_looser', ['2e-5', '3e-5', '5e-5', '1e-4'], 'Part 4: looser tolerances, default control.')
flags.DEFINE_string('config', 'vp.cifar10_ddpmpp_continuous', 'configs.<this> for part 1.')
flags.DEFINE_integer('nf', 32, 'model.nf for part 1.')
flags.DEFINE_integer('batch', 4, 'Batch of part 1.')
flags.DEFINE_integer('repeats', 5, 'Timed calls per function in part 1.')


def eval_cost() -> None:
  config = importlib.import_module(f'configs.{FLAGS.config}').get_config()
  config.model.nf = FLAGS.nf
  sde = sde_lib.get_sde(config)
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  drift_of = sde.reverse(mutils.network_score_fn(config, sde, model, variables), probability_flow=True)
  shape = (FLAGS.batch, config.data.image_size, config.data.image_size, config.data.num_channels)
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  probe = jax.random.rademacher(jax.random.PRNGKey(2), shape, jnp.float32)
  t = jnp.full((FLAGS.batch,), 0.5)

  def drift(v):
    return drift_of.sde(v, t)[0]

  def linearized(v, q):
    value, jvp = jax.linearize(drift, v)
    return value, jnp.sum(jvp(q) * q)

  def forward_mode(v, q):
    value, tangent = jax.jvp(drift, (v,), (q,))
    return value, jnp.sum(tangent * q)

  def reverse_mode(v, q):
    value, vjp = jax.vjp(drift, v)
    return value, jnp.sum(vjp(q)[0] * q)

  fns = {'forward': jax.jit(lambda v, q: drift(v)), 'linearize + JVP': jax.jit(linearized),
         'jvp': jax.jit(forward_mode), 'vjp (reference)': jax.jit(reverse_mode)}
  for fn in fns.values():
    jax.block_until_ready(fn(x, probe))
  times = {name: [] for name in fns}
  for _ in range(FLAGS.repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x, probe))
      times[name].append(time.perf_counter() - start)
  base = np.median(times['forward'])
  print(f'{FLAGS.config} nf {FLAGS.nf} batch {FLAGS.batch}, load average {os.getloadavg()[0]:.1f}')
  print('| what | median ms | time / forward |\n|---|---|---|')
  for name, values in times.items():
    print(f'| {name} | {np.median(values) * 1e3:.1f} | {np.median(values) / base:.2f} |')


def _solve(sde, score_fn, x, probes, variable: str, tol: float, eps: float = 1e-5, **controller):
  """(log p (B,), NFE (B,)) by the probability-flow ODE in t or in u = log ρ(t), solved by diffrax's
  Dopri5 on the joint state with ``diffrax.PIDController(rtol=tol, atol=tol, **controller)``."""
  drift_of = sde.reverse(score_fn, probability_flow=True)
  bounds = (eps, sde.T)
  if variable == 'log_snr':
    bounds = tuple(likelihood_weighting.log_noise_to_signal(sde, jnp.full((1,), b))[0] for b in bounds)

  def one(xi, probe):
    def field(s, state, args):
      del args
      y, _ = state
      t, dt_ds = s, 1.
      if variable == 'log_snr':  # dt/du = 2 s(t)² / g(t)², since d log ρ / dt = g² / (2 s²)
        t = sde.time_of_noise_to_signal(jnp.exp(s))
        g = sde.sde(jnp.zeros((1,)), jnp.reshape(t, (1,)))[1]
        std = sde.marginal_coeffs(jnp.reshape(t, (1,)))[1]
        dt_ds = (2. * std**2 / g**2)[0]
      value, jvp = jax.linearize(lambda v: drift_of.sde(v[None], jnp.reshape(t, (1,)))[0][0], y)
      return value * dt_ds, jnp.sum(jvp(probe) * probe) * dt_ds
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(field), diffrax.Dopri5(), t0=bounds[0], t1=bounds[1], dt0=None,
        y0=(xi, jnp.zeros(())), stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol, **controller),
        saveat=diffrax.SaveAt(t1=True), max_steps=20_000)
    return solution.ys[0][0], solution.ys[1][0], solution.stats['num_steps']
  z, delta, steps = jax.jit(jax.vmap(one))(x, probes)
  return sde.prior_logp(z) + delta, 6 * steps + 1


def time_variable() -> None:
  print('| SDE | rtol = atol | time variable | NFE mean | NFE max | max bits/dim error |\n|---|---|---|---|---|---|')
  for name, sde in (('VP', sde_lib.VPSDE(0.1, 20., 1000)), ('sub-VP', sde_lib.subVPSDE(0.1, 20., 1000)),
                    ('VE', sde_lib.VESDE(0.01, 50., 1000))):
    data = gaussian_mixture.default_mixture(64, separation=1., std=0.3)
    score = gaussian_mixture.isotropic_score_fn(sde, data)
    x = data.sample(jax.random.PRNGKey(0), 16)
    probes = jax.random.rademacher(jax.random.PRNGKey(1), x.shape, jnp.float32)
    exact, _ = _solve(sde, score, x, probes, 't', 1e-8)
    for tol in (1e-5, 1e-4, 1e-3):
      for variable in ('t', 'log_snr'):
        logp, nfe = _solve(sde, score, x, probes, variable, tol)
        error = float(jnp.max(jnp.abs(logp - exact))) / (x.shape[1] * math.log(2.))
        print(f'| {name} | {tol:g} | {variable} | {float(jnp.mean(nfe)):.0f} | {int(jnp.max(nfe))} | '
              f'{error:.2e} |', flush=True)


SOLVER_TOLERANCES = (1e-5, 1e-4, 1e-3)


def _library_solve(sde, score_fn, x, method: str, tol: float) -> tuple[np.ndarray, np.ndarray, float]:
  """(log p (B,) float64, NFE (B,), seconds of the compiled second call) by ``likelihood``'s own solve."""
  fn = likelihood.get_log_likelihood_fn(sde, 'rademacher', num_probes=1, rtol=tol, atol=tol, eps=1e-5,
                                        method=method, max_steps=20_000)
  (logp, _, nfe), seconds = _second_call(fn, jax.random.PRNGKey(1), score_fn, x)
  return np.asarray(logp, np.float64), np.asarray(nfe), seconds


def _second_call(fn, *args):
  """(fn(*args), seconds of that call), timed after a first, compiling call."""
  # Blocks on the compiling call too: otherwise its execution, still running asynchronously, is timed
  # with the second (it was before 2026-12-07: BENCHMARKS.md's solver seconds of 2026-12-02 are ~2x).
  jax.block_until_ready(fn(*args))
  started = time.perf_counter()
  result = jax.block_until_ready(fn(*args))
  return result, time.perf_counter() - started


def _errors(logp: np.ndarray, exact: np.ndarray, dims: int) -> str:
  """'largest per-example error | error of the mean', in bits/dim."""
  error = float(np.max(np.abs(logp - exact))) / (dims * math.log(2.))
  mean_error = abs(float(np.mean(logp - exact))) / (dims * math.log(2.))
  return f'{error:.1e} | {mean_error:.1e}'


def _solver_rows(name: str, sde, score_fn, x, reference_tol: float, methods) -> None:
  """One table row per (solver, tolerance): NFE, seconds and bits/dim errors on x against Dopri8: the
  largest per example, and that of the mean over the examples (what a test-set figure would show)."""
  dims = math.prod(x.shape[1:])
  exact, exact_nfe, exact_seconds = _library_solve(sde, score_fn, x, 'dopri8', reference_tol)
  print(f'| {name} | dopri8 (reference) | {reference_tol:g} | {exact_nfe.mean():.0f} | {exact_nfe.max()} | '
        f'{exact_seconds:.2f} | 0 | 0 |', flush=True)
  for method in methods:
    for tol in SOLVER_TOLERANCES:
      logp, nfe, seconds = _library_solve(sde, score_fn, x, method, tol)
      print(f'| {name} | {method} | {tol:g} | {nfe.mean():.0f} | {nfe.max()} | {seconds:.2f} | '
            f'{_errors(logp, exact, dims)} |', flush=True)


def _digits_problem():
  """(sde, score_fn, 32 uniformly dequantized test digits, step) of the ``--workdir`` checkpoint."""
  config = importlib.import_module(f'configs.{FLAGS.digits_config}').get_config()
  sde = sde_lib.get_sde(config)
  variables, step = checkpointing.load_variables(config, FLAGS.workdir, ema=True)
  score_fn = mutils.network_score_fn(config, sde, mutils.create_model(config), variables)
  test = datasets.digits_split_indices('test')[:32]
  levels = np.asarray(datasets._digits_raw()[test])  # pylint: disable=protected-access
  u = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), levels.shape))
  x = datasets.get_data_scaler(config)(((levels + u) / datasets.DIGITS_NUM_LEVELS)[..., None].astype(np.float32))
  return sde, score_fn, jnp.asarray(x), step


def _image_and_density_norm(tree) -> jax.Array:
  """max(RMS of the image's scaled error, |the log-density's|): the density is not 1 of D + 1 parts."""
  image, density = tree
  return jnp.maximum(jnp.sqrt(jnp.mean(image**2)), jnp.abs(density))


def _max_norm(tree) -> jax.Array:
  return jnp.maximum(jnp.max(jnp.abs(tree[0])), jnp.abs(tree[1]))


CONTROLS = (
    ('I (default), RMS norm', {}),
    ('PI 0.4 / 0.3', dict(pcoeff=0.4, icoeff=0.3)),
    ('PI 0.3 / 0.3', dict(pcoeff=0.3, icoeff=0.3)),
    ('PI 0.2 / 0.4', dict(pcoeff=0.2, icoeff=0.4)),
    ('I, max(image RMS, log-density)', dict(norm=_image_and_density_norm)),
    ('I, log-density only', dict(norm=lambda tree: jnp.abs(tree[1]))),
    ('I, max norm', dict(norm=_max_norm)),
)


def control() -> None:
  if not FLAGS.workdir:
    raise app.UsageError('--part=control needs --workdir (a trained digits checkpoint).')
  sde, score_fn, x, step = _digits_problem()
  dims = math.prod(x.shape[1:])
  exact, exact_nfe, _ = _library_solve(sde, score_fn, x, 'dopri8', 1e-6)
  print(f'digits NCSN++ step {step}, 32 test digits; errors against Dopri8 at 1e-6 ({exact_nfe.mean():.0f} NFE), '
        f'load {os.getloadavg()[0]:.1f}')
  print('| step-size control | rtol = atol | NFE mean | NFE max | seconds | max bits/dim error | error of the mean |\n'
        '|---|---|---|---|---|---|---|')
  rows = [(label, kwargs, FLAGS.control_tol) for label, kwargs in CONTROLS]
  rows += [(CONTROLS[0][0], {}, float(tol)) for tol in FLAGS.control_looser]
  # The probes of _library_solve's rng.
  probes = likelihood._draw_probes(  # pylint: disable=protected-access
      jax.random.PRNGKey(1), 'rademacher', x.shape, 1)[:, 0]
  for label, kwargs, tol in rows:
    solve = jax.jit(functools.partial(_solve, sde, score_fn, variable='t', tol=tol, **kwargs))
    (logp, nfe), seconds = _second_call(solve, x, probes)
    logp, nfe = np.asarray(logp, np.float64), np.asarray(nfe)
    print(f'| {label} | {tol:g} | {nfe.mean():.0f} | {nfe.max()} | {seconds:.1f} | {_errors(logp, exact, dims)} |',
          flush=True)


def solvers() -> None:
  print('| data | solver | rtol = atol | NFE mean | NFE max | seconds | max bits/dim error | error of the mean |\n'
        '|---|---|---|---|---|---|---|---|')
  every = [m for m in ode_solvers.SOLVERS if m != 'rk45']  # rk45 is dopri5's other name
  for name, sde in (('VP', sde_lib.VPSDE(0.1, 20., 1000)), ('sub-VP', sde_lib.subVPSDE(0.1, 20., 1000)),
                    ('VE', sde_lib.VESDE(0.01, 50., 1000))) if FLAGS.mixture else ():
    data = gaussian_mixture.default_mixture(64, separation=1., std=0.3)
    x = data.sample(jax.random.PRNGKey(0), 16)
    _solver_rows(f'64-D mixture, {name}, exact score', sde, gaussian_mixture.isotropic_score_fn(sde, data), x, 1e-8,
                 every)
  if FLAGS.workdir:
    sde, score_fn, x, step = _digits_problem()
    # Not tighter: the float32 network's rounding keeps an error estimate from falling much below 1e-6,
    # and a solve at 1e-7 runs into its step limit.
    # Bosh3 (third order) is left out: on the mixtures it needs 2-3x Dopri5's evaluations at 1e-5.
    _solver_rows(f'digits NCSN++ (step {step}), 32 test digits', sde, score_fn, x, 1e-6,
                 ('dopri5', 'tsit5', 'dopri8'))


def main(argv):
  del argv
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, {time.strftime("%Y-%m-%d")}')
  if FLAGS.part in ('eval', 'both'):
    eval_cost()
  if FLAGS.part in ('time', 'both'):
    time_variable()
  if FLAGS.part == 'solvers':
    solvers()
  if FLAGS.part == 'control':
    control()


if __name__ == '__main__':
  app.run(main)
