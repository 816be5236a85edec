"""Where the CPU time of the U-Nets goes (issue 16): convolutions against PyTorch, and GroupNorm's share.

Part ``conv``: one 3x3 convolution (batch 4, CIFAR-10 shapes) as XLA's convolution, as im2col patches
times a matrix, and as nine shifted matrix products, forward and with its gradient; and PyTorch's
``Conv2d`` at the same shapes with 2 threads when torch is installed (optional; never a dependency).
All in one process, calls interleaved, medians of ``--repeats``.

Part ``blocks`` (needs torch and ``--reference_dir``, a checkout of score_sde_pytorch): DDPM++'s
residual and attention blocks at CIFAR-10 shapes, batch 4, training mode (dropout 0.1), forward and
backward for a fixed cotangent — ours with XLA's defaults and with this CPU's gradient options
(``infra/xla_cpu.py``), the reference's modules with PyTorch — to find which block the whole-network gap
sits in.

Part ``groupnorm``: the forward pass and the parameter-and-input gradient of ``--config``'s network at
batch 4 with its GroupNorms as they are (``layers.GroupNorm``: two-pass variance, per-channel sums over
H, W first), as flax's ``GroupNorm(use_fast_variance=False)`` (the same function, reduced over the
grouped view), with one-pass moments (E[x²] - E[x]²), and removed (identity): the share of the time
GroupNorm takes and what each formulation costs. XLA's default options unless ``--ynn_fusions`` names a
YNNPACK set. Times are ratios to the first variant, measured in one run.

  .venv/bin/python benchmarks/cpu_profile.py --part=conv
  .venv/bin/python benchmarks/cpu_profile.py --part=blocks --reference_dir=/path/to/score_sde_pytorch
  .venv/bin/python benchmarks/cpu_profile.py --part=groupnorm --config=vp.cifar10_ddpmpp_continuous
  .venv/bin/python benchmarks/cpu_profile.py --part=groupnorm --ynn_fusions=LIBRARY_FUSION_TYPE_REDUCE
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
from scoresde.infra import xla_cpu
from scoresde.models import layers
from scoresde.models import layerspp
from scoresde.models import utils as mutils
import torch_reference  # benchmarks/

FLAGS = flags.FLAGS
flags.DEFINE_enum('part', 'conv', ['conv', 'blocks', 'groupnorm'], 'What to measure.')
flags.DEFINE_string('reference_dir', '', 'A score_sde_pytorch checkout (--part=blocks).')
flags.DEFINE_string('config', 'vp.cifar10_ddpmpp_continuous', 'configs.<this> for --part=groupnorm.')
flags.DEFINE_integer('repeats', 5, 'Timed calls per variant (median).')
flags.DEFINE_string('ynn_fusions', None, 'xla_cpu_experimental_ynn_fusion_type for --part=groupnorm\'s '
                    'programs (e.g. LIBRARY_FUSION_TYPE_REDUCE; unset: XLA\'s defaults).')

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


def _blocks(ref_layers):
  """(name, our block, the reference's, input side, input channels) of DDPM++ at CIFAR-10 shapes."""
  import torch  # pylint: disable=import-outside-toplevel
  act, ref_act = nn.silu, torch.nn.SiLU()
  resnet, ref_resnet = layerspp.ResnetBlockBigGANpp, ref_layers.ResnetBlockBigGANpp
  for name, side, cin, cout, resample in (('residual', 32, 128, 128, {}), ('residual', 16, 256, 256, {}),
                                          ('residual, concatenated input', 32, 384, 128, {}),
                                          ('down-sampling', 32, 128, 128, {'down': True}),
                                          ('up-sampling', 16, 256, 256, {'up': True})):
    yield (f'{name} {cin}->{cout} @ {side}²', resnet(act, out_ch=cout, dropout=0.1, **resample),
           ref_resnet(ref_act, cin, cout, 512, dropout=0.1, **resample), side, cin)
  yield ('attention 256 @ 16²', layerspp.AttnBlockpp(skip_rescale=True),
         ref_layers.AttnBlockpp(256, skip_rescale=True), 16, 256)


def blocks_part() -> None:
  import torch  # pylint: disable=import-outside-toplevel
  if not FLAGS.reference_dir:
    raise app.UsageError('--part=blocks needs --reference_dir (a score_sde_pytorch checkout).')
  ref_layers = torch_reference.layers_module(FLAGS.reference_dir, threads=2)
  rng = np.random.default_rng(0)
  print(f'DDPM++ blocks, batch 4, fwd + bwd, jax {jax.__version__}, torch {torch.__version__} (2 threads), '
        f'{time.strftime("%Y-%m-%d")}; ours with {xla_cpu.compiler_options("gradient")}')
  print('| block | ours, XLA defaults (ms) | ours, tuned (ms) | reference (ms) | tuned / reference |\n'
        '|---|---|---|---|---|')
  for name, ours, ref, side, channels in _blocks(ref_layers):
    x = jnp.asarray(rng.standard_normal((4, side, side, channels)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((4, 512)), jnp.float32)
    attention = isinstance(ours, layerspp.AttnBlockpp)
    args, kwargs = ((x,), {}) if attention else ((x, temb), {'train': True})
    rngs = {'dropout': jax.random.PRNGKey(2)}
    variables = ours.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}, *args)
    cotangent = jnp.asarray(rng.standard_normal(ours.apply(variables, *args, **kwargs, rngs=rngs).shape),
                            jnp.float32)

    def loss(v, x, block=ours, rest=args[1:], kw=kwargs, ct=cotangent):
      return jnp.sum(block.apply(v, x, *rest, **kw, rngs=rngs) * ct)
    grad = jax.grad(loss, argnums=(0, 1))
    default = jax.jit(grad)
    tuned = jax.jit(grad, compiler_options=xla_cpu.compiler_options('gradient'))
    x_t = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    ref_args = (x_t,) if attention else (x_t, torch.tensor(np.asarray(temb)))
    cotangent_t = torch.tensor(np.asarray(cotangent).transpose(0, 3, 1, 2))
    ref.train()

    def reference_call(block=ref, a=ref_args, ct=cotangent_t):
      block.zero_grad()
      block(*a).backward(ct)
    calls = {'default': lambda f=default, v=variables, x=x: f(v, x),
             'tuned': lambda f=tuned, v=variables, x=x: f(v, x), 'reference': reference_call}
    for call in calls.values():
      _timings(call, 2)  # compile and warm up
    times = {variant: [] for variant in calls}
    for _ in range(FLAGS.repeats):  # interleaved: every variant sees the same load
      for variant, call in calls.items():
        times[variant].extend(_timings(call, 1))
    ms = {variant: 1e3 * np.median(ts) for variant, ts in times.items()}
    print(f"| {name} | {ms['default']:.1f} | {ms['tuned']:.1f} | {ms['reference']:.1f} | "
          f"{ms['tuned'] / ms['reference']:.2f} |", flush=True)


class _Identity(nn.Module):

  @nn.compact
  def __call__(self, x):
    return x


@contextlib.contextmanager
def _group_norms(kind: str):
  """Temporarily builds the models' GroupNorms as ``kind``: 'ours' (as they are), 'flax two-pass',
  'one-pass', 'none'."""
  saved = layers.group_norm_32, layerspp.group_norm
  if kind in ('flax two-pass', 'one-pass'):
    fast = kind == 'one-pass'
    layers.group_norm_32 = lambda: nn.GroupNorm(num_groups=32, use_fast_variance=fast)
    layerspp.group_norm = lambda c: nn.GroupNorm(num_groups=layerspp.num_groups(c), use_fast_variance=fast)
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
  options = None if FLAGS.ynn_fusions is None else {'xla_cpu_experimental_ynn_fusion_type': FLAGS.ynn_fusions}
  for kind in ('ours', 'flax two-pass', 'one-pass', 'none'):
    with _group_norms(kind):  # the modules are built when traced: trace (compile) inside
      model = mutils.create_model(config)
      variables = model.init(jax.random.PRNGKey(0), x, t, train=False)
      forward = jax.jit(lambda v, m=model: m.apply(v, x, t, train=False), compiler_options=options)
      grad = jax.jit(jax.grad(lambda v, m=model: jnp.sum(m.apply(v, x, t, train=False) ** 2)),
                     compiler_options=options)
      jax.block_until_ready((forward(variables), grad(variables)))
    calls[kind] = (lambda f=forward, v=variables: f(v), lambda g=grad, v=variables: g(v))
  times = {kind: ([], []) for kind in calls}
  for _ in range(FLAGS.repeats):
    for kind, (forward, grad) in calls.items():
      times[kind][0].extend(_timings(forward, 1))
      times[kind][1].extend(_timings(grad, 1))
  base = [np.median(v) for v in times['ours']]
  print(f'{FLAGS.config}, batch 4, jax {jax.__version__}, YNNPACK fusions {FLAGS.ynn_fusions or "XLA defaults"}, '
        f'{time.strftime("%Y-%m-%d")}')
  print('| GroupNorm | forward (s) | ratio | gradient (s) | ratio |\n|---|---|---|---|---|')
  for kind, (fw, gr) in times.items():
    print(f'| {kind} | {np.median(fw):.3f} | {np.median(fw) / base[0]:.2f} | {np.median(gr):.3f} | '
          f'{np.median(gr) / base[1]:.2f} |', flush=True)


def main(argv):
  del argv
  if FLAGS.part == 'conv':
    conv_part()
  elif FLAGS.part == 'blocks':
    blocks_part()
  else:
    groupnorm_part()


if __name__ == '__main__':
  app.run(main)
