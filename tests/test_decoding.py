"""Cached greedy decoding equals greedy decoding that recomputes the whole prefix; the
Evaluator's length-sorted decoding equals decoding each example alone."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import linen as nn

from dsbs_jax import decoding, evaluation, models, network, partitioning
from dsbs_jax.data import demo

CONFIG = network.T5Config(
    vocab_size=50,
    emb_dim=32,
    num_heads=2,
    num_encoder_layers=2,
    num_decoder_layers=2,
    head_dim=16,
    mlp_dim=64,
    dropout_rate=0.0,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)


def _naive_greedy(module, params, enc, length, eos):
  """Re-runs the full teacher-forced decoder on the growing prefix at every step."""
  out = np.zeros((enc.shape[0], length), np.int32)
  finished = np.zeros(enc.shape[0], bool)
  for t in range(length):
    dec_in = np.concatenate([np.zeros((enc.shape[0], 1), np.int32), out[:, :-1]], 1)
    logits = module.apply(
        {'params': params}, enc, dec_in, np.ones_like(dec_in), enable_dropout=False
    )
    nxt = np.where(finished, 0, np.asarray(jnp.argmax(logits[:, t], -1)))
    out[:, t] = nxt
    finished |= nxt == eos
    if finished.all():
      break
  return out


def test_cached_greedy_matches_full_recompute():
  vocab = seqio.PassThroughVocabulary(size=50, eos_id=1)
  model = models.StepByStepModel(network.Transformer(CONFIG), vocab, vocab)
  variables = model.get_initial_variables(
      jax.random.PRNGKey(3), {'encoder_input_tokens': (1, 8), 'decoder_input_tokens': (1, 8)}
  )
  params = nn.meta.unbox(variables)['params']
  rng = np.random.RandomState(0)
  enc = rng.randint(2, 50, size=(4, 12)).astype(np.int32)
  enc[1, 7:] = 0
  length = 10
  batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': np.zeros((4, length), np.int32)}
  cached = np.asarray(jax.jit(model.predict_batch)(params, batch))
  expected = _naive_greedy(model.module, params, enc, length, eos=1)
  np.testing.assert_array_equal(cached, expected)
  assert cached.shape == (4, length)


def test_trimmed_inputs_decode_the_same():
  """Dropping all-padding encoder columns (to a multiple of 8) changes no prediction."""
  vocab = seqio.PassThroughVocabulary(size=50, eos_id=1)
  model = models.StepByStepModel(network.Transformer(CONFIG), vocab, vocab)
  params = nn.meta.unbox(
      model.get_initial_variables(
          jax.random.PRNGKey(4), {'encoder_input_tokens': (1, 8), 'decoder_input_tokens': (1, 8)}
      )
  )['params']
  enc = np.zeros((3, 40), np.int32)
  enc[:, :11] = np.random.RandomState(1).randint(2, 50, size=(3, 11))
  enc[2, 5:] = 0
  batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': np.zeros((3, 6), np.int32)}
  trimmed = decoding.trim_inputs(batch, multiple=8)
  assert trimmed['encoder_input_tokens'].shape == (3, 16)
  assert trimmed['decoder_input_tokens'].shape == (3, 6)
  predict = jax.jit(model.predict_batch)
  np.testing.assert_array_equal(predict(params, trimmed), predict(params, batch))
  assert decoding.trim_inputs(batch, multiple=64)['encoder_input_tokens'].shape == (3, 40)
  empty = dict(batch, encoder_input_tokens=np.zeros_like(enc))
  assert decoding.trim_inputs(empty, multiple=8)['encoder_input_tokens'].shape == (3, 8)


def test_length_sorted_batches_put_the_longest_inputs_first_and_keep_ties_in_order():
  tokens = np.zeros((7, 10), np.int32)
  for row, length in enumerate([3, 9, 0, 3, 10, 5, 9]):
    tokens[row, :length] = 7
  tokens[0, 1] = 0  # an inner 0 does not shorten a row: its length is one past its last token
  lengths = decoding.input_lengths(tokens)
  np.testing.assert_array_equal(lengths, [3, 9, 0, 3, 10, 5, 9])
  batches = decoding.length_sorted_batches(lengths, batch_size=3)
  assert [b.tolist() for b in batches] == [[4, 1, 6], [5, 0, 3], [2]]


def test_the_evaluator_decodes_by_length_and_returns_the_splits_order(tmp_path):
  """Its predictions equal each example decoded alone at full width, in the split's order."""
  demo.register()
  task = seqio.get_mixture_or_task('demo_gt_label')
  vocab = task.output_features['targets'].vocabulary
  config = dataclasses.replace(CONFIG, vocab_size=vocab.vocab_size)
  model = models.StepByStepModel(network.Transformer(config), vocab, vocab)
  shapes = {'encoder_input_tokens': (1, 8), 'decoder_input_tokens': (1, 8)}
  params = nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(2), shapes))['params']
  partitioner = partitioning.Partitioner()
  n = 21  # not a multiple of the batch: the last batch is padded
  evaluator = evaluation.Evaluator(
      ['demo_gt_label'],
      'validation',
      model,
      partitioner,
      8,
      partitioner.replicated(),
      os.fspath(tmp_path),
      num_examples=n,
  )
  evaluator.evaluate(params, step=5)
  logged = [json.loads(line) for line in (tmp_path / 'demo_gt_label-000005.jsonl').open()]

  examples = list(task.get_dataset(None, split='validation', shuffle=False).take(n))
  inputs = [e['inputs'].numpy() for e in examples]
  length = max(len(e['targets']) for e in examples)
  assert len({len(x) for x in inputs}) > 3  # lengths differ, so sorting reorders them
  predict = jax.jit(functools.partial(model.predict_batch, max_decode_length=length))
  width = max(len(x) for x in inputs)
  expected = []
  for x in inputs:
    enc = np.zeros((1, width), np.int32)
    enc[0, : len(x)] = x
    dec = np.zeros((1, length), np.int32)
    tokens = np.asarray(predict(params, {'encoder_input_tokens': enc, 'decoder_input_tokens': dec}))
    expected.append(vocab.decode(tokens[0].tolist()))
  assert [r['input']['inputs_pretokenized'] for r in logged] == [
      e['inputs_pretokenized'].numpy().decode() for e in examples
  ]
  assert [r['prediction'] for r in logged] == expected
  assert len(set(expected)) > 1
