"""Cached greedy decoding equals greedy decoding that recomputes the whole prefix; the
Evaluator's length-sorted decoding equals decoding each example alone."""

import dataclasses
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from conftest import attention_logits_dtypes, initial_params
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
  greedy = jax.jit(
      lambda dec_in: jnp.argmax(
          module.apply(
              {'params': params}, enc, dec_in, jnp.ones_like(dec_in), enable_dropout=False
          ),
          -1,
      )
  )
  for t in range(length):
    dec_in = np.concatenate([np.zeros((enc.shape[0], 1), np.int32), out[:, :-1]], 1)
    nxt = np.where(finished, 0, np.asarray(greedy(dec_in))[:, t])
    out[:, t] = nxt
    finished |= nxt == eos
    if finished.all():
      break
  return out


def test_cached_greedy_matches_full_recompute():
  vocab = seqio.PassThroughVocabulary(size=50, eos_id=1)
  model = models.StepByStepModel(network.Transformer(CONFIG), vocab, vocab)
  params = initial_params(model, 3)
  rng = np.random.RandomState(0)
  enc = rng.randint(2, 50, size=(4, 12)).astype(np.int32)
  enc[1, 7:] = 0
  length = 10
  batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': np.zeros((4, length), np.int32)}
  cached = np.asarray(jax.jit(model.predict_batch)(params, batch))
  expected = _naive_greedy(model.module, params, enc, length, eos=1)
  np.testing.assert_array_equal(cached, expected)
  assert cached.shape == (4, length)


def test_greedy_decoding_runs_with_bfloat16_attention_logits():
  """`float32_attention_logits=False` reaches the cached decoding loop: its
  one-token attention computes bfloat16 logits, and it decodes."""
  vocab = seqio.PassThroughVocabulary(size=50, eos_id=1)
  config = dataclasses.replace(CONFIG, dtype='bfloat16', float32_attention_logits=False)
  model = models.StepByStepModel(network.Transformer(config), vocab, vocab)
  params = initial_params(model, 3)
  enc = np.random.RandomState(0).randint(2, 50, size=(4, 12)).astype(np.int32)
  batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': np.zeros((4, 6), np.int32)}
  predict = functools.partial(model.predict_batch, batch=batch)
  assert attention_logits_dtypes(predict, params, head_dim=config.head_dim) == {'bfloat16'}
  tokens = np.asarray(jax.jit(model.predict_batch)(params, batch))
  assert tokens.shape == (4, 6) and ((tokens >= 0) & (tokens < 50)).all()


def test_inputs_cut_to_a_width_decode_the_same():
  """Dropping all-padding encoder columns, or adding some, changes no prediction."""
  vocab = seqio.PassThroughVocabulary(size=50, eos_id=1)
  model = models.StepByStepModel(network.Transformer(CONFIG), vocab, vocab)
  params = initial_params(model, 4)
  enc = np.zeros((3, 40), np.int32)
  enc[:, :11] = np.random.RandomState(1).randint(2, 50, size=(3, 11))
  enc[2, 5:] = 0
  batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': np.zeros((3, 6), np.int32)}
  predict = jax.jit(model.predict_batch)
  expected = predict(params, batch)
  for width in (11, 16, 48):
    fitted = decoding.with_input_width(batch, width)
    assert fitted['encoder_input_tokens'].shape == (3, width)
    assert fitted['decoder_input_tokens'].shape == (3, 6)
    np.testing.assert_array_equal(predict(params, fitted), expected)
  with pytest.raises(ValueError, match='width 10 would cut an input of 11 tokens'):
    decoding.with_input_width(batch, 10)


def _fewest_padded_widths(needs: np.ndarray, max_widths: int) -> int:
  """The least total width by trying every choice of at most `max_widths` widths."""
  distinct = np.unique(needs)
  return min(
      int(np.sum(chosen[np.searchsorted(chosen, needs)]))
      for k in range(1, min(max_widths, len(distinct)) + 1)
      for narrower in itertools.combinations(distinct[:-1], k - 1)
      for chosen in [np.array([*narrower, distinct[-1]])]
  )


def test_batch_widths_pad_the_least_that_so_many_widths_allow():
  rng = np.random.default_rng(0)
  for _ in range(300):
    lengths = rng.integers(0, 300, rng.integers(1, 40))
    batches = decoding.length_sorted_batches(lengths, int(rng.integers(1, 6)))
    max_widths, alignment = int(rng.integers(1, 6)), int(rng.choice([1, 8, 64]))
    widths = decoding.batch_widths(lengths, batches, max_widths, alignment)
    longest = np.array([max(lengths[b].max(), 1) for b in batches])
    assert np.all(widths >= longest) and np.all(widths % alignment == 0)
    assert len(set(widths.tolist())) <= max_widths
    needs = -(-longest // alignment) * alignment
    assert widths.sum() == _fewest_padded_widths(needs, max_widths)
  # A batch of 130-token inputs is 136 wide, not 192 (a grid of multiples of 64).
  lengths = np.array([130] * 4 + [380] * 4 + [0])
  batches = decoding.length_sorted_batches(lengths, 4)
  assert decoding.batch_widths(lengths, batches, 8).tolist() == [384, 136, 8]
  assert decoding.batch_widths(lengths, batches, 1).tolist() == [384, 384, 384]
  with pytest.raises(ValueError, match='max_widths must be >= 1'):
    decoding.batch_widths(lengths, batches, 0)


def test_length_sorted_batches_put_the_longest_inputs_first_and_keep_ties_in_order():
  tokens = np.zeros((7, 10), np.int32)
  for row, length in enumerate([3, 9, 0, 3, 10, 5, 9]):
    tokens[row, :length] = 7
  tokens[0, 1] = 0  # an inner 0 does not shorten a row: its length is one past its last token
  lengths = decoding.input_lengths(tokens)
  np.testing.assert_array_equal(lengths, [3, 9, 0, 3, 10, 5, 9])
  batches = decoding.length_sorted_batches(lengths, batch_size=3)
  assert [b.tolist() for b in batches] == [[4, 1, 6], [5, 0, 3], [2]]


@pytest.mark.parametrize(
    'task,prefixes',
    [('demo_gt_standard', ['']), ('demo_gt_step_by_step', ['predict: ', 'explain: '])],
)
def test_the_loss_evaluators_quick_look_reads_the_splits_first_examples(task, prefixes):
  """`num_examples` counts examples (both sequences of a paired one), not packed
  rows: first-fit packing reorders them."""
  demo.register()
  vocab = seqio.get_mixture_or_task(task).output_features['targets'].vocabulary
  model = models.StepByStepModel(
      network.Transformer(dataclasses.replace(CONFIG, vocab_size=vocab.vocab_size)), vocab, vocab
  )
  lengths = {'inputs': 256, 'targets': 128}
  partitioner = partitioning.Partitioner()
  evaluator = evaluation.LossEvaluator(
      task, 'validation', lengths, model, partitioner, 8, partitioner.replicated(), 5
  )
  packed = [
      vocab.decode(row['encoder_input_tokens'][row['encoder_segment_ids'] == s].tolist())
      for row in evaluator._dataset.as_numpy_iterator()
      for s in set(row['encoder_segment_ids'].tolist()) - {0}
  ]
  plain = seqio.get_mixture_or_task('demo_gt_standard')
  first = plain.get_dataset(lengths, split='validation', shuffle=False).take(5)
  inputs = [vocab.decode(e['inputs'].tolist()) for e in first.as_numpy_iterator()]
  assert sorted(packed) == sorted(p + x for x in inputs for p in prefixes)


def test_the_evaluator_decodes_by_length_and_returns_the_splits_order(tmp_path):
  """Its predictions equal each example decoded alone at full width, in the split's order."""
  demo.register()
  task = seqio.get_mixture_or_task('demo_gt_label')
  vocab = task.output_features['targets'].vocabulary
  config = dataclasses.replace(CONFIG, vocab_size=vocab.vocab_size)
  model = models.StepByStepModel(network.Transformer(config), vocab, vocab)
  params = initial_params(model, 2)
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
  lengths = np.array([len(x) for x in inputs])
  widths = decoding.batch_widths(lengths, decoding.length_sorted_batches(lengths, 8), 8)
  assert len(set(widths.tolist())) > 1  # the batches decode at widths of their own
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
