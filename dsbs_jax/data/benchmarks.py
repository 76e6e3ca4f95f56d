"""The paper's four benchmarks, read from the authors' released layout.

    <root>/<name>/<name>_{train,valid,test}.json   JSON lines
    <root>/<name>/llm/<split>_CoT_<i>.json         JSON lists of raw teacher outputs,
                                                   aligned with the split's rows in chunks
                                                   (optional for validation and test)

The root (a directory or a `gs://` URL) comes from `register(root=...)` (gin
macro `DATA_ROOT`) or else the `DSBS_DATA_ROOT` environment variable, and is
read only when a split is first loaded: registering touches no file.

Rows become `{input, label_gt, label_llm, rationale}`. On validation and test
splits `label_llm` is the gold label: models are always evaluated against
gold, as in the paper, while only the training targets come from the teacher.
Run `python -m dsbs_jax.data.benchmarks --data_root=...` to print each split's
parse report and the teacher's label accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import seqio

from dsbs_jax import storage
from dsbs_jax.data import metrics, splits, tasks, teacher
from dsbs_jax.errors import ConfigError, DataError

log = logging.getLogger('dsbs_jax')
DATA_ROOT_ENV = 'DSBS_DATA_ROOT'
NLI_LABELS = ('entailment', 'neutral', 'contradiction')
FILE_SPLITS = {'train': 'train', 'validation': 'valid', 'test': 'test'}


def _field(row: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
  if key not in row:
    raise DataError(f'{where}: missing field {key!r} (fields: {sorted(row)})')
  if not isinstance(row[key], kind):
    raise DataError(
        f'{where}: field {key!r} should be {kind.__name__}, '
        f'got {type(row[key]).__name__} {row[key]!r:.80}'
    )
  return row[key]


def _nli(row: Mapping[str, Any], where: str) -> tuple[str, str]:
  label = _field(row, 'label', int, where)
  if label not in (0, 1, 2):
    raise DataError(
        f"{where}: field 'label' must be 0, 1 or 2 ({', '.join(NLI_LABELS)}); got {label}"
    )
  text = (
      _field(row, 'premise', str, where) + tasks.SEPARATOR + _field(row, 'hypothesis', str, where)
  )
  return text, NLI_LABELS[label]


def _cqa(row: Mapping[str, Any], where: str) -> tuple[str, str]:
  choices = _field(row, 'choices', list, where)
  if len(choices) != 5:
    raise DataError(f"{where}: field 'choices' must hold 5 answers; got {len(choices)}")
  options = '\n'.join(
      f'({letter}) {choice}' for letter, choice in zip('abcde', choices, strict=True)
  )
  return (
      f'{_field(row, "question", str, where)}\nAnswer Choices:\n{options}',
      _field(row, 'answer', str, where),
  )


def _svamp(row: Mapping[str, Any], where: str) -> tuple[str, str]:
  return _field(row, 'input', str, where), _field(row, 'label', str, where)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """How one released dataset is read, parsed and scored."""

  name: str
  chunk_size: int
  parse: Callable[[str], teacher.TeacherOutput]
  example: Callable[[Mapping[str, Any], str], tuple[str, str]]  # (input, gold label)
  has_validation: bool
  label_metric: Callable[[Sequence[str], Sequence[str]], dict[str, float]]


BENCHMARKS: Mapping[str, Benchmark] = {
    'esnli': Benchmark('esnli', 5500, teacher.parse_esnli, _nli, True, metrics.accuracy),
    'anli1': Benchmark('anli1', 5000, teacher.parse_anli, _nli, True, metrics.accuracy),
    'cqa': Benchmark('cqa', 1000, teacher.parse_cqa, _cqa, False, metrics.accuracy),
    'svamp': Benchmark('svamp', 500, teacher.parse_svamp, _svamp, False, metrics.equation_accuracy),
}


def resolve_root(root: Optional[str]) -> str:
  """`root`, else $DSBS_DATA_ROOT; a clear error when neither is set."""
  root = root or os.environ.get(DATA_ROOT_ENV)
  if not root:
    raise ConfigError(
        f'No data root: set the gin macro DATA_ROOT or the environment variable '
        f'{DATA_ROOT_ENV} to the directory holding <name>/<name>_train.json.'
    )
  return root


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line number, row) of each JSON-lines row; blank lines are skipped but counted, and a
  bad line raises naming the file and line."""
  rows = []
  for number, line in enumerate(storage.read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{number}: not valid JSON ({e.msg})') from None
    if not isinstance(row, dict):
      raise DataError(f'{path}:{number}: expected a JSON object, got {type(row).__name__}')
    rows.append((number, row))
  return rows


def read_teacher_outputs(directory: str, file_split: str, chunk_size: int) -> list[str]:
  """`<split>_CoT_0.json`, `_1`, ... concatenated; every chunk but the last is full."""
  outputs: list[str] = []
  paths: list[str] = []
  while storage.exists(path := os.path.join(directory, f'{file_split}_CoT_{len(paths)}.json')):
    paths.append(path)
  if not paths:
    raise DataError(
        f'{os.path.join(directory, file_split + "_CoT_0.json")}: file not found '
        f'(the teacher outputs for this split)'
    )
  for i, path in enumerate(paths):
    try:
      chunk = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from None
    if not isinstance(chunk, list) or not all(isinstance(o, str) for o in chunk):
      raise DataError(f'{path}: expected a JSON list of strings (raw teacher completions)')
    if i < len(paths) - 1 and len(chunk) != chunk_size:
      raise DataError(
          f'{path}: holds {len(chunk)} outputs, but every chunk before the last '
          f'must hold {chunk_size}; later chunks would misalign with the rows'
      )
    outputs.extend(chunk)
  return outputs


def load_split(
    benchmark: Benchmark, root: str, split: str
) -> tuple[list[dict[str, str]], teacher.ParseReport]:
  """One released split as rows, with the report of parsing its teacher outputs."""
  file_split = FILE_SPLITS[split]
  directory = os.path.join(root, benchmark.name)
  path = os.path.join(directory, f'{benchmark.name}_{file_split}.json')
  raw = read_jsonl(path)
  llm = os.path.join(directory, 'llm')
  if split != 'train' and not storage.exists(os.path.join(llm, f'{file_split}_CoT_0.json')):
    # Evaluation splits are scored against gold, so a teacher run that answered
    # only the training split (dsbs-teacher) leaves them without outputs.
    rows = [
        _row(benchmark, row, f'{path}:{n}', teacher.TeacherOutput('', '', False)) for n, row in raw
    ]
    return rows, teacher.report(f'{benchmark.name}/{file_split}', [])
  outputs = read_teacher_outputs(llm, file_split, benchmark.chunk_size)
  if len(outputs) != len(raw):
    raise DataError(
        f'{path}: {len(raw)} rows but {len(outputs)} teacher outputs in '
        f'{directory}/llm/{file_split}_CoT_*.json; they must align one to one'
    )
  parsed = [benchmark.parse(o) for o in outputs]
  rows = [
      _row(benchmark, row, f'{path}:{number}', out)
      for (number, row), out in zip(raw, parsed, strict=True)
  ]
  return rows, teacher.report(f'{benchmark.name}/{file_split}', parsed)


def _row(
    benchmark: Benchmark, row: Mapping[str, Any], where: str, out: teacher.TeacherOutput
) -> dict[str, str]:
  text, gold = benchmark.example(row, where)
  return {'input': text, 'label_gt': gold, 'label_llm': out.label, 'rationale': out.rationale}


@functools.lru_cache(maxsize=32)
def _released(name: str, root: str, split: str) -> list[dict[str, str]]:
  rows, report = load_split(BENCHMARKS[name], root, split)
  log.info(report.summary())
  return rows


def split_rows(
    name: str, split: str, *, root: Optional[str] = None, train_fraction: float = 1.0, seed: int = 0
) -> list[dict[str, str]]:
  """The rows of a split as the paper uses them (subsampled train, held-out validation)."""
  benchmark = BENCHMARKS[name]
  root = resolve_root(root)
  selected = splits.select(
      functools.partial(_released, name, root),
      split,
      has_validation=benchmark.has_validation,
      train_fraction=train_fraction,
      seed=seed,
  )
  return selected if split == 'train' else splits.gold_targets(selected)


def register(
    name: str,
    *,
    root: Optional[str] = None,
    train_fraction: float = 1.0,
    seed: int = 0,
    vocabulary: Optional[seqio.Vocabulary] = None,
) -> tasks.StepByStepFamily:
  """Registers `name`'s family (see `tasks`) for gold and teacher labels.

  Gin calls this (gin/tasks/<name>.gin) to pick the root, the train fraction
  and its seed, and the vocabulary; registering again replaces the tasks.
  """
  if name not in BENCHMARKS:
    raise ConfigError(f'Unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}')
  splits.check_fraction(train_fraction)
  load = functools.partial(split_rows, name, root=root, train_fraction=train_fraction, seed=seed)
  return tasks.register_step_by_step(
      name,
      tasks.rows_source(load, tuple(FILE_SPLITS)),
      vocabulary,
      label_fields={'gt': 'label_gt', 'llm': 'label_llm'},
      label_metric_fns=[BENCHMARKS[name].label_metric],
      rationale_metric_fns=[metrics.rouge],
  )


def teacher_accuracy(name: str, root: Optional[str] = None, split: str = 'test') -> float:
  """The teacher's label metric on a released split (its parsed labels against gold):
  the horizontal line of the paper's model-size figures."""
  rows, _ = load_split(BENCHMARKS[name], resolve_root(root), split)
  score = BENCHMARKS[name].label_metric(
      [r['label_gt'] for r in rows], [r['label_llm'] for r in rows]
  )
  return next(iter(score.values()))


def main(argv: Sequence[str]) -> None:
  """Prints, per available split, the parse report and the teacher's label accuracy."""
  import argparse

  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('--data_root', default=None)
  parser.add_argument('--datasets', nargs='*', default=sorted(BENCHMARKS))
  args = parser.parse_args(argv)
  root = resolve_root(args.data_root)
  for name in args.datasets:
    benchmark = BENCHMARKS[name]
    for split, file_split in FILE_SPLITS.items():
      if not storage.exists(os.path.join(root, name, f'{name}_{file_split}.json')):
        continue
      examples, report = load_split(benchmark, root, split)
      score = benchmark.label_metric(
          [r['label_gt'] for r in examples], [r['label_llm'] for r in examples]
      )
      print(
          json.dumps(
              {
                  'split': report.source,
                  'rows': report.total,
                  'unparsed': report.unparsed,
                  'teacher_label': score,
              }
          )
      )


if __name__ == '__main__':
  import sys

  main(sys.argv[1:])
