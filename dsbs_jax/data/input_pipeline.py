"""The training input pipeline: a SeqIO task or mixture as this process's batches.

`DatasetConfig` (after T5X's `utils.DatasetConfig`) says what to read; `batches`
turns it into the infinite, deterministic stream the train loop consumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Optional

import jax
import numpy as np
import seqio

from dsbs_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What a run trains on.

  mixture_or_task_name: a registered SeqIO task or mixture (gin: MIXTURE_OR_TASK_NAME).
  task_feature_lengths: {'inputs': n, 'targets': m} (gin: TASK_FEATURE_LENGTHS).
  batch_size: rows per global batch, over all processes (gin: BATCH_SIZE).
  pack: pack several examples into each row (SeqIO's packing).
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


def model_input_shapes(
    config: DatasetConfig, converter: seqio.FeatureConverter
) -> dict[str, tuple[int, int]]:
  """[global batch, length] of the encoder and decoder token arrays of a training batch."""
  lengths = converter.get_model_feature_lengths(dict(config.task_feature_lengths))
  return {
      k: (config.batch_size, lengths[k]) for k in ('encoder_input_tokens', 'decoder_input_tokens')
  }


def batches(
    config: DatasetConfig, converter: seqio.FeatureConverter, skip: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of the infinite, deterministic training stream.

  The stream is `num_input_shards` SeqIO shards (`ShardInfo`), each giving
  `batch_size / num_input_shards` rows per batch; a process reads only its own
  consecutive shards. The global batch is then the same on any number of
  processes, so 1 process and 2 processes with 2 input shards train alike.
  The first `skip` batches (those consumed before a restart) are dropped.
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
      seqio.get_dataset(
          config.mixture_or_task_name,
          task_feature_lengths=dict(config.task_feature_lengths),
          dataset_split='train',
          shuffle=True,
          num_epochs=None,
          seed=config.seed,
          use_cached=False,
          feature_converter=converter,
          shard_info=seqio.ShardInfo(index, shards),
          batch_size=config.batch_size // shards,
      )
      .skip(skip)
      .as_numpy_iterator()
      for index in range(first, first + per_process)
  ]
  for parts in zip(*streams, strict=True):
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
