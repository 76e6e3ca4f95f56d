"""A SeqIO feature converter that keeps each target token's task through packing.

`seqio.EncDecFeatureConverter` packs label and rationale examples into the same
rows but forgets which task each token came from. The step-by-step objective
averages each task's loss over its own tokens, so this converter adds
`decoder_task_ids` (0 = padding, 1 = label, 2 = rationale), built from the
per-example `task_id` feature and packed alongside `targets`. Examples without
a `task_id` (e.g. a user's plain SeqIO task) count as label examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import seqio
import tensorflow as tf

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
    return super().__call__(ds, lengths)

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
    ds = self._pack_or_pad(ds, lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    converted = dict(super()._convert_example(features))
    converted['decoder_task_ids'] = features[_TOKEN_TASK_IDS]
    return converted

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths['decoder_task_ids'] = task_feature_lengths['targets']
    return lengths
