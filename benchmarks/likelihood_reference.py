"""The probability-flow likelihood against the PyTorch reference on the same CPU, same weights, same inputs.

The reference (a checkout of github.com/yang-song/score_sde_pytorch, ``--reference_dir``; torch is never a
dependency of the library) builds ``--config`` with ``model.nf = --nf``, takes ``--train_steps`` of its own
training steps on random images at ``--train_lr`` without warm-up (so that the last layer, initialised at
zero, is not: otherwise the score is 0 and the ODE trivial), and writes its checkpoint. Ours loads that checkpoint
(``porting.torch_port``, raw weights) and both evaluate bits/dim of the same ``--batch`` dequantized
random images at rtol = atol = ``--tol``: the reference's ``likelihood.get_likelihood_fn`` (scipy RK45 over
the flattened batch, drift and a VJP divergence: two network passes and a backward pass per evaluation)
and ours (``likelihood.get_log_likelihood_fn``: diffrax Dopri5 with PID control per example, drift and
divergence from one linearisation). Hutchinson probes differ between the two (each draws its own), so
bits/dim agree to the estimator's noise, not exactly. Our compile time is reported apart; the timed
solve is the second call.

  .venv/bin/python benchmarks/likelihood_reference.py --reference_dir=/path/to/score_sde_pytorch
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import tempfile
import time

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
flags.DEFINE_string('reference_dir', None, 'A score_sde_pytorch checkout.', required=True)
flags.DEFINE_string('config', 'vp.cifar10_ddpmpp_continuous', 'Config name in both code bases.')
flags.DEFINE_integer('nf', 32, 'model.nf for both.')
flags.DEFINE_integer('batch', 4, 'Images.')
flags.DEFINE_integer('train_steps', 20, 'Reference training steps before the checkpoint is written.')
flags.DEFINE_float('train_lr', 1e-3, 'Their learning rate (no warm-up): weights far enough from init.')
flags.DEFINE_float('tol', 1e-5, 'rtol = atol of both solvers.')
flags.DEFINE_integer('threads', 2, 'torch.set_num_threads for the reference.')


def _images(config, batch: int) -> np.ndarray:
  """Uniformly dequantized random 8-bit images in [0, 1], NHWC."""
  rng = np.random.default_rng(0)
  shape = (batch, config.data.image_size, config.data.image_size, config.data.num_channels)
  return ((rng.integers(0, 256, shape) + rng.random(shape)) / 256.).astype(np.float32)


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
  start = time.perf_counter()
  bpd, _, nfe = likelihood_fn(ref.model, data)
  return bpd.numpy(), int(nfe), time.perf_counter() - start


def ours(images: np.ndarray, checkpoint: str) -> tuple[np.ndarray, np.ndarray, float, float]:
  """(bits/dim, NFE per image, compile + first call seconds, timed call seconds) of ours."""
  config = importlib.import_module(f'configs.{FLAGS.config}').get_config()
  config.model.nf = FLAGS.nf
  variables = torch_port.load_score_sde_pytorch(checkpoint, config, ema=False)
  model = mutils.create_model(config)
  sde = sde_lib.get_sde(config)
  score_fn = mutils.get_score_fn(sde, model, variables, continuous=config.training.continuous)
  fn = likelihood.get_log_likelihood_fn(sde, 'rademacher', num_probes=1, rtol=FLAGS.tol, atol=FLAGS.tol,
                                        eps=1e-5, method='dopri5')
  x = jnp.asarray(datasets.get_data_scaler(config)(images))
  rng = jax.random.PRNGKey(0)
  start = time.perf_counter()
  jax.block_until_ready(fn(rng, score_fn, x))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  logp, _, nfe = jax.block_until_ready(fn(rng, score_fn, x))
  timed = time.perf_counter() - start
  # The reference's conversion: -log p / (D ln 2) + 7 - inverse_scaler(-1) (= 7 on [-1, 1] data).
  offset = 7. - float(datasets.get_data_inverse_scaler(config)(-1.))
  bpd = -np.asarray(logp) / (math.prod(images.shape[1:]) * math.log(2.)) + offset
  return bpd, np.asarray(nfe), compile_s, timed


def main(argv):
  del argv
  config = importlib.import_module(f'configs.{FLAGS.config}').get_config()
  images = _images(config, FLAGS.batch)
  with tempfile.TemporaryDirectory() as workdir:
    checkpoint = os.path.join(workdir, 'checkpoint.pth')
    ref_bpd, ref_nfe, ref_s = reference(images, checkpoint)
    our_bpd, our_nfe, compile_s, our_s = ours(images, checkpoint)
  print(f'# {FLAGS.config}, nf {FLAGS.nf}, {FLAGS.train_steps} reference steps, batch {FLAGS.batch}, '
        f'rtol = atol = {FLAGS.tol}, jax {jax.__version__}, load {os.getloadavg()[0]:.1f}, '
        f'{time.strftime("%Y-%m-%d")}')
  print('| | seconds | NFE | bits/dim (per image) |\n|---|---|---|---|')
  print(f'| reference (RK45 over the batch) | {ref_s:.1f} | {ref_nfe} | '
        f'{", ".join(f"{b:.4f}" for b in ref_bpd)} |')
  print(f'| ours (Dopri5 per example; compile {compile_s:.1f} s apart) | {our_s:.1f} | '
        f'{our_nfe.mean():.0f} mean / {our_nfe.max()} max | {", ".join(f"{b:.4f}" for b in our_bpd)} |')
  print(f'ours / reference: {our_s / ref_s:.2f} (with compile: {(our_s + compile_s) / ref_s:.2f})')


if __name__ == '__main__':
  app.run(main)
