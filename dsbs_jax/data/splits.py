"""Deterministic train subsampling and validation hold-out, as the authors do them.

The authors use HuggingFace `Dataset.train_test_split`: first to subsample the
training set (`test_size=1 - fraction, seed=run`), then, for datasets without
a validation split, to hold out 10% of the (subsampled) training set as
validation (`seed=0`). `train_test_split_indices` reproduces those index sets
exactly, so a run here sees the very examples a reference run saw. The test
split is never touched, and never used for model selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from dsbs_jax.errors import ConfigError

T = TypeVar('T')
VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 0


def train_test_split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) row indices, identical to `datasets.Dataset.train_test_split`."""
  n_test = math.ceil(test_size * n)
  n_train = n - n_test
  if n_test == 0 or n_train == 0:
    raise ConfigError(f'splitting {n} rows with test_size={test_size} leaves an empty side')
  permutation = np.random.default_rng(seed).permutation(n)
  return permutation[n_test:], permutation[:n_test]


def _take(rows: Sequence[T], indices: np.ndarray) -> list[T]:
  return [rows[i] for i in indices]


def check_fraction(fraction: float) -> None:
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f'TRAIN_FRACTION must be in (0, 1]; got {fraction}')


def subsample_train(rows: Sequence[T], fraction: float, seed: int) -> list[T]:
  """The first `fraction` of a seeded permutation (all rows, in order, for 1.0)."""
  check_fraction(fraction)
  if fraction == 1.0:
    return list(rows)
  train, _ = train_test_split_indices(len(rows), 1.0 - fraction, seed)
  return _take(rows, train)


def hold_out_validation(rows: Sequence[T]) -> tuple[list[T], list[T]]:
  """(train, validation): 10% of the training rows held out with a fixed seed."""
  train, valid = train_test_split_indices(len(rows), VALIDATION_FRACTION, VALIDATION_SEED)
  return _take(rows, train), _take(rows, valid)


def select(
    load: Callable[[str], Sequence[T]],
    split: str,
    *,
    has_validation: bool,
    train_fraction: float,
    seed: int,
) -> list[T]:
  """The rows of `split` as the paper uses them, from `load(split)` of the released splits.

  Train is subsampled; without a released validation split, validation is
  held out of the subsampled train; test is returned untouched.
  """
  if split == 'test':
    return list(load('test'))
  if has_validation:
    if split == 'train':
      return subsample_train(load('train'), train_fraction, seed)
    return list(load('validation'))
  train, valid = hold_out_validation(subsample_train(load('train'), train_fraction, seed))
  return train if split == 'train' else valid


def gold_targets(rows: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
  """Evaluation rows: the teacher-label target becomes the gold label where one exists.

  Training targets may come from the teacher; models are always scored on gold.
  """
  return [{**row, 'label_llm': row['label_gt']} if 'label_gt' in row else dict(row) for row in rows]
