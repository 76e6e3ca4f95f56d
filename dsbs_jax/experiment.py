"""Experiment grids: the paper's comparison, one command (`dsbs-experiment`).

A `Grid` crosses methods (standard finetuning, standard distillation, distilling
step-by-step with gold or teacher labels), train fractions, model sizes, λ and
seeds. Each point is an ordinary dsbs-train run in `<output_dir>/runs/<point>`:
it selects its checkpoint on validation and evaluates test once. A finished run
(its `results.json` exists) is skipped, so an interrupted grid restarts where it
stopped, and a run cut short resumes from its checkpoint. The runs go one after
another here, or are printed as independent commands for a pod or a cluster.

`summarize` writes `results.csv`, `results.jsonl`, `results.md` (mean ± std over
seeds, a row per method, a column per fraction) and the paper's two plots.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import os
import shlex
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from dsbs_jax import storage
from dsbs_jax.errors import ConfigError

log = logging.getLogger('dsbs_jax')

# Each method as the gin run file and label source that make it.
METHODS: Mapping[str, tuple[str, str]] = {
    'standard_finetuning': ('runs/standard.gin', 'gt'),
    'standard_distillation': ('runs/standard.gin', 'llm'),
    'step_by_step_gold': ('runs/step_by_step.gin', 'gt'),
    'step_by_step_teacher': ('runs/step_by_step.gin', 'llm'),
}
LABELS = {
    'standard_finetuning': 'Standard finetuning',
    'standard_distillation': 'Standard distillation',
    'step_by_step_gold': 'Distilling step-by-step (gold labels)',
    'step_by_step_teacher': 'Distilling step-by-step',
}


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a grid."""

  method: str
  train_fraction: float
  size: str
  lambda_: float
  seed: int

  @property
  def name(self) -> str:
    lam = f'-lambda{self.lambda_:g}' if self.method.startswith('step_by_step') else ''
    return f'{self.method}-frac{self.train_fraction:g}-{self.size}{lam}-seed{self.seed}'


@dataclasses.dataclass(frozen=True)
class Grid:
  """What to run. `gin_files` and `bindings` make every run (a dataset and its
  settings); `sizes` maps a name to a model size's gin files, and bindings (any
  entry with `=`, e.g. its INITIAL_CHECKPOINT_PATH). `teacher_accuracy` draws the
  teacher's line in the size plot (`benchmarks.teacher_accuracy`)."""

  name: str
  output_dir: str
  gin_files: Sequence[str]
  methods: Sequence[str] = ('standard_finetuning', 'step_by_step_teacher')
  train_fractions: Sequence[float] = (1.0,)
  sizes: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  lambdas: Sequence[float] = (1.0,)
  seeds: Sequence[int] = (0,)
  bindings: Sequence[str] = ()
  teacher_accuracy: Optional[float] = None

  def __post_init__(self):
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown:
      raise ConfigError(
          f'experiment {self.name}: unknown methods {unknown}; choose from {sorted(METHODS)}'
      )
    if not self.sizes:
      raise ConfigError(f'experiment {self.name}: `sizes` names no model size')

  def points(self) -> list[Point]:
    """Every run, once: λ varies only for step-by-step methods."""
    out = []
    for method, fraction, size, seed in itertools.product(
        self.methods, self.train_fractions, self.sizes, self.seeds
    ):
      lambdas = self.lambdas if method.startswith('step_by_step') else (0.0,)
      out += [Point(method, fraction, size, lam, seed) for lam in lambdas]
    return out

  def run_dir(self, point: Point) -> str:
    return os.path.join(self.output_dir, 'runs', point.name)

  def arguments(self, point: Point) -> list[str]:
    """The dsbs-train arguments of one run."""
    run_file, label_source = METHODS[point.method]
    size = self.sizes[point.size]
    files = [*self.gin_files, *(x for x in size if '=' not in x), run_file]
    bindings = [
        *self.bindings,
        *(x for x in size if '=' in x),
        f"LABEL_SOURCE = '{label_source}'",
        f'TRAIN_FRACTION = {point.train_fraction}',
        f'SEED = {point.seed}',
        f'DATA_SEED = {point.seed}',
        f"MODEL_DIR = '{self.run_dir(point)}'",
    ]
    if point.method.startswith('step_by_step'):
      bindings.append(f'LAMBDA = {point.lambda_}')
    return [f'--gin_file={f}' for f in files] + [f'--gin_bindings={b}' for b in bindings]


def _finished(grid: Grid, point: Point) -> bool:
  return storage.exists(os.path.join(grid.run_dir(point), 'results.json'))


def commands(grid: Grid, extra: Sequence[str] = ()) -> list[str]:
  """One shell command per unfinished run (dsbs-train's `extra` arguments first), for a
  pod or cluster to launch."""
  return [
      shlex.join(['dsbs-train', *extra, *grid.arguments(p)])
      for p in grid.points()
      if not _finished(grid, p)
  ]


def run(grid: Grid, train: Callable[[Sequence[str]], int]) -> None:
  """Runs the unfinished points one after another with `train` (dsbs-train's
  arguments -> exit status), logging runs done and left with an ETA."""
  points = grid.points()
  todo = [p for p in points if not _finished(grid, p)]
  log.info(
      'experiment %s: %d runs, %d finished, %d to run',
      grid.name,
      len(points),
      len(points) - len(todo),
      len(todo),
  )
  started = time.perf_counter()
  for i, point in enumerate(todo):
    log.info('experiment %s: run %d/%d: %s', grid.name, i + 1, len(todo), point.name)
    status = train(grid.arguments(point))
    if status:
      raise ConfigError(f'experiment {grid.name}: run {point.name} failed (exit {status})')
    if not _finished(grid, point):  # SIGTERM: saved, exit 0, no results
      log.info('experiment %s: %s stopped before its end; rerun to resume', grid.name, point.name)
      return
    per_run = (time.perf_counter() - started) / (i + 1)
    left = len(todo) - i - 1
    log.info(
        'experiment %s: %d/%d runs done, %d left, ETA %s',
        grid.name,
        len(points) - left,
        len(points),
        left,
        _duration(per_run * left),
    )


def _duration(seconds: float) -> str:
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{secs:02d}s'


def collect(grid: Grid) -> list[dict[str, Any]]:
  """A record per finished run: its point, test metric, teacher-forced test label loss,
  best validation step and size."""
  records = []
  for point in grid.points():
    path = os.path.join(grid.run_dir(point), 'results.json')
    if not storage.exists(path):
      continue
    results = json.loads(storage.read_text(path))
    test: dict[str, Any] = next(iter(results['eval'].values()), {})
    decoded = [(t, v) for t, v in test.items() if t != 'teacher_forced']
    if not decoded:
      raise ConfigError(f'experiment {grid.name}: {path} has no final evaluation to report')
    task, values = decoded[0]
    metric, value = next(iter(values.items()))
    records.append(
        {
            **dataclasses.asdict(point),
            'name': point.name,
            'task': task,
            'metric': metric,
            'value': value,
            'label_loss': test.get('teacher_forced', {}).get('label/loss'),
            'best_step': results.get('best', {}).get('step'),
            'steps': results['step'],
            'parameters': results.get('parameters'),
        }
    )
  return records


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(grid: Grid, records: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: mean ± std over seeds, a row per method (and λ), a column per fraction,
  for each model size."""
  lines = []
  metric = records[0]['metric'] if records else 'metric'
  for size in grid.sizes:
    lines += [f'{grid.name}, {size}: test {metric}, mean ± std over seeds (n)', '']
    header = ['method', *(f'{f:.1%}' for f in grid.train_fractions)]
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    rows = sorted({(r['method'], r['lambda_']) for r in records if r['size'] == size})
    for method, lam in sorted(rows, key=lambda m: list(grid.methods).index(m[0])):
      cells = [LABELS[method] + (f' (λ={lam:g})' if method.startswith('step_by_step') else '')]
      for fraction in grid.train_fractions:
        values = [
            r['value']
            for r in records
            if (r['size'], r['method'], r['lambda_'], r['train_fraction'])
            == (size, method, lam, fraction)
        ]
        cells.append(
            '{:.1f} ± {:.1f} ({})'.format(*_mean_std(values), len(values)) if values else '—'
        )
      lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('')
  return '\n'.join(lines)


def summarize(grid: Grid) -> list[dict[str, Any]]:
  """Writes results.{csv,jsonl,md} and the plots to the grid's output dir."""
  records = collect(grid)
  if not records:
    raise ConfigError(f'experiment {grid.name}: no finished run in {grid.output_dir}')
  out = grid.output_dir
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
  writer.writeheader()
  writer.writerows(records)
  storage.write_atomic(os.path.join(out, 'results.csv'), buffer.getvalue())
  storage.write_atomic(
      os.path.join(out, 'results.jsonl'), ''.join(json.dumps(r) + '\n' for r in records)
  )
  storage.write_atomic(os.path.join(out, 'results.md'), table(grid, records))
  from dsbs_jax import plots  # matplotlib, only where plots are drawn

  for name, figure in (
      ('accuracy_vs_data.png', plots.against_data(grid, records)),
      ('accuracy_vs_size.png', plots.against_size(grid, records)),
  ):
    storage.write_atomic(os.path.join(out, name), plots.png(figure))
  return records
