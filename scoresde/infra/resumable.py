"""Resumable evaluation output: a run directory bound to its settings, and files written atomically.

The evaluations (``evaluation.rounds``: bits/dim and sample quality) save each unit of work as it finishes and skip
the units they find, so a preempted run resumes where it stopped. That is only sound when the saved
units were made with the same settings, which ``open_run_dir`` checks, and when a file that exists is
complete, which ``atomic_write`` guarantees (write to a temporary name, then rename).
"""

from __future__ import annotations

import json
import os
from typing import Any, BinaryIO, Callable

import jax

from scoresde.infra import parallel


def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> None:
  """Calls ``write`` on a temporary binary file and renames it to ``path`` (atomic on POSIX)."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    write(f)
  os.replace(tmp, path)


def open_run_dir(run_dir: str, settings: dict[str, Any], contents: str = 'results') -> None:
  """Creates ``run_dir`` with ``settings.json``, or checks that an existing one has the same settings.

  Process 0 writes; every process returns once the directory exists. ``contents`` names what the
  directory holds, for the error raised on a mismatch.
  """
  path = os.path.join(run_dir, 'settings.json')
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != settings:
      changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
      raise ValueError(f'{run_dir} holds {contents} made with other settings ({changed}); delete it or '
                       f'evaluate into another eval_dir.')
    return
  if jax.process_index() == 0:
    os.makedirs(run_dir, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(settings, indent=2).encode()))
  parallel.sync(f'open {run_dir}')
