"""Training objectives, optimizer, EMA and the training step.

Objectives (all return per-example losses of shape (B,); callers average):

- ``sde_loss``: continuous denoising score matching (Song et al. 2021, eq. 7), t ~ U(eps, T),
  λ(t) = σ_t² (the paper's default) or the likelihood weighting λ(t) = g(t)² (Song, Durkan, Murray,
  Ermon 2021, "Maximum Likelihood Training of Score-Based Diffusion Models", Thm. 1), optionally with
  t importance-sampled ∝ g²/σ² (their Sec. 5.1; ``likelihood_weighting.py``).
- ``smld_loss``: the discrete NCSN objective over the N noise levels of a VE SDE (Song & Ermon 2019).
- ``ddpm_loss``: the discrete DDPM ε-prediction objective over the N steps of a VP SDE (Ho et al. 2020).
- ``ssm_loss``: sliced score matching (Song, Garg, Shi, Ermon 2019), optionally with variance
  reduction, at the perturbed marginals p_t with the same λ(t) = σ_t² as DSM.

Each takes a plain ``score_fn(x, t)`` (or, for the discrete ones, ``model_fn(x, labels)``), so an exact
analytic score can be plugged in to check that it minimises the objective (tests/test_losses.py).
``reduce_mean`` averages the squared error over data dimensions; otherwise it is halved and summed, as in
the reference (``0.5 * sum``).

Training: optax Adam with the reference's linear warm-up and global-norm clipping, an EMA of the
parameters, and ``train_step`` which ``run_lib`` scans ``n_jitted_steps`` times per host call.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from scoresde import likelihood_weighting as likelihood_weighting_lib
from scoresde import sde_lib
from scoresde.models import utils as mutils

Array = jax.Array
PyTree = Any
ModelFn = Callable[[Array, Array], Array]
# loss_fn(rng, params, x (B, ...)) -> per-example losses (B,)
LossFn = Callable[[Array, PyTree, Array], Array]

ADAM_BETA2 = 0.999  # flax.optim.Adam's and torch.optim.Adam's default, which the reference used


def _reduce(x: Array, reduce_mean: bool) -> Array:
  """Per-example reduction over all non-batch dims: mean, or 0.5·sum (reference convention)."""
  x = x.reshape(x.shape[0], -1)
  return jnp.mean(x, axis=-1) if reduce_mean else 0.5 * jnp.sum(x, axis=-1)


def sde_loss(rng: Array, score_fn: sde_lib.ScoreFn, sde: sde_lib.SDE, x: Array, *,
             reduce_mean: bool = True, likelihood_weighting: bool = False, eps: float = 1e-5,
             times: Array | None = None, unit_weighting: bool = False,
             importance_sampling: bool = False) -> Array:
  """Continuous DSM: λ(t) E‖s(x_t, t) − ∇ log p_0t(x_t | x_0)‖², t ~ U(eps, T), per example.

  With λ = σ² this is ‖σ s + z‖² (x_t = a x_0 + σ z); with λ = g², ‖s + z/σ‖² g²; with
  ``unit_weighting`` (λ = 1), ‖s + z/σ‖². ``times`` (n,): draw t uniformly among these instead (the
  anomaly detector's discrete noise levels, ``SDE.noise_level_time``). ``importance_sampling`` (with
  ``likelihood_weighting``): t ~ q(t) ∝ g²/σ² and the loss ‖σ s + z‖² Z/(T − eps), an unbiased estimate
  of the likelihood-weighted loss with less variance (Song, Durkan, Murray, Ermon 2021, Sec. 5.1;
  ``likelihood_weighting.importance_time``).
  """
  if importance_sampling and not likelihood_weighting:
    raise ValueError('importance_sampling samples t for the likelihood weighting: it needs '
                     'likelihood_weighting=True (config.training.likelihood_weighting).')
  rng_t, rng_z = jax.random.split(rng)
  if importance_sampling:
    t = likelihood_weighting_lib.importance_time(rng_t, sde, (x.shape[0],), eps)
  elif times is None:
    t = jax.random.uniform(rng_t, (x.shape[0],), minval=eps, maxval=sde.T)
  else:
    t = jnp.asarray(times, jnp.float32)[jax.random.randint(rng_t, (x.shape[0],), 0, len(times))]
  z = jax.random.normal(rng_z, x.shape)
  mean, std = sde.marginal_prob(x, t)
  perturbed = mean + sde_lib.batch_mul(std, z)
  score = score_fn(perturbed, t)
  if importance_sampling:
    scale = likelihood_weighting_lib.importance_normalizer(sde, eps) / (sde.T - eps)
    return _reduce(jnp.square(sde_lib.batch_mul(std, score) + z), reduce_mean) * scale
  if likelihood_weighting or unit_weighting:
    weight = sde.sde(jnp.zeros_like(x), t)[1]**2 if likelihood_weighting else 1.
    return _reduce(jnp.square(score + sde_lib.batch_mul(1. / std, z)), reduce_mean) * weight
  return _reduce(jnp.square(sde_lib.batch_mul(std, score) + z), reduce_mean)


def smld_loss(rng: Array, model_fn: ModelFn, sde: sde_lib.VESDE, x: Array, *,
              reduce_mean: bool = False) -> Array:
  """NCSN objective: σ² ‖s(x + σ z, j) + z/σ‖², label j ~ U{0..N-1}, σ = ``sde.label_sigma(j)``."""
  if not isinstance(sde, sde_lib.VESDE):
    raise TypeError(f'SMLD training needs a VESDE, got {type(sde).__name__}.')
  rng_i, rng_z = jax.random.split(rng)
  labels = jax.random.randint(rng_i, (x.shape[0],), 0, sde.N)
  sigmas = sde.label_sigma(labels)
  noise = sde_lib.batch_mul(sigmas, jax.random.normal(rng_z, x.shape))
  score = model_fn(x + noise, labels)
  target = -sde_lib.batch_mul(1. / sigmas**2, noise)
  return _reduce(jnp.square(score - target), reduce_mean) * sigmas**2


def ddpm_loss(rng: Array, model_fn: ModelFn, sde: sde_lib.VPSDE, x: Array, *,
              reduce_mean: bool = True) -> Array:
  """DDPM objective: ‖ε_θ(√ᾱ_i x + √(1−ᾱ_i) ε, i) − ε‖², i ~ U{0..N-1} (Ho et al. 2020, eq. 14)."""
  if not isinstance(sde, sde_lib.VPSDE):
    raise TypeError(f'DDPM training needs a VPSDE, got {type(sde).__name__}.')
  rng_i, rng_z = jax.random.split(rng)
  labels = jax.random.randint(rng_i, (x.shape[0],), 0, sde.N)
  noise = jax.random.normal(rng_z, x.shape)
  perturbed = (sde_lib.batch_mul(sde.sqrt_alphas_cumprod[labels], x)
               + sde_lib.batch_mul(sde.sqrt_1m_alphas_cumprod[labels], noise))
  return _reduce(jnp.square(model_fn(perturbed, labels) - noise), reduce_mean)


def ssm_loss(rng: Array, score_fn: sde_lib.ScoreFn, sde: sde_lib.SDE, x: Array, *,
             reduce_mean: bool = True, variance_reduction: bool = True, n_projections: int = 1,
             eps: float = 1e-5) -> Array:
  """Sliced score matching at the perturbed marginals, λ(t) = σ_t², per example.

  J(s) = E_v[vᵀ ∇ₓs v + ½ (vᵀs)²] (Song et al. 2019, eq. 7), or with variance reduction (SSM-VR)
  E_v[vᵀ ∇ₓs v] + ½ ‖s‖², v ~ N(0, I). Both equal ½ E‖s − ∇ log p_t‖² − ½ E‖∇ log p_t‖², so the exact
  score minimises them. The sum over dimensions is not halved here (the ½ is in J); ``reduce_mean``
  divides by the dimension, matching ``sde_loss``'s two reductions up to a constant.
  """
  rng_t, rng_z, rng_v = jax.random.split(rng, 3)
  t = jax.random.uniform(rng_t, (x.shape[0],), minval=eps, maxval=sde.T)
  mean, std = sde.marginal_prob(x, t)
  perturbed = mean + sde_lib.batch_mul(std, jax.random.normal(rng_z, x.shape))
  vs = jax.random.normal(rng_v, (n_projections,) + x.shape)

  def per_projection(v):
    score, jvp = jax.jvp(lambda y: score_fn(y, t), (perturbed,), (v,))
    flat = lambda a: a.reshape(a.shape[0], -1)
    trace_term = jnp.sum(flat(v) * flat(jvp), axis=-1)
    if variance_reduction:
      norm_term = 0.5 * jnp.sum(flat(score)**2, axis=-1)
    else:
      norm_term = 0.5 * jnp.sum(flat(v) * flat(score), axis=-1)**2
    return trace_term + norm_term

  objective = jnp.mean(jax.vmap(per_projection)(vs), axis=0)
  if reduce_mean:
    objective = objective / (x.size // x.shape[0])
  return objective * std**2


def check_objective(config) -> None:
  """Raises for the combinations the paper rules out, naming the config keys."""
  training = config.training
  sde_name = str(training.sde).lower()
  importance_error = ('config.training.importance_sampling=True samples t for the likelihood-weighted DSM '
                      'loss: it needs config.training.continuous=True, likelihood_weighting=True and '
                      'sliced_score_matching=False.')
  if training.continuous:
    if training.importance_sampling and (training.sliced_score_matching or not training.likelihood_weighting):
      raise ValueError(importance_error)
    return
  if training.sliced_score_matching:
    raise ValueError('config.training.sliced_score_matching=True needs config.training.continuous=True.')
  if training.likelihood_weighting:
    raise ValueError('config.training.likelihood_weighting=True is only defined for continuous training; '
                     'set config.training.continuous=True or likelihood_weighting=False.')
  if sde_name == 'subvpsde':
    raise ValueError('discrete training (config.training.continuous=False) is not defined for '
                     "config.training.sde='subvpsde' (the paper rules it out); use continuous=True.")
  if sde_name not in ('vesde', 'vpsde'):
    raise ValueError(f'config.training.sde={training.sde!r} has no discrete objective; '
                     "choose 'vesde' (SMLD) or 'vpsde' (DDPM).")
  if training.importance_sampling:
    raise ValueError(importance_error)


def check_dsm_levels(config) -> None:
  """Raises unless ``training.dsm_sigmas`` / ``dsm_unit_weighting`` (the anomaly detector's DSM) go with
  plain continuous DSM, and every level is reached by the SDE."""
  training = config.training
  if not (training.dsm_sigmas or training.dsm_unit_weighting):
    return
  if not training.continuous or training.sliced_score_matching or training.likelihood_weighting:
    raise ValueError('config.training.dsm_sigmas / dsm_unit_weighting choose the noise levels and weighting '
                     'of continuous DSM: they need config.training.continuous=True, '
                     'sliced_score_matching=False and likelihood_weighting=False.')
  if training.dsm_sigmas:
    sde_lib.get_sde(config).noise_level_time(list(training.dsm_sigmas))


def get_loss_fn(config, sde: sde_lib.SDE, model, train: bool) -> LossFn:
  """``loss_fn(rng, params, x) -> (B,)`` for the configured objective and network.

  In training mode ``rng`` also drives dropout. ``x`` is already scaled (``datasets.get_data_scaler``).
  The network computes in ``config.training.dtype`` (``models.utils.with_compute_dtype``): ``params``
  stay float32, so their gradients, the optimizer state and the EMA do, and the loss is float32.
  """
  check_objective(config)
  check_dsm_levels(config)
  training = config.training
  dtype = mutils.configured_dtype(config, 'training')
  reduce_mean = bool(training.reduce_mean)
  times = sde.noise_level_time(list(training.dsm_sigmas)) if training.dsm_sigmas else None

  def loss_fn(rng: Array, params: PyTree, x: Array) -> Array:
    rng, dropout_rng = jax.random.split(rng)
    variables = {'params': params}
    if not training.continuous:
      model_fn = mutils.get_model_fn(model, variables, train=train, rng=dropout_rng, dtype=dtype)
      if isinstance(sde, sde_lib.VESDE):
        return smld_loss(rng, model_fn, sde, x, reduce_mean=reduce_mean)
      return ddpm_loss(rng, model_fn, sde, x, reduce_mean=reduce_mean)
    score_fn = mutils.get_score_fn(sde, model, variables, train=train, continuous=True, rng=dropout_rng,
                                   dtype=dtype)
    if training.sliced_score_matching:
      return ssm_loss(rng, score_fn, sde, x, reduce_mean=reduce_mean,
                      variance_reduction=bool(training.ssm_variance_reduction),
                      n_projections=int(training.ssm_n_projections), eps=training.eps)
    return sde_loss(rng, score_fn, sde, x, reduce_mean=reduce_mean,
                    likelihood_weighting=bool(training.likelihood_weighting), eps=training.eps,
                    times=times, unit_weighting=bool(training.dsm_unit_weighting),
                    importance_sampling=bool(training.importance_sampling))
  return loss_fn


def learning_rate_schedule(config) -> optax.Schedule:
  """lr · min(step / warmup, 1): linear warm-up from 0 at step 0, as in the reference."""
  lr, warmup = float(config.optim.lr), int(config.optim.warmup)
  if warmup <= 0:
    return optax.constant_schedule(lr)
  return lambda step: lr * jnp.minimum(step / warmup, 1.)


def get_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping (off when ``optim.grad_clip < 0``), then Adam (β₂ = 0.999) with the
  reference's decoupled weight decay (flax.optim.Adam: p ← p − lr·(update + wd·p))."""
  optim = config.optim
  if str(optim.optimizer).lower() != 'adam':
    raise ValueError(f"config.optim.optimizer={optim.optimizer!r} is not supported; use 'Adam'.")
  adam = optax.adamw(learning_rate_schedule(config), b1=float(optim.beta1), b2=ADAM_BETA2,
                     eps=float(optim.eps), weight_decay=float(optim.weight_decay))
  if float(optim.grad_clip) < 0:
    return adam
  return optax.chain(optax.clip_by_global_norm(float(optim.grad_clip)), adam)


def ema_decay(step: Array, rate: float, warmup: bool) -> Array:
  """The EMA decay at a step: the reference JAX code's constant ``rate`` or, with ``warmup``,
  score_sde_pytorch's min(rate, (1 + n)/(10 + n)), n the number of updates so far."""
  if not warmup:
    return jnp.asarray(rate, jnp.float32)
  n = step.astype(jnp.float32)
  return jnp.minimum(rate, (1. + n) / (10. + n))


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: checkpointed whole."""
  step: Array
  params: PyTree
  opt_state: PyTree
  params_ema: PyTree
  rng: Array


def init_train_state(rng: Array, params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
  """Step 0; the EMA starts at the initial parameters (as in both references), in its own buffers so
  that the state can be donated to the compiled step."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    params_ema=jax.tree.map(jnp.copy, params), rng=rng)


def get_gradient_step(loss_fn: LossFn):
  """``gradient_step(state, x) -> (grads, loss, rng)``: the first half of a training step, the mean loss
  on the global batch ``x``, its gradient and the state's next key.

  Under ``jax.jit`` with the batch sharded over devices, the mean loss and its gradient are global
  (XLA inserts the cross-device reductions the reference wrote as ``lax.pmean``).
  """
  def gradient_step(state: TrainState, x: Array) -> tuple[PyTree, Array, Array]:
    rng, step_rng = jax.random.split(state.rng)
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(step_rng, p, x)))(state.params)
    return grads, loss, rng
  return gradient_step


def get_update_step(config, optimizer: optax.GradientTransformation):
  """``update_step(state, grads, loss, rng) -> (state, metrics)``: the second half, the optimizer and
  EMA update."""
  ema_rate = float(config.model.ema_rate)
  ema_warmup = bool(config.model.ema_warmup)

  def update_step(state: TrainState, grads: PyTree, loss: Array,
                  rng: Array) -> tuple[TrainState, dict[str, Array]]:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, ema_rate, ema_warmup)
    params_ema = jax.tree.map(lambda e, p: decay * e + (1. - decay) * p, state.params_ema, params)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           params_ema=params_ema, rng=rng)
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
  return update_step


def get_train_step(config, loss_fn: LossFn, optimizer: optax.GradientTransformation):
  """``train_step(state, x) -> (state, metrics)``: one optimizer update on the global batch ``x``
  (``get_gradient_step`` then ``get_update_step``, in one program)."""
  gradient_step, update_step = get_gradient_step(loss_fn), get_update_step(config, optimizer)

  def train_step(state: TrainState, x: Array) -> tuple[TrainState, dict[str, Array]]:
    return update_step(state, *gradient_step(state, x))
  return train_step


def get_eval_loss_fn(config, sde: sde_lib.SDE, model):
  """``eval_loss(rng, params, x, mask) -> (loss sum over unmasked rows, their count, per-example losses)``
  with the network in eval mode (no dropout). Sums, so that batches (a padded last one included) combine
  exactly into the mean over the split."""
  loss_fn = get_loss_fn(config, sde, model, train=False)

  def eval_loss(rng, params, x, mask):
    losses = loss_fn(rng, params, x)
    mask = mask.astype(losses.dtype)
    return jnp.sum(losses * mask), jnp.sum(mask), losses
  return eval_loss
