"""Model registry, initialisation, and the reference's score parameterisations.

Every model is a ``flax.linen.Module`` built from explicit kwargs, ``cls(**cls.kwargs_from_config(config),
**label_kwargs(config))`` (``create_model``), and called as ``model.apply(variables, x, labels, train=...)``,
NHWC (or (B, D) for toy data); its ``input_shape`` is the shape of one example. What ``labels`` is and how
the network output becomes a score depend on the SDE and on continuous vs discrete training; those
conventions live here alone: ``get_score_fn`` passes the labels and ``label_kwargs`` tells the network what
they are (Song et al. 2021 reference code, models/utils.py).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoresde import sde_lib
from scoresde.models import layerspp

Array = jax.Array
Variables = Any

# name -> module that defines it. Modules are imported on first use so that the registry is complete
# whatever the caller imported, and an unknown name fails with the list of known ones.
_MODEL_MODULES = {
    'mlp': 'scoresde.models.mlp',
    'ncsnpp': 'scoresde.models.ncsnpp',
    'ddpm': 'scoresde.models.ddpm',
    'ncsn': 'scoresde.models.ncsnv2',
    'ncsnv2_64': 'scoresde.models.ncsnv2',
    'ncsnv2_128': 'scoresde.models.ncsnv2',
    'ncsnv2_256': 'scoresde.models.ncsnv2',
    'noise_conditional_wrn': 'scoresde.models.classifier',  # config.classifier.name (controllable.py)
}
_MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str):
  """Class decorator: makes ``cls`` available as ``config.model.name = name``."""
  def register(cls):
    if name in _MODELS and _MODELS[name] is not cls:
      raise ValueError(f'a model named {name!r} is already registered ({_MODELS[name].__name__}).')
    _MODELS[name] = cls
    return cls
  return register


def get_model(name: str) -> type[nn.Module]:
  """The model class registered under ``name``."""
  if name not in _MODELS and name in _MODEL_MODULES:
    importlib.import_module(_MODEL_MODULES[name])
  if name not in _MODELS:
    raise ValueError(f'config.model.name={name!r} is not a known model; choose one of '
                     f'{sorted(set(_MODEL_MODULES) | set(_MODELS))}.')
  return _MODELS[name]


def get_sigmas(config) -> np.ndarray:
  """The noise level of each discrete label of SMLD/NCSN models, float32 (num_scales,): label j is the
  j-th largest, σ_max → σ_min (``sde_lib.VESDE.noise_label``)."""
  model = config.model
  return sde_lib.geometric_sigmas(model.sigma_min, model.sigma_max, model.num_scales)[::-1]


def create_model(config) -> nn.Module:
  """The configured network, built from explicit kwargs: its architecture (``cls.kwargs_from_config``,
  next to each class) and what its labels mean (``label_kwargs``)."""
  cls = get_model(config.model.name)
  return cls(**cls.kwargs_from_config(config), **label_kwargs(config))


def dummy_inputs(model: nn.Module, batch_size: int) -> tuple[Array, Array]:
  """``(x, labels)`` to trace an initialisation with: zeros of the model's ``input_shape``, unit labels."""
  return (jnp.zeros((batch_size,) + tuple(model.input_shape), jnp.float32),
          jnp.ones((batch_size,), jnp.int32))


def init_model(rng: Array, config, batch_size: int = 1) -> tuple[nn.Module, Variables]:
  """Builds the configured model and initialises its variables on a dummy batch."""
  model = create_model(config)
  x, labels = dummy_inputs(model, batch_size)
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({'params': params_rng, 'dropout': dropout_rng}, x, labels, train=False)
  return model, variables


# The compute dtypes of ``config.training.dtype`` and ``config.sampling.dtype``. Whatever the choice, the
# parameters, optimizer state and EMA are float32: only the network's forward (and backward) pass is cast.
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Modules kept float32 (parameters, inputs and output) in a bfloat16 pass: the Fourier features multiply
# log σ by 2π W, and bfloat16's 8-bit significand would move W by up to 2⁻⁹ |W| (|W| reaches ~50 at
# fourier_scale=16), i.e. the features' phases by radians, so a float32-trained network would see others.
_FLOAT32_MODULES = (layerspp.GaussianFourierProjection,)


def compute_dtype(name: str, key: str) -> jnp.dtype:
  """The dtype that config key ``key`` names (``config.training.dtype`` or ``config.sampling.dtype``)."""
  if str(name) not in COMPUTE_DTYPES:
    raise ValueError(f'{key}={name!r} is not a compute dtype; choose one of {sorted(COMPUTE_DTYPES)} '
                     "('bfloat16': bfloat16 compute with float32 parameters).")
  return COMPUTE_DTYPES[str(name)]


def configured_dtype(config, section: str) -> str:
  """The checked name of ``config.<section>.dtype`` ('training' or 'sampling'); 'float32' when the config
  has no such key (ours: configs written for the reference, e.g. beside a released checkpoint, and
  partial configs that only build a model lack it)."""
  name = str(config[section].dtype) if section in config and 'dtype' in config[section] else 'float32'
  compute_dtype(name, f'config.{section}.dtype')
  return name


def check_precision(config) -> None:
  """Raises ValueError naming the key unless ``config.training.dtype`` and ``config.sampling.dtype`` are
  known compute dtypes."""
  configured_dtype(config, 'training')
  configured_dtype(config, 'sampling')


def _cast_floating(tree: Any, dtype: jnp.dtype, keep: Callable[[str], bool] = lambda path: False) -> Any:
  """``tree`` with its floating arrays cast to ``dtype``, except those whose key path ``keep`` names;
  other leaves (integer labels, Python scalars, flags) unchanged."""
  def cast(path, leaf):
    if (not isinstance(leaf, (jax.Array, np.ndarray)) or not jnp.issubdtype(leaf.dtype, jnp.floating)
        or keep(jax.tree_util.keystr(path))):
      return leaf
    return jnp.asarray(leaf).astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, tree)


def _in_float32_module(path: str) -> bool:
  """Whether a variable's key path lies in a ``_FLOAT32_MODULES`` module (flax names them Class_i)."""
  return any(f"['{cls.__name__}_" in path for cls in _FLOAT32_MODULES)


def with_compute_dtype(apply: Callable[..., Array], dtype: jnp.dtype) -> Callable[..., Array]:
  """``apply(variables, x, *labels)`` evaluated in ``dtype``, returning float32: the precision policy.

  Inside the function the floating variables and ``x`` are cast to ``dtype``, so gradients reach the
  float32 parameters through the casts, and so are the floating inputs and outputs of every submodule
  (but ``_FLOAT32_MODULES``): without that, the float32 time embedding or a NumPy-scalar rescaling
  (``residual_sum``'s 1/√2) would promote the activations back to float32. The network's own labels are
  not cast: in bfloat16, 999 t would be resolved to steps of 4.
  """
  if dtype == jnp.float32:
    return apply

  def cast_submodule_io(next_fn, args, kwargs, context):
    module = context.module
    if not isinstance(module.parent, nn.Module) or isinstance(module, _FLOAT32_MODULES):
      return next_fn(*args, **kwargs)
    return _cast_floating(next_fn(*_cast_floating(args, dtype), **_cast_floating(kwargs, dtype)), dtype)

  def apply_in_dtype(variables, x, *labels):
    with nn.intercept_methods(cast_submodule_io):
      out = apply(_cast_floating(variables, dtype, _in_float32_module), x.astype(dtype), *labels)
    return out.astype(jnp.float32)
  return apply_in_dtype


def get_model_fn(model: nn.Module, variables: Variables, train: bool = False,
                 rng: Array | None = None, dtype: str = 'float32') -> Callable[[Array, Array], Array]:
  """``model_fn(x, labels)``, computed in ``dtype`` (``with_compute_dtype``); in training mode dropout
  draws from ``rng``."""
  if train and rng is None:
    raise ValueError('get_model_fn(train=True) needs an rng for dropout.')
  rngs = {'dropout': rng} if train else {}
  apply = with_compute_dtype(
      lambda v, x, labels: model.apply(v, x, labels, train=train, rngs=rngs), compute_dtype(dtype, 'dtype'))
  return lambda x, labels: apply(variables, x, labels)


def get_score_fn(sde: sde_lib.SDE, model: nn.Module, variables: Variables, *, continuous: bool,
                 train: bool = False, rng: Array | None = None, dtype: str = 'float32') -> sde_lib.ScoreFn:
  """``score_fn(x, t)`` from a network, with the reference's label and scaling conventions.

  ``continuous`` must say how the network was trained (``config.training.continuous``): it has no
  default because a wrong value gives no error, only wrong scores (the reference's likelihood
  evaluation hard-coded ``continuous=True`` and so fed discretely trained models labels they never
  saw). Outside training, build score functions with ``network_score_fn(config, ...)``, which reads it.

  - VP / sub-VP: the network predicts ε; score = -ε / std. Continuous (and always for sub-VP): labels
    = 999 t and std = the marginal std. Discrete VP: labels = t (N-1) and std = √(1-ᾱ)[⌊t (N-1)⌋].
    The 999 is the reference's, independent of N: kept so that released checkpoints give their scores.
  - VE: continuous labels = σ(t) (the marginal std); discrete labels = round((T-t)(N-1)), the index into
    the descending σ table. The network's output is the score (``scale_by_sigma`` divides inside).

  ``dtype``: the network's compute dtype (``with_compute_dtype``); the scaling by 1/std is float32.
  """
  model_fn = get_model_fn(model, variables, train=train, rng=rng, dtype=dtype)

  if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
    def score_fn(x, t):
      if continuous or isinstance(sde, sde_lib.subVPSDE):
        labels = t * 999
        std = sde.marginal_coeffs(t)[1]
      else:
        labels = sde.noise_label(t)
        std = sde.sqrt_1m_alphas_cumprod[sde.timestep_index(t)]
      return sde_lib.batch_mul(-1. / std, model_fn(x, labels))
    return score_fn

  if isinstance(sde, sde_lib.VESDE):
    def score_fn(x, t):
      if continuous:
        labels = sde.marginal_coeffs(t)[1]
      else:
        labels = sde.noise_label(t)
      return model_fn(x, labels)
    return score_fn

  raise TypeError(f'no score parameterisation for SDE {type(sde).__name__}; '
                  f'expected one of {[c.__name__ for c in sde_lib.SDES.values()]}.')


def is_continuous(config) -> bool:
  """Whether the network's labels are continuous (σ or 999 t) or discrete (an index): how it was
  trained. sub-VP has only a continuous objective, so its labels are always continuous."""
  return bool(config.training.continuous) or str(config.training.sde).lower() == 'subvpsde'


def label_kind(config) -> str:
  """What the network's labels are: the one place that decides it, from the SDE and how the network was
  trained (``is_continuous``), matching the labels ``get_score_fn`` passes.

  - 'sigma' (continuous VE): the label is σ(t) itself;
  - 'index' (discrete VE): the label indexes the descending σ table (``get_sigmas``);
  - 'time' (VP, sub-VP): the label is 999 t (continuous) or t (N-1) (discrete); it carries no σ.
  """
  name = str(config.training.sde).lower()
  if name not in sde_lib.SDES:
    raise ValueError(f'config.training.sde={config.training.sde!r} is not known; choose one of '
                     f'{sorted(sde_lib.SDES)}.')
  if name != 'vesde':
    return 'time'
  return 'sigma' if is_continuous(config) else 'index'


def label_kwargs(config) -> dict[str, Any]:
  """The networks' constructor kwargs for their labels: ``label_kind`` and ``sigmas``, the descending σ
  table that 'index' labels point into (None for other kinds)."""
  kind = label_kind(config)
  sigmas = tuple(float(s) for s in get_sigmas(config)) if kind == 'index' else None
  return {'label_kind': kind, 'sigmas': sigmas}


@dataclasses.dataclass(frozen=True, eq=False)
class _NetworkScore:
  """``(variables, x, t) -> score`` for one (SDE, model, label convention), eval mode. Equal when built
  from the same SDE and model objects, so ``jit`` caches one compiled program for all weights."""
  sde: sde_lib.SDE
  model: nn.Module
  continuous: bool
  dtype: str

  def __call__(self, variables: Variables, x: Array, t: Array) -> Array:
    return get_score_fn(self.sde, self.model, variables, continuous=self.continuous, dtype=self.dtype)(x, t)

  def __eq__(self, other):
    return (isinstance(other, _NetworkScore) and self.sde is other.sde and self.model is other.model
            and self.continuous == other.continuous and self.dtype == other.dtype)

  def __hash__(self):
    return hash((id(self.sde), id(self.model), self.continuous, self.dtype))


def network_score_fn(config, sde: sde_lib.SDE, model: nn.Module,
                     variables: Variables) -> jax.tree_util.Partial:
  """The trained network's ``score_fn(x, t)`` in eval mode, with the label convention it was trained
  with (``is_continuous(config)``): the one builder that sampling, likelihood and evaluation share, so
  all of them compute in ``config.sampling.dtype`` (``with_compute_dtype``).

  A ``jax.tree_util.Partial`` over ``variables``: samplers and likelihoods jit it with the weights as
  traced arguments, so every checkpoint of one model reuses one compiled program.
  """
  return jax.tree_util.Partial(_NetworkScore(sde, model, is_continuous(config),
                                             configured_dtype(config, 'sampling')), variables)


def param_count(variables: Variables) -> int:
  """Number of scalars in ``variables['params']`` (frozen parameters included, as the reference counts)."""
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(variables['params'])))


def validate_model_config(config) -> None:
  """Checks ``config.model`` / ``config.data`` for the configured model before anything is compiled.

  Raises ValueError naming the offending key: unknown model name, image size not divisible by the number
  of down-samplings, GroupNorm group counts that do not divide a layer's channels, and the like. Each model
  class states its own constraints in a ``check_config(config)`` static method.
  """
  cls = get_model(config.model.name)
  check = getattr(cls, 'check_config', None)
  if check is not None:
    check(config)
  if config.model.scale_by_sigma and label_kind(config) == 'time':
    raise ValueError(f'config.model.scale_by_sigma=True divides the output by σ, but with '
                     f'config.training.sde={config.training.sde!r} the labels are times (999 t or t (N-1)), '
                     'not noise levels: set config.model.scale_by_sigma=False.')


def check_input_shape(config, data_shape: tuple[int, ...]) -> None:
  """Raises ValueError unless the configured network takes examples of ``data_shape``, the data
  pipeline's shape of one example (the caller passes it: models never import the data pipeline)."""
  model_shape = tuple(create_model(config).input_shape)
  data_shape = tuple(data_shape)
  if model_shape != data_shape:
    kind = 'vector data' if len(model_shape) == 1 else 'images'
    fix = "an image model such as 'ncsnpp'" if len(data_shape) == 3 else "config.model.name='mlp'"
    raise ValueError(f'config.model.name={config.model.name!r} is for {kind} of shape {model_shape}; '
                     f'config.data.dataset={config.data.dataset!r} gives examples of shape {data_shape}: '
                     f'use {fix}.')
