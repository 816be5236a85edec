"""Memory plan: the compiled training step's device memory, with and without ``config.model.remat``, and
the largest batch that fits a 16 / 40 / 80 GiB device.

For each config the training step the trainer runs (``run_lib.build_multi_step``: loss, gradient,
optimizer update, EMA, the state donated) is lowered on abstract inputs (``jax.eval_shape`` of the train
state, ``jax.ShapeDtypeStruct`` batches: no array is allocated) and compiled, and XLA's buffer assignment
is read from ``compiled.memory_analysis()``:

  peak ≈ argument + output + temp − alias

(the donated state's buffers are reused for the new state, ``alias``; generated code is listed apart).
One step per call (``n_jitted_steps=1``): more steps per call add only their stacked input batches.

The largest batch is a linear fit, not a search: the step is compiled at two batches b₁ (the config's
paper batch ``config.training.batch_size``, or ``--batch``) and b₂ = b₁/2 (2 b₁ when b₁/2 would not split
over the devices), and peak(b) = fixed + b · per_example through both points is solved for
peak(b) = usable · capacity. Figures are per device, for the per-device batch (the global batch over
``jax.device_count()`` devices).

On a CPU backend the figures are XLA:CPU's buffer assignment; a GPU's differs (other fusions, layouts,
cuDNN workspaces), so rerun this on the accelerator for its own figures. In particular XLA:CPU schedules
the recomputation of every checkpointed block early instead of just before its backward pass, so on CPU
remat saves (almost) nothing: measured 66.3 vs 66.2 MiB at the digits NCSN++'s batch 64, and 520 vs
640 MiB of temp for a plain jax.checkpoint'ed chain of 16 dense blocks. JAX on GPU preallocates 75 % of
the device by default (XLA_PYTHON_CLIENT_MEM_FRACTION); ``--usable`` is the fraction a batch may fill.

``--method=residuals`` plans without compiling, so the 256 px and 1024 px configs (whose CPU compiles
take tens of minutes) fit in minutes, and it shows what remat does on any backend:

  estimate = state + gradients + saved residuals

the train state (parameters, Adam's two moments, EMA; ``jax.eval_shape``), one gradient the size of the
parameters, and every intermediate the gradient keeps from the forward pass for the backward pass at
this batch (``jax.ad_checkpoint.print_saved_residuals`` of the training loss, the parameters themselves
left out). It leaves out the backward pass's transient working set and what XLA's fusion and scheduling
add or save, so it is compared with the compiled figure where both were measured (BENCHMARKS.md).
Residuals are linear in the batch, so max batch = (usable · capacity − state − gradients) / per example.

  .venv/bin/python benchmarks/memory_plan.py --configs=configs/ve/digits_ncsnpp_continuous.py
  .venv/bin/python benchmarks/memory_plan.py --configs=vp.cifar10_ddpmpp_continuous --batch=8 --remat=both
  .venv/bin/python benchmarks/memory_plan.py --method=residuals --configs=ve.ffhq_ncsnpp_continuous
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import platform
import re
import sys

from absl import app
from absl import flags
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scoresde import datasets  # pylint: disable=g-import-not-at-top
from scoresde import losses
from scoresde import run_lib
from scoresde import sde_lib
from scoresde.infra import parallel
from scoresde.models import utils as mutils

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['configs/ve/digits_ncsnpp_continuous.py'],
                  'Config modules: configs/ve/x.py or ve.x.')
flags.DEFINE_integer('batch', 0, 'Global batch b₁ for every config (0: its config.training.batch_size).')
flags.DEFINE_enum('remat', 'both', ['both', 'on', 'off'], 'config.model.remat values to plan.')
flags.DEFINE_list('capacities_gib', ['16', '40', '80'], 'Device memories (GiB) to fit a batch into.')
flags.DEFINE_float('usable', 0.9, 'Fraction of a device memory the step may fill.')
flags.DEFINE_enum('method', 'compiled', ['compiled', 'residuals'],
                  'compiled: XLA\'s buffer assignment of the step; residuals: state + gradients + saved '
                  'residuals, traced only.')

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Footprint:
  """``compiled.memory_analysis()`` of one step, bytes per device."""
  argument: int
  output: int
  alias: int
  temp: int
  code: int

  @property
  def peak(self) -> int:
    return self.argument + self.output + self.temp - self.alias


@dataclasses.dataclass(frozen=True)
class LinearFit:
  """peak(b) = fixed + b · per_example through two compiled batches (per-device b)."""
  fixed: float
  per_example: float

  def max_batch(self, capacity_bytes: float) -> int:
    if self.per_example <= 0:
      raise ValueError(f'per-example memory {self.per_example:.0f} B is not positive: the two compiled '
                       'batches do not give a usable linear fit.')
    return max(0, int((capacity_bytes - self.fixed) // self.per_example))


def load_config(name: str):
  """A config from ``configs/ve/x.py`` or ``ve.x``."""
  module = name[:-len('.py')] if name.endswith('.py') else name
  module = module.replace(os.sep, '.').replace('/', '.')
  if not module.startswith('configs.'):
    module = 'configs.' + module
  return importlib.import_module(module).get_config()


def abstract_setup(config, batch: int):
  """(config at ``batch`` with one step per call, model, optimizer, abstract train state): no arrays."""
  parallel.check_batch_size(batch, 'the planned batch')
  config = config.copy_and_resolve_references()
  config.training.batch_size = batch
  config.training.n_jitted_steps = 1
  mutils.validate_model_config(config)
  model = mutils.create_model(config)
  optimizer = losses.get_optimizer(config)

  def init_state():
    x, labels = mutils.dummy_inputs(model, 1)
    params = model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}, x, labels,
                        train=False)['params']
    return losses.init_train_state(jax.random.PRNGKey(2), params, optimizer)
  return config, model, optimizer, jax.eval_shape(init_state)

def footprint(config, batch: int) -> tuple[Footprint, int]:
  """The compiled train step's memory at global ``batch`` and the model's parameter count, from abstract
  inputs only."""
  config, model, optimizer, state = abstract_setup(config, batch)
  batches = jax.ShapeDtypeStruct((1, batch) + tuple(datasets.data_shape(config)), jnp.float32)
  step = run_lib.build_multi_step(config, sde_lib.get_sde(config), model, optimizer, parallel.data_mesh(),
                                  split_on_cpu=False)  # one program, as accelerators run it
  analysis = step.lower(state, batches).compile().memory_analysis()
  params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params)))
  return Footprint(argument=analysis.argument_size_in_bytes, output=analysis.output_size_in_bytes,
                   alias=analysis.alias_size_in_bytes, temp=analysis.temp_size_in_bytes,
                   code=analysis.generated_code_size_in_bytes), params


_SHORT_DTYPES = {'bool': 1, 'i8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 'i16': 2, 'u16': 2, 'f32': 4, 'i32': 4,
                 'u32': 4, 'f64': 8, 'i64': 8, 'u64': 8}
_RESIDUAL = re.compile(r'^(\w+)\[([\d,]*)\] (.*)$')


def residual_bytes(printed: str) -> int:
  """Bytes of the residuals ``print_saved_residuals`` listed, arguments (the parameters) left out."""
  total = 0
  for line in printed.splitlines():
    match = _RESIDUAL.match(line.strip())
    if match is None:
      raise ValueError(f'unexpected line from print_saved_residuals: {line!r}')
    dtype, dims, source = match.groups()
    if source.startswith('from the argument'):
      continue
    total += _SHORT_DTYPES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d]))
  return total


@dataclasses.dataclass(frozen=True)
class ResidualPlan:
  """Bytes per device of one step as state + gradients + saved residuals (see the module docstring)."""
  state: int
  gradients: int
  residuals: int

  @property
  def estimate(self) -> int:
    return self.state + self.gradients + self.residuals


def residual_plan(config, batch: int) -> tuple[ResidualPlan, int]:
  """The step's memory at global ``batch`` from tracing alone, and the parameter count."""
  config, model, _, state = abstract_setup(config, batch)
  loss_fn = losses.get_loss_fn(config, sde_lib.get_sde(config), model, train=True)
  per_device = batch // jax.device_count()
  x = jax.ShapeDtypeStruct((per_device,) + tuple(datasets.data_shape(config)), jnp.float32)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    ad_checkpoint.print_saved_residuals(
        lambda params, x: loss_fn(jax.random.PRNGKey(0), params, x), state.params, x)
  nbytes = lambda tree: int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree)))
  params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params)))
  return ResidualPlan(state=nbytes(state), gradients=nbytes(state.params),
                      residuals=residual_bytes(printed.getvalue())), params


def second_batch(batch: int, devices: int) -> int:
  """b₂ for the fit: half of b₁ where that still splits over the devices, else twice b₁."""
  half = batch // 2
  return half if half >= devices and half % devices == 0 else 2 * batch


def fit(b1: int, f1: Footprint, b2: int, f2: Footprint, devices: int) -> LinearFit:
  """The line through (b₁, peak₁) and (b₂, peak₂), batches per device."""
  d1, d2 = b1 / devices, b2 / devices
  per_example = (f2.peak - f1.peak) / (d2 - d1)
  return LinearFit(fixed=f1.peak - d1 * per_example, per_example=per_example)


def _mib(n: float) -> str:
  return f'{n / 2 ** 20:,.1f}'


def main_residuals(capacities: list[float], remats: tuple[bool, ...]) -> None:
  print(f'# {jax.devices()[0].platform} backend, jax {jax.__version__}; MiB per device; estimate = state + '
        f'gradients + saved residuals (traced, not compiled); max batch per device filling '
        f'{FLAGS.usable:.0%} of the device\n')
  print('| config | remat | params | batch | state | gradients | saved residuals | estimate | per example | '
        + ' | '.join(f'max batch {c:g} GiB' for c in capacities) + ' |')
  print('|' + '---|' * (9 + len(capacities)))
  for name in FLAGS.configs:
    config = load_config(name)
    batch = FLAGS.batch or int(config.training.batch_size)
    for remat in remats:
      config.model.remat = remat
      plan, params = residual_plan(config, batch)
      per_example = plan.residuals / (batch / jax.device_count())
      fixed = plan.state + plan.gradients
      maxima = [str(max(0, int((FLAGS.usable * c * GIB - fixed) // per_example))) for c in capacities]
      print(f'| {name} | {"on" if remat else "off"} | {params / 1e6:.1f}M | {batch} | {_mib(plan.state)} | '
            f'{_mib(plan.gradients)} | {_mib(plan.residuals)} | {_mib(plan.estimate)} | {_mib(per_example)} | '
            + ' | '.join(maxima) + ' |', flush=True)


def main(argv):
  del argv
  devices = jax.device_count()
  capacities = [float(c) for c in FLAGS.capacities_gib]
  remats = {'both': (False, True), 'on': (True,), 'off': (False,)}[FLAGS.remat]
  if FLAGS.method == 'residuals':
    main_residuals(capacities, remats)
    return
  print(f'# {platform.processor() or platform.machine()}, {devices} {jax.devices()[0].platform} device(s), '
        f'jax {jax.__version__}; MiB per device; max batch per device from a linear fit of two compiled '
        f'batches, filling {FLAGS.usable:.0%} of the device\n')
  print('| config | remat | params | batch | argument | output | alias | temp | code | peak | '
        'fixed + per example | ' + ' | '.join(f'max batch {c:g} GiB' for c in capacities) + ' |')
  print('|' + '---|' * (11 + len(capacities)))
  for name in FLAGS.configs:
    config = load_config(name)
    b1 = FLAGS.batch or int(config.training.batch_size)
    b2 = second_batch(b1, devices)
    for remat in remats:
      config.model.remat = remat
      f1, params = footprint(config, b1)
      f2, _ = footprint(config, b2)
      line = fit(b1, f1, b2, f2, devices)
      maxima = [str(line.max_batch(FLAGS.usable * c * GIB)) for c in capacities]
      print(f'| {name} | {"on" if remat else "off"} | {params / 1e6:.1f}M | {b1} | {_mib(f1.argument)} | '
            f'{_mib(f1.output)} | {_mib(f1.alias)} | {_mib(f1.temp)} | {_mib(f1.code)} | {_mib(f1.peak)} | '
            f'{_mib(line.fixed)} + {_mib(line.per_example)} b | ' + ' | '.join(maxima) + ' |', flush=True)


if __name__ == '__main__':
  app.run(main)
