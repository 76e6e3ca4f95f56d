"""The training input pipeline: a SeqIO task or mixture as this process's batches.

`DatasetConfig` (after T5X's `utils.DatasetConfig`) says what to read; `batches`
turns it into the infinite, deterministic stream the train loop consumes.

A batch holds `batch_size` *examples* (source rows), for every method. A paired
step-by-step task gives two sequences per example (its predict: and its
explain: sequence, `tasks.paired_examples`), any other task one; so a standard
run and a step-by-step run with the same batch size and seed see the same
label examples, step by step, as in the authors' trainer.

Each step's sequences are packed together (first-fit, within the step alone:
`feature_converters`, `packed_steps`) into as many rows as they need, rounded
up to a bucket of rows and padded with empty ones:

    step with 2 examples, paired (4 sequences), rows of 8 input tokens
    inputs   predict: a  explain: a | predict: b  explain: b | (empty row) ...
    targets  label a     rationale a | label b    rationale b |

Only a few row counts occur, so only a few shapes compile; the loss, a mean per
task over its tokens, does not depend on how the sequences were packed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import jax
import numpy as np
import seqio
import tensorflow as tf
from jax.experimental import multihost_utils

from dsbs_jax.data import tasks
from dsbs_jax.data.feature_converters import TASK_ID
from dsbs_jax.errors import ConfigError

# Rows per step are rounded up to a multiple of this many (times the data-parallel
# unit), so that a run compiles a handful of step shapes, not one per row count.
ROW_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What a run trains on.

  mixture_or_task_name: a registered SeqIO task or mixture (gin: MIXTURE_OR_TASK_NAME).
  task_feature_lengths: {'inputs': n, 'targets': m}, the length of a row (gin:
    TASK_FEATURE_LENGTHS); longer sequences are cut.
  batch_size: examples per global step, over all processes (gin: BATCH_SIZE).
  pack: pack each step's sequences into shared rows; else one row per sequence.
  seed: the shuffle's seed; the same seed gives the same stream.
  num_input_shards: SeqIO shards the stream is read as (default: one per process);
    the global batch does not depend on the number of processes reading them.
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  pack: bool = True
  seed: int = 0
  num_input_shards: Optional[int] = None

  def __post_init__(self):
    for key in ('inputs', 'targets'):
      length = self.task_feature_lengths.get(key)
      if length is None:
        raise ConfigError(
            f'TASK_FEATURE_LENGTHS must set {key!r}; got {dict(self.task_feature_lengths)}'
        )
      if not isinstance(length, int) or length < 1:
        raise ConfigError(f'TASK_FEATURE_LENGTHS[{key!r}] must be an integer >= 1; got {length!r}')
    if self.batch_size < 1:
      raise ConfigError(f'BATCH_SIZE must be >= 1; got {self.batch_size}')

  @property
  def sequences_per_step(self) -> int:
    """The most rows a step can need: one per sequence."""
    return self.batch_size * tasks.sequences_per_example(self.mixture_or_task_name)


def model_input_shapes(
    config: DatasetConfig, converter: seqio.FeatureConverter
) -> dict[str, tuple[int, int]]:
  """[largest rows per step, length] of the encoder and decoder token arrays."""
  lengths = converter.get_model_feature_lengths(dict(config.task_feature_lengths))
  return {
      k: (config.sequences_per_step, lengths[k])
      for k in ('encoder_input_tokens', 'decoder_input_tokens')
  }


def numpy_iterator(ds: tf.data.Dataset) -> Iterator[Any]:
  """`ds.as_numpy_iterator()`, without tf.data's autotuning thread.

  That thread sleeps up to a minute between optimisations, and an iterator's
  destructor waits for it to wake: the end of a demo-sized run stalled 0-51 s (seen
  in gdb: `~RootDataset::Iterator` waiting on `Model::OptimizeLoop`). Without it,
  parallel maps use every core and prefetches their default buffer; the
  pipeline still runs hundreds of times faster than the step (`bench/`).
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options).as_numpy_iterator()


def _without_padding(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """An example back from `padded_batch`: token ids are never 0 (the pad id)."""
  return {k: tf.boolean_mask(v, v != 0) for k, v in example.items()}


def _steps(
    config: DatasetConfig, converter: seqio.FeatureConverter, shard: seqio.ShardInfo
) -> tf.data.Dataset:
  """One shard's share of every step: its sequences, packed into up to that many rows."""
  per_step = config.sequences_per_step // shard.num_shards
  examples = seqio.get_mixture_or_task(config.mixture_or_task_name).get_dataset(
      dict(config.task_feature_lengths),
      split='train',
      shuffle=True,
      seed=config.seed,
      shard_info=shard,
      num_epochs=None,
  )
  examples = examples.map(
      tf.autograph.experimental.do_not_convert(
          lambda ex: {k: ex[k] for k in ('inputs', 'targets', TASK_ID) if k in ex}
      )
  )
  return packed_steps(examples, per_step, converter, dict(config.task_feature_lengths))


def packed_steps(
    sequences: tf.data.Dataset,
    per_step: int,
    converter: seqio.FeatureConverter,
    lengths: Mapping[str, int],
) -> tf.data.Dataset:
  """Each `per_step` consecutive sequences, converted and packed among themselves
  alone: one element per step, [its rows, length] per feature. First-fit over
  the whole step when it has no more sequences than the longest feature length
  (the converter's packing window); a larger step is packed window by window.
  The train bench packs its examples with this too, so that its rows are the
  pipeline's (before the row bucket)."""

  # `pack` is plain Python that builds a dataset: AutoGraph converting it, and all the
  # SeqIO code it calls, added about 2 s to every run's start and changed nothing.
  # (The converter turns AutoGraph on for SeqIO's packing map, which needs it.)
  @tf.autograph.experimental.do_not_convert
  def pack(step: Mapping[str, tf.Tensor]) -> tf.data.Dataset:
    step_sequences = tf.data.Dataset.from_tensor_slices(step).map(_without_padding)
    return converter(step_sequences, lengths).batch(per_step)

  return sequences.padded_batch(per_step).flat_map(pack)


def batches(
    config: DatasetConfig,
    converter: seqio.FeatureConverter,
    skip: int = 0,
    row_unit: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of the infinite, deterministic training stream, step by step.

  The stream is `num_input_shards` SeqIO shards (`ShardInfo`), each giving
  `batch_size / num_input_shards` examples per step; a process reads only its own
  consecutive shards. The global batch is then the same on any number of
  processes. Rows are padded to a multiple of `row_unit` (the rows that the data
  axis and the microbatches divide), bucketed, and agreed on by all processes.
  The first `skip` steps (those consumed before a restart) are dropped.
  """
  processes = jax.process_count()
  shards = config.num_input_shards or processes
  if shards % processes or config.batch_size % shards:
    raise ConfigError(
        f'num_input_shards={shards} must be a multiple of the {processes} '
        f'processes and divide BATCH_SIZE={config.batch_size}'
    )
  per_process = shards // processes
  first = jax.process_index() * per_process
  streams = [
      numpy_iterator(_steps(config, converter, seqio.ShardInfo(index, shards)).skip(skip))
      for index in range(first, first + per_process)
  ]
  local_unit = process_row_unit(row_unit, processes)
  bucket = local_unit * -(-ROW_BUCKET // (local_unit * processes))
  most = _round_up(config.sequences_per_step // processes, local_unit)
  for parts in zip(*streams, strict=True):
    step = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    rows = len(step['encoder_input_tokens'])
    if processes > 1:
      rows = int(np.max(multihost_utils.process_allgather(np.asarray(rows))))
    rows = min(_round_up(rows, bucket), most)
    yield {k: np.pad(v, [(0, rows - len(v)), (0, 0)]) for k, v in step.items()}


def process_row_unit(row_unit: int, processes: int) -> int:
  """The multiple of rows each process pads its part of a step to, so that the
  processes' rows together are a multiple of `row_unit`: the least such, as
  padding costs compute. row_unit // processes is not enough when the processes
  do not divide row_unit: 2 processes with a data axis of 1 and 3 microbatches
  would each give 64 rows, 128 together, which 3 microbatches do not divide."""
  return row_unit // math.gcd(row_unit, processes)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
