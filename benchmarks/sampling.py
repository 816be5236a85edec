"""Sampler wall time, NFE, and sample quality versus NFE.

1. Quality vs NFE on the 2-D three-mode Gaussian mixture (``gaussian_mixture.default_mixture``) with its exact
   score: unbiased MMD² (Gaussian kernel) between ``--n`` samples and as many exact samples, and the
   largest errors of the mode weights and per-mode variances, for the PC sampler at N in
   {50, 100, 250, 1000} and the probability-flow ODE (Dopri5) at several tolerances, under VE
   (σ_max = 50, reverse diffusion + Langevin, the reference's VE choice) and VP (Euler-Maruyama, no
   corrector, its VP choice). The floor row is an independent exact sample set of the same size.
   (A sliced Wasserstein distance was tried first: with modes 8 apart, the sampling noise of the mode
   weights alone gave it a floor of 0.19 that hid every sampler's error.)
   The fast samplers (scoresde/fast_samplers.py) at NFE ≈ 10, 20, 35, 50, 100 under VE and VP on the same
   target, GGF at several tolerances, and the global error of the fixed-step solvers
   against the closed-form probability-flow map of Gaussian data for N = 8 ... 128 steps with the fitted
   order (float64).
2. Wall time and NFE per sampler for the digits NCSN++ (configs/ve/digits_ncsnpp_continuous.py; the
   newest checkpoint of ``--workdir`` if given, else random weights) and a CIFAR-10-shaped NCSN++
   (configs/ve/cifar10_ncsnpp_continuous.py, random weights, batch 4). Compilation (first call) is
   timed separately from a second, timed call. On a small CPU a full PC run (N = 1000) takes tens of
   minutes (digits) to hours (CIFAR-shaped), so each PC sampler runs ``--digits_steps`` /
   ``--cifar_steps`` steps of the same loop and the full run is extrapolated (printed as such).
   NCSN++ starts with a zero last layer (init_scale = 0), so random-init scores are zero and ODE step
   counts are meaningless without a trained checkpoint: the digits ODE row says which.

  .venv/bin/python benchmarks/sampling.py [--workdir=runs/digits_ve] [--skip_cifar] [--fast_only]
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import default_cifar10_configs  # pylint: disable=g-import-not-at-top
from scoresde import gaussian_mixture
from scoresde import datasets
from scoresde import fast_samplers
from scoresde import sampling
from scoresde import sde_lib
from scoresde.models import utils as mutils

FLAGS = flags.FLAGS
flags.DEFINE_integer('n', 10_000, 'Samples per Gaussian-mixture quality measurement.')
flags.DEFINE_string('workdir', None, 'Digits training workdir whose newest checkpoint to load.')
flags.DEFINE_integer('digits_batch', 16, 'Digits samples per sampler call.')
flags.DEFINE_integer('digits_steps', 20, 'PC steps actually run for the digits model.')
flags.DEFINE_integer('cifar_steps', 2, 'PC steps actually run for the CIFAR-shaped model.')
flags.DEFINE_bool('skip_cifar', False, 'Skip the CIFAR-shaped model.')
flags.DEFINE_bool('skip_models', False, 'Only run the Gaussian-mixture quality sweep.')
flags.DEFINE_bool('skip_mixture', False, 'Skip the Gaussian-mixture quality sweep.')
flags.DEFINE_bool('digits_fid', False, 'Only the digits FID / IS / KID per sampler and NFE of the checkpoint in '
                  '--workdir (the demo\'s eval setting), with its plot (--plot).')
flags.DEFINE_string('plot', os.path.join(ROOT, 'assets', 'digits_fid_vs_nfe.png'),
                    'Where --digits_fid writes its FID-vs-NFE plot.')
flags.DEFINE_bool('fast_only', False, 'Only the fast samplers: their mixture sweep, convergence orders and '
                  'model timings.')


# The PC settings these benchmarks were measured with (the default config's sampling values).
_PC_SETTINGS = dict(snr=0.16, n_steps=1, probability_flow=False, denoise=True, langevin_per_sample=False)


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float = 1., chunk: int = 2000) -> float:
  """Unbiased MMD² (Gretton et al. 2012, eq. 3) with k(a, b) = exp(-‖a - b‖² / (2 h²)); 0 in
  expectation when x and y share a law."""
  def mean_kernel(a, b, same):
    total = 0.
    for i in range(0, len(a), chunk):
      d2 = np.sum((a[i:i + chunk, None] - b[None]) ** 2, axis=-1)
      total += np.exp(-d2 / (2 * bandwidth**2)).sum()
    if same:
      total -= len(a)
      return total / (len(a) * (len(a) - 1))
    return total / (len(a) * len(b))
  return float(mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2 * mean_kernel(x, y, False))


def moment_errors(x: np.ndarray, data: gaussian_mixture.GaussianMixture) -> tuple[float, float]:
  """(max |ŵ_k - w_k|, max |v̂_k / s_k² - 1|) with samples assigned to modes by responsibility."""
  labels = np.asarray(jax.vmap(data.component_log_probs)(x.astype(np.float32))).argmax(1)
  weights = np.bincount(labels, minlength=len(data.weights)) / len(x)
  variances = np.asarray(data.covs)[:, 0, 0]
  var_err = max(np.max(np.abs(x[labels == k].var(0) / variances[k] - 1))
                for k in range(len(weights)))
  return float(np.max(np.abs(weights - np.asarray(data.weights)))), float(var_err)


def _timed(sampler, *args, **kwargs):
  start = time.perf_counter()
  x, nfe = sampler(*args, **kwargs)
  x = np.asarray(x)
  return time.perf_counter() - start, x, nfe


def mixture_sweep():
  data = gaussian_mixture.default_mixture(2)
  n = FLAGS.n
  truth = np.asarray(data.sample(jax.random.PRNGKey(100), n), np.float64)
  exact = np.asarray(data.sample(jax.random.PRNGKey(101), n), np.float64)
  w_err, v_err = moment_errors(exact, data)
  print(f'\n## Gaussian mixture, {n} samples per sampler: unbiased MMD² (Gaussian kernel, h = 1) to '
        f'{n} exact samples, largest mode-weight error and largest relative variance error')
  print('| SDE | sampler | setting | NFE | MMD² (×1e4) | max Δw | max Δvar/var '
        '| time (s, incl. compile) |')
  print('|---|---|---|---|---|---|---|---|')
  print(f'| — | exact samples (floor) | — | — | {mmd2(exact, truth) * 1e4:.2f} | {w_err:.4f} | '
        f'{v_err:.3f} | — |', flush=True)
  settings = {'vesde': (lambda n_: sde_lib.VESDE(0.01, 50., n_), 'reverse_diffusion', 'langevin', 1e-5),
              'vpsde': (lambda n_: sde_lib.VPSDE(0.1, 20., n_), 'euler_maruyama', 'none', 1e-3)}

  def row(name, label, setting, sampler, score_fn):
    wall, x, nfe = _timed(sampler, jax.random.PRNGKey(0), score_fn)
    x = x.astype(np.float64)
    w_err, v_err = moment_errors(x, data)
    print(f'| {name} | {label} | {setting} | {nfe} | {mmd2(x, truth) * 1e4:.2f} | {w_err:.4f} | '
          f'{v_err:.3f} | {wall:.1f} |', flush=True)

  for name, (make, predictor, corrector, eps) in settings.items():
    for steps in (50, 100, 250, 1000):
      sde = make(steps)
      row(name, f'PC {predictor} + {corrector}', f'N = {steps}',
          sampling.get_pc_sampler(sde, (n, 2), predictor, corrector, eps=eps, **_PC_SETTINGS),
          gaussian_mixture.isotropic_score_fn(sde, data))
    sde = make(1000)
    for tol in (1e-2, 1e-3, 1e-4, 1e-5):
      row(name, 'ODE dopri5', f'rtol = atol = {tol:g}',
          sampling.get_ode_sampler(sde, (n, 2), rtol=tol, atol=tol, method='dopri5', eps=eps,
                                   denoise=False),
          gaussian_mixture.isotropic_score_fn(sde, data))


_SDES = {'vesde': (lambda n_: sde_lib.VESDE(0.01, 50., n_), 1e-5),
          'vpsde': (lambda n_: sde_lib.VPSDE(0.1, 20., n_), 1e-3),
          'subvpsde': (lambda n_: sde_lib.subVPSDE(0.1, 20., n_), 1e-3)}
# num_steps giving NFE ≈ 10, 20, 35, 50, 100: Heun and EDM-SDE 2n - 1, DPM-Solver++(2M) n, third order 3n - 2.
_FAST_STEPS = {'heun': (5, 10, 18, 25, 50), 'edm_sde': (5, 10, 18, 25, 50),
               'dpm_solver++': (10, 20, 35, 50, 100), 'dpm_solver++ (3rd order)': (4, 7, 12, 17, 34)}


def _fast_config(method: str, eps: float, **keys):
  config = default_cifar10_configs.get_default_configs()
  config.sampling.method = method.split(' ')[0]
  config.sampling.eps = eps
  if method.endswith('(3rd order)'):
    config.sampling.dpm_order = 3
  for key, value in keys.items():
    config.sampling[key] = value
  return config


def fast_mixture_sweep():
  """Rows of the fast samplers for the mixture table (same columns as ``mixture_sweep``)."""
  data = gaussian_mixture.default_mixture(2)
  n = FLAGS.n
  truth = np.asarray(data.sample(jax.random.PRNGKey(100), n), np.float64)
  exact = np.asarray(data.sample(jax.random.PRNGKey(101), n), np.float64)
  w_err, v_err = moment_errors(exact, data)
  print(f'\n## Fast samplers on the Gaussian mixture, {n} samples each (columns as above)')
  print('| SDE | sampler | setting | NFE | MMD² (×1e4) | max Δw | max Δvar/var | time (s, incl. compile) |')
  print('|---|---|---|---|---|---|---|---|')
  print(f'| — | exact samples (floor) | — | — | {mmd2(exact, truth) * 1e4:.2f} | {w_err:.4f} | '
        f'{v_err:.3f} | — |', flush=True)
  for name in ('vesde', 'vpsde'):
    make, eps = _SDES[name]
    sde = make(1000)
    score = gaussian_mixture.isotropic_score_fn(sde, data)

    def row(label, setting, sampler):
      wall, x, nfe = _timed(sampler, jax.random.PRNGKey(0), score)
      nfe = f'{nfe.mean():.0f} (max {nfe.max()})' if isinstance(nfe, np.ndarray) else nfe
      x = x.astype(np.float64)
      w_err, v_err = moment_errors(x, data)
      print(f'| {name} | {label} | {setting} | {nfe} | {mmd2(x, truth) * 1e4:.2f} | {w_err:.4f} | '
            f'{v_err:.3f} | {wall:.1f} |', flush=True)

    for method, steps in _FAST_STEPS.items():
      for num_steps in steps:
        row(method, f'num_steps = {num_steps}',
            sampling.get_sampling_fn(_fast_config(method, eps, num_steps=num_steps), sde, (n, 2)))
    for rtol in (0.2, 0.05, 0.01):
      row('ggf', f'rtol = {rtol:g}, atol = 0.0078',
          sampling.get_ggf_sampler(sde, (n, 2), atol=0.0078, rtol=rtol, h_init=0.01, eps=eps,
                                   nfe_per_sample=True))


def convergence_orders():
  """Global error of the fixed-step solvers against the closed-form probability-flow map of Gaussian
  data N((1, -0.5), 0.5² I), 16 samples, float64, EDM schedule; slope fitted over N = 8 ... 128 and 32 ...
  128."""
  steps = (8, 16, 32, 64, 128)
  mean, std = np.array([1., -0.5]), 0.5
  print('\n## Convergence order: max error vs the exact Gaussian flow, N steps (float64, ρ-schedule)')
  print('| SDE | solver | ' + ' | '.join(f'N = {k}' for k in steps) + ' | slope 8-128 | slope 32-128 |')
  print('|---|---|' + '---|' * (len(steps) + 2))
  with jax.enable_x64(True):
    for name, (make, eps) in _SDES.items():
      sde = make(1000)
      view = fast_samplers.EDMView(sde)
      score = gaussian_mixture.isotropic_score_fn(sde, gaussian_mixture.gaussian(mean, std**2 * np.eye(2)))
      (a_T, a_e), (s_T, s_e) = sde.marginal_coeffs(jax.numpy.array([sde.T, eps]))
      v_T, v_e = a_T**2 * std**2 + s_T**2, a_e**2 * std**2 + s_e**2
      x_T = a_T * mean + np.sqrt(v_T) * jax.random.normal(jax.random.PRNGKey(0), (16, 2), np.float64)
      x_e = a_e * mean + np.sqrt(v_e / v_T) * (x_T - a_T * mean)
      truth = (x_e - s_e**2 * (x_e - a_e * mean) / v_e) / a_e
      builders = {'Euler': lambda g: fast_samplers.heun(g, order=1), 'Heun': fast_samplers.heun,
                  'DPM-Solver++(2M)': fast_samplers.dpm_solver_2m,
                  'DPM-Solver-3 (data prediction)': lambda g: fast_samplers.dpm_solver_3s(view, g, eps)}
      for label, build in builders.items():
        errors = []
        for k in steps:
          solver = build(fast_samplers.time_grid(view, 'edm', k + 1, eps, 7.))
          x = jax.jit(lambda x: solver.solve(view.denoiser(score), None, x / a_T))(x_T)  # pylint: disable=cell-var-from-loop
          errors.append(float(np.max(np.abs(np.asarray(x) - np.asarray(truth)))))
        fit = lambda lo: -np.polyfit(np.log(steps[lo:]), np.log(errors[lo:]), 1)[0]
        print(f'| {name} | {label} | ' + ' | '.join(f'{e:.2e}' for e in errors) +
              f' | {fit(0):.2f} | {fit(2):.2f} |', flush=True)


def _model(module: str, workdir: str | None):
  config = importlib.import_module(module).get_config()
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  source = 'random init'
  if workdir and os.path.isdir(os.path.join(workdir, 'checkpoints')):
    from scoresde import checkpointing  # pylint: disable=import-outside-toplevel
    variables, step = checkpointing.load_variables(config, workdir)
    source = f'EMA checkpoint, step {step}'
  return config, model, variables, source


def _cut_sde(config, steps: int) -> sde_lib.SDE:
  """The config's SDE with ``steps`` discretisation steps: the same per-step work as the full one."""
  config = config.copy_and_resolve_references()
  config.model.num_scales = steps
  return sde_lib.get_sde(config)


def _bench_pc(label, config, model, variables, source, batch, samplers, steps):
  """Each PC sampler runs ``steps`` steps twice (compile + first call, then a timed call); the
  full sampler's time (N = config.model.num_scales) is the per-evaluation time times its NFE."""
  full_n = config.model.num_scales
  sde = _cut_sde(config, steps)
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  shape = (batch,) + tuple(datasets.data_shape(config))
  print(f'\n## {label}: {mutils.param_count(variables):,} parameters, {source}, batch {batch} of '
        f'{shape[1:]}; PC samplers timed over {steps} steps, full N = {full_n} extrapolated')
  print('| sampler | NFE (full) | compile + 1st call (s) | timed call (s) | ms per batched evaluation '
        '| full sampler (extrapolated) |')
  print('|---|---|---|---|---|---|')
  for name, build in samplers:
    sampler = build(sde, shape)
    first, _, _ = _timed(sampler, jax.random.PRNGKey(0), score_fn)
    wall, x, nfe = _timed(sampler, jax.random.PRNGKey(1), score_fn)
    assert np.all(np.isfinite(x))
    per_eval = wall / nfe
    full_nfe = nfe * full_n // steps
    print(f'| {name} | {full_nfe} | {first:.1f} | {wall:.1f} | {per_eval * 1e3:.0f} | '
          f'{per_eval * full_nfe / 60:.1f} min |', flush=True)


def _bench_fast(label, config, sde, shape, score_fn, inverse):
  """Wall time of the fixed-step fast samplers at their 35-evaluation settings on a network."""
  print(f'\n## {label}: fast samplers, batch {shape[0]} (compile + 1st call, then a timed call)')
  print('| sampler | NFE | compile + 1st call (s) | timed call (s) | s per sample |')
  print('|---|---|---|---|---|')
  for method, num_steps in (('heun', 18), ('dpm_solver++', 35), ('dpm_solver++ (3rd order)', 12)):
    fast = _fast_config(method, config.sampling.eps, num_steps=num_steps)
    sampler = sampling.get_sampling_fn(fast, sde, shape, inverse)
    first, _, _ = _timed(sampler, jax.random.PRNGKey(0), score_fn)
    wall, x, nfe = _timed(sampler, jax.random.PRNGKey(1), score_fn)
    assert np.all(np.isfinite(x))
    print(f'| {method} | {nfe} | {first:.1f} | {wall:.1f} | {wall / shape[0]:.2f} |', flush=True)


def fast_model_benchmarks():
  for module, batch, workdir in (('configs.ve.digits_ncsnpp_continuous', FLAGS.digits_batch, FLAGS.workdir),
                                 ('configs.ve.cifar10_ncsnpp_continuous', 4, None)):
    if 'cifar10' in module and FLAGS.skip_cifar:
      continue
    config, model, variables, source = _model(module, workdir)
    sde = sde_lib.get_sde(config)
    _bench_fast(f'{module} ({source}, {mutils.param_count(variables):,} parameters)', config, sde,
                (batch,) + tuple(datasets.data_shape(config)),
                mutils.network_score_fn(config, sde, model, variables),
                datasets.get_data_inverse_scaler(config))


# (label, config.sampling keys) of the digits study: each fixed-step sampler at NFE ≈ 10, 20, 35, 50;
# GGF at two tolerances (it chooses its NFE); PC (the default, N = 500 with a corrector: 1,000 NFE) and the
# adaptive ODE as the references.
_DIGITS_FID_SETTINGS = (
    [('pc', {'method': 'pc'}), ('ode', {'method': 'ode'})]
    + [(f'heun_{n}', {'method': 'heun', 'num_steps': n}) for n in (5, 10, 18, 25)]
    + [(f'dpm2m_{n}', {'method': 'dpm_solver++', 'num_steps': n}) for n in (10, 20, 35, 50)]
    + [(f'dpm3_{n}', {'method': 'dpm_solver++', 'dpm_order': 3, 'num_steps': n}) for n in (4, 7, 12, 17)]
    + [(f'edm_sde_{n}', {'method': 'edm_sde', 'num_steps': n}) for n in (5, 10, 18, 25)]
    + [(f'ggf_{r:g}', {'method': 'ggf', 'ggf_rtol': r}) for r in (0.1, 0.05)])


def digits_fid_vs_nfe(workdir: str, plot_path: str) -> None:
  """Digits-FID / IS / KID of 300 samples against the test split (``--mode=eval``'s setting, through
  the same ``evaluate_samples``; rounds of 100, seed 0) of the EMA checkpoint in ``workdir`` for every
  sampler in ``_DIGITS_FID_SETTINGS``; a markdown table and a PNG plot of FID against NFE."""
  from scoresde.evaluation import sample_quality  # pylint: disable=import-outside-toplevel
  config, model, variables, source = _model('configs.ve.digits_ncsnpp_continuous', workdir)
  if source == 'random init':
    raise ValueError(f'--digits_fid needs a trained checkpoint in --workdir; {workdir!r} has none.')
  sde = sde_lib.get_sde(config)
  print(f'\n## Digits FID vs NFE: {source}, {config.eval.num_samples} samples against the test split')
  print('| sampler | setting | NFE | FID | IS | KID | wall (s, incl. compile) |')
  print('|---|---|---|---|---|---|---|')
  results = []
  for label, keys in _DIGITS_FID_SETTINGS:
    variant = config.copy_and_resolve_references()
    variant.sampling.update(keys)
    report = sample_quality.evaluate_samples(variant, os.path.join(workdir, 'fid_vs_nfe'), label, model,
                                             variables, sde, show_progress=False)
    setting = ', '.join(f'{k}={v}' for k, v in keys.items() if k != 'method') or 'default'
    print(f'| {keys["method"]} | {setting} | {report["nfe_mean"]:.0f} | {report["fid"]:.2f} | '
          f'{report["is"]:.2f} | {report["kid"]:.0f} | {report["seconds"]:.0f} |', flush=True)
    results.append((label, keys, report['nfe_mean'], report['fid']))
  _plot_fid_vs_nfe(results, plot_path)
  print(f'plot: {plot_path}')


def _plot_fid_vs_nfe(results, path: str) -> None:
  """FID against NFE (log scale), one line per sampler, PC and the ODE as labelled points (PIL: no
  plotting library is a dependency)."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  lines: dict[str, list[tuple[float, float]]] = {}
  for label, keys, nfe, fid in results:
    name = keys['method'] + (' (3rd order)' if keys.get('dpm_order') == 3 else '')
    lines.setdefault(name, []).append((nfe, fid))
  width, height, margin = 640, 420, 60
  lo_n, hi_n = 8., 1.3 * max(n for pts in lines.values() for n, _ in pts)
  hi_f = 1.1 * max(f for pts in lines.values() for _, f in pts)
  to_px = lambda n, f: (margin + (np.log(n / lo_n) / np.log(hi_n / lo_n)) * (width - 2 * margin),
                        height - margin - f / hi_f * (height - 2 * margin))
  image = Image.new('RGB', (width + 150, height), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  draw.line([to_px(lo_n, 0), to_px(hi_n, 0)], fill=(0, 0, 0))
  draw.line([to_px(lo_n, 0), to_px(lo_n, hi_f)], fill=(0, 0, 0))
  for tick in (10, 20, 35, 50, 100, 200, 500, 1000):
    if lo_n <= tick <= hi_n:
      x, y = to_px(tick, 0)
      draw.line([(x, y), (x, y + 4)], fill=(0, 0, 0))
      draw.text((x - 8, y + 6), str(tick), fill=(0, 0, 0))
  step = 5 if hi_f < 60 else 20
  for tick in range(0, int(hi_f) + 1, step):
    x, y = to_px(lo_n, tick)
    draw.line([(x - 4, y), (x, y)], fill=(0, 0, 0))
    draw.text((x - 28, y - 6), str(tick), fill=(0, 0, 0))
  draw.text((width // 2 - 60, height - 25), 'NFE (log scale)', fill=(0, 0, 0))
  draw.text((8, 8), 'digits FID (300 samples vs test split)', fill=(0, 0, 0))
  colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194)]
  for i, (name, pts) in enumerate(sorted(lines.items())):
    color = colors[i % len(colors)]
    pts = sorted(pts)
    xy = [to_px(n, f) for n, f in pts]
    if len(xy) > 1:
      draw.line(xy, fill=color, width=2)
    for x, y in xy:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    draw.text((width + 5, 40 + 18 * i), name, fill=color)
  image.save(path)


def model_benchmarks():
  config, model, variables, source = _model('configs.ve.digits_ncsnpp_continuous', FLAGS.workdir)
  inverse = datasets.get_data_inverse_scaler(config)
  eps = config.sampling.eps

  def pc(predictor, corrector):
    return lambda sde, shape: sampling.get_pc_sampler(sde, shape, predictor, corrector,
                                                      eps=eps, inverse_scaler=inverse,
                                                      **{**_PC_SETTINGS, 'snr': config.sampling.snr})

  _bench_pc('digits NCSN++ (configs/ve/digits_ncsnpp_continuous.py)', config, model, variables,
            source, FLAGS.digits_batch,
            [('PC reverse_diffusion + langevin', pc('reverse_diffusion', 'langevin')),
             ('PC euler_maruyama + none', pc('euler_maruyama', 'none')),
             ('PC none + ald', pc('none', 'ald'))], FLAGS.digits_steps)
  sde = sde_lib.get_sde(config)
  shape = (FLAGS.digits_batch,) + tuple(datasets.data_shape(config))
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  sampler = sampling.get_ode_sampler(sde, shape, rtol=1e-5, atol=1e-5, method='dopri5', eps=eps,
                                     denoise=False, inverse_scaler=inverse)
  first, _, _ = _timed(sampler, jax.random.PRNGKey(0), score_fn)
  wall, _, nfe = _timed(sampler, jax.random.PRNGKey(1), score_fn)
  note = ' (random init: the score is zero, so this only times the solver loop)' if (
      source == 'random init') else ''
  print(f'digits ODE dopri5, rtol = atol = 1e-5{note}: NFE {nfe}, compile + 1st call {first:.1f} s, '
        f'timed call {wall:.1f} s')
  if FLAGS.skip_cifar:
    return
  _bench_pc('CIFAR-10-shaped NCSN++ (configs/ve/cifar10_ncsnpp_continuous.py)', config, model,
            variables, source, 4,
            [('PC reverse_diffusion + langevin',
              lambda sde, shape: sampling.get_pc_sampler(sde, shape, 'reverse_diffusion', 'langevin',
                                                         eps=config.sampling.eps, **_PC_SETTINGS))],
            FLAGS.cifar_steps)


def main(argv):
  del argv
  print(f'sampling benchmark: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on '
        f'{jax.devices()[0].platform} x{jax.device_count()}')
  if FLAGS.digits_fid:
    digits_fid_vs_nfe(FLAGS.workdir, FLAGS.plot)
    return
  if not FLAGS.skip_mixture:
    if not FLAGS.fast_only:
      mixture_sweep()
    fast_mixture_sweep()
    convergence_orders()
  if not FLAGS.skip_models:
    if not FLAGS.fast_only:
      model_benchmarks()
    fast_model_benchmarks()


if __name__ == '__main__':
  app.run(main)
