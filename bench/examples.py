"""The real examples both sides train and decode on, as token ids (SVAMP and CQA with
their PaLM rationales), and our packed batches of them. Needs seqio and TensorFlow;
`harness.prepared` saves what these build so a host without them can run the benches."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import seqio
import tensorflow as tf

from bench import harness
from dsbs_jax import losses
from dsbs_jax.data import benchmarks, input_pipeline, tasks
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter

VOCAB = seqio.ByteVocabulary()


def vocab_shape() -> dict[str, int]:
  """What our model reads of the vocabulary (see `harness.student`)."""
  return {'vocab_size': VOCAB.vocab_size, 'eos_id': VOCAB.eos_id}


def data_root() -> str:
  return os.environ.get(benchmarks.DATA_ROOT_ENV) or os.path.join(
      harness.REPO, '..', 'shared', 'datasets'
  )


def encode(text: str, limit: int) -> list[int]:
  """Token ids as `tasks.tokenize` makes them (`</s>` -> EOS), truncated, with EOS."""
  ids: list[int] = []
  for i, part in enumerate(text.split(tasks.SEPARATOR)):
    ids += ([VOCAB.eos_id] if i else []) + VOCAB.encode(part)
  return [*ids[: limit - 1], VOCAB.eos_id]


def examples(
    datasets: Sequence[str], split: str, lengths: dict[str, int], limit: int | None = None
) -> list[dict[str, list[int]]]:
  """Real rows as token ids: predict/explain inputs, label and rationale targets (with EOS),
  truncated to `lengths`, interleaved across datasets; at most `limit` of them."""
  per_dataset = []
  for name in datasets:
    rows = benchmarks.split_rows(name, split, root=data_root())[:limit]
    per_dataset.append(
        [
            {
                'predict': encode(tasks.LABEL_PREFIX + r['input'], lengths['inputs']),
                'explain': encode(tasks.RATIONALE_PREFIX + r['input'], lengths['inputs']),
                'label': encode(r['label_llm'], lengths['targets']),
                'rationale': encode(r['rationale'], lengths['targets']),
            }
            for r in rows
        ]
    )
  return [ex for group in zip(*per_dataset, strict=False) for ex in group][:limit]


def packed_batches(
    rows: Sequence[dict[str, list[int]]],
    lengths: dict[str, int],
    batch_size: int,
    rationale: bool = True,
    step_examples: int = 64,
) -> Iterator[tuple[dict, int]]:
  """Our input: the same examples' two tasks packed into fixed-shape rows.

  Every `step_examples` examples are packed among themselves, as the training
  pipeline packs a step of that batch size (`input_pipeline.packed_steps`),
  then the rows are cut into batches of `batch_size`. Yields (batch, examples in
  it), counting an example once per task half, /2 for step-by-step, so
  examples/s compares with the reference's batch.
  """

  def gen():
    for r in rows:
      yield {'inputs': r['predict'], 'targets': r['label'], 'task_id': [losses.LABEL_TASK]}
      if rationale:
        yield {
            'inputs': r['explain'],
            'targets': r['rationale'],
            'task_id': [losses.RATIONALE_TASK],
        }

  spec = {k: tf.TensorSpec([None], tf.int32) for k in ('inputs', 'targets', 'task_id')}
  ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
  per_step = step_examples * (2 if rationale else 1)
  ds = input_pipeline.packed_steps(ds, per_step, StepByStepFeatureConverter(pack=True), lengths)
  for batch in ds.unbatch().batch(batch_size, drop_remainder=True).as_numpy_iterator():
    segments = sum(len(set(row[row > 0].tolist())) for row in batch['encoder_segment_ids'])
    yield batch, segments / (2 if rationale else 1)
