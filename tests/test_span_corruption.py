"""Span corruption: inputs and targets together restore the text, about 15% of it in
spans of about 3, sentinels from the vocabulary's last id down."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from dsbs_jax.data import demo, span_corruption, tasks
from dsbs_jax.errors import ConfigError

VOCABULARY = seqio.ByteVocabulary(extra_ids=100)


def restore(inputs: list[int], targets: list[int], size: int) -> list[int]:
  """An independent inverse: each sentinel in inputs replaced by what follows it in targets."""
  spans, current = {}, None
  for token in targets:
    if token >= size - 100:
      current = spans.setdefault(token, [])
    else:
      current.append(token)
  out = []
  for token in inputs:
    out += spans[token] if token >= size - 100 else [token]
  return out


def test_inputs_and_targets_restore_the_text():
  family = demo.register(VOCABULARY, name='demo_sc')
  task = seqio.get_mixture_or_task(tasks.task_name(family, 'span_corruption'))
  ds = task.get_dataset(None, split='validation', shuffle=False, seed=3)
  plain = seqio.get_mixture_or_task(family.label_tasks['gt']).get_dataset(
      None, split='validation', shuffle=False
  )
  noise, spans, n = 0, 0, 0
  for ex, original in zip(
      ds.take(50).as_numpy_iterator(), plain.take(50).as_numpy_iterator(), strict=True
  ):
    inputs, targets = list(ex['inputs'][:-1]), list(ex['targets'][:-1])  # each ends in EOS
    text = list(original['inputs'][len(tasks.LABEL_PREFIX) : -1])
    assert restore(inputs, targets, VOCABULARY.vocab_size) == text
    sentinels = [t for t in inputs if t >= VOCABULARY.vocab_size - 100]
    assert sentinels == list(
        range(VOCABULARY.vocab_size - 1, VOCABULARY.vocab_size - 1 - len(sentinels), -1)
    )
    noise += len(targets) - len(sentinels)
    spans += len(sentinels)
    n += len(text)
  assert 0.13 < noise / n < 0.17
  assert 2.5 < noise / spans < 3.5
  again = task.get_dataset(None, split='validation', shuffle=False, seed=3)
  assert all(
      np.array_equal(a['inputs'], b['inputs'])
      for a, b in zip(
          ds.take(5).as_numpy_iterator(), again.take(5).as_numpy_iterator(), strict=True
      )
  )


def test_a_short_text_keeps_one_token_and_drops_one():
  mask = span_corruption.noise_mask(tf.constant(2), tf.constant([[1, 2], [3, 4]]))
  assert mask.numpy().tolist() == [False, True]


def test_a_vocabulary_without_sentinels_is_refused():
  family = demo.register(seqio.ByteVocabulary(), name='demo_sc_bytes')
  task = seqio.get_mixture_or_task(tasks.task_name(family, 'span_corruption'))
  with pytest.raises(ConfigError, match='extra ids'):
    task.get_dataset(None, split='validation', shuffle=False)
