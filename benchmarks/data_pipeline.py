"""Training-data pipeline: ours (datasets.get_train_iterator) against the same stream built on grain.

Each pipeline yields this process's batch k of the training stream, ``{'image': float32 (b, ...)}``
(B the global batch, P processes, b = B / P), starting at any k:

- ours: ``datasets.get_train_iterator(config, k)`` (numpy index arithmetic, a loader thread pool for
  file sources, a prefetch thread).
- grain_steps: ours' per-batch function (datasets.train_positions, train_indices, the source's
  vectorised load, the row generators) as ``grain.MapDataset.range(...).map(batch)``, ``ds[k:]``,
  ``.to_iter_dataset(ReadOptions)``: grain's threads replace ours' prefetch thread and loader pool
  (a batch is read serially in one of grain's threads; the threads work on different batches).
- grain_steps_mp: the same with ``.mp_prefetch(MultiprocessingOptions(num_workers=--mp_workers))``
  (worker processes instead of threads).
- grain_exact: ``grain.MapDataset.range(...)`` over this process's stream positions, ``.map`` of one
  example (datasets.train_indices, the row generator keyed by the stream position as in datasets.py),
  ``.batch(b)``, ``ds[k:]``, ``.to_iter_dataset(ReadOptions)``: grain's element-wise idiom.
- grain_native: grain's own shuffle and per-element generators: ``MapDataset.source(examples)
  .shuffle(seed).repeat().random_map(finish, seed=seed).batch(b)[p::P]``, ``ds[k:]``,
  ``.to_iter_dataset(ReadOptions)``. Batch k is a function of (config, k) too, but not ours' batch k
  (grain's index_shuffle is not ours' permutation).

The grain pipelines read examples through the same ``datasets.get_source`` as ours, so only the
iteration machinery differs. Measured per dataset: the time to the first batch from nothing (build +
first ``next``; the sources' one-off caches are warmed first, so it measures the pipeline, not
scikit-learn's loader), batches/s after it (at least ``--batches`` batches and ``--min_seconds``), and
the time to the first batch when starting at ``--resume_step`` (resumption). Trials interleave the
pipelines (the order rotates), so a loaded machine slows them alike; figures are min-max ranges over
``--trials``, ratios to ours are taken within each trial. Checks: the exact pipelines against ours,
bit for bit, at the first batches and at ``--resume_step``; for every pipeline, batch ``--check_step``
reached by iterating from 0 against a fresh start there and against another fresh start, and two
processes' halves against the one-process batch. Last, grain's own cost: installed size, import time.

Datasets: the digits default (configs/ve/digits_ncsnpp_continuous.py, in memory) and a 'folder' of
``--folder_images`` random RGB PNGs of ``--folder_size`` px in a temporary directory (decoded per
batch, resized to 32 px, random flips as in the CIFAR-10 defaults), at ``--batch_size``.

  .venv/bin/python benchmarks/data_pipeline.py
  .venv/bin/python benchmarks/data_pipeline.py --datasets=folder --folder_size=128 --folder_images=1000

scoresde does not depend on grain; install it to run this: pip install grain==0.2.18.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

from absl import app
from absl import flags
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scoresde import datasets  # pylint: disable=g-import-not-at-top

try:
  import grain  # pylint: disable=g-import-not-at-top
except ImportError as e:
  raise SystemExit('benchmarks/data_pipeline.py compares against grain, which scoresde does not '
                   'depend on: pip install grain==0.2.18') from e

FLAGS = flags.FLAGS
flags.DEFINE_string('config', 've.digits_ncsnpp_continuous', 'Config module under configs/ (digits).')
flags.DEFINE_integer('batch_size', 128, 'Global training batch.')
flags.DEFINE_integer('folder_images', 2000, 'PNG files in the folder dataset.')
flags.DEFINE_integer('folder_size', 32, 'Side of the random RGB PNGs (image_size stays 32).')
flags.DEFINE_string('folder_dir', '', 'Use (or fill, if empty) this directory instead of a temporary '
                    'one.')
flags.DEFINE_integer('batches', 40, 'Least timed batches after the first, per pipeline and trial.')
flags.DEFINE_float('min_seconds', 1., 'Least timed seconds per pipeline and trial (fast pipelines run '
                   'more batches).')
flags.DEFINE_integer('trials', 3, 'Interleaved trials.')
flags.DEFINE_integer('resume_step', 10_000, 'Global batch to resume at.')
flags.DEFINE_integer('check_batches', 3, 'First batches compared between ours and the exact grain '
                     'pipelines.')
flags.DEFINE_integer('check_step', 20, 'Batch reached by iteration, compared with a fresh start '
                     'there.')
flags.DEFINE_integer('grain_threads', -1, 'grain ReadOptions.num_threads (-1: as ours, the loader '
                     "pool's size for file sources and 0 in memory, as grain advises).")
flags.DEFINE_integer('grain_prefetch', 3, 'grain ReadOptions.prefetch_buffer_size (batches in flight; '
                     'ours keeps up to 3).')
flags.DEFINE_integer('mp_workers', 2, 'Worker processes of grain_steps_mp (grain mp_prefetch).')
flags.DEFINE_list('datasets', ['digits', 'folder'], 'Which of digits, folder to run.')
flags.DEFINE_list('pipelines', ['ours', 'grain_steps', 'grain_steps_mp', 'grain_exact', 'grain_native'],
                  'Pipelines to time (ours is always included; the checks cover all).')
flags.DEFINE_integer('import_repeats', 3, 'Fresh interpreters per import-time measurement (0: skip).')

Batch = dict[str, np.ndarray]
Pipeline = Callable[..., Iterator[Batch]]


# ----------------------------------------------------------------------------------------------------
# The grain pipelines


def _read_options(config, source) -> grain.ReadOptions:
  threads = FLAGS.grain_threads
  if threads < 0:
    threads = (int(config.data.num_workers) or min(8, os.cpu_count() or 1)) if source.parallel else 0
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=FLAGS.grain_prefetch)


def _finish_rows(config, images: np.ndarray, positions) -> np.ndarray:
  """Ours' flips and dequantization: each row's generator is keyed by its stream position."""
  # pylint: disable=protected-access
  keys = [(int(config.seed), datasets._TAG_TRAIN_ROW, int(q)) for q in positions]
  return datasets._finish(images, keys, bool(config.data.random_flip),
                          bool(config.data.uniform_dequantization), config.data.num_levels)


def _example_getter(source) -> Callable[[int], np.ndarray]:
  """One uint8 example of a datasets source by index (grain reads element by element)."""
  if isinstance(source, datasets.ArraySource):
    return lambda i: source.images[i]
  return source.get


def grain_steps(config, start_step: int = 0, *, process_index: int = 0, process_count: int = 1,
                processes: int = 0) -> Iterator[Batch]:
  """Ours' batch function mapped over global batch indices by grain (in ``processes`` worker
  processes if > 0)."""
  source = datasets.get_source(config, 'train')
  n = len(source)

  def batch(step: int) -> Batch:
    positions = datasets.train_positions(config, step, process_index, process_count)
    images = source.load(datasets.train_indices(config, positions, n))
    return {'image': _finish_rows(config, images, positions)}

  ds = grain.MapDataset.range(sys.maxsize).map(batch)
  ds = ds[start_step:].to_iter_dataset(_read_options(config, source))
  if processes:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes))
  return iter(ds)


def grain_exact(config, start_step: int = 0, *, process_index: int = 0,
                process_count: int = 1) -> Iterator[Batch]:
  """Ours' stream on grain: element j of this process is stream position (j // b) B + p b + j % b."""
  source = datasets.get_source(config, 'train')
  get, n = _example_getter(source), len(source)
  global_batch = config.training.batch_size
  local = global_batch // process_count

  def example(j: int) -> Batch:
    q = (j // local) * global_batch + process_index * local + j % local
    i = int(datasets.train_indices(config, np.array([q]), n)[0])
    return {'image': _finish_rows(config, get(i)[None], [q])[0]}

  ds = grain.MapDataset.range(sys.maxsize).map(example).batch(local)
  return iter(ds[start_step:].to_iter_dataset(_read_options(config, source)))


def grain_native(config, start_step: int = 0, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """grain's shuffle (reseeded each epoch) and per-element generators; process p takes rows
  [p b, (p+1) b) of each global batch, as ours."""
  source = datasets.get_source(config, 'train')
  get, n = _example_getter(source), len(source)
  seed, levels = int(config.seed), config.data.num_levels
  flip, dequantize = bool(config.data.random_flip), bool(config.data.uniform_dequantization)
  local = config.training.batch_size // process_count

  class Examples:
    def __len__(self):
      return n

    def __getitem__(self, i):
      return get(int(i))

  def finish(image: np.ndarray, rng: np.random.Generator) -> Batch:
    if flip and rng.random() < 0.5:
      image = image[:, ::-1]
    noise = rng.random(image.shape) if dequantize else None
    return {'image': datasets.to_unit_interval(image, levels, noise)}

  ds = (grain.MapDataset.source(Examples()).shuffle(seed=seed).repeat()
        .random_map(finish, seed=seed).batch(local))
  ds = ds[process_index::process_count]
  return iter(ds[start_step:].to_iter_dataset(_read_options(config, source)))


def ours(config, start_step: int = 0, *, process_index: int = 0,
         process_count: int = 1) -> Iterator[Batch]:
  return datasets.get_train_iterator(config, start_step, process_index=process_index,
                                     process_count=process_count)


def grain_steps_mp(config, start_step: int = 0, **kwargs) -> Iterator[Batch]:
  return grain_steps(config, start_step, processes=FLAGS.mp_workers, **kwargs)


PIPELINES: dict[str, Pipeline] = {'ours': ours, 'grain_steps': grain_steps,
                                   'grain_steps_mp': grain_steps_mp, 'grain_exact': grain_exact,
                                   'grain_native': grain_native}
EXACT = ('grain_steps', 'grain_steps_mp', 'grain_exact')


# ----------------------------------------------------------------------------------------------------
# Measurements


def _close(it) -> None:
  close = getattr(it, 'close', None)
  if close is not None:
    close()


def first_batch(pipeline: Pipeline, config, start_step: int, **kwargs) -> np.ndarray:
  it = pipeline(config, start_step, **kwargs)
  try:
    return next(it)['image']
  finally:
    _close(it)


def time_pipeline(pipeline: Pipeline, config, batches: int, resume_step: int) -> dict[str, float]:
  """Seconds to the first batch (build + next), batches/s after it, seconds to batch resume_step."""
  start = time.perf_counter()
  it = pipeline(config, 0)
  next(it)
  first = time.perf_counter() - start
  start, count = time.perf_counter(), 0
  while count < batches or time.perf_counter() - start < FLAGS.min_seconds:
    next(it)
    count += 1
  rate = count / (time.perf_counter() - start)
  _close(it)
  start = time.perf_counter()
  first_batch(pipeline, config, resume_step)
  resume = time.perf_counter() - start
  return {'first_s': first, 'batches_per_s': rate, 'resume_s': resume}


def check(config, resume_step: int, check_batches: int, check_step: int) -> list[str]:
  """Plain-language results of the determinism checks."""
  lines = []
  it = ours(config, 0)
  reference = [next(it) for _ in range(check_batches)]
  _close(it)
  reference_resume = first_batch(ours, config, resume_step)
  for name in EXACT:
    it = PIPELINES[name](config, 0)
    same = all(np.array_equal(next(it)['image'], r['image']) for r in reference)
    _close(it)
    same_resume = np.array_equal(first_batch(PIPELINES[name], config, resume_step), reference_resume)
    lines.append(f'{name} == ours bit for bit: batches 0-{check_batches - 1} {same}, '
                 f'batch {resume_step} {same_resume}')
  for name, pipeline in PIPELINES.items():
    it = pipeline(config, 0)
    for _ in range(check_step):
      next(it)
    iterated = next(it)['image']
    _close(it)
    fresh = first_batch(pipeline, config, check_step)
    again = first_batch(pipeline, config, check_step)
    halves = np.concatenate([first_batch(pipeline, config, check_step, process_index=p, process_count=2)
                             for p in range(2)])
    lines.append(f'{name}: batch {check_step} iterated from 0 == fresh start there '
                 f'{np.array_equal(iterated, fresh)}, == a second fresh start '
                 f'{np.array_equal(fresh, again)}, 2 processes\' halves == 1-process batch '
                 f'{np.array_equal(halves, fresh)}')
  same = np.array_equal(first_batch(grain_native, config, 0), first_batch(ours, config, 0))
  lines.append(f'grain_native batch 0 == ours batch 0: {same}')
  # grain's shuffle seeds epoch e with seed + e, so neighbouring seeds share epochs, shifted by one.
  n, seed = datasets.num_examples(config, 'train'), int(config.seed)
  shuffled = [grain.MapDataset.range(n).shuffle(seed=s).repeat() for s in (seed, seed + 1)]
  grain_shifted = all(shuffled[0][n + i] == shuffled[1][i] for i in range(n))
  next_seed = config.copy_and_resolve_references()
  next_seed.seed = seed + 1
  ours_shifted = np.array_equal(datasets.train_indices(config, np.arange(n, 2 * n), n),
                                datasets.train_indices(next_seed, np.arange(n), n))
  lines.append(f'epoch 1 with seed {seed} == epoch 0 with seed {seed + 1}: grain shuffle '
               f'{grain_shifted}, ours {ours_shifted}')
  return lines


def _range(values: list[float], fmt: str) -> str:
  lo, hi = min(values), max(values)
  return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f'{lo:{fmt}}-{hi:{fmt}}'


def benchmark(label: str, config) -> None:
  datasets.validate_data_config(config, 1)
  for split in datasets.SPLITS:  # warm the one-off caches (scikit-learn's digits) outside the timings
    datasets.num_examples(config, split)
  names = ['ours'] + [name for name in PIPELINES if name != 'ours' and name in FLAGS.pipelines]
  results = {name: [] for name in names}
  for trial in range(FLAGS.trials):
    for name in names[trial % len(names):] + names[:trial % len(names)]:
      results[name].append(time_pipeline(PIPELINES[name], config, FLAGS.batches, FLAGS.resume_step))
  b = config.training.batch_size
  print(f'\n{label}: {datasets.num_examples(config, "train")} train examples, batch {b}, '
        f'{FLAGS.trials} interleaved trials, >= {FLAGS.batches} batches and {FLAGS.min_seconds} s timed '
        'each', flush=True)
  for name in names:
    rs = results[name]
    rates = [r['batches_per_s'] for r in rs]
    print(f'  {name:13s} first batch {_range([r["first_s"] for r in rs], ".3f")} s, '
          f'{_range(rates, ".1f")} batches/s ({_range([x * b for x in rates], ".0f")} examples/s), '
          f'batch {FLAGS.resume_step} from a fresh start {_range([r["resume_s"] for r in rs], ".3f")} s '
          f'(replaying the {FLAGS.resume_step} batches before it at this rate would take '
          f'{_range([FLAGS.resume_step / x for x in rates], ".0f")} s)', flush=True)
  for name in names[1:]:
    ratios = [g['batches_per_s'] / o['batches_per_s'] for g, o in zip(results[name], results['ours'])]
    print(f'  {name} / ours batches/s, per trial: {_range(ratios, ".2f")} '
          f'(median {np.median(ratios):.2f})', flush=True)
  for line in check(config, FLAGS.resume_step, FLAGS.check_batches, FLAGS.check_step):
    print(f'  check: {line}', flush=True)


def write_folder(directory: pathlib.Path, count: int, size: int) -> None:
  rng = np.random.default_rng(0)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(directory / f'{i:05d}.png')


def _requirement_names(dist) -> set[str]:
  """Normalised names of a distribution's unconditional requirements."""
  names = set()
  for req in dist.requires or ():
    if 'extra ==' not in req:
      names.add(re.match(r'[A-Za-z0-9_.-]+', req).group().lower().replace('_', '-'))
  return names


def grain_cost() -> None:
  """grain's installed files, and the seconds `import grain` adds after what training imports anyway."""
  dist = importlib.metadata.distribution('grain')
  size = sum(f.size or 0 for f in dist.files or ())
  requires = sorted(_requirement_names(dist))
  others = set()
  for d in importlib.metadata.distributions():
    if d.metadata['Name'].lower() != 'grain':
      others |= _requirement_names(d)
  only_grain = [r for r in requires if r not in others]
  only_size = sum(sum(f.size or 0 for f in importlib.metadata.distribution(r).files or ())
                  for r in only_grain)
  print(f'\ngrain {dist.version}: {size / 2**20:.1f} MiB installed; requires {", ".join(requires)}; '
        f'of these, required by nothing else installed: {", ".join(only_grain) or "none"} '
        f'({only_size / 2**20:.2f} MiB)')
  baseline = 'import jax, numpy, orbax.checkpoint, PIL.Image, absl.app'
  code = (f'import time; {baseline}; t = time.perf_counter(); import grain; '
          'print(time.perf_counter() - t)')
  alone = ('import time; t = time.perf_counter(); import grain; print(time.perf_counter() - t)')
  marginal = [float(subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                                   text=True).stdout) for _ in range(FLAGS.import_repeats)]
  cold = [float(subprocess.run([sys.executable, '-c', alone], check=True, capture_output=True,
                               text=True).stdout) for _ in range(FLAGS.import_repeats)]
  print(f'import grain: {_range(cold, ".2f")} s in a fresh interpreter (it imports jax and orbax); '
        f'{_range(marginal, ".2f")} s after `{baseline}`', flush=True)


def _load() -> str:
  return ', '.join(f'{x:.1f}' for x in os.getloadavg())


def main(argv):
  del argv
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average '
        f'{_load()}, grain {importlib.metadata.version("grain")}, numpy {np.__version__}, '
        f'pillow {Image.__version__}', flush=True)
  if 'digits' in FLAGS.datasets:
    config = importlib.import_module(f'configs.{FLAGS.config}').get_config()
    config.training.batch_size = FLAGS.batch_size
    benchmark(f'{FLAGS.config} (in memory)', config)
  if 'folder' in FLAGS.datasets:
    with tempfile.TemporaryDirectory() as tmp:
      directory = pathlib.Path(FLAGS.folder_dir or tmp)
      directory.mkdir(parents=True, exist_ok=True)
      if not any(directory.glob('*.png')):
        write_folder(directory, FLAGS.folder_images, FLAGS.folder_size)
      config = importlib.import_module('configs.default_cifar10_configs').get_default_configs()
      config.training.batch_size = FLAGS.batch_size
      config.data.dataset = 'folder'
      config.data.path = str(directory)
      config.data.image_size = 32
      benchmark(f'folder of {FLAGS.folder_size}x{FLAGS.folder_size} RGB PNGs (decoded per batch, '
                'random flips)', config)
  if FLAGS.import_repeats:
    grain_cost()
  print(f'# load average at the end {_load()}', flush=True)


if __name__ == '__main__':
  app.run(main)
