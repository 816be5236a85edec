"""Resumable evaluation rounds: the loop shape shared by the sample-quality and bits/dim evaluations.

An evaluation is a sequence of units of work (a round of samples, a batch of a likelihood pass). Each
finished unit's arrays are saved as ``{run_dir}/{name}.npz``; a unit whose file exists is loaded
instead of computed, so a preempted evaluation resumes where it stopped and, since every unit draws its
randomness from its own index, gives the numbers an uninterrupted one would. ``infra.resumable``
guarantees that a file that exists is complete and that ``run_dir`` was made with the same settings.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from absl import logging
import jax
import numpy as np
import tqdm

from scoresde.infra import parallel
from scoresde.infra import resumable

Unit = TypeVar('Unit')
Arrays = dict[str, np.ndarray]


def _load(path: str) -> Arrays:
  with np.load(path) as saved:
    return {key: saved[key] for key in saved.files}


def resumable_rounds(run_dir: str, units: Iterable[tuple[str, Unit]], compute: Callable[[Unit], Arrays],
                     *, total: int, desc: str, show_progress: bool = True,
                     postfix: Callable[[Arrays], dict[str, Any]] | None = None
                     ) -> Iterator[tuple[Unit, Arrays]]:
  """Yields ``(unit, arrays)`` for each ``(name, unit)`` of ``units``, in order.

  ``arrays`` is read from ``{run_dir}/{name}.npz`` when a previous run saved it, else ``compute(unit)``
  (called on every process: it may run sharded computations), which process 0 then saves. Every
  process must iterate the same units. A progress bar (process 0) shows ``postfix(arrays)``, and the
  log reports seconds per computed unit with an ETA, once a minute.
  """
  progress = tqdm.tqdm(total=total, desc=desc, unit='round',
                       disable=not show_progress or jax.process_index() != 0)
  resumed = computed = position = 0
  compute_seconds = 0.
  for position, (name, unit) in enumerate(units, 1):
    path = os.path.join(run_dir, f'{name}.npz')
    if os.path.exists(path):
      arrays = _load(path)
      resumed += 1
    else:
      started = time.time()
      arrays = compute(unit)
      if jax.process_index() == 0:
        resumable.atomic_write(path, lambda f, a=arrays: np.savez(f, **a))
      parallel.sync(f'{path} written')
      computed += 1
      compute_seconds += time.time() - started
      per_unit = compute_seconds / computed
      logging.log_every_n_seconds(logging.INFO, '%s: %d/%d, %.1f s/round, ETA %.0f s', 60, desc,
                                  position, total, per_unit, (total - position) * per_unit)
    yield unit, arrays
    if postfix is not None:
      progress.set_postfix(postfix(arrays))
    progress.update()
  progress.close()
  if position != total:
    raise RuntimeError(f'{desc}: {position} units of work, expected {total}.')
  if resumed:
    logging.info('%s: resumed %d of %d rounds from %s', desc, resumed, total, run_dir)
