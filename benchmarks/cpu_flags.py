"""Forward pass and training step on the CPU: XLA's defaults against ``infra/xla_cpu.py``'s options, and
optionally against the PyTorch reference (score_sde_pytorch) on the same CPU, in one run.

For each ``--configs`` entry at batch ``--batch`` (random init, random data of the config's shape):
the network's forward pass as samplers call it (``model.apply`` jitted), the forward pass with one
tangent (``jax.jvp`` with a Rademacher probe: the work of one likelihood evaluation), and the trainer's
compiled step
(``run_lib.build_multi_step``: loss, gradient, Adam, clipping, EMA), each compiled twice — with XLA's
default CPU options (``SCORESDE_XLA_CPU_TUNING=0``; the step as one program) and as the library builds
it (the inference options; on CPU the step as a gradient and an update program, each with its options)
— plus the one-program step under ``--candidate_step`` (a YNNPACK fusion set) and the split step with
each ``--candidate_gradient`` set for its gradient program, and with ``--halves`` the step's gradient and
update apart (ours as the library's two programs, the reference's loss + backward and clip + Adam + EMA), then
``--repeats`` calls of every variant interleaved, medians (of the time and of the minor page faults a call
takes: memory fresh from the kernel). Compile times are the first calls. The header names the process's C
allocator and whether freed memory is kept as ``main.py`` keeps it (``infra/host_allocator.py``: programs
run inline, glibc's mallopt; both sides in the process get it; ``--nokeep_freed_memory`` times glibc as it
starts, ``LD_PRELOAD=.../libtcmalloc_minimal.so.4`` both sides with tcmalloc).

``--reference_dir`` points at a checkout of github.com/yang-song/score_sde_pytorch: its models are built
from its own config of the same name and timed the same way (``torch.set_num_threads(--threads)``, its
``losses.get_step_fn`` with Adam and EMA for the step; ``no_grad`` forward in eval mode). Its CUDA-only
``op`` extensions are not compiled: ``torch.utils.cpp_extension.load`` is replaced by a stub before
import, and on the CPU the reference calls its native ``upfirdn2d`` anyway. torch is never a
dependency of the library; this part is skipped without it.

  .venv/bin/python benchmarks/cpu_flags.py
  .venv/bin/python benchmarks/cpu_flags.py --reference_dir=/path/to/score_sde_pytorch
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
import time
from typing import Callable
from unittest import mock

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from scoresde import datasets
from scoresde import losses
from scoresde import run_lib
from scoresde import sde_lib
from scoresde.infra import host_allocator
from scoresde.infra import parallel
from scoresde.infra import xla_cpu
from scoresde.models import utils as mutils
import torch_reference  # benchmarks/

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['vp.cifar10_ddpmpp_continuous', 've.cifar10_ncsnpp_continuous'],
                  'Config modules under configs/ (the reference has configs of the same names).')
flags.DEFINE_integer('batch', 4, 'Batch size.')
flags.DEFINE_integer('repeats', 5, 'Timed calls per variant (median).')
flags.DEFINE_string('reference_dir', '', 'A score_sde_pytorch checkout to time beside ours (optional).')
flags.DEFINE_integer('threads', 2, 'torch.set_num_threads for the reference.')
flags.DEFINE_string('candidate_step', 'LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_DOT',
                    'xla_cpu_experimental_ynn_fusion_type of a candidate training step timed beside the '
                    'library\'s (empty: none).')
flags.DEFINE_list('candidate_gradient', [],
                  'xla_cpu_experimental_ynn_fusion_type sets (`+` between LIBRARY_FUSION_TYPE_ suffixes, e.g. '
                  'DOT+REDUCE; `none` for the empty set) for the gradient program of candidate split steps, each timed beside the library\'s.')

flags.DEFINE_bool('keep_freed_memory', True,
                  'As main.py: single-device CPU programs inline and glibc\'s freed memory kept '
                  '(infra/host_allocator.py).')
flags.DEFINE_bool('halves', False,
                  'Also time the step\'s two halves apart: ours the gradient and the optimizer + EMA update '
                  'programs (the library\'s training options), the reference its loss + backward and its '
                  'clip + Adam + EMA.')

Call = Callable[[], None]


def _with_tuning(enabled: bool, build: Callable[[], object]):
  """Builds (and so compiles, on first call) a program with the library's CPU options on or off."""
  saved = os.environ.get(xla_cpu.ENV_SWITCH)
  os.environ[xla_cpu.ENV_SWITCH] = '1' if enabled else '0'
  try:
    return build()
  finally:
    if saved is None:
      del os.environ[xla_cpu.ENV_SWITCH]
    else:
      os.environ[xla_cpu.ENV_SWITCH] = saved


def _step_call(step, params, optimizer, mesh, data) -> Call:
  """A call of the compiled training ``step`` on its own copy of the state (each step donates it)."""
  holder = {'state': parallel.replicate(mesh, losses.init_train_state(
      jax.random.PRNGKey(1), jax.tree.map(jnp.copy, params), optimizer))}

  def call():
    holder['state'], metrics = step(holder['state'], data)
    jax.block_until_ready(metrics)
  return call


def ours(config, batch: int) -> dict[str, tuple[Call, float]]:
  """Variant name -> (a timed call, its compile + first-call seconds)."""
  config.training.batch_size = batch
  config.training.n_jitted_steps = 1
  mesh = parallel.data_mesh()
  model, variables = mutils.init_model(jax.random.PRNGKey(0), config)
  shape = (batch,) + tuple(datasets.data_shape(config))
  rng = np.random.default_rng(0)
  x = jnp.asarray(datasets.get_data_scaler(config)(rng.random(shape, dtype=np.float32)))
  t = jnp.full((batch,), 0.5)
  probe = jnp.sign(jax.random.normal(jax.random.PRNGKey(2), shape))  # a Rademacher probe
  optimizer = losses.get_optimizer(config)
  sde = sde_lib.get_sde(config)
  data = parallel.shard_batch(mesh, np.asarray(x)[None], axis=1)
  calls = {}
  for enabled, label in ((False, 'XLA defaults'), (True, 'tuned')):
    forward = _with_tuning(enabled, lambda: jax.jit(
        lambda v: model.apply(v, x, t, train=False), compiler_options=xla_cpu.compiler_options('inference')))
    tangent = _with_tuning(enabled, lambda: jax.jit(
        lambda v: jax.jvp(lambda y: model.apply(v, y, t, train=False), (x,), (probe,)),
        compiler_options=xla_cpu.compiler_options('inference')))
    # XLA's defaults: the one-program step as before; tuned: the trainer's step as the library builds it
    # (on CPU a gradient and an update program, each with its options).
    step = _with_tuning(enabled, lambda: run_lib.build_multi_step(config, sde, model, optimizer, mesh,
                                                                  split_on_cpu=enabled))
    def forward_call(f=forward):
      jax.block_until_ready(f(variables))

    def tangent_call(f=tangent):
      jax.block_until_ready(f(variables))

    step_call = _step_call(step, variables['params'], optimizer, mesh, data)
    calls[f'forward, {label}'] = (forward_call, _seconds(forward_call))
    calls[f'forward + tangent, {label}'] = (tangent_call, _seconds(tangent_call))
    calls[f'training step, {label}'] = (step_call, _seconds(step_call))
  if FLAGS.halves:
    calls.update(_our_halves(config, sde, model, optimizer, variables['params'], x))
  if FLAGS.candidate_step:
    candidate = {'xla_cpu_experimental_ynn_fusion_type': FLAGS.candidate_step}
    with mock.patch.dict(xla_cpu.table(), {'training': candidate}):
      step = run_lib.build_multi_step(config, sde, model, optimizer, mesh, split_on_cpu=False)
    candidate_call = _step_call(step, variables['params'], optimizer, mesh, data)
    calls[f'training step, candidate {FLAGS.candidate_step}'] = (candidate_call, _seconds(candidate_call))
  for fusion_set in FLAGS.candidate_gradient:
    types = '' if fusion_set == 'none' else ','.join(f'LIBRARY_FUSION_TYPE_{t}' for t in fusion_set.split('+'))
    gradient = {'xla_cpu_experimental_ynn_fusion_type': types}
    with mock.patch.dict(xla_cpu.table(), {'gradient': gradient}):
      step = _with_tuning(True, lambda: run_lib.build_multi_step(config, sde, model, optimizer, mesh,
                                                                 split_on_cpu=True))
    split_call = _step_call(step, variables['params'], optimizer, mesh, data)
    calls[f'training step, split, gradient {fusion_set}'] = (split_call, _seconds(split_call))
  return calls


def _our_halves(config, sde, model, optimizer, params, x) -> dict[str, tuple[Call, float]]:
  """The step's gradient and update as two programs with the library's training options."""
  state = losses.init_train_state(jax.random.PRNGKey(1), params, optimizer)
  gradient = xla_cpu.jit(losses.get_gradient_step(losses.get_loss_fn(config, sde, model, train=True)),
                         'training')
  update = xla_cpu.jit(losses.get_update_step(config, optimizer), 'training')
  halves = {'args': None}

  def gradient_call():
    halves['args'] = jax.block_until_ready(gradient(state, x))

  def update_call():  # the state is not donated: every call updates the same one
    jax.block_until_ready(update(state, *halves['args']))
  gradient_seconds = _seconds(gradient_call)
  return {'gradient, tuned': (gradient_call, gradient_seconds),
          'update, tuned': (update_call, _seconds(update_call))}


def reference(name: str, batch: int) -> dict[str, tuple[Call, float]]:
  """The PyTorch reference's forward and step for its config ``name`` (empty without torch)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    print('torch is not installed: the reference is skipped')
    return {}
  ref = torch_reference.build(FLAGS.reference_dir, name, FLAGS.threads)
  config = ref.config
  score_fn = ref.modules['models.utils'].get_score_fn(ref.sde, ref.model, train=False,
                                                      continuous=config.training.continuous)
  x = torch.rand(batch, config.data.num_channels, config.data.image_size, config.data.image_size)
  t = torch.full((batch,), 0.5)

  def forward_call():
    with torch.no_grad():
      score_fn(x, t)

  def step_call():
    ref.step_fn(ref.state, x)
  calls = {'forward, reference': (forward_call, _seconds(forward_call)),
           'training step, reference': (step_call, _seconds(step_call))}
  if FLAGS.halves:
    calls.update(_reference_halves(ref, x))
  return calls


def _reference_halves(ref, x) -> dict[str, tuple[Call, float]]:
  """The reference's step split as ours: loss + backward, then clip + Adam and the EMA update."""
  config, losses_module = ref.config, ref.modules['losses']
  loss_fn = losses_module.get_sde_loss_fn(ref.sde, train=True, reduce_mean=config.training.reduce_mean,
                                          continuous=config.training.continuous,
                                          likelihood_weighting=config.training.likelihood_weighting)
  optimize_fn = losses_module.optimization_manager(config)
  state = ref.state

  def gradient_call():
    state['optimizer'].zero_grad()
    loss_fn(state['model'], x).backward()

  def update_call():
    optimize_fn(state['optimizer'], state['model'].parameters(), step=state['step'])
    state['ema'].update(state['model'].parameters())
  gradient_seconds = _seconds(gradient_call)
  return {'gradient, reference': (gradient_call, gradient_seconds),
          'update, reference': (update_call, _seconds(update_call))}


def _seconds(call: Call) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv):
  del argv
  if FLAGS.keep_freed_memory:
    host_allocator.inline_cpu_programs()
  kept = FLAGS.keep_freed_memory and host_allocator.keep_freed_memory()
  load = os.getloadavg()[0]
  print(f'# {os.cpu_count()} CPUs, jax {jax.__version__}, batch {FLAGS.batch}, load {load:.1f} at start, '
        f'{time.strftime("%Y-%m-%d")}, allocator: {host_allocator.allocator()}, freed memory kept: {kept}')
  print('| config | variant | compile + 1st call (s) | median (s) | / XLA defaults | / reference | '
        'page faults / call |')
  print('|---|---|---|---|---|---|---|')
  for name in FLAGS.configs:
    config = importlib.import_module(f'configs.{name}').get_config()
    calls = ours(config, FLAGS.batch)
    if FLAGS.reference_dir:
      calls.update(reference(name, FLAGS.batch))
    times = {variant: [] for variant in calls}
    faults = {variant: [] for variant in calls}
    for _ in range(FLAGS.repeats):  # interleaved: every variant sees the same load
      for variant, (call, _) in calls.items():
        before = _minor_faults()
        times[variant].append(_seconds(call))
        faults[variant].append(_minor_faults() - before)
    median = {variant: float(np.median(ts)) for variant, ts in times.items()}
    for variant, (_, compile_s) in calls.items():
      kind = variant.split(',')[0]
      base = median.get(f'{kind}, XLA defaults')  # none for the halves
      ref = median.get(f'{kind}, reference')
      print(f'| {name} | {variant} | {compile_s:.1f} | {median[variant]:.3f} | '
            f'{f"{median[variant] / base:.2f}" if base else "—"} | '
            f'{f"{median[variant] / ref:.2f}" if ref else "—"} | {int(np.median(faults[variant])):,} |',
            flush=True)


if __name__ == '__main__':
  app.run(main)
