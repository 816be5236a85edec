"""What one likelihood ODE evaluation costs, and how many the time variable needs.

Part 1 (``--part=eval``): the probability-flow drift of a network (default the CIFAR-shaped DDPM++ at
nf 32, random init, batch 4) timed alone and with the divergence probe product three ways: ``jax.linearize``
then one JVP (what ``likelihood._drift_and_divergence`` does), ``jax.jvp``, and ``jax.vjp`` (the reference's
autograd formulation, grad of ε·f). Medians of interleaved calls, printed as ratios to the forward pass.

Part 2 (``--part=time``): the adaptive likelihood solve (Dopri5 + PID, one Rademacher probe) of a 64-D
Gaussian mixture with its exact score under VP, sub-VP and VE, in the time t and in the log
noise-to-signal ratio u = log(σ(t)/a(t)); mean/max NFE and the bits/dim error against rtol = atol = 1e-8.

  .venv/bin/python benchmarks/likelihood_cost.py [--part=eval|time|both] [--config=vp.cifar10_ddpmpp_continuous]
"""

from __future__ import annotations

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

from scoresde import gaussian_mixture  # pylint: disable=g-import-not-at-top
from scoresde import likelihood_weighting
from scoresde import sde_lib
from scoresde.models import utils as mutils

FLAGS = flags.FLAGS
flags.DEFINE_enum('part', 'both', ['eval', 'time', 'both'], 'Which measurement to run.')
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


def _solve(sde, score_fn, x, probes, variable: str, tol: float, eps: float = 1e-5):
  """(log p (B,), NFE (B,)) by the probability-flow ODE in t or in u = log ρ(t)."""
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
        y0=(xi, jnp.zeros(())), stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
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


def main(argv):
  del argv
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, {time.strftime("%Y-%m-%d")}')
  if FLAGS.part in ('eval', 'both'):
    eval_cost()
  if FLAGS.part in ('time', 'both'):
    time_variable()


if __name__ == '__main__':
  app.run(main)
