"""Training and evaluation loops (``main.py --mode=train`` / ``--mode=eval``).

``train`` reads top to bottom: validate the config → model, optimizer and state → resume → compiled
multi-step update → loop with logging, eval loss, checkpoints and snapshot samples. Data parallelism is
``jax.jit`` over a 1-D device mesh spanning every process (``infra/parallel.py``): the batch is sharded, the
state replicated; ``n_jitted_steps`` updates run per host call under ``lax.scan`` (unrolled on CPU).

Exact resumption: the data are a pure function of (config, step) (``datasets.get_train_iterator``), the
random key lives in the checkpointed state, so a run killed at any point and restarted ends with the
same parameters as one that was never interrupted. A restart resumes from the newest checkpoint that
restores (a damaged one is reported and set aside, ``checkpointing.restore_newest``) and only with the
config the workdir was started with (``check_resume_config``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from scoresde import checkpointing
from scoresde import datasets
from scoresde import dequantization_training
from scoresde.infra import host_allocator
from scoresde.infra import images
from scoresde import losses
from scoresde.infra import parallel
from scoresde.infra import resumable
from scoresde.infra import xla_cpu
from scoresde import sde_lib
from scoresde.models import utils as mutils

_FREQ_KEYS = ('log_freq', 'eval_freq', 'snapshot_freq', 'snapshot_freq_for_preemption')


# ----------------------------------------------------------------------------------------------------
# Config validation (before anything is compiled)


def validate_config(config, mode: str = 'train') -> None:
  """Raises ValueError naming the key and the fix for settings that cannot work."""
  sde_lib.get_sde(config)
  datasets.validate_data_config(config)
  mutils.validate_model_config(config)
  mutils.check_input_shape(config, datasets.data_shape(config))
  mutils.check_precision(config)
  losses.check_objective(config)
  losses.check_dsm_levels(config)
  losses.get_optimizer(config)
  training, optim = config.training, config.optim
  n_jitted = training.n_jitted_steps
  if not isinstance(n_jitted, int) or n_jitted < 1:
    raise ValueError(f'config.training.n_jitted_steps={n_jitted!r} must be a positive integer.')
  if not isinstance(training.n_iters, int) or training.n_iters < 1:
    raise ValueError(f'config.training.n_iters={training.n_iters!r} must be a positive integer.')
  for key in _FREQ_KEYS:
    value = training[key]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'config.training.{key}={value!r} must be a positive integer.')
    if value % n_jitted:
      raise ValueError(f'config.training.{key}={value} must be divisible by config.training.n_jitted_steps='
                       f'{n_jitted} (events happen between jitted chunks of steps).')
  if not (math.isfinite(float(optim.lr)) and float(optim.lr) > 0):
    raise ValueError(f'config.optim.lr={optim.lr!r} must be a positive finite number.')
  if int(optim.warmup) < 0:
    raise ValueError(f'config.optim.warmup={optim.warmup!r} must be >= 0 (0 disables warm-up).')
  if float(optim.grad_clip) == 0:
    raise ValueError('config.optim.grad_clip=0 would zero every gradient; use a positive clipping norm or '
                     'a negative value to disable clipping.')
  if not 0. <= float(config.model.ema_rate) < 1.:
    raise ValueError(f'config.model.ema_rate={config.model.ema_rate!r} must lie in [0, 1).')
  parallel.check_batch_size(training.batch_size, 'config.training.batch_size')
  parallel.check_batch_size(config.eval.batch_size, 'config.eval.batch_size')
  if (mode == 'train' and training.snapshot_sampling) or (mode == 'eval' and config.eval.enable_sampling):
    _validate_sampling_config(config)
    if mode == 'train':
      parallel.check_batch_size(_snapshot_batch_size(config), 'config.training.snapshot_batch_size')
  if (mode == 'train' and config.qa.calibrate_after_training) or mode == 'qa':
    from scoresde.evaluation import qa  # pylint: disable=import-outside-toplevel
    qa.validate_qa_config(config)


def _validate_sampling_config(config) -> None:
  from scoresde import sampling  # pylint: disable=import-outside-toplevel  (heavy: diffrax)
  sampling.validate_config(config)


def _snapshot_batch_size(config) -> int:
  return int(config.training.snapshot_batch_size) or int(config.training.batch_size)


# ----------------------------------------------------------------------------------------------------
# The config a workdir was started with


CONFIG_FILE = 'config.json'
# What a resumed run may change without --allow_config_change (see check_resume_config); a key ending in
# '.' stands for its whole group.
RESUME_MUTABLE_KEYS = ('training.n_iters', 'training.log_freq', 'training.eval_freq',
                       'training.snapshot_freq_for_preemption', 'training.n_jitted_steps',
                       'training.snapshot_sampling', 'training.snapshot_batch_size', 'eval.', 'sampling.',
                       'data.tfds_data_dir', 'data.num_workers',
                       # --mode=train_deq's optional keys: they do not change the score model
                       *(f'training.{key}' for key in dequantization_training.DEFAULTS))
_ABSENT = '(absent)'


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    flat.update(_flat(value, f'{prefix}{key}.') if isinstance(value, dict) else {prefix + key: value})
  return flat


def config_changes(recorded: dict[str, Any], config) -> dict[str, tuple[Any, Any]]:
  """{key: (recorded value, value in ``config``)} of the keys outside ``RESUME_MUTABLE_KEYS`` that differ
  between a recorded config (nested JSON) and ``config`` (compared as JSON: tuples as lists)."""
  old, new = _flat(recorded), _flat(json.loads(config.to_json_best_effort()))
  return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
          if old.get(k, _ABSENT) != new.get(k, _ABSENT)
          and not any(k == m or (m.endswith('.') and k.startswith(m)) for m in RESUME_MUTABLE_KEYS)}


def check_resume_config(config, workdir: str, allow_change: bool = False) -> None:
  """Refuses to resume ``workdir``'s checkpoints with another config; records ``config`` there.

  A workdir holds one experiment. When it has checkpoints, ``config`` is compared with
  ``workdir/config.json`` (written at the first start, and rewritten at each start); keys that differ
  raise a ValueError naming them with both values, or, with ``allow_change`` (``main.py
  --allow_config_change``), are logged in a warning and the run resumes. A key added or removed (e.g. by
  a newer version of the code) counts as changed.

  Always allowed (``RESUME_MUTABLE_KEYS``), since they change when things happen or how a run is watched,
  not what it learns: ``training.n_iters`` (extend or shorten a run), ``training.log_freq``,
  ``eval_freq``, ``snapshot_freq_for_preemption``, ``n_jitted_steps``, ``snapshot_sampling``,
  ``snapshot_batch_size``, every ``eval.*`` and ``sampling.*`` key, ``data.tfds_data_dir`` and
  ``data.num_workers``. Not ``training.snapshot_freq``: permanent checkpoint k holds the state after
  k·snapshot_freq steps, so changing it renumbers (and overwrites) the snapshots. A workdir with
  checkpoints but no ``config.json`` (written by an older version) is not checked; it gets one.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if checkpointing.has_checkpoints(workdir) and os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      changes = config_changes(json.load(f), config)
    listing = '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in changes.items())
    if changes and not allow_change:
      mutable = ', '.join(k + '*' if k.endswith('.') else k for k in RESUME_MUTABLE_KEYS)
      raise ValueError(
          f'{workdir} holds checkpoints trained with another config ({path}); changed: {listing}. Resuming '
          'them with these changes would continue that run as another experiment: use a new --workdir, '
          'or pass --allow_config_change (run_lib.train(..., allow_config_change=True)) to resume anyway. '
          f'Keys that may change on resume: {mutable}.')
    if changes:
      logging.warning('resuming %s with a changed config (--allow_config_change): %s', workdir, listing)
  if jax.process_index() == 0:
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    resumable.atomic_write(path, lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------------------------------
# Outputs: metrics, sample grids


class MetricWriter:
  """Scalars to TensorBoard event files and to ``metrics.jsonl`` (process 0 only)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      import tensorboardX  # pylint: disable=import-outside-toplevel
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()


def save_samples(samples: np.ndarray, directory: str, min_png_size: int = 384) -> str:
  """Writes ``samples.npz`` and ``sample.png`` into ``directory``; returns the PNG path.

  Images (N, H, W, C) in [0, 1] are saved as uint8 (like the reference's ``sample.np``) and as a grid
  enlarged to at least ``min_png_size`` pixels; 2-D points as float32 and a density plot.
  """
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, 'sample.png')
  if samples.ndim == 4:
    samples = images.to_uint8(samples)
    images.save_grid(samples, path, min_png_size)
  else:
    samples = np.asarray(samples, np.float32)
    images.save_scatter(samples, path)
  np.savez_compressed(os.path.join(directory, 'samples.npz'), samples=samples)
  return path


# ----------------------------------------------------------------------------------------------------
# Stop requests (SIGTERM from schedulers)


class StopRequest:
  """True once SIGTERM arrived. Single process: a Python signal handler. Several processes: JAX's
  preemption notifier (installed by ``jax.distributed.initialize``), so that every process learns of it
  at the same step and they save together."""

  def __init__(self):
    self._flag = False
    self._calls = 0
    self._multi = jax.process_count() > 1
    self._previous = None
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._flag = True

  def __call__(self) -> bool:
    """Call once per host call on every process."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      # The sync point is the largest id any process has reached, plus one: ids must count calls by one.
      self._calls += 1
      return bool(multihost_utils.reached_preemption_sync_point(self._calls))
    return self._flag

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------------------------------
# Training


def _stacked_batches(train_iter, scaler, n: int) -> np.ndarray:
  return np.stack([scaler(next(train_iter)['image']) for _ in range(n)])


def _chunk_length(step: int, n_jitted: int, n_iters: int) -> int:
  """Steps in the next host call: up to the next multiple of n_jitted_steps, never past n_iters."""
  return min(n_jitted - step % n_jitted, n_iters - step)


def _permanent_index(step: int, snapshot_freq: int) -> int:
  return -(-step // snapshot_freq)


def build_multi_step(config, sde: sde_lib.SDE, model, optimizer, mesh, *, split_on_cpu: bool = True):
  """``multi_step(state, batches) -> (state, metrics)``, compiled: ``lax.scan`` of ``train_step`` over
  batches (n, global_batch, ...) sharded on their batch axis (unrolled on CPU, see below); the state
  replicated and donated. Metrics are stacked per step.

  On CPU each step is two programs unless ``split_on_cpu=False`` or the CPU's options do not differ
  between the gradient and the update (``xla_cpu.split_training``; ``_split_multi_step``); the single
  program is what accelerators run, and what ``benchmarks/memory_plan.py`` compiles.
  """
  loss_fn = losses.get_loss_fn(config, sde, model, train=True)
  replicated = parallel.replicated(mesh)
  batches_sharding = parallel.batch_sharding(mesh, len(datasets.data_shape(config)) + 2, axis=1)
  on_cpu = jax.default_backend() == 'cpu'
  if on_cpu and split_on_cpu and xla_cpu.split_training():  # one set for both halves: no split
    return _split_multi_step(config, loss_fn, optimizer, replicated, batches_sharding)
  train_step = losses.get_train_step(config, loss_fn, optimizer)
  if on_cpu:
    # XLA:CPU runs convolution gradients inside a scan (while) body far slower than outside a loop
    # (measured: 48 s vs 1.3 s per digits NCSN++ step at batch 64), so on CPU the steps are unrolled.
    def multi_step(state, xs):
      metrics = []
      for i in range(xs.shape[0]):
        state, m = train_step(state, xs[i])
        metrics.append(m)
      return state, jax.tree.map(lambda *ms: jnp.stack(ms), *metrics)
  else:
    def multi_step(state, xs):
      return jax.lax.scan(train_step, state, xs)
  return xla_cpu.jit(multi_step, 'training', in_shardings=(replicated, batches_sharding),
                     out_shardings=(replicated, replicated), donate_argnums=0)


def _split_multi_step(config, loss_fn, optimizer, replicated, batches_sharding):
  """CPU: every step as two compiled programs, the gradient and the optimizer + EMA update, each with
  its own XLA:CPU options (``infra/xla_cpu.py``): XLA's best options for the gradient slow the update
  of the parameters, and one program can have only one set. Measured on an Intel Sapphire Rapids:
  0.76–0.83× the single program's time on the CIFAR-10 DDPM++ and NCSN++ at batch 4, 0.96× on the
  digits demo (BENCHMARKS.md). Used where the CPU's table asks for it (``xla_cpu.split_training``)."""
  gradient_step = losses.get_gradient_step(loss_fn)

  def gradient(state, xs, i):  # the batch is picked inside: a multi-host array is not indexable outside
    return gradient_step(state, jax.lax.dynamic_index_in_dim(xs, i, axis=0, keepdims=False))
  gradient = xla_cpu.jit(gradient, 'gradient', in_shardings=(replicated, batches_sharding, replicated),
                         out_shardings=replicated)
  update = xla_cpu.jit(losses.get_update_step(config, optimizer), 'update',
                       out_shardings=(replicated, replicated), donate_argnums=0)

  def multi_step(state, xs):
    metrics = []
    for i in range(xs.shape[0]):
      state, m = update(state, *gradient(state, xs, i))
      metrics.append(m)
    return state, jax.tree.map(lambda *ms: jnp.stack(ms), *metrics)
  return multi_step


def train(config, workdir: str, allow_config_change: bool = False) -> losses.TrainState:
  """Trains ``config`` in ``workdir`` (resuming from its newest checkpoint); returns the final state.

  Outputs: ``config.json``, ``checkpoints/``, ``checkpoints-meta/``, ``samples/iter_{step}/``,
  ``tensorboard/``, ``metrics.jsonl``. Stops early, after saving, on SIGTERM. Resumes from the newest
  checkpoint that restores (``checkpointing.restore_newest``), and only with the config of the run
  unless ``allow_config_change`` (``check_resume_config``).
  """
  validate_config(config, 'train')
  training = config.training
  n_iters, n_jitted = int(training.n_iters), int(training.n_jitted_steps)
  os.makedirs(workdir, exist_ok=True)
  check_resume_config(config, workdir, allow_config_change)
  mesh = parallel.data_mesh()

  rng = jax.random.PRNGKey(config.seed)
  rng, init_rng = jax.random.split(rng)
  model, variables = mutils.init_model(init_rng, config)
  logging.info('model %s: %s parameters', config.model.name, f'{mutils.param_count(variables):,}')
  optimizer = losses.get_optimizer(config)
  state = parallel.replicate(mesh, losses.init_train_state(rng, variables['params'], optimizer))

  resumed = checkpointing.restore_newest(workdir, state)
  if resumed is not None:
    state = resumed.state
    logging.info('resumed from the %s checkpoint %d at step %d (%s)', resumed.kind, resumed.index,
                 int(state.step), resumed.path)
  initial_step = int(state.step)
  preemption = checkpointing.preemption_manager(workdir)
  permanent = checkpointing.permanent_manager(workdir)

  sde = sde_lib.get_sde(config)
  scaler = datasets.get_data_scaler(config)
  multi_step = build_multi_step(config, sde, model, optimizer, mesh)
  eval_loss = _jit_eval_loss(config, sde, model, mesh)
  eval_rng = jax.random.PRNGKey(config.seed + 1)

  train_iter = datasets.get_train_iterator(config, start_step=initial_step)
  eval_iter = None
  writer = MetricWriter(workdir)
  stop = StopRequest()
  snapshotter = _Snapshotter(config, workdir, sde, model) if training.snapshot_sampling else None

  def save_preemption(step):
    checkpointing.save(preemption, step, state, {'step': step})

  step = initial_step
  last_log_time, last_log_step = time.time(), step
  logging.info('training from step %d to %d, %d steps per host call, global batch %d on %d devices',
               initial_step, n_iters, n_jitted, training.batch_size, jax.device_count())
  if (advice := host_allocator.advice()) is not None:
    logging.info(advice)
  try:
    while step < n_iters:
      n = _chunk_length(step, n_jitted, n_iters)
      batches = parallel.shard_batch(mesh, _stacked_batches(train_iter, scaler, n), axis=1)
      state, metrics = multi_step(state, batches)
      # Fetching the losses every call synchronises the processes (which avoids the multi-process
      # deadlock of unsynchronised jitted steps) and lets a non-finite loss stop the run before any save.
      chunk_losses = np.asarray(jax.device_get(metrics['loss']))
      grad_norms = np.asarray(jax.device_get(metrics['grad_norm']))
      bad = np.flatnonzero(~(np.isfinite(chunk_losses) & np.isfinite(grad_norms)))
      if bad.size:
        raise FloatingPointError(
            f'non-finite training loss ({chunk_losses[bad[0]]}) or gradient norm ({grad_norms[bad[0]]}) at '
            f'step {step + int(bad[0]) + 1} (the update from state.step={step + int(bad[0])}); training '
            f'stopped without saving, the checkpoints in {workdir} are those of earlier steps. Lower '
            'config.optim.lr, raise config.optim.warmup or check the data.')
      step += n

      if step % training.log_freq == 0 or step == n_iters:
        now = time.time()
        rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        logging.info('step %d/%d  loss %.5f  grad_norm %.3f  %.2f steps/s  ETA %s', step, n_iters,
                     chunk_losses[-1], grad_norms[-1], rate, _duration((n_iters - step) / max(rate, 1e-9)))
        writer.write(step, {'training_loss': chunk_losses[-1], 'grad_norm': grad_norms[-1],
                            'steps_per_sec': rate})
      if step == initial_step + n:  # later rates exclude the first call, which compiles
        last_log_time, last_log_step = time.time(), step

      if step % training.eval_freq == 0:
        eval_iter, batch = _next_eval_batch(config, eval_iter)
        total, count, _ = eval_loss(jax.random.fold_in(eval_rng, step), state.params_ema,
                                    *parallel.shard_batch(mesh, (scaler(batch['image']), batch['mask'])))
        value = float(total) / max(float(count), 1.)
        logging.info('step %d  eval_loss %.5f', step, value)
        writer.write(step, {'eval_loss': value})

      if step % training.snapshot_freq_for_preemption == 0:
        save_preemption(step)

      if step % training.snapshot_freq == 0 or step == n_iters:
        index = _permanent_index(step, training.snapshot_freq)
        checkpointing.save(permanent, index, state, {'step': step})
        logging.info('saved checkpoint %d (step %d)', index, step)
        if snapshotter is not None:
          snapshotter(step, state.params_ema)

      if stop() and step < n_iters:
        if step % training.snapshot_freq_for_preemption:
          save_preemption(step)
        logging.info('SIGTERM: saved the preemption checkpoint at step %d; exiting', step)
        break
  finally:
    stop.close()
    writer.close()
    preemption.close()
    permanent.close()
  if config.qa.calibrate_after_training and step >= n_iters:
    from scoresde.evaluation import qa  # pylint: disable=import-outside-toplevel
    qa.calibrate(config, workdir)
  return state


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _next_eval_batch(config, eval_iter):
  """The next batch of the test split, starting a new pass when one ends."""
  for _ in range(2):
    if eval_iter is None:
      eval_iter = datasets.get_eval_iterator(config, 'test')
    batch = next(eval_iter, None)
    if batch is not None:
      return eval_iter, batch
    eval_iter = None
  raise ValueError(f'the test split of {config.data.dataset!r} is empty.')


class _Snapshotter:
  """Draws ``snapshot_batch_size`` samples with the configured sampler from the EMA weights and writes
  ``samples/iter_{step}/{sample.png, samples.npz}``."""

  def __init__(self, config, workdir: str, sde: sde_lib.SDE, model):
    from scoresde import sampling  # pylint: disable=import-outside-toplevel  (heavy: diffrax)
    self._sampling = sampling
    self._config = config
    self._dir = os.path.join(workdir, 'samples')
    self._sde, self._model = sde, model
    shape = (_snapshot_batch_size(config),) + tuple(datasets.data_shape(config))
    self._sampler = sampling.get_sampling_fn(config, sde, shape, datasets.get_data_inverse_scaler(config),
                                             eps=config.sampling.eps)
    self._rng = jax.random.PRNGKey(config.seed + 2)

  def __call__(self, step: int, params) -> None:
    start = time.time()
    score_fn = mutils.network_score_fn(self._config, self._sde, self._model, {'params': params})
    samples, nfe = self._sampler(jax.random.fold_in(self._rng, step), score_fn)
    samples = parallel.gather(samples)
    if jax.process_index() == 0:
      path = save_samples(datasets.samples_to_levels(self._config, samples),
                          os.path.join(self._dir, f'iter_{step}'))
      logging.info('step %d: %d samples (%s score evaluations each) in %.1f s -> %s', step, len(samples),
                   nfe, time.time() - start, path)


# ----------------------------------------------------------------------------------------------------
# Evaluation


def _checkpoint_indices(config, workdir: str) -> list[int]:
  manager = checkpointing.permanent_manager(workdir)
  available = sorted(manager.all_steps())
  manager.close()
  if not available:
    raise FileNotFoundError(f'no checkpoints in {os.path.join(workdir, checkpointing.PERMANENT_DIR)}; '
                            'train first (--mode=train).')
  begin, end = config.eval.begin_ckpt, config.eval.end_ckpt
  if begin is None and end is None:
    return [available[-1]]
  begin = available[0] if begin is None else int(begin)
  end = available[-1] if end is None else int(end)
  chosen = [k for k in available if begin <= k <= end]
  missing = sorted(set(range(begin, end + 1)) - set(available))
  if missing:
    logging.warning('checkpoints %s of eval.begin_ckpt..end_ckpt=%d..%d do not exist; evaluating %s',
                    missing, begin, end, chosen)
  if not chosen:
    raise FileNotFoundError(f'no checkpoint in eval.begin_ckpt..end_ckpt={begin}..{end}; '
                            f'available: {available}.')
  return chosen


def _jit_eval_loss(config, sde, model, mesh):
  """The eval loss, compiled with global (replicated) sums, readable on every process."""
  replicated = parallel.replicated(mesh)
  return xla_cpu.jit(losses.get_eval_loss_fn(config, sde, model), 'inference',
                     out_shardings=(replicated, replicated, parallel.batch_sharding(mesh)))


def eval_loss_over_split(config, sde, model, variables, split: str = 'test',
                         compiled_loss=None) -> dict[str, Any]:
  """The loss of ``variables`` (eval mode) over every example of ``split``: per-example losses in the
  split's order and their mean (the padded rows of the last batch are excluded). Pass the same
  ``compiled_loss`` (``_jit_eval_loss``) for several checkpoints to compile once."""
  mesh = parallel.data_mesh()
  scaler = datasets.get_data_scaler(config)
  fn = compiled_loss or _jit_eval_loss(config, sde, model, mesh)
  params = parallel.replicate(mesh, variables['params'])
  rng = jax.random.PRNGKey(config.seed + 1)
  total, count, per_example = 0., 0., []
  for i, batch in enumerate(datasets.get_eval_iterator(config, split)):
    x, mask = parallel.shard_batch(mesh, (scaler(batch['image']), batch['mask']))
    batch_total, batch_count, batch_losses = fn(jax.random.fold_in(rng, i), params, x, mask)
    total += float(batch_total)
    count += float(batch_count)
    per_example.append(parallel.gather(batch_losses)[parallel.gather(mask)])
  all_losses = np.concatenate(per_example) if per_example else np.zeros((0,), np.float32)
  return {'all_losses': all_losses, 'mean_loss': total / max(count, 1.), 'num_examples': int(count)}


def _checkpoint_tag(checkpoint: int | str) -> int | str:
  """The name evaluation outputs carry for a checkpoint: its index, or its file name."""
  if isinstance(checkpoint, int) or str(checkpoint).isdigit():
    return int(checkpoint)
  return os.path.splitext(os.path.basename(str(checkpoint).rstrip('/')))[0]


def evaluate(config, workdir: str, eval_folder: str = 'eval',
             checkpoint: int | str | None = None) -> dict[int | str, dict[str, Any]]:
  """Evaluates the permanent checkpoints eval.begin_ckpt..end_ckpt (the newest if both are None), or
  only ``checkpoint`` (an index, or a path: ``checkpointing.load_variables``), with their EMA weights:
  loss over the test split (``eval.enable_loss``), bits/dim (``eval.enable_bpd``, bits_per_dim.py) and
  sample quality (``eval.enable_sampling``, sample_quality.py). Writes into ``workdir/eval_folder``;
  returns {checkpoint index or file name: results}."""
  validate_config(config, 'eval')
  eval_dir = os.path.join(workdir, eval_folder)
  os.makedirs(eval_dir, exist_ok=True)
  sde = sde_lib.get_sde(config)
  model = mutils.create_model(config)
  compiled_loss = _jit_eval_loss(config, sde, model, parallel.data_mesh())
  results = {}
  chosen = [checkpoint] if checkpoint is not None else _checkpoint_indices(config, workdir)
  for source in chosen:
    variables, step = checkpointing.load_variables(config, workdir, checkpoint=source, ema=True)
    ckpt = _checkpoint_tag(source)
    result: dict[str, Any] = {'step': step}
    if config.eval.enable_loss:
      loss = eval_loss_over_split(config, sde, model, variables, compiled_loss=compiled_loss)
      result['loss'] = loss['mean_loss']
      if jax.process_index() == 0:
        np.savez_compressed(os.path.join(eval_dir, f'ckpt_{ckpt}_loss.npz'), **loss)
        with open(os.path.join(eval_dir, f'ckpt_{ckpt}_loss.json'), 'w', encoding='utf-8') as f:
          json.dump({'ckpt': ckpt, 'step': step, 'mean_loss': loss['mean_loss'],
                     'num_examples': loss['num_examples']}, f, indent=2)
      logging.info('checkpoint %s (step %s): eval loss %.5f over %d examples', ckpt, step,
                   loss['mean_loss'], loss['num_examples'])
    if config.eval.enable_bpd:
      from scoresde.evaluation import bits_per_dim  # pylint: disable=import-outside-toplevel
      result['bpd'] = bits_per_dim.evaluate_bpd(config, eval_dir, ckpt, model, variables, sde,
                                                workdir=workdir)
    if config.eval.enable_sampling:
      from scoresde.evaluation import sample_quality  # pylint: disable=import-outside-toplevel
      result['samples'] = sample_quality.evaluate_samples(config, eval_dir, ckpt, model, variables, sde)
    results[ckpt] = result
  return results


def import_checkpoint(config, workdir: str, path: str) -> str:
  """``--mode=import``: a checkpoint of a reference implementation (a score_sde (JAX) file or a
  score_sde_pytorch ``.pth``) becomes the permanent checkpoint of a new run directory, with
  ``config.json``, so that ``--mode=eval``, ``sample`` and ``train`` (resume, fine-tune) use it as one of
  ours (``checkpointing.import_checkpoint``). Returns the checkpoint directory written."""
  validate_config(config, 'eval')
  os.makedirs(workdir, exist_ok=True)
  _, written = checkpointing.import_checkpoint(config, workdir, path)
  check_resume_config(config, workdir)
  return written


# ----------------------------------------------------------------------------------------------------
# Anomaly detection (evaluation/qa.py)


def qa_calibrate(config, workdir: str, checkpoint=None):
  """``--mode=qa_calibrate``: the threshold from the held-out clean split → ``workdir/qa_calibration.json``."""
  validate_config(config, 'qa')
  from scoresde.evaluation import qa  # pylint: disable=import-outside-toplevel
  return qa.calibrate(config, workdir, checkpoint)


def qa_check(config, workdir: str, input_path: str, checkpoint=None) -> dict[str, Any]:
  """``--mode=qa --qa.input=PATH``: scores and decides the inputs → ``workdir/qa/<input>/report.json``."""
  validate_config(config, 'qa')
  from scoresde.evaluation import qa  # pylint: disable=import-outside-toplevel
  return qa.run_qa(config, workdir, input_path, checkpoint)
