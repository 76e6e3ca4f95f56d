"""Span corruption, T5's self-supervised objective, over a task's own input texts.

What "pretrained" means for T5: about 15% of the tokens, in spans of 3 on
average, are dropped from the input, each span replaced by one sentinel id, and
the target lists the sentinels each followed by the tokens it replaced:

    tokens   The  cat  sat  on   the  mat  .
    inputs   The  <0>  on   the  <1>
    targets  <0>  cat  sat  <1>  mat  .

(the text starts with a kept span and ends with a noise span). It runs before
the inputs are trimmed, so a text of more than about 2,000 tokens would need more
sentinels than the vocabulary's 100: keep warm-up texts shorter.

A short warm-up on the training inputs alone (no labels, no rationales) gives a
student trained from scratch some of what T5's pretraining gives the paper's
students; it also suits a user's own data (`TASK_VARIANT = 'span_corruption'`).
Sentinels are the vocabulary's last ids, as in T5 (`<extra_id_0>` is the very
last), so the vocabulary needs extra ids: T5's SentencePiece model has 100; for
bytes set `seqio.ByteVocabulary.extra_ids`.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from dsbs_jax.errors import ConfigError

NOISE_DENSITY = 0.15
MEAN_SPAN_LENGTH = 3.0


def _segment_lengths(total: tf.Tensor, segments: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """`total` items cut at random into `segments` non-empty runs: their lengths."""
  cuts = tf.cast(tf.range(total - 1) < segments - 1, tf.int32)
  starts = tf.pad(seqio.utils.stateless_shuffle(cuts, seed), [[1, 0]])
  return tf.math.segment_sum(tf.ones_like(starts), tf.cumsum(starts))


def noise_mask(length: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
  """[length] bool: spans of noise alternating with spans of kept tokens, the text
  starting with a kept span, noise about NOISE_DENSITY of the tokens."""
  n = tf.maximum(length, 2)
  noise = tf.cast(tf.round(tf.cast(n, tf.float32) * NOISE_DENSITY), tf.int32)
  noise = tf.clip_by_value(noise, 1, n - 1)
  spans = tf.maximum(tf.cast(tf.round(tf.cast(noise, tf.float32) / MEAN_SPAN_LENGTH), tf.int32), 1)
  spans = tf.minimum(spans, n - noise)
  noise_lengths = _segment_lengths(noise, spans, seeds[0])
  kept_lengths = _segment_lengths(n - noise, spans, seeds[1])
  interleaved = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
  starts = tf.cumsum(interleaved)[:-1]
  span_index = tf.cumsum(tf.math.unsorted_segment_sum(tf.ones_like(starts), starts, n))
  return tf.equal(span_index % 2, 1)[:length]


def replace_spans(tokens: tf.Tensor, mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
  """`tokens` with each masked span replaced by one sentinel, numbered from the
  vocabulary's last id down."""
  previous = tf.pad(mask[:-1], [[1, 0]])
  first = mask & ~previous
  sentinels = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
  return tf.boolean_mask(tf.where(first, sentinels, tokens), ~(mask & previous))


def span_corruption(
    ds: tf.data.Dataset, output_features: dict[str, seqio.Feature]
) -> tf.data.Dataset:
  """Tokenized `inputs` (no EOS yet) -> `{inputs, targets}` of span corruption."""
  vocabulary = output_features['inputs'].vocabulary
  if not getattr(vocabulary, 'extra_ids', 0):
    raise ConfigError(
        "span corruption needs sentinel ids: a vocabulary with extra ids (T5's SentencePiece "
        'has 100; for bytes set seqio.ByteVocabulary.extra_ids = 100)'
    )
  size = vocabulary.vocab_size

  @seqio.map_over_dataset(num_seeds=2)
  def corrupt(ex, seeds):
    tokens = ex['inputs']
    mask = noise_mask(tf.size(tokens), seeds)
    return {
        **ex,
        'inputs': replace_spans(tokens, mask, size),
        'targets': replace_spans(tokens, ~mask, size),
    }

  return corrupt(ds)
