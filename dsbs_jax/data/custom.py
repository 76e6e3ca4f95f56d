"""Bring your own data: one call registers the step-by-step family for any table.

The rows come from JSON-lines or CSV files (one per split) or from a
HuggingFace `datasets` dataset (a hub name, a local loading script/directory,
or a `save_to_disk` directory). Column names are arguments, so the same call
(`gin/tasks/custom.gin`) fits any layout:

    custom.register('mydata', files={'train': 'train.jsonl', 'test': 'test.csv'},
                    input_field='question', gt_label_field='answer',
                    llm_label_field='teacher_answer', rationale_field='teacher_rationale')

Splits follow `benchmarks`: a missing validation split is 10% of train held
out with a fixed seed; `train_fraction` subsamples train; validation and test
targets are gold labels whenever a gold column exists.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import seqio

from dsbs_jax import storage
from dsbs_jax.data import benchmarks, metrics, splits, tasks
from dsbs_jax.errors import ConfigError, DataError

METRICS = {'accuracy': metrics.accuracy, 'equation_accuracy': metrics.equation_accuracy}
_FILE_TYPES = ('.jsonl', '.json', '.csv')
SPLITS = ('train', 'validation', 'test')
_HF_SPLIT_NAMES = {
    'train': ('train',),
    'validation': ('validation', 'valid', 'dev'),
    'test': ('test',),
}


def read_csv(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line number, row) of each CSV record; a record spanning lines has its last line's."""
  reader = csv.DictReader(io.StringIO(storage.read_text(path), newline=''))
  rows = []
  try:
    for row in reader:
      rows.append((reader.line_num, row))
  except csv.Error as e:
    raise DataError(f'{path}:{reader.line_num}: not valid CSV ({e})') from None
  return rows


def read_file(path: str) -> list[tuple[str, dict[str, Any]]]:
  """(`file:line` location, row) pairs from a .jsonl/.json or .csv file."""
  rows = read_csv(path) if path.endswith('.csv') else benchmarks.read_jsonl(path)
  return [(f'{path}:{line}', row) for line, row in rows]


@functools.lru_cache(maxsize=8)
def _hf_dataset(path: str, config: Optional[str]) -> Any:
  import datasets

  if storage.exists(os.path.join(path, 'dataset_dict.json')):
    return datasets.load_from_disk(path)
  return datasets.load_dataset(path, config)


def _read_hf(path: str, config: Optional[str], split: str) -> list[tuple[str, dict[str, Any]]]:
  dataset = _hf_dataset(path, config)
  for name in _HF_SPLIT_NAMES[split]:
    if name in dataset:
      return [(f'{path}[{name}][{i}]', row) for i, row in enumerate(dataset[name])]
  raise DataError(f'{path}: no {split!r} split (has {sorted(dataset)})')


@functools.lru_cache(maxsize=32)
def _released(name: str, source: tuple, split: str, fields: tuple) -> list[dict[str, str]]:
  kind, where = source
  if kind == 'hf':
    hf_path, hf_config = where
    raw = _read_hf(hf_path, hf_config, split)
  else:
    raw = read_file(dict(where)[split])
  if not raw:
    raise DataError(f'{name}: the {split} split is empty')
  gold = dict(fields).get('label_gt')
  if split != 'train' and gold is not None:
    raw = [(where, _gold_defaults(row, fields, gold)) for where, row in raw]
  return examples(raw, fields)


def _gold_defaults(
    row: Mapping[str, Any], fields: Sequence[tuple[str, str]], gold: str
) -> dict[str, Any]:
  """An evaluation row (scored against gold) may lack the teacher's fields, as
  dsbs-teacher writes splits it did not query: blank rationale, gold label."""
  columns = dict(fields)
  defaults: dict[str, Any] = {columns['rationale']: ''}
  if 'label_llm' in columns:
    defaults[columns['label_llm']] = row.get(gold)
  return {**defaults, **row}


def examples(
    raw: Sequence[tuple[str, Mapping[str, Any]]], fields: Sequence[tuple[str, str]]
) -> list[dict[str, str]]:
  """Each (location, row) as {target: row[column]} for the (target, column) `fields`;
  every field must be a string, non-empty but for the rationale, or the row's
  location is named. No row is dropped."""
  out = []
  for location, row in raw:
    example = {}
    for target, column in fields:
      value = row.get(column)
      if not isinstance(value, str) or (target != 'rationale' and not value.strip()):
        problem = 'missing' if value is None else f'not a non-empty string ({value!r:.60})'
        raise DataError(f'{location}: field {column!r} ({target}) is {problem}')
      example[target] = value
    out.append(example)
  return out


def register(
    name: str,
    *,
    files: Optional[Mapping[str, str]] = None,
    hf_dataset: Optional[str] = None,
    hf_config: Optional[str] = None,
    input_field: str = 'input',
    gt_label_field: Optional[str] = 'label',
    llm_label_field: Optional[str] = None,
    rationale_field: str = 'rationale',
    metric: str = 'accuracy',
    train_fraction: float = 1.0,
    seed: int = 0,
    vocabulary: Optional[seqio.Vocabulary] = None,
) -> tasks.StepByStepFamily:
  """Registers `name`'s family from files (`{'train': path, ...}`) or an HF dataset."""
  if (files is None) == (hf_dataset is None):
    raise ConfigError(f'{name}: give exactly one of files= and hf_dataset=')
  if files is not None:
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
      raise ConfigError(
          f'{name}: files= has unknown split {", ".join(map(repr, unknown))}; '
          f'the splits are {", ".join(map(repr, SPLITS))}'
      )
    if not {'train', 'test'} <= set(files):
      raise ConfigError(f'{name}: files= needs at least "train" and "test"; got {sorted(files)}')
  for path in (files or {}).values():
    if not path.endswith(_FILE_TYPES):
      raise ConfigError(f'{path}: unsupported file type; use .jsonl, .json (JSON lines) or .csv')
  if metric not in METRICS:
    raise ConfigError(f'{name}: unknown metric {metric!r}; choose from {sorted(METRICS)}')
  label_fields = {
      src: field for src, field in (('gt', gt_label_field), ('llm', llm_label_field)) if field
  }
  if not label_fields:
    raise ConfigError(f'{name}: set gt_label_field and/or llm_label_field')
  splits.check_fraction(train_fraction)
  fields = (
      ('input', input_field),
      ('rationale', rationale_field),
      *((f'label_{src}', field) for src, field in label_fields.items()),
  )
  source = (
      ('hf', (hf_dataset, hf_config))
      if hf_dataset is not None
      else ('files', tuple(sorted((files or {}).items())))
  )

  def load(split: str) -> list[dict[str, str]]:
    selected = splits.select(
        functools.partial(_released, name, source, fields=fields),
        split,
        has_validation=_has_split(source, 'validation'),
        train_fraction=train_fraction,
        seed=seed,
    )
    return selected if split == 'train' else splits.gold_targets(selected)

  return tasks.register_step_by_step(
      name,
      tasks.rows_source(load, SPLITS),
      vocabulary,
      label_fields={src: f'label_{src}' for src in label_fields},
      label_metric_fns=[METRICS[metric]],
      rationale_metric_fns=[metrics.rouge],
  )


def _has_split(source: tuple, split: str) -> bool:
  kind, where = source
  if kind == 'files':
    return split in dict(where)
  return any(name in _hf_dataset(*where) for name in _HF_SPLIT_NAMES[split])
