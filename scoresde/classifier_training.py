"""``main.py --mode=train_classifier``: the noise-conditional classifier p_t(y | x(t)) of class-conditional
sampling (Song et al. 2021, Sec. 5 and App. I; the reference ships the model but no training code).

The classifier (``config.classifier``, ``models/classifier.py``) learns the labels of noised data
x(t) = a(t) x(0) + s(t) z, t ~ U(eps, T) under the config's SDE, by cross-entropy. It reuses the score
model's machinery: ``config.training``'s schedule (batch size, n_iters, frequencies), ``config.optim``'s
optimizer and ``config.model.ema_rate`` (``losses.get_train_step``), orbax checkpoints with exact resume
(``checkpointing``), the resume-config check and metric files of ``run_lib``. Everything goes to
``workdir/classifier/``, next to the score model it guides. Every ``eval_freq`` steps the EMA weights'
accuracy on the whole test split is measured at each t of ``config.classifier.eval_times`` (one fixed
noise draw per example), logged and written as ``eval_accuracy_t<t>``.
"""

from __future__ import annotations

import copy
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from scoresde import checkpointing
from scoresde import datasets
from scoresde import generate
from scoresde import losses
from scoresde.infra import parallel
from scoresde import run_lib
from scoresde import sde_lib
from scoresde.models import classifier as classifier_lib
from scoresde.models import utils as mutils

Array = jax.Array
TRAIN_EPS = 1e-5  # t ~ U(eps, T): the classifier must also know nearly clean data


def with_labels(config):
  """A copy of ``config`` whose data batches carry class labels (``config.data.labels``)."""
  config = copy.deepcopy(config)
  config.data.labels = True
  return config


def noised(rng: Array, sde: sde_lib.SDE, x: Array, t: Array) -> Array:
  """x(t) ~ p_0t(x(t) | x(0) = x) at times t (B,)."""
  mean, std = sde.marginal_prob(x, t)
  return mean + sde_lib.batch_mul(std, jax.random.normal(rng, x.shape))


def get_loss_fn(sde: sde_lib.SDE, model) -> losses.LossFn:
  """``loss_fn(rng, params, (x, y)) -> (B,)``: cross-entropy of the labels at x(t), t ~ U(eps, T)."""
  def loss_fn(rng, params, batch):
    x, y = batch
    rng_t, rng_z = jax.random.split(rng)
    t = jax.random.uniform(rng_t, (x.shape[0],), minval=TRAIN_EPS, maxval=sde.T)
    logits = classifier_lib.classifier_logits_fn(sde, model, {'params': params})(noised(rng_z, sde, x, t), t)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, y[:, None], axis=1)[:, 0]
  return loss_fn


def _eval_correct(sde, model):
  """Compiled ``(params, rng, x, y, mask, t) -> correct count`` at one time t for every example."""
  @jax.jit
  def correct(params, rng, x, y, mask, t):
    times = jnp.full((x.shape[0],), t)
    logits = classifier_lib.classifier_logits_fn(sde, model, {'params': params})(noised(rng, sde, x, times),
                                                                               times)
    return jnp.sum((jnp.argmax(logits, -1) == y) & mask)
  return correct


def evaluate_accuracy(config, sde, model, params, mesh, rng: Array) -> dict[float, float]:
  """{t: accuracy of the classifier on the test split at x(t)} for t in ``config.classifier.eval_times``."""
  scaler = datasets.get_data_scaler(config)
  correct_fn = _eval_correct(sde, model)
  times = [float(t) for t in config.classifier.eval_times]
  correct, total = np.zeros(len(times)), 0
  for j, batch in enumerate(datasets.get_eval_iterator(config, 'test')):
    x, y, mask = parallel.shard_batch(mesh, (scaler(batch['image']), batch['label'], batch['mask']))
    total += int(np.sum(batch['mask']))
    for i, t in enumerate(times):
      correct[i] += int(correct_fn(params, jax.random.fold_in(rng, j), x, y, mask, t))
  return {t: c / max(total, 1) for t, c in zip(times, correct)}


def train_classifier(config, workdir: str, allow_config_change: bool = False) -> losses.TrainState:
  """Trains ``config.classifier`` on noised labelled data into ``workdir/classifier`` (resuming from
  its newest checkpoint); one optimizer step per host call. Returns the final state."""
  config = with_labels(config)
  datasets.validate_data_config(config)
  sde = sde_lib.get_sde(config)
  training = config.training
  n_iters = int(training.n_iters)
  cdir = generate.classifier_workdir(workdir)
  os.makedirs(cdir, exist_ok=True)
  run_lib.check_resume_config(config, cdir, allow_config_change)
  mesh = parallel.data_mesh()

  rng, init_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  model, variables = classifier_lib.init_classifier(init_rng, config)
  logging.info('classifier %s: %s parameters', config.classifier.name,
               f'{mutils.param_count(variables):,}')
  optimizer = losses.get_optimizer(config)
  state = parallel.replicate(mesh, losses.init_train_state(rng, variables['params'], optimizer))
  resumed = checkpointing.restore_newest(cdir, state)
  if resumed is not None:
    state = resumed.state
    logging.info('resumed the classifier from %s at step %d', resumed.path, int(state.step))
  step = initial_step = int(state.step)
  preemption = checkpointing.preemption_manager(cdir)
  permanent = checkpointing.permanent_manager(cdir)

  train_step = losses.get_train_step(config, get_loss_fn(sde, model), optimizer)
  example_ndim = len(datasets.data_shape(config))
  replicated = parallel.replicated(mesh)
  batch_shardings = (parallel.batch_sharding(mesh, example_ndim + 1), parallel.batch_sharding(mesh, 1))
  step_fn = jax.jit(train_step, in_shardings=(replicated, batch_shardings),
                    out_shardings=(replicated, replicated), donate_argnums=0)
  scaler = datasets.get_data_scaler(config)
  train_iter = datasets.get_train_iterator(config, start_step=initial_step)
  writer = run_lib.MetricWriter(cdir)
  stop = run_lib.StopRequest()
  eval_rng = jax.random.PRNGKey(config.seed + 1)
  last_time, last_step = time.time(), step
  try:
    while step < n_iters:
      batch = next(train_iter)
      state, metrics = step_fn(state, parallel.shard_batch(mesh, (scaler(batch['image']), batch['label'])))
      loss = float(metrics['loss'])
      if not np.isfinite(loss):
        raise FloatingPointError(f'non-finite classifier loss at step {step + 1}; lower config.optim.lr.')
      step += 1
      if step % training.log_freq == 0 or step == n_iters:
        rate = (step - last_step) / max(time.time() - last_time, 1e-9)
        last_time, last_step = time.time(), step
        logging.info('classifier step %d/%d  loss %.4f  %.2f steps/s', step, n_iters, loss, rate)
        writer.write(step, {'training_loss': loss, 'steps_per_sec': rate})
      if step % training.eval_freq == 0 or step == n_iters:
        accuracy = evaluate_accuracy(config, sde, model, state.params_ema, mesh, eval_rng)
        logging.info('classifier step %d  test accuracy by t: %s', step,
                     '  '.join(f't={t:g}: {a:.3f}' for t, a in accuracy.items()))
        writer.write(step, {f'eval_accuracy_t{t:g}': a for t, a in accuracy.items()})
      if step % training.snapshot_freq_for_preemption == 0:
        checkpointing.save(preemption, step, state, {'step': step})
      if step % training.snapshot_freq == 0 or step == n_iters:
        index = -(-step // training.snapshot_freq)
        checkpointing.save(permanent, index, state, {'step': step})
        logging.info('saved classifier checkpoint %d (step %d)', index, step)
      if stop() and step < n_iters:
        if step % training.snapshot_freq_for_preemption:
          checkpointing.save(preemption, step, state, {'step': step})
        logging.info('SIGTERM: saved the classifier preemption checkpoint at step %d; exiting', step)
        break
  finally:
    stop.close()
    writer.close()
    preemption.close()
    permanent.close()
  return state
