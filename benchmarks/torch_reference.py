"""The PyTorch reference (a checkout of github.com/yang-song/score_sde_pytorch) built on the CPU, for the
benchmarks that time it beside ours (``cpu_flags.py``, ``likelihood_reference.py``).

torch is never a dependency of the library: callers import this only when asked to compare. The
reference's CUDA-only ``op`` extensions are not compiled (``torch.utils.cpp_extension.load`` is replaced
by a stub before import; on the CPU the reference calls its native ``upfirdn2d`` anyway). Its ``configs``
package shares our package's name, so ours is set aside while the reference's config is read.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any, Callable


@dataclasses.dataclass
class Reference:
  """A reference model with its training state, SDE and modules (``losses``, ``likelihood``, ...)."""
  config: Any
  model: Any
  state: dict
  sde: Any
  step_fn: Callable
  modules: dict[str, Any]


def _import(reference_dir: str, config_name: str) -> tuple[dict[str, Any], Any]:
  """The reference's modules and its config ``config_name``, our ``configs`` package restored after."""
  sys.path.insert(0, reference_dir)
  ours = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split('.')[0] == 'configs'}
  try:
    modules = {name: importlib.import_module(name)
               for name in ('losses', 'sde_lib', 'likelihood', 'models.utils', 'models.ema')}
    for model_module in ('ncsnpp', 'ddpm', 'ncsnv2'):
      importlib.import_module(f'models.{model_module}')  # registers the models
    config = importlib.import_module(f'configs.{config_name}').get_config()
  finally:
    sys.path.remove(reference_dir)
    for module in [m for m in sys.modules if m.split('.')[0] == 'configs']:
      del sys.modules[module]
    sys.modules.update(ours)
  return modules, config


def _prepare_torch(threads: int) -> None:
  """torch on ``threads`` CPU threads, with the reference's CUDA-only extensions stubbed before import."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.utils.cpp_extension as cpp_extension  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  cpp_extension.load = lambda *args, **kwargs: None  # the CUDA kernels; unused on the CPU


def build(reference_dir: str, config_name: str, threads: int,
          adjust: Callable[[Any], None] = lambda config: None) -> Reference:
  """The reference's model for its config ``config_name`` (changed by ``adjust`` first), seeded, with
  Adam, EMA and its training step, on the CPU with ``threads`` threads."""
  import torch  # pylint: disable=import-outside-toplevel
  _prepare_torch(threads)
  modules, config = _import(reference_dir, config_name)
  config.device = torch.device('cpu')
  adjust(config)
  torch.manual_seed(0)
  losses, sde_lib = modules['losses'], modules['sde_lib']
  model = modules['models.utils'].create_model(config)
  state = dict(optimizer=losses.get_optimizer(config, model.parameters()), model=model,
               ema=modules['models.ema'].ExponentialMovingAverage(model.parameters(),
                                                                   decay=config.model.ema_rate),
               step=0)
  if config.training.sde == 'vesde':
    sde = sde_lib.VESDE(config.model.sigma_min, config.model.sigma_max, config.model.num_scales)
  else:
    sde = sde_lib.VPSDE(config.model.beta_min, config.model.beta_max, config.model.num_scales)
  step_fn = losses.get_step_fn(sde, train=True, optimize_fn=losses.optimization_manager(config),
                               reduce_mean=config.training.reduce_mean,
                               continuous=config.training.continuous,
                               likelihood_weighting=config.training.likelihood_weighting)
  return Reference(config=config, model=model, state=state, sde=sde, step_fn=step_fn, modules=modules)


def layers_module(reference_dir: str, threads: int) -> Any:
  """The reference's ``models.layerspp`` (its NCSN++/DDPM++ blocks), on the CPU with ``threads`` threads."""
  _prepare_torch(threads)
  sys.path.insert(0, reference_dir)
  try:
    return importlib.import_module('models.layerspp')
  finally:
    sys.path.remove(reference_dir)
