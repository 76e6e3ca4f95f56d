"""The step-by-step objective: packed == unpacked == a two-pass reference; lambda = 0."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio
import tensorflow as tf

from conftest import initial_params, synthetic_batch, tiny_config, tiny_student
from dsbs_jax import losses, models, network
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter
from dsbs_jax.errors import ConfigError

CONFIG = network.T5Config(
    vocab_size=64,
    emb_dim=32,
    num_heads=2,
    num_encoder_layers=2,
    num_decoder_layers=2,
    head_dim=16,
    mlp_dim=64,
    dropout_rate=0.0,
)
LENGTHS = {'inputs': 24, 'targets': 16}


def _examples(rng):
  """Three label and three rationale examples of varied lengths (EOS = 1 appended)."""
  out = []
  for task, n in [(1, 3), (2, 3)]:
    for _ in range(n):
      x = [*rng.randint(3, 64, size=rng.randint(4, 10)).tolist(), 1]
      y = [*rng.randint(3, 64, size=rng.randint(2, 7 if task == 1 else 12)).tolist(), 1]
      out.append({'inputs': x, 'targets': y, 'task_id': [task]})
  return out


def _convert(examples, pack):
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature={
          'inputs': tf.TensorSpec([None], tf.int32),
          'targets': tf.TensorSpec([None], tf.int32),
          'task_id': tf.TensorSpec([1], tf.int32),
      },
  )
  rows = list(StepByStepFeatureConverter(pack=pack)(ds, LENGTHS).as_numpy_iterator())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _model(weights):
  vocab = seqio.PassThroughVocabulary(size=64)
  return models.StepByStepModel(network.Transformer(CONFIG), vocab, vocab, task_weights=weights)


def _loss_fn(model):
  """`model.loss_fn` without dropout, jitted: run op by op, the tests here compiled
  some 200 one-operation programs each (bench/README.md, the test suite)."""
  return jax.jit(lambda params, batch: model.loss_fn(params, batch, None))


@jax.jit
def _task_loss(params, enc, dec_in, tgt):
  """One task's padded pass: its target tokens' mean cross-entropy, as HF averages it."""
  logits = network.Transformer(CONFIG).apply(
      {'params': params}, enc, dec_in, tgt, enable_dropout=False
  )
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
  mask = tgt > 0
  return jnp.sum(ce * mask) / jnp.sum(mask)


def _two_pass_reference(params, examples, lam):
  """What the reference PyTorch code does: one padded forward pass per task, HF-style mean CE."""
  per_task = []
  for task in (1, 2):
    rows = [e for e in examples if e['task_id'][0] == task]
    enc = np.zeros((len(rows), LENGTHS['inputs']), np.int32)
    tgt = np.zeros((len(rows), LENGTHS['targets']), np.int32)
    for i, e in enumerate(rows):
      enc[i, : len(e['inputs'])] = e['inputs']
      tgt[i, : len(e['targets'])] = e['targets']
    dec_in = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], 1)
    per_task.append(float(_task_loss(params, enc, dec_in, tgt)))
  return per_task[0] + lam * per_task[1], per_task


@pytest.mark.parametrize('lam', [1.0, 0.3])
def test_packed_unpacked_and_two_pass_agree(lam):
  examples = _examples(np.random.RandomState(0))
  model = _model(losses.task_weights(lambda_=lam))
  params = initial_params(model, seed=1)
  packed, unpacked = _convert(examples, True), _convert(examples, False)
  assert packed['encoder_input_tokens'].shape[0] < len(examples), 'examples were not packed'
  # Task identity survives packing: every target token of a segment has its example's task.
  assert set(np.unique(packed['decoder_task_ids'])) == {0, 1, 2}
  assert np.array_equal(packed['decoder_task_ids'] > 0, packed['decoder_target_tokens'] > 0)
  loss_fn = _loss_fn(model)
  loss_packed, m_packed = loss_fn(params, packed)
  loss_unpacked, m_unpacked = loss_fn(params, unpacked)
  reference, (ref_label, ref_rationale) = _two_pass_reference(params, examples, lam)
  np.testing.assert_allclose(float(loss_packed), reference, atol=1e-5)
  np.testing.assert_allclose(float(loss_unpacked), reference, atol=1e-5)
  np.testing.assert_allclose(float(m_packed['label/loss']), ref_label, atol=1e-5)
  np.testing.assert_allclose(float(m_packed['rationale/loss']), ref_rationale, atol=1e-5)
  n_label = sum(len(e['targets']) for e in examples if e['task_id'][0] == 1)
  assert float(m_packed['label/tokens']) == n_label == float(m_unpacked['label/tokens'])


def test_alpha_form_is_the_reference_weighting():
  examples = _examples(np.random.RandomState(1))
  model = _model(losses.task_weights(alpha=0.25))
  params = initial_params(model, seed=1)
  loss, _ = _loss_fn(model)(params, _convert(examples, True))
  _, (label, rationale) = _two_pass_reference(params, examples, 0.0)
  np.testing.assert_allclose(float(loss), 0.25 * label + 0.75 * rationale, atol=1e-5)


def test_lambda_zero_is_standard_finetuning():
  examples = _examples(np.random.RandomState(2))
  mixed = _convert(examples, True)
  label_only = dict(mixed, decoder_task_ids=np.where(mixed['decoder_task_ids'] == 1, 1, 0))
  model = _model(losses.task_weights(lambda_=0.0))
  params = initial_params(model, seed=1)
  loss_fn = _loss_fn(model)
  grad = jax.jit(jax.grad(lambda p, b: model.loss_fn(p, b, None)[0]))
  # Rationale tokens contribute exactly nothing: same loss and gradients, bitwise.
  np.testing.assert_array_equal(loss_fn(params, mixed)[0], loss_fn(params, label_only)[0])
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, grad(params, mixed), grad(params, label_only)
  )
  # ... and the value is the plain mean token cross-entropy of the label examples.
  _, (label, _) = _two_pass_reference(params, examples, 0.0)
  np.testing.assert_allclose(float(loss_fn(params, mixed)[0]), label, atol=1e-5)


def test_plain_seqio_batches_count_as_label_examples():
  examples = _examples(np.random.RandomState(3))
  batch = _convert(examples, False)
  plain = {k: v for k, v in batch.items() if k != 'decoder_task_ids'}
  model = _model((1.0, 1.0))
  params = initial_params(model, seed=1)
  _, (label, rationale) = _two_pass_reference(params, examples, 0.0)
  n = [sum(len(e['targets']) for e in examples if e['task_id'][0] == t) for t in (1, 2)]
  pooled = (label * n[0] + rationale * n[1]) / sum(n)
  np.testing.assert_allclose(float(_loss_fn(model)(params, plain)[0]), pooled, atol=1e-5)


@pytest.mark.parametrize('vocab,offset', [(11, 0.0), (32128, 30.0)])
def test_token_cross_entropy_label_smoothing_and_z_loss_match_t5x_formula(rng, vocab, offset):
  """T5X's formula in float64, with its one-hot and log-probabilities; also at T5's
  vocabulary with large logits, where the loss sums over every id."""
  logits = rng.randn(2, 5, vocab).astype(np.float32) * 3 + offset
  targets = rng.randint(0, vocab, size=(2, 5))
  ls, zl = 0.1, 1e-3
  loss, z = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), ls, zl)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  log_p = logits - log_z[..., None]
  conf, low = 1 - ls, ls / (vocab - 1)
  soft = np.full(logits.shape, low)
  np.put_along_axis(soft, targets[..., None], conf, axis=-1)
  norm = -(conf * np.log(conf) + (vocab - 1) * low * np.log(low + 1e-20))
  expected = -(soft * log_p).sum(-1) - norm + zl * log_z**2
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(z), zl * log_z**2, rtol=1e-5)


def test_multitask_loss_pure_function(rng):
  token_loss = rng.rand(3, 6).astype(np.float32)
  task_ids = rng.randint(0, 3, size=(3, 6))
  total, means, counts = losses.multitask_loss(token_loss, task_ids, (0.5, 2.0))
  expected = [token_loss[task_ids == k].mean() for k in (1, 2)]
  np.testing.assert_allclose(np.asarray(means), expected, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(counts), [(task_ids == k).sum() for k in (1, 2)])
  np.testing.assert_allclose(float(total), 0.5 * expected[0] + 2.0 * expected[1], rtol=1e-6)


@pytest.mark.parametrize(
    'kwargs', [{}, {'lambda_': 1.0, 'alpha': 0.5}, {'lambda_': -1.0}, {'alpha': 1.5}]
)
def test_task_weights_reject_bad_settings(kwargs):
  with pytest.raises(ValueError):
    losses.task_weights(**kwargs)


@pytest.mark.parametrize('tied', [False, True])
def test_a_chunked_loss_gives_the_same_loss_metrics_and_gradients(tied):
  """`loss_chunk_length` changes what exists at a time, not what is computed: chunks
  of 5 positions (which do not divide the 12 targets) against all at once, with
  label smoothing and z-loss, for both kinds of head."""
  config = tiny_config(logits_via_embedding=tied)
  batch = synthetic_batch(ragged=True)
  shapes = {k: batch[k].shape for k in ('encoder_input_tokens', 'decoder_input_tokens')}
  student = tiny_student(config)
  params = initial_params(student, seed=0, shapes=shapes)
  # Every other target is the model's own greedy token, so accuracy is compared too.
  greedy = jax.jit(
      lambda p, b: student.module.apply(
          {'params': p},
          b['encoder_input_tokens'],
          b['decoder_input_tokens'],
          b['decoder_target_tokens'],
          enable_dropout=False,
      ).argmax(-1)
  )(params, batch)
  targets = batch['decoder_target_tokens']
  hits = (targets > 0) & (np.arange(targets.shape[1]) % 2 == 0)
  batch['decoder_target_tokens'] = np.where(hits, greedy, targets).astype(np.int32)

  @jax.jit
  def outputs(params, batch):
    """For all at once and for chunks of 5: (loss, metrics), gradients, scores."""
    out = []
    for chunk in (None, 5):
      model = tiny_student(config, label_smoothing=0.1, z_loss=1e-3, loss_chunk_length=chunk)
      loss = jax.value_and_grad(lambda p, m=model: m.loss_fn(p, batch, None), has_aux=True)
      out.append((*loss(params), model.score_batch(params, batch)))
    return out

  ((_, expected), expected_grads, expected_scores), ((_, metrics), grads, scores) = outputs(
      params, batch
  )
  assert float(expected['label/accuracy']) > 0.3
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, expected_grads
  )
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
  for bad in (0, 64.0, True):
    with pytest.raises(
        ConfigError, match=r'LOSS_CHUNK_LENGTH \(StepByStepModel.loss_chunk_length\)'
    ):
      tiny_student(config, loss_chunk_length=bad)


def test_score_batch_is_each_rows_log_likelihood():
  """T5X's scoring API (`t5x.infer` mode 'score'): row i scores minus the sum of its
  target tokens' cross-entropy, what loss_fn averages over a one-row batch."""
  student = tiny_student()
  batch = synthetic_batch(rows=3, ragged=True)
  del batch['decoder_task_ids']  # plain SeqIO rows: every target token counts
  shapes = {k: batch[k].shape for k in ('encoder_input_tokens', 'decoder_input_tokens')}
  params = initial_params(student, seed=0, shapes=shapes)
  scores = np.asarray(jax.jit(student.score_batch)(params, batch))
  loss_fn = _loss_fn(student)
  for i in range(3):
    row = {k: v[i : i + 1] for k, v in batch.items()}
    _, metrics = loss_fn(params, row)
    assert scores[i] == pytest.approx(
        -float(metrics['label/loss']) * float(metrics['label/tokens']), rel=1e-5
    )
  assert (scores < 0).all()
