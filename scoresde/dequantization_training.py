"""``main.py --mode=train_deq``: the variational dequantizer q(u | x) of a trained score model (Song, Durkan,
Murray, Ermon 2021, Sec. 5.2, the score_flow code's ``train_deq`` mode; the flow is Flow++'s idea, Ho et al.
2019: ``dequantization.py``).

After the score model, with its EMA weights frozen, the flow's parameters φ minimise the ELBO bound on
bits/dim of the training levels x (``likelihood.get_elbo_bpd_fn`` with the flow as its dequantizer),

  E_{u ~ q_φ(u | x)} [ L((x + u) / L) + log q_φ(u | x) ] / (D ln 2) + offset,

L(·) the ELBO on -log p_θ (``likelihood_weighting.elbo``), by Adam on reparameterised samples u. The flow
goes to ``workdir/dequantizer/`` (orbax, resumable); ``--mode=eval`` finds it there (``load_dequantizer``)
and reports the variational bits/dim next to the uniform ones.

Settings are optional ``config.training`` keys (the reference configs lack them); absent, ``DEFAULTS``:
``deq_n_iters`` (steps), ``deq_lr`` (Adam), ``deq_features`` and ``deq_num_couplings`` (the flow),
``deq_num_samples`` (importance-sampled times per example of each ELBO estimate). The batch size, log and
preemption-checkpoint frequencies are ``config.training``'s; the ELBO's eps is ``config.eval.likelihood_eps``.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scoresde import checkpointing
from scoresde import datasets
from scoresde import dequantization
from scoresde import likelihood
from scoresde import sde_lib
from scoresde.models import utils as mutils

Array = jax.Array
DEQUANTIZER_DIR = 'dequantizer'
DEFAULTS = {'deq_n_iters': 1000, 'deq_lr': 1e-3, 'deq_features': 32, 'deq_num_couplings': 4,
            'deq_num_samples': 1}


class DequantizerState(NamedTuple):
  step: Array
  params: Any
  opt_state: Any


def setting(config, key: str):
  """``config.training[key]`` when the config declares it, else ``DEFAULTS[key]``."""
  return config.training[key] if key in config.training else DEFAULTS[key]


def dequantizer_workdir(workdir: str) -> str:
  """Where ``--mode=train_deq`` writes the dequantizer of ``workdir``'s score model."""
  return os.path.join(workdir, DEQUANTIZER_DIR)


def flow_for(config) -> dequantization.DequantizerFlow:
  return dequantization.DequantizerFlow(num_levels=int(config.data.num_levels),
                                        features=int(setting(config, 'deq_features')),
                                        num_couplings=int(setting(config, 'deq_num_couplings')))


def get_optimizer(lr: float) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.), optax.adam(lr))


def init_state(rng: Array, flow: dequantization.DequantizerFlow, example_shape: tuple[int, ...],
               optimizer: optax.GradientTransformation) -> DequantizerState:
  params = dequantization.init(rng, flow, example_shape)
  return DequantizerState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def get_train_step(elbo_bpd_fn: Callable[..., Array], flow: dequantization.DequantizerFlow,
                   optimizer: optax.GradientTransformation):
  """Compiled ``step(state, score_fn, rng, levels) -> (state, mean ELBO bits/dim)``: one Adam step on the
  flow, ``score_fn`` held fixed (a ``Partial``'s weights are traced arguments, as in ``likelihood``)."""
  def step(state: DequantizerState, score_fn, rng: Array, levels: Array):
    def loss_fn(params):
      return jnp.mean(elbo_bpd_fn(rng, score_fn, levels, dequantization.as_dequantizer(flow, params)))
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return DequantizerState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), loss
  jitted = jax.jit(step, donate_argnums=0)
  return lambda state, score_fn, rng, levels: jitted(state, likelihood.as_pytree(score_fn), rng, levels)


def _abstract_state(config) -> DequantizerState:
  flow, optimizer = flow_for(config), get_optimizer(float(setting(config, 'deq_lr')))
  return checkpointing.abstract_like(jax.eval_shape(
      lambda: init_state(jax.random.PRNGKey(0), flow, datasets.data_shape(config), optimizer)))


def load_dequantizer(config, workdir: str) -> tuple[jax.tree_util.Partial, dict[str, Any]] | None:
  """(``dequantizer(rng, levels)`` for ``likelihood``'s bits/dim, checkpoint meta) of the newest flow in
  ``workdir/dequantizer``; None when there is none."""
  if not checkpointing.has_checkpoints(dequantizer_workdir(workdir)):
    return None
  restored = checkpointing.restore_newest(dequantizer_workdir(workdir), _abstract_state(config))
  checkpointing.check_finite_weights(restored.state.params, f'the dequantizer {restored.path}')
  return dequantization.as_dequantizer(flow_for(config), restored.state.params), restored.meta


def _check_config(config) -> None:
  if datasets.dataset_name(config) in datasets.TOY_DATASETS:
    raise ValueError(f'--mode=train_deq dequantizes discrete images; config.data.dataset='
                     f'{config.data.dataset!r} is continuous toy data.')
  if len(datasets.data_shape(config)) != 3:
    raise ValueError(f'--mode=train_deq needs images (H, W, C), got data shape '
                     f'{datasets.data_shape(config)}.')
  for key, default in DEFAULTS.items():
    value = setting(config, key)
    if not (float(value) > 0 and (isinstance(default, float) or float(value) == int(value))):
      kind = 'number' if isinstance(default, float) else 'integer'
      raise ValueError(f'config.training.{key} must be a positive {kind}, got {value!r}.')
  if jax.process_count() > 1:
    raise ValueError('--mode=train_deq runs in one process; start it without --num_processes.')


def train_dequantizer(config, workdir: str) -> DequantizerState:
  """Trains the dequantizer of ``workdir``'s score model (its newest EMA weights, frozen) into
  ``workdir/dequantizer``, resuming from its newest checkpoint. Returns the final state."""
  datasets.validate_data_config(config)
  _check_config(config)
  n_iters, num_levels = int(setting(config, 'deq_n_iters')), int(config.data.num_levels)
  sde = sde_lib.get_sde(config)
  model = mutils.create_model(config)
  variables, score_step = checkpointing.load_variables(config, workdir, ema=True)
  score_fn = mutils.network_score_fn(config, sde, model, variables)
  elbo_bpd_fn = likelihood.get_elbo_bpd_fn(
      sde, datasets.get_data_inverse_scaler(config), num_levels=num_levels,
      eps=float(config.eval.likelihood_eps), num_samples=int(setting(config, 'deq_num_samples')))

  ddir = dequantizer_workdir(workdir)
  os.makedirs(ddir, exist_ok=True)
  flow, optimizer = flow_for(config), get_optimizer(float(setting(config, 'deq_lr')))
  init_rng, base_rng = jax.random.split(jax.random.PRNGKey(int(config.seed) + 2))
  state = init_state(init_rng, flow, datasets.data_shape(config), optimizer)
  logging.info('dequantizer flow: %s parameters, %d couplings; score model of training step %s',
               f'{mutils.param_count({"params": state.params}):,}', flow.num_couplings, score_step)
  resumed = checkpointing.restore_newest(ddir, state)
  if resumed is not None:
    state = resumed.state
    logging.info('resumed the dequantizer from %s at step %d', resumed.path, int(state.step))
  step = int(state.step)

  data_config = copy.deepcopy(config)
  data_config.data.uniform_dequantization = False  # the flow dequantizes: the pipeline gives levels
  train_iter = datasets.get_train_iterator(data_config, start_step=step)
  step_fn = get_train_step(elbo_bpd_fn, flow, optimizer)
  uniform_fn = jax.jit(lambda rng, score, levels: jnp.mean(elbo_bpd_fn(rng, score, levels)))
  manager = checkpointing.preemption_manager(ddir)
  log_freq, save_freq = int(config.training.log_freq), int(config.training.snapshot_freq_for_preemption)
  meta = {'score_step': score_step, 'features': flow.features, 'num_couplings': flow.num_couplings}
  started, start_step = time.time(), step
  try:
    while step < n_iters:
      levels = jnp.asarray(likelihood.levels_from_unit_interval(
          next(train_iter)['image'], num_levels, f'training batch {step}'))
      rng = jax.random.fold_in(base_rng, step)
      state, loss = step_fn(state, score_fn, rng, levels)
      step += 1
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(f'non-finite dequantizer loss at step {step}; lower the learning rate '
                                 '(deq_lr in config.training).')
      if step % log_freq == 0 or step == n_iters:
        rate = (step - start_step) / max(time.time() - started, 1e-9)
        uniform = float(uniform_fn(rng, score_fn, levels))
        logging.info('dequantizer step %d/%d  ELBO bits/dim %.4f (uniform dequantization %.4f on this '
                     'batch)  %.2f steps/s  ETA %.0f s', step, n_iters, loss, uniform, rate,
                     (n_iters - step) / rate)
      if step % save_freq == 0 or step == n_iters:
        checkpointing.save(manager, step, state, {'step': step, **meta})
  finally:
    manager.close()
  logging.info('dequantizer saved in %s (step %d)', ddir, step)
  return state
