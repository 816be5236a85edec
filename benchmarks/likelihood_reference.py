"""The probability-flow likelihood against the PyTorch reference on the same CPU, same weights, same inputs.

The reference (a checkout of github.com/yang-song/score_sde_pytorch, ``--reference_dir``; torch is never a
dependency of the library) builds ``--config`` with ``model.nf = --nf``, takes ``--train_steps`` of its own
training steps on random images at ``--train_lr`` without warm-up (so that the last layer, initialised at
zero, is not: otherwise the score is 0 and the ODE trivial), and writes its checkpoint. Ours loads that checkpoint
(``porting.torch_port``, raw weights) and both evaluate bits/dim of the same ``--batch`` dequantized
random images at rtol = atol = ``--tol``: the reference's ``likelihood.get_likelihood_fn`` (scipy RK45 over
the flattened batch, drift and a VJP divergence: two network passes and a backward pass per evaluation)
and ours (``likelihood.get_log_likelihood_fn``: Dopri5 with diffrax's integral step-size control per
example, as ``ode_solvers.solve_with_quadrature`` rebuilds it, drift and divergence from one
linearisation, the divergence skipped at the stage whose weight is zero), ours also at each of
``--our_tols``. Both use the same Rademacher probe (the reference's draw is replaced by ours), so their
bits/dim differ by solver error only, and each is compared with the tight-tolerance value: ours with
Dopri8 at rtol = atol = ``--truth_tol``. Our compile time is reported apart; the timed solve is the
second call.

  .venv/bin/python benchmarks/likelihood_reference.py --reference_dir=/path/to/score_sde_pytorch
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import tempfile
import time
from unittest import mock

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from scoresde import datasets
from scoresde import likelihood
from scoresde import sde_lib
from scoresde.models import utils as mutils
from scoresde.porting import torch_port
import torch_reference  # benchmarks/

FLAGS = flags.FLAGS
RNG = jax.random.PRNGKey(0)  # our probes; the reference is given the same
flags.DEFINE_string('reference_dir', None, 'A score_sde_pytorch checkout.', required=True)
flags.DEFINE_string('config', 'vp.cifar10_ddpmpp_continuous', 'Config name in both code bases.')
flags.DEFINE_integer('nf', 32, 'model.nf for both.')
flags.DEFINE_integer('batch', 4, 'Images.')
flags.DEFINE_integer('train_steps', 20, 'Reference training steps before the checkpoint is written.')
flags.DEFINE_float('train_lr', 1e-3, 'Their learning rate (no warm-up): weights far enough from init.')
flags.DEFINE_float('tol', 1e-5, 'rtol = atol of both solvers.')
flags.DEFINE_integer('threads', 2, 'torch.set_num_threads for the reference.')
flags.DEFINE_list('our_tols', [], 'Further rtol = atol values for our Dopri5 solve (error against the truth).')
flags.DEFINE_float('truth_tol', 1e-5, 'rtol = atol of the Dopri8 solve taken as the tight value (0: none; at 1e-6 it '
                   'did not finish in 15 minutes on a 2-core CPU).')


def _images(config, batch: int) -> np.ndarray:
  """Uniformly dequantized random 8-bit images in [0, 1], NHWC."""
  rng = np.random.default_rng(0)
  shape = (batch, config.data.image_size, config.data.image_size, config.data.num_channels)
  return ((rng.integers(0, 256, shape) + rng.random(shape)) / 256.).astype(np.float32)


def _probe(shape: tuple[int, ...]) -> np.ndarray:
  """The Rademacher probe our solve draws from PRNGKey(0) (one per image, NHWC), for both solves."""
  probes = likelihood._draw_probes(RNG, 'rademacher', shape, 1)  # pylint: disable=protected-access
  return np.asarray(probes[:, 0])


def reference(images: np.ndarray, checkpoint: str) -> tuple[np.ndarray, int, float]:
  """(bits/dim, NFE, seconds) of the reference, after training it briefly and writing ``checkpoint``."""
  import torch  # pylint: disable=import-outside-toplevel

  def adjust(config):
    config.model.nf = FLAGS.nf
    config.optim.lr, config.optim.warmup = FLAGS.train_lr, 0
  ref = torch_reference.build(FLAGS.reference_dir, FLAGS.config, FLAGS.threads, adjust)
  config = ref.config
  # The reference's data scaling, written out: its datasets module imports TensorFlow.
  centered = bool(config.data.centered)
  scaler = (lambda x: 2. * x - 1.) if centered else (lambda x: x)
  inverse_scaler = (lambda x: (x + 1.) / 2.) if centered else (lambda x: x)
  for _ in range(FLAGS.train_steps):
    ref.step_fn(ref.state, scaler(torch.rand(8, config.data.num_channels, config.data.image_size,
                                             config.data.image_size)))
  # No optimizer state: its numpy scalars are refused by our loader's allow-list (untrusted pickles).
  torch.save({'model': ref.model.state_dict(), 'ema': ref.state['ema'].state_dict(),
              'step': FLAGS.train_steps}, checkpoint)
  likelihood_fn = ref.modules['likelihood'].get_likelihood_fn(ref.sde, inverse_scaler, rtol=FLAGS.tol,
                                                              atol=FLAGS.tol)
  data = scaler(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  # Its probe is torch.randint_like(data, 0, 2) * 2 - 1: return ours as those {0, 1} draws.
  bits = torch.from_numpy((_probe(images.shape) + 1.) / 2.).permute(0, 3, 1, 2).contiguous()
  with mock.patch.object(ref.modules['likelihood'].torch, 'randint_like', lambda *a, **k: bits.clone()):
    start = time.perf_counter()
    bpd, _, nfe = likelihood_fn(ref.model, data)
    seconds = time.perf_counter() - start
  return bpd.numpy(), int(nfe), seconds


def ours(images: np.ndarray, checkpoint: str, tol: float,
         method: str = 'dopri5') -> tuple[np.ndarray, np.ndarray, float, float]:
  """(bits/dim, NFE per image, compile + first call seconds, timed call seconds) of ours."""
  config = importlib.import_module(f'configs.{FLAGS.config}').get_config()
  config.model.nf = FLAGS.nf
  variables = torch_port.load_score_sde_pytorch(checkpoint, config, ema=False)
  model = mutils.create_model(config)
  sde = sde_lib.get_sde(config)
  score_fn = mutils.get_score_fn(sde, model, variables, continuous=config.training.continuous)
  fn = likelihood.get_log_likelihood_fn(sde, 'rademacher', num_probes=1, rtol=tol, atol=tol,
                                        eps=1e-5, method=method, max_steps=20_000)
  x = jnp.asarray(datasets.get_data_scaler(config)(images))
  start = time.perf_counter()
  jax.block_until_ready(fn(RNG, score_fn, x))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  logp, _, nfe = jax.block_until_ready(fn(RNG, score_fn, x))
  timed = time.perf_counter() - start
  # The reference's conversion: -log p / (D ln 2) + 7 - inverse_scaler(-1) (= 7 on [-1, 1] data).
  offset = 7. - float(datasets.get_data_inverse_scaler(config)(-1.))
  bpd = -np.asarray(logp) / (math.prod(images.shape[1:]) * math.log(2.)) + offset
  return bpd, np.asarray(nfe), compile_s, timed


def _errors(bpd: np.ndarray, truth: np.ndarray | None) -> str:
  """'largest per-image error | error of the mean' against the tight value, in bits/dim."""
  if truth is None:
    return '— | —'
  return f'{np.max(np.abs(bpd - truth)):.1e} | {abs(np.mean(bpd - truth)):.1e}'


def main(argv):
  del argv
  config = importlib.import_module(f'configs.{FLAGS.config}').get_config()
  images = _images(config, FLAGS.batch)
  with tempfile.TemporaryDirectory() as workdir:
    checkpoint = os.path.join(workdir, 'checkpoint.pth')
    ref_bpd, ref_nfe, ref_s = reference(images, checkpoint)
    truth = truth_nfe = None
    if FLAGS.truth_tol:
      truth, truth_nfe, _, truth_s = ours(images, checkpoint, FLAGS.truth_tol, 'dopri8')
    runs = {float(tol): ours(images, checkpoint, float(tol)) for tol in [FLAGS.tol] + FLAGS.our_tols}
  print(f'# {FLAGS.config}, nf {FLAGS.nf}, {FLAGS.train_steps} reference steps, batch {FLAGS.batch}, '
        f'jax {jax.__version__}, load {os.getloadavg()[0]:.1f}, {time.strftime("%Y-%m-%d")}; errors against '
        f'Dopri8 at rtol = atol = {FLAGS.truth_tol:g}, same probe')
  print('| | rtol = atol | seconds | NFE | ours / reference | max bits/dim error | error of the mean | '
        'bits/dim (per image) |\n|---|---|---|---|---|---|---|---|')
  print(f'| reference (RK45 over the batch) | {FLAGS.tol:g} | {ref_s:.1f} | {ref_nfe} | 1 | '
        f'{_errors(ref_bpd, truth)} | {", ".join(f"{b:.4f}" for b in ref_bpd)} |')
  if truth is not None:
    print(f'| ours, Dopri8 (the tight value) | {FLAGS.truth_tol:g} | {truth_s:.1f} | {truth_nfe.mean():.0f} | '
          f'{truth_s / ref_s:.2f} | 0 | 0 | {", ".join(f"{b:.4f}" for b in truth)} |')
  for tol, (bpd, nfe, compile_s, seconds) in runs.items():
    print(f'| ours, Dopri5 per example (compile {compile_s:.1f} s apart) | {tol:g} | {seconds:.1f} | '
          f'{nfe.mean():.0f} mean / {nfe.max()} max | {seconds / ref_s:.2f} | {_errors(bpd, truth)} | '
          f'{", ".join(f"{b:.4f}" for b in bpd)} |', flush=True)


if __name__ == '__main__':
  app.run(main)
