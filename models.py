"""``import models`` / ``from models import utils``, as in score_sde: an alias of ``scoresde.models``.

Every submodule is registered under its old name too, so that ``models.utils`` *is*
``scoresde.models.utils`` (one module object; Flax classes and monkeypatches are shared). The
checkpoint converters are ``models.torch_port`` and ``models.jax_port``.
"""
import importlib
import sys

from scoresde import models

_SUBMODULES = {name: f'scoresde.models.{name}' for name in (
    'ddpm', 'layers', 'layerspp', 'mlp', 'ncsnpp', 'ncsnv2', 'normalization', 'up_or_down_sampling',
    'utils')}
_SUBMODULES['torch_port'] = 'scoresde.porting.torch_port'
_SUBMODULES['jax_port'] = 'scoresde.porting.jax_port'

for _name, _path in _SUBMODULES.items():
  _module = importlib.import_module(_path)
  setattr(models, _name, _module)
  sys.modules[f'{__name__}.{_name}'] = _module

sys.modules[__name__] = models
