"""Config sweeps: a grid or list of config overrides becomes runs with their own workdirs, launched
locally, on SLURM (through submitit) or written out as TPU-pod commands; a report gathers every run's
metrics and evaluation results into one table and one plot.

A run is only ever ``main.py --config=FILE --config.KEY=VALUE ... --workdir=DIR --mode=train``: the sweep
adds no training logic, so a run resumes, is evaluated and is sampled exactly like a hand-started one,
and re-launching a sweep resumes every run from its newest checkpoint (``run_lib.train``).

Files, in the sweep's root: ``sweep.json`` (the runs, their overrides and commands, written before
anything starts), ``tpu_commands.sh`` (the TPU launcher), ``submitit/`` (the submitit launchers' logs),
``report.{csv,md,png}``; in each run's workdir, ``console.txt`` (the process's stdout and stderr; main.py
itself keeps its log in ``stdout.txt``).

This module imports nothing else of scoresde, so planning, launching and reporting do not load JAX.
"""

from __future__ import annotations

import ast
import concurrent.futures
import copy
import csv
import dataclasses
import difflib
import glob
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import ml_collections

Overrides = dict[str, Any]  # dotted config key -> value, e.g. {'optim.lr': 2e-4}

MANIFEST_FILE = 'sweep.json'
TPU_COMMANDS_FILE = 'tpu_commands.sh'
CONSOLE_FILE = 'console.txt'
METRICS_FILE = 'metrics.jsonl'
REPORT_BASENAME = 'report'
MAX_NAME_LENGTH = 100
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_PY = os.path.join(REPO_ROOT, 'main.py')


class SweepError(ValueError):
  """A sweep that cannot be planned or reported: the message names the key or file and the fix."""


# ----------------------------------------------------------------------------------------------------
# Overrides: parsing, expansion, validation


def parse_value(text: str) -> Any:
  """A Python literal (``1e-3``, ``True``, ``(1, 2)``, ``'pc'``), else the text itself as a string, so
  that ``sampling.method=pc`` needs no quotes, as on main.py's command line."""
  text = text.strip()
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _split_top_level(text: str) -> list[str]:
  """``a, (1, 2), b`` -> ['a', '(1, 2)', 'b']: commas inside brackets or quotes do not split."""
  items, depth, quote, current = [], 0, None, []
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in '\'"':
      quote = char
    elif char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    elif char == ',' and depth == 0:
      items.append(''.join(current))
      current = []
      continue
    current.append(char)
  items.append(''.join(current))
  return [item for item in (i.strip() for i in items) if item]


def parse_assignment(spec: str) -> tuple[str, Any]:
  """``'training.n_iters=20'`` -> ('training.n_iters', 20)."""
  key, sep, value = spec.partition('=')
  key = key.strip()
  if key.startswith('config.'):
    key = key[len('config.'):]
  if not sep or not key:
    raise SweepError(f'{spec!r} is not KEY=VALUE; write e.g. training.n_iters=20.')
  return key, parse_value(value)


def parse_grid_axis(spec: str) -> tuple[str, list[Any]]:
  """``'optim.lr=[1e-3,2e-4]'`` -> ('optim.lr', [0.001, 0.0002]); items that are not Python literals are
  strings (``model.name=[ncsnpp,ddpm]``)."""
  key, value = parse_assignment(spec)
  text = spec.partition('=')[2].strip()
  if not (text.startswith('[') and text.endswith(']')):
    raise SweepError(f'--grid {spec!r}: the values must be a bracketed list, e.g. {key}=[1e-3,2e-4]; '
                     'use --set for a single value.')
  values = value if isinstance(value, list) else [parse_value(item) for item in _split_top_level(text[1:-1])]
  if not values:
    raise SweepError(f'--grid {spec!r} lists no values.')
  return key, values


def expand_grid(axes: Sequence[tuple[str, Sequence[Any]]], fixed: Overrides | None = None) -> list[Overrides]:
  """The cartesian product of the axes (the first axis varies slowest), each with ``fixed`` added."""
  keys = [key for key, _ in axes]
  repeated = {key for key in keys if keys.count(key) > 1} | (set(keys) & set(fixed or {}))
  if repeated:
    raise SweepError(f'{sorted(repeated)} given more than once (in --grid and --set); give each key once.')
  return [{**(fixed or {}), **dict(zip(keys, values))}
          for values in itertools.product(*(values for _, values in axes))]


def load_override_list(path: str) -> list[Overrides]:
  """A JSON file holding a list of ``{"dotted.key": value}`` objects, one per run."""
  try:
    with open(path, encoding='utf-8') as f:
      runs = json.load(f)
  except (OSError, ValueError) as e:
    raise SweepError(f'--list={path}: {e}') from e
  if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
    raise SweepError(f'{path}: expected a JSON list of objects such as [{{"optim.lr": 0.001}}, ...].')
  return [{k[len('config.'):] if k.startswith('config.') else k: v for k, v in r.items()} for r in runs]


def load_config(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file, as main.py's ``--config`` loads it (configs are repository code;
  the repository root must be importable, as it is for main.py and sweep.py)."""
  if not os.path.isfile(path):
    raise SweepError(f'--config={path}: no such file.')
  spec = importlib.util.spec_from_file_location(f'_sweep_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(_flat_keys(value, f'{prefix}{key}.'))
    else:
      keys.append(f'{prefix}{key}')
  return keys


def _coerce(key: str, value: Any, current: Any) -> Any:
  """``value`` as the type of the config's ``current`` value, as main.py's ``--config.KEY`` flags accept
  it (ml_collections config_flags), or a SweepError saying what to write."""
  def refuse(expected: str, example: str) -> SweepError:
    return SweepError(f'config.{key}={value!r} ({type(value).__name__}): the config holds {current!r}, '
                      f'so give {expected}, e.g. {key}={example}.')
  if isinstance(current, ml_collections.ConfigDict):
    raise SweepError(f'config.{key} is a group of keys; override one of them, e.g. '
                     f'{key}.{next(iter(current.keys()), "...")}=...')
  if isinstance(current, bool):
    if not isinstance(value, bool):
      raise refuse('True or False', 'False')
    return value
  if isinstance(current, int):
    if isinstance(value, bool) or not isinstance(value, int):
      raise refuse('an integer', str(current))
    return value
  if isinstance(current, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise refuse('a number', repr(current))
    return float(value)
  if isinstance(current, str):
    if not isinstance(value, str):
      raise refuse('a string', current or 'name')
    return value
  if isinstance(current, tuple):
    if not isinstance(value, (tuple, list)):
      raise refuse('a tuple', f"'{current!r}'")
    return tuple(value)
  if isinstance(current, list):
    raise SweepError(f'config.{key} is a list, which main.py\'s --config.{key} flag cannot override '
                     '(ml_collections config_flags); make it a tuple in the config file.')
  raise SweepError(f'config.{key} holds {current!r} ({type(current).__name__}), whose type main.py\'s '
                   f'--config.{key} flag cannot parse; set a typed default in the config file.')


def validate_overrides(config: ml_collections.ConfigDict, overrides: Overrides) -> Overrides:
  """The overrides with values coerced to their keys' types; a SweepError for an unknown key (with the
  nearest known ones) or a value of an incompatible type. Runs before anything is launched, so a typo
  does not cost a queue slot or a failed array."""
  known = _flat_keys(config)
  coerced = {}
  for key, value in overrides.items():
    node: Any = config
    for part in key.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f'did you mean {", ".join(close)}?' if close else f'the config\'s keys are {", ".join(known)}.'
        raise SweepError(f'config.{key} does not exist in the base config; {hint}')
      node = node[part]
    coerced[key] = _coerce(key, value, node)
  return coerced


def apply_overrides(config: ml_collections.ConfigDict, overrides: Overrides) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the (validated) overrides set, as main.py will see it."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *groups, name = key.split('.')
    node = config
    for group in groups:
      node = node[group]
    node[name] = value
  return config


# ----------------------------------------------------------------------------------------------------
# Runs: names, commands, the manifest


def flag_value(value: Any) -> str:
  """The text of ``--config.KEY=TEXT`` that config_flags parses back to ``value``."""
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, tuple):
    return repr(value)
  return str(value)


def _name_value(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (tuple, list)):
    return '-'.join(_name_value(v) for v in value) or 'none'
  return str(value)


def run_names(runs: Sequence[Overrides]) -> list[str]:
  """Readable, unique, filesystem-safe names such as ``lr=0.001,nf=8``: the keys whose value differs
  between runs, each by its last component unless two varying keys share it."""
  keys = list(dict.fromkeys(k for r in runs for k in r))
  varying = [k for k in keys if len({json.dumps(r.get(k), sort_keys=True, default=str) for r in runs}) > 1]
  last = [k.rsplit('.', 1)[-1] for k in varying]
  labels = {k: (short if last.count(short) == 1 else k) for k, short in zip(varying, last)}
  names, seen = [], set()
  for overrides in runs:
    name = ','.join(f'{labels[k]}={_name_value(overrides[k])}' for k in varying if k in overrides) or 'base'
    name = re.sub(r'[^A-Za-z0-9._,=+-]', '_', name).lstrip('.-') or 'run'
    if len(name) > MAX_NAME_LENGTH:  # keep it unique when cut
      name = f'{name[:MAX_NAME_LENGTH - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}'
    unique, i = name, 2
    while unique in seen:
      unique, i = f'{name}_{i}', i + 1
    seen.add(unique)
    names.append(unique)
  return names


def main_command(config_path: str, overrides: Overrides, workdir: str, mode: str, *,
                 python: str = sys.executable, main_py: str = MAIN_PY,
                 extra: Sequence[str] = ()) -> list[str]:
  """The argument list of one main.py invocation (never a shell string: values need no quoting)."""
  return [python, main_py, f'--config={config_path}',
          *(f'--config.{key}={flag_value(value)}' for key, value in overrides.items()),
          f'--workdir={workdir}', f'--mode={mode}', *extra]


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its name (the workdir's basename), overrides and the commands it executes in
  order (training, then optionally evaluation)."""
  name: str
  workdir: str
  overrides: Overrides
  modes: tuple[str, ...]
  commands: tuple[tuple[str, ...], ...]


def plan_runs(config_path: str, config: ml_collections.ConfigDict, sweep: Sequence[Overrides], root: str, *,
              mode: str = 'train', then_eval: bool = False) -> list[Run]:
  """Validates every run's overrides against ``config`` and gives each its workdir ``root/<name>`` and
  absolute-path commands (a SLURM job or a pool thread may run from any directory)."""
  if not sweep:
    raise SweepError('the sweep has no runs; give --grid KEY=[...] or --list FILE.json.')
  validated = [validate_overrides(config, overrides) for overrides in sweep]
  for i, j in itertools.combinations(range(len(validated)), 2):
    if validated[i] == validated[j]:
      raise SweepError(f'runs {i} and {j} have the same overrides {validated[i]}; each run must differ.')
  config_path = os.path.abspath(config_path)
  runs = []
  for name, overrides in zip(run_names(validated), validated):
    workdir = os.path.abspath(os.path.join(root, name))
    modes = (mode, 'eval') if then_eval and mode != 'eval' else (mode,)
    runs.append(Run(name, workdir, overrides, modes,
                    tuple(tuple(main_command(config_path, overrides, workdir, m)) for m in modes)))
  return runs


def write_manifest(root: str, config_path: str, launcher: str, runs: Sequence[Run],
                   extra: dict[str, Any] | None = None) -> str:
  """``root/sweep.json``: what will run, written before anything starts, so a crashed launcher leaves the
  plan behind and ``report`` knows every run's overrides."""
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, MANIFEST_FILE)
  manifest = {'config': config_path, 'launcher': launcher, **(extra or {}),
              'runs': [{'name': r.name, 'overrides': r.overrides, 'commands': [list(c) for c in r.commands]}
                       for r in runs]}
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=2, default=str)
  os.replace(tmp, path)
  return path


def read_manifest(root: str) -> dict[str, Any]:
  path = os.path.join(root, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise SweepError(f'{path} does not exist; is {root} the --root of a launched sweep?')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------------
# Launchers


def _run_commands(commands: Iterable[Sequence[str]], log_path: str,
                  on_start: Callable[[subprocess.Popen], None] | None = None, env: dict[str, str] | None = None,
                  poll_s: float = 0.5) -> int:
  """Runs the commands in order, stdout and stderr appended to ``log_path``; stops at the first failure
  and returns its exit code (0 when all succeed). Polls rather than blocks in ``wait()`` so a signal
  handler may signal and reap the child (see ``SweepJob.checkpoint``)."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, 'a', encoding='utf-8') as log:
    for command in commands:
      log.write(f'$ {shlex.join(command)}\n')
      log.flush()
      try:
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env)  # pylint: disable=consider-using-with
      except OSError as e:
        log.write(f'could not start: {e}\n')
        return 127
      if on_start is not None:
        on_start(proc)
      while proc.poll() is None:
        time.sleep(poll_s)
      if proc.returncode:
        return proc.returncode
  return 0


def launch_local(runs: Sequence[Run], parallel: int = 1, env: dict[str, str] | None = None,
                 echo: Callable[[str], None] = print) -> list[int]:
  """Runs the sweep here, ``parallel`` runs at a time; returns each run's exit code in run order. A failed
  run does not stop the others."""
  if parallel < 1:
    raise SweepError(f'--parallel={parallel} must be at least 1.')
  codes: dict[str, int] = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = {pool.submit(_run_commands, r.commands, os.path.join(r.workdir, CONSOLE_FILE), env=env): r
               for r in runs}
    for future in concurrent.futures.as_completed(futures):
      run = futures[future]
      codes[run.name] = future.result()
      state = 'finished' if codes[run.name] == 0 else f'FAILED (exit code {codes[run.name]})'
      echo(f'[{len(codes)}/{len(runs)}] {run.name}: {state}; log {os.path.join(run.workdir, CONSOLE_FILE)}')
  return [codes[r.name] for r in runs]


def summary(runs: Sequence[Run], codes: Sequence[int]) -> str:
  """One line per run and a count, for the end of a launch."""
  lines = [f'  {"ok    " if c == 0 else f"rc {c:<3d}"} {r.name}' for r, c in zip(runs, codes)]
  failed = sum(c != 0 for c in codes)
  lines.append(f'{len(runs) - failed}/{len(runs)} runs succeeded' +
               (f'; rerun the same launch to resume the {failed} failed' if failed else '.'))
  return '\n'.join(lines)


class SweepJob:
  """A submitit job that runs one run's commands in a subprocess.

  submitit calls ``checkpoint`` (any callable with one is checkpointable) when SLURM signals a
  preemption or the time limit; it asks the training process to stop (SIGTERM: run_lib saves a
  preemption checkpoint and exits) and returns a fresh copy of this job to requeue, which resumes from
  that checkpoint exactly.
  """

  def __init__(self, commands: Sequence[Sequence[str]], log_path: str, grace_s: float = 120.):
    self.commands = [list(c) for c in commands]
    self.log_path = log_path
    self.grace_s = grace_s
    self._proc: subprocess.Popen | None = None

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, '_proc': None}  # a running process is not part of a requeued job

  def _started(self, proc: subprocess.Popen) -> None:
    self._proc = proc

  def __call__(self) -> int:
    code = _run_commands(self.commands, self.log_path, on_start=self._started)
    if code:
      raise RuntimeError(f'the run exited with code {code}; its log is {self.log_path}')
    return code

  def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
    from submitit.helpers import DelayedSubmission  # pylint: disable=import-outside-toplevel
    proc = self._proc
    if proc is not None and proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
      deadline = time.monotonic() + self.grace_s
      while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return DelayedSubmission(SweepJob(self.commands, self.log_path, self.grace_s), *args, **kwargs)


def _import_submitit():
  try:
    import submitit  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SweepError('--launcher=slurm and submitit_local need the submitit package: '
                     'pip install submitit==1.5.4 (listed in requirements-test.txt).') from e
  return submitit


def slurm_minutes(text: str) -> int:
  """SLURM's time formats (``MM``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) as whole minutes, for submitit."""
  match = re.fullmatch(r'(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?', text.strip())
  if not match:
    raise SweepError(f'--slurm.time={text!r}: write minutes (90), HH:MM:SS (01:30:00) or D-HH:MM:SS.')
  days, a, b, c = (int(g) if g else None for g in match.groups())
  if days is not None:  # D-HH[:MM[:SS]]
    hours, minutes, seconds = a, b or 0, c or 0
  elif c is not None:  # HH:MM:SS
    hours, minutes, seconds = a, b, c
  elif b is not None:  # MM:SS
    hours, minutes, seconds = 0, a, b
  else:
    hours, minutes, seconds = 0, a, 0
  return max(1, (days or 0) * 1440 + hours * 60 + minutes + math.ceil(seconds / 60))


def launch_submitit(runs: Sequence[Run], folder: str, cluster: str, parameters: dict[str, Any]) -> list[Any]:
  """Submits the runs as one job array (``cluster='slurm'``) or as local processes (``'local'``, for
  tests); returns the submitit jobs in run order. ``parameters`` are the executor's (``timeout_min``,
  ``gpus_per_node``; SLURM's ``partition``, ``account``, ``array_parallelism``, ``setup``, ...)."""
  submitit = _import_submitit()
  # The cluster's own executor: AutoExecutor would scan installed packages for plugins (pkg_resources).
  executors = {'slurm': submitit.SlurmExecutor, 'local': submitit.LocalExecutor}
  if cluster not in executors:
    raise SweepError(f'cluster {cluster!r} is not one of {sorted(executors)}.')
  executor = executors[cluster](folder=os.path.join(folder, '%j'))
  executor.update_parameters(**parameters)
  with executor.batch():
    jobs = [executor.submit(SweepJob(r.commands, os.path.join(r.workdir, CONSOLE_FILE))) for r in runs]
  return jobs


def wait_submitit(jobs: Sequence[Any], echo: Callable[[str], None] = print) -> list[int]:
  """Waits for the jobs; 0 for each that succeeded, 1 for each that failed (its error echoed)."""
  codes = []
  for job in jobs:
    try:
      codes.append(int(job.result()))
    except Exception as e:  # pylint: disable=broad-except  (submitit re-raises the job's error, any type)
      echo(f'job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}')
      codes.append(1)
  return codes


def tpu_script(runs: Sequence[Run], config_path: str, *, tpu_name: str, zone: str, repo: str,
               project: str | None = None, python: str = 'python3') -> str:
  """A bash script running the runs one after another on a TPU-VM pod: each line starts main.py on every
  worker (``--worker=all``) with ``--jax_distributed``, which lets JAX find the pod's hosts. Paths inside
  the repository are given relative to it, since the pod has its own checkout at ``repo``."""
  def on_pod(path: str) -> str:
    relative = os.path.relpath(os.path.abspath(path), REPO_ROOT)
    return path if relative.startswith('..') else relative

  def quoted_dir(path: str) -> str:  # keep ~ expandable by the remote shell
    return '~/' + shlex.quote(path[2:]) if path.startswith('~/') else shlex.quote(path)

  lines = ['#!/usr/bin/env bash', f'# {len(runs)} runs of a sweep, written by sweep.py; run them with',
           f'#   bash {TPU_COMMANDS_FILE}', '# A failed run does not stop the next one.', 'set -u', '']
  for run in runs:
    steps = [shlex.join(main_command(on_pod(config_path), run.overrides, on_pod(run.workdir), mode,
                                     python=python, main_py='main.py', extra=['--jax_distributed']))
             for mode in run.modes]
    remote = f'cd {quoted_dir(repo)} && ' + ' && '.join(steps)
    gcloud = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu_name, f'--zone={zone}', '--worker=all',
              *([f'--project={project}'] if project else []), f'--command={remote}']
    lines += [f'echo {shlex.quote(f"=== {run.name}")}', shlex.join(gcloud)]
  return '\n'.join(lines) + '\n'


def write_tpu_script(root: str, text: str) -> str:
  path = os.path.join(root, TPU_COMMANDS_FILE)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  os.chmod(path, 0o755)
  return path


# ----------------------------------------------------------------------------------------------------
# Report


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
  """``metrics.jsonl`` as {scalar: [(step, value), ...]} sorted by step. A resumed run logs some steps
  again (from its checkpoint on): the last record of a step wins. A line cut by a kill is skipped."""
  by_key: dict[str, dict[int, float]] = {}
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
        step = int(record['step'])
      except (ValueError, KeyError, TypeError):
        continue
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)):
          by_key.setdefault(key, {})[step] = float(value)
  return {key: sorted(values.items()) for key, values in by_key.items()}


def _ckpt_order(tag: str, path: str) -> tuple[int, int, float]:
  return (tag.isdigit(), int(tag) if tag.isdigit() else 0, os.path.getmtime(path))


# eval/ files written by run_lib.evaluate and evaluation/{bits_per_dim,sample_quality}.py: a pattern whose
# group is the checkpoint tag, and the report's column for each of their keys.
EVAL_FILES = (
    (r'ckpt_(.+)_loss\.json', {'mean_loss': 'eval_mean_loss'}),
    (r'bpd_\w+?_ckpt_(.+)\.json', {'bpd': 'bpd', 'bpd_stderr': 'bpd_stderr', 'elbo_bpd': 'elbo_bpd',
                                    'deq_bpd': 'deq_bpd', 'deq_elbo_bpd': 'deq_elbo_bpd'}),
    (r'report_ckpt_(.+)\.json', {'fid': 'fid', 'is': 'is', 'kid': 'kid'}),
)


def read_eval(eval_dir: str) -> dict[str, Any]:
  """The newest checkpoint's results of each kind found in ``eval_dir`` (``eval_ckpt`` says which)."""
  result: dict[str, Any] = {}
  names = [os.path.basename(p) for p in glob.glob(os.path.join(eval_dir, '*.json'))]
  for pattern, columns in EVAL_FILES:
    found = [(m.group(1), os.path.join(eval_dir, n)) for n in names if (m := re.fullmatch(pattern, n))]
    if not found:
      continue
    tag, path = max(found, key=lambda item: _ckpt_order(*item))
    try:
      with open(path, encoding='utf-8') as f:
        values = json.load(f)
    except (OSError, ValueError):
      continue
    result['eval_ckpt'] = tag
    result.update({column: values[key] for key, column in columns.items() if key in values})
  return result


def _n_iters(workdir: str) -> int | None:
  try:
    with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
      return int(json.load(f)['training']['n_iters'])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def gather(root: str) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int, float]]]]:
  """One row per run of the sweep in ``root`` (its overrides, status, last step, last training and eval
  losses, evaluation results) and each run's training-loss curve."""
  manifest = read_manifest(root)
  rows, curves = [], {}
  for run in manifest['runs']:
    workdir = os.path.join(root, run['name'])
    metrics = read_metrics(os.path.join(workdir, METRICS_FILE))
    losses = metrics.get('training_loss', [])
    n_iters = _n_iters(workdir)
    last_step = max((s for series in metrics.values() for s, _ in series), default=None)
    status = ('not started' if last_step is None else
              'finished' if n_iters is not None and last_step >= n_iters else 'incomplete')
    row = {'run': run['name'], **run['overrides'], 'status': status, 'step': last_step, 'n_iters': n_iters,
           'training_loss': losses[-1][1] if losses else None,
           'eval_loss': metrics['eval_loss'][-1][1] if metrics.get('eval_loss') else None,
           **read_eval(os.path.join(workdir, 'eval'))}
    rows.append(row)
    curves[run['name']] = losses
  return rows, curves


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
  columns = list(dict.fromkeys(key for row in rows for key in row))
  return [c for c in columns if any(row.get(c) is not None for row in rows)]


def _cell(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.5g}'
  return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
  columns = _columns(rows) if columns is None else columns
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(_cell(row.get(c)).replace('|', '\\|') for c in columns) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def write_report(root: str) -> dict[str, str]:
  """``root/report.csv``, ``report.md`` and ``report.png`` (training loss against step, one line per run);
  returns their paths."""
  rows, curves = gather(root)
  base = os.path.join(root, REPORT_BASENAME)
  columns = _columns(rows)
  with open(f'{base}.csv', 'w', encoding='utf-8', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows([{c: '' if row.get(c) is None else row[c] for c in columns} for row in rows])
  # The Markdown table shows the overrides that differ between runs; the others go in one line above it.
  overrides = list(dict.fromkeys(k for run in read_manifest(root)['runs'] for k in run['overrides']))
  common = [k for k in overrides if len(rows) > 1 and len({json.dumps(r.get(k)) for r in rows}) == 1]
  with open(f'{base}.md', 'w', encoding='utf-8') as f:
    f.write(f'# Sweep {os.path.basename(os.path.abspath(root))}: {len(rows)} runs\n\n')
    if common:
      f.write('Common to all runs: ' + ', '.join(f'`{k}={_cell(rows[0].get(k))}`' for k in common) + '\n\n')
    f.write(markdown_table(rows, [c for c in columns if c not in common]))
  plot_curves(curves, f'{base}.png', title='training loss')
  return {'csv': f'{base}.csv', 'md': f'{base}.md', 'png': f'{base}.png'}


PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def plot_curves(curves: dict[str, Sequence[tuple[int, float]]], path: str, title: str,
                size: tuple[int, int] = (900, 520)) -> None:
  """A line plot (PIL; the project has no plotting dependency): value against step, one colour per curve,
  a logarithmic value axis when the values span more than a decade, and a legend."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  width, height = size
  left, right, top, bottom = 70, 260, 30, 40
  image = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(image)
  draw.text((left, 8), title, fill='black')
  points = [(s, v) for series in curves.values() for s, v in series if math.isfinite(v)]
  x0, x1, y0, y1 = left, width - right, height - bottom, top
  draw.rectangle((x0, y1, x1, y0), outline='black')
  if not points:
    draw.text((x0 + 10, y1 + 10), 'no metrics yet', fill='black')
    image.save(path)
    return
  log = min(v for _, v in points) > 0 and max(v for _, v in points) > 10 * min(v for _, v in points)
  scale = math.log10 if log else (lambda v: v)
  steps, values = [s for s, _ in points], [scale(v) for _, v in points]
  s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)
  v_lo, v_hi = min(values), max(values)
  pad = max(v_hi - v_lo, 1e-6) * 0.05  # keep the extreme points off the frame
  v_lo, v_hi = v_lo - pad, v_hi + pad

  def to_pixel(step: float, value: float) -> tuple[float, float]:
    return (x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0), y0 - (scale(value) - v_lo) / (v_hi - v_lo) * (y0 - y1))

  for i in range(5):
    v = v_lo + (v_hi - v_lo) * i / 4
    y = y0 - (y0 - y1) * i / 4
    draw.line((x0 - 4, y, x0, y), fill='black')
    draw.text((4, y - 6), f'{10 ** v if log else v:.4g}', fill='black')
    s = s_lo + (s_hi - s_lo) * i / 4
    x = x0 + (x1 - x0) * i / 4
    draw.line((x, y0, x, y0 + 4), fill='black')
    draw.text((x - 10, y0 + 8), f'{s:.6g}', fill='black')
  draw.text(((x0 + x1) // 2 - 10, height - 16), 'step', fill='black')
  for i, (name, series) in enumerate(curves.items()):
    colour = PALETTE[i % len(PALETTE)]  # by run, so a run keeps its colour as others start
    xy = [to_pixel(s, v) for s, v in series if math.isfinite(v)]
    if not xy:
      continue
    if len(xy) > 1:
      draw.line(xy, fill=colour, width=2)
    for x, y in xy:
      draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    legend_y = top + 16 * i
    draw.line((x1 + 12, legend_y + 6, x1 + 32, legend_y + 6), fill=colour, width=3)
    draw.text((x1 + 38, legend_y), name[:34], fill='black')
  image.save(path)
