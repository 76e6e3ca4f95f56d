"""A SeqIO feature converter that keeps each target token's task through packing.

`seqio.EncDecFeatureConverter` packs label and rationale examples into the same
rows but forgets which task each token came from. The step-by-step objective
averages each task's loss over its own tokens, so this converter adds
`decoder_task_ids` (0 = padding, 1 = label, 2 = rationale), built from the
per-example `task_id` feature and packed alongside `targets`. Examples without
a `task_id` (e.g. a user's plain SeqIO task) count as label examples.

When it packs, it packs first-fit. SeqIO's packer takes windows of examples
(as many as the longest feature length) and fills one row at a time: an
example that does not fit closes the row for good (next-fit). The converter
first reorders each window as first-fit would place it, each row's examples
together and in their order; SeqIO's packer then closes a row exactly where
first-fit's next row starts, since that example did not fit the earlier row
with less in it. Rows of 8 input and 8 target tokens, example sizes in order:

    sizes        (5, 5)  (4, 4)  (3, 3)  (4, 4)
    next-fit     [5] [4 3] [4]      3 rows
    first-fit    [5 3] [4 4]        2 rows: the order 0, 2, 1, 3, which next-fit packs alike

The training pipeline packs each step alone, in one window when the step has
no more sequences than that. On the paper's SVAMP and CQA train splits at
512/384 tokens, steps of 64 examples (128 sequences) took 47.4 and 46.4 rows
instead of next-fit's 52.9 and 50.6.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import ClassVar

import seqio
import tensorflow as tf
from tensorflow.python.autograph.core import ag_ctx

from dsbs_jax import losses

TASK_ID = 'task_id'
_TOKEN_TASK_IDS = 'targets_task_ids'


class StepByStepFeatureConverter(seqio.EncDecFeatureConverter):
  """EncDecFeatureConverter plus the per-token `decoder_task_ids` feature."""

  MODEL_FEATURES: ClassVar[dict[str, seqio.FeatureConverter.FeatureSpec]] = {
      **seqio.EncDecFeatureConverter.MODEL_FEATURES,
      'decoder_task_ids': seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
  }

  def __call__(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    # seqio.Evaluator measures every output feature, `task_id` included; its
    # length is not a packing length, so it is dropped before validation.
    lengths = {k: v for k, v in task_feature_lengths.items() if k != TASK_ID}
    # Its maps use TensorFlow ops alone, so they are built without AutoGraph (as
    # `tasks.StepByStepTask`'s are), all but SeqIO's packing map (`_pack_or_pad`).
    return tf.autograph.experimental.do_not_convert(super().__call__)(ds, lengths)

  def _convert_features(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    def add_token_task_ids(ex):
      ex = dict(ex)
      task = ex.pop(TASK_ID)[0] if TASK_ID in ex else tf.constant(losses.LABEL_TASK, tf.int32)
      ex[_TOKEN_TASK_IDS] = tf.fill(tf.shape(ex['targets']), tf.cast(task, tf.int32))
      return ex

    ds = ds.map(add_token_task_ids, num_parallel_calls=tf.data.AUTOTUNE)
    lengths = {**task_feature_lengths, _TOKEN_TASK_IDS: task_feature_lengths['targets']}
    if self.pack and not self._use_custom_packing_ops:  # those pack their own way
      ds = _first_fit_ordered(ds, lengths)
    ds = self._pack_or_pad(ds, lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def _pack_or_pad(self, ds: tf.data.Dataset, packed_lengths: Mapping[str, int]) -> tf.data.Dataset:
    """SeqIO's; packing with TensorFlow's default AutoGraph setting (convert, whatever
    the caller's), as SeqIO's packing map loops over tensors in Python. TensorFlow's
    public API can only turn AutoGraph off, hence its context class."""
    default = ag_ctx.ControlStatusCtx(status=ag_ctx.Status.UNSPECIFIED)
    with default if self.pack else contextlib.nullcontext():
      return super()._pack_or_pad(ds, packed_lengths)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    converted = dict(super()._convert_example(features))
    converted['decoder_task_ids'] = features[_TOKEN_TASK_IDS]
    return converted

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths['decoder_task_ids'] = task_feature_lengths['targets']
    return lengths


def first_fit_order(sizes: tf.Tensor, capacity: tf.Tensor) -> tf.Tensor:
  """The order that lists first-fit's rows one after another.

  sizes: [n, f] int32, each example's length in each packed feature.
  capacity: [f] int32, a row's length per feature; every size fits in it.
  Returns [n] indices: the examples of first-fit's first row, in their order,
  then its second row's, and so on. First-fit puts each example into the first
  row with room for it in every feature, opening a row when none has.
  """
  n = tf.shape(sizes)[0]

  def place(i, used, rows):
    fits = tf.reduce_all(used + sizes[i] <= capacity, axis=1)
    row = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    return i + 1, tf.tensor_scatter_nd_add(used, [[row]], [sizes[i]]), rows.write(i, row)

  rows = tf.TensorArray(tf.int32, size=n, element_shape=[])
  _, _, rows = tf.while_loop(
      lambda i, *_: i < n, place, (tf.constant(0), tf.zeros_like(sizes), rows)
  )
  return tf.argsort(rows.stack(), stable=True)


def _first_fit_ordered(ds: tf.data.Dataset, lengths: Mapping[str, int]) -> tf.data.Dataset:
  """The packed features of `ds`, cut to `lengths`, reordered window by window so
  that SeqIO's next-fit packer (same windows) makes first-fit's rows."""
  window = max(lengths.values())  # SeqIO's packing window (`utils.trim_and_pack_dataset`)
  capacity = tf.constant([lengths[k] for k in lengths], tf.int32)

  def cut(ex):
    ex = {k: ex[k][:n] for k, n in lengths.items()}
    return {**ex, **{f'{k}/size': tf.size(v) for k, v in ex.items()}}

  def reorder(batch):
    order = first_fit_order(tf.stack([batch[f'{k}/size'] for k in lengths], axis=1), capacity)
    return {k: tf.gather(v, order) for k, v in batch.items()}

  def uncut(ex):
    return {k: ex[k][: ex[f'{k}/size']] for k in lengths}

  ds = ds.map(cut, num_parallel_calls=tf.data.AUTOTUNE).padded_batch(window).map(reorder)
  return ds.unbatch().map(uncut, num_parallel_calls=tf.data.AUTOTUNE)
