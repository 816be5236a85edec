"""Where the CPU time of the U-Nets goes (issue 16): convolutions against PyTorch, and GroupNorm's share.

Part ``conv``: one 3x3 convolution (batch 4, CIFAR-10 shapes) as XLA's convolution, as im2col patches
times a matrix, and as nine shifted matrix products, forward and with its gradient; and PyTorch's
``Conv2d`` at the same shapes with 2 threads when torch is installed (optional; never a dependency).
All in one process, calls interleaved, medians of ``--repeats``.

Part ``groupnorm``: the forward pass and the parameter-and-input gradient of ``--config``'s network at
batch 4 with its GroupNorms as they are (two-pass variance, ``use_fast_variance=False``), with one-pass
moments (E[x²] - E[x]²), and removed (identity): the share of the time GroupNorm takes and what one-pass
moments would save. Times are ratios to the first variant, measured in one run.

  .venv/bin/python benchmarks/cpu_profile.py --part=conv
  .venv/bin/python benchmarks/cpu_profile.py --part=groupnorm --config=vp.cifar10_ddpmpp_continuous
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from scoresde.models import layers
from scoresde.models import layerspp
from scoresde.models import utils as mutils

FLAGS = flags.FLAGS
flags.DEFINE_enum('part', 'conv', ['conv', 'groupnorm'], 'What to measure.')
flags.DEFINE_string('config', 'vp.cifar10_ddpmpp_continuous', 'configs.<this> for --part=groupnorm.')
flags.DEFINE_integer('repeats', 5, 'Timed calls per variant (median).')

CONV_SHAPES = ((4, 32, 128), (4, 16, 256), (4, 8, 256))  # batch, side, channels


def conv_xla(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv_patches(x, w):
  """im2col: the (ci, kh, kw) patches of every pixel times the reshaped kernel."""
  kh, kw, ci, co = w.shape
  patches = jax.lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return patches @ jnp.transpose(w, (2, 0, 1, 3)).reshape(ci * kh * kw, co)


def conv_shifted(x, w):
  """Σ over the kernel's offsets of the shifted input times that offset's (ci, co) matrix."""
  kh, kw = w.shape[:2]
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, wd = x.shape[1:3]
  return sum(padded[:, i:i + h, j:j + wd] @ w[i, j] for i in range(kh) for j in range(kw))


def _timings(fn: Callable[[], object], repeats: int) -> list[float]:
  """Seconds of ``repeats`` calls of ``fn``, each waited for."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def _torch_conv(batch: int, side: int, channels: int):
  """(forward, forward + backward) callables of PyTorch's Conv2d, or None without torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  torch.set_num_threads(2)
  x = torch.randn(batch, channels, side, side, requires_grad=True)
  conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)

  def forward():
    with torch.no_grad():
      return conv(x)

  def both():
    (conv(x) ** 2).sum().backward()
  return forward, both


def conv_part() -> None:
  print('| batch × side² × channels | variant | forward (ms) | with gradient (ms) | max |Δ| vs XLA |')
  print('|---|---|---|---|---|')
  for batch, side, channels in CONV_SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, side, side, channels))
    w = 0.03 * jax.random.normal(jax.random.PRNGKey(1), (3, 3, channels, channels))
    reference = conv_xla(x, w)
    calls = {}
    for name, fn in (('XLA conv', conv_xla), ('im2col + matmul', conv_patches), ('9 shifted matmuls', conv_shifted)):
      forward = jax.jit(fn)
      grad = jax.jit(jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w) ** 2), argnums=(0, 1)))
      error = float(jnp.max(jnp.abs(forward(x, w) - reference)))
      jax.block_until_ready(grad(x, w))
      calls[name] = (lambda f=forward: f(x, w), lambda g=grad: g(x, w), f'{error:.1e}')
    torch_calls = _torch_conv(batch, side, channels)
    if torch_calls is not None:
      for call in torch_calls:
        call()
      calls['PyTorch Conv2d (2 threads)'] = (*torch_calls, '—')
    times = {name: ([], []) for name in calls}
    for _ in range(FLAGS.repeats):  # interleaved: every variant sees the same load
      for name, (forward, both, _) in calls.items():
        times[name][0].extend(_timings(forward, 1))
        times[name][1].extend(_timings(both, 1))
    for name, (_, _, error) in calls.items():
      print(f'| {batch} × {side}² × {channels} | {name} | {1e3 * np.median(times[name][0]):.1f} | '
            f'{1e3 * np.median(times[name][1]):.1f} | {error} |', flush=True)


class _Identity(nn.Module):

  @nn.compact
  def __call__(self, x):
    return x


@contextlib.contextmanager
def _group_norms(kind: str):
  """Temporarily builds the models' GroupNorms as ``kind``: 'two-pass' (as they are), 'one-pass', 'none'."""
  saved = layers.group_norm_32, layerspp.group_norm
  if kind == 'one-pass':
    layers.group_norm_32 = lambda: nn.GroupNorm(num_groups=32, use_fast_variance=True)
    layerspp.group_norm = lambda c: nn.GroupNorm(num_groups=layerspp.num_groups(c), use_fast_variance=True)
  elif kind == 'none':
    layers.group_norm_32 = _Identity
    layerspp.group_norm = lambda c: _Identity()
  try:
    yield
  finally:
    layers.group_norm_32, layerspp.group_norm = saved


def groupnorm_part() -> None:
  config = importlib.import_module(f'configs.{FLAGS.config}').get_config()
  shape = (4, config.data.image_size, config.data.image_size, config.data.num_channels)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  t = jnp.full((shape[0],), 0.5)
  calls = {}
  for kind in ('two-pass', 'one-pass', 'none'):
    with _group_norms(kind):  # the modules are built when traced: trace (compile) inside
      model = mutils.create_model(config)
      variables = model.init(jax.random.PRNGKey(0), x, t, train=False)
      forward = jax.jit(lambda v, m=model: m.apply(v, x, t, train=False))
      grad = jax.jit(jax.grad(lambda v, m=model: jnp.sum(m.apply(v, x, t, train=False) ** 2)))
      jax.block_until_ready((forward(variables), grad(variables)))
    calls[kind] = (lambda f=forward, v=variables: f(v), lambda g=grad, v=variables: g(v))
  times = {kind: ([], []) for kind in calls}
  for _ in range(FLAGS.repeats):
    for kind, (forward, grad) in calls.items():
      times[kind][0].extend(_timings(forward, 1))
      times[kind][1].extend(_timings(grad, 1))
  base = [np.median(v) for v in times['two-pass']]
  print(f'{FLAGS.config}, batch 4, jax {jax.__version__}, {time.strftime("%Y-%m-%d")}')
  print('| GroupNorm | forward (s) | ratio | gradient (s) | ratio |\n|---|---|---|---|---|')
  for kind, (fw, gr) in times.items():
    print(f'| {kind} | {np.median(fw):.3f} | {np.median(fw) / base[0]:.2f} | {np.median(gr):.3f} | '
          f'{np.median(gr) / base[1]:.2f} |', flush=True)


def main(argv):
  del argv
  if FLAGS.part == 'conv':
    conv_part()
  else:
    groupnorm_part()


if __name__ == '__main__':
  app.run(main)
