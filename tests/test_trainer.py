"""The sharded train step: optimizers, mesh layouts and activation dtypes."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import attention_logits_dtypes, tiny_config, tiny_student
from conftest import synthetic_batch as _batch
from dsbs_jax import memory, optimizers, partitioning, trainer
from dsbs_jax.errors import ConfigError

CONFIG = tiny_config(dropout_rate=0.1)
SHAPES = {'encoder_input_tokens': (8, 16), 'decoder_input_tokens': (8, 12)}


def _trainer(config=CONFIG, optimizer='adamw', num_partitions=1):
  return trainer.Trainer(
      tiny_student(config),
      optimizers.create_optimizer(optimizer, learning_rate=1e-2),
      partitioning.Partitioner(num_partitions),
  )


@pytest.mark.parametrize('optimizer', ['adamw', 'adafactor'])
def test_train_step_on_a_data_by_model_mesh(optimizer):
  t = _trainer(optimizer=optimizer, num_partitions=2)
  assert dict(t.partitioner.mesh.shape) == {'data': 4, 'model': 2}
  state = t.create_state(SHAPES)
  kernel = state.params['decoder']['layers_0']['mlp']['wi_0']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'model')
  step = t.compile_train_step(SHAPES)
  losses = []
  for _ in range(5):
    state, metrics = step(state, t.partitioner.shard_batch(_batch()))
    losses.append(float(metrics['loss']))
  assert int(state.step) == 5
  assert losses[-1] < losses[0]
  assert np.isfinite(float(metrics['grad_norm'])) and float(
      metrics['learning_rate']
  ) == pytest.approx(1e-2)


def test_bfloat16_activations_track_float32():
  """bfloat16 activations keep attention's logits in float32 unless
  `float32_attention_logits=False`, which computes them in bfloat16 (T5X's
  default): each loss tracks float32's, and the setting changes the numbers."""
  batch = _batch()
  params = _trainer(dataclasses.replace(CONFIG, dropout_rate=0.0)).create_state(SHAPES).params
  settings = {
      'float32': {'dtype': 'float32'},
      'bfloat16': {'dtype': 'bfloat16'},
      'bfloat16 logits': {'dtype': 'bfloat16', 'float32_attention_logits': False},
  }
  results, logits = {}, {}
  for name, changes in settings.items():
    model = tiny_student(dataclasses.replace(CONFIG, dropout_rate=0.0, **changes))

    def loss(p, model=model):
      return model.loss_fn(p, batch, None)[0]

    results[name] = float(jax.jit(loss)(params))
    logits[name] = attention_logits_dtypes(loss, params, head_dim=CONFIG.head_dim)
  assert logits == {
      'float32': {'float32'},
      'bfloat16': {'float32'},
      'bfloat16 logits': {'bfloat16'},
  }
  assert results['bfloat16'] == pytest.approx(results['float32'], rel=2e-2)
  assert results['bfloat16 logits'] == pytest.approx(results['float32'], rel=2e-2)
  assert results['bfloat16 logits'] != results['bfloat16']


def test_bfloat16_attention_logits_need_bfloat16_activations():
  with pytest.raises(ConfigError, match='float32_attention_logits=False has no effect'):
    dataclasses.replace(CONFIG, float32_attention_logits=False)


@pytest.mark.parametrize('changes', [{'attention_block_size': 5}, {'remat': True}])
def test_blocked_attention_and_remat_give_the_same_loss_and_gradients(changes):
  """Query blocks of 5 (16 and 12 rows: padded blocks) and layer remat change
  only what is kept for the backward pass, not the numbers."""
  batch = _batch()
  config = dataclasses.replace(CONFIG, dropout_rate=0.0)
  base = _trainer(config)
  params = base.create_state(SHAPES).params

  def grad(t):
    return jax.jit(jax.value_and_grad(lambda p: t.model.loss_fn(p, batch, None)[0]))(params)

  (loss, grads), (loss_b, grads_b) = grad(base), grad(
      _trainer(dataclasses.replace(config, **changes))
  )
  assert float(loss_b) == pytest.approx(float(loss), rel=1e-6)
  for g, g_b in zip(
      jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_b), strict=True
  ):
    np.testing.assert_allclose(g_b, g, rtol=1e-4, atol=1e-6)


def test_remat_keeps_only_each_layers_input():
  """XLA's own buffer plan for the gradient: with remat, the temporaries must
  not grow by a whole layer's activations per layer (per-layer `nn.remat` did,
  because XLA CPU hoists the recomputation)."""
  shapes = {'encoder_input_tokens': (8, 256), 'decoder_input_tokens': (8, 128)}
  batch = {
      'encoder_input_tokens': np.ones(shapes['encoder_input_tokens'], np.int32),
      'decoder_input_tokens': np.ones(shapes['decoder_input_tokens'], np.int32),
      'decoder_target_tokens': np.ones(shapes['decoder_input_tokens'], np.int32),
  }

  def temp_bytes(layers, remat):
    config = dataclasses.replace(
        CONFIG, num_encoder_layers=layers, num_decoder_layers=layers, remat=remat, dropout_rate=0.0
    )
    t = _trainer(config)
    params = t.abstract_state(shapes).params
    grad = jax.jit(jax.grad(lambda p, b: t.model.loss_fn(p, b, None)[0]))
    return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

  plain = temp_bytes(6, False) - temp_bytes(2, False)
  remat = temp_bytes(6, True) - temp_bytes(2, True)
  assert remat < 0.25 * plain, (remat, plain)


def _gradient_temp_bytes(student, shapes, num_microbatches=1) -> int:
  """XLA's buffer plan for one step's gradient (microbatches and all) at these
  shapes: the temporaries, i.e. the activations, in bytes."""
  t = trainer.Trainer(
      student,
      optimizers.create_optimizer('adamw', learning_rate=1e-2),
      partitioning.Partitioner(1),
      num_microbatches=num_microbatches,
  )
  batch = {
      k: jax.ShapeDtypeStruct(shapes[k.replace('target', 'input')], np.int32)
      for k in ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens')
  }
  grads = jax.jit(lambda p, b: t._grads(p, b, jax.random.PRNGKey(0))[0])
  plan = grads.lower(t.abstract_state(shapes).params, batch).compile().memory_analysis()
  return plan.temp_size_in_bytes


def test_the_plans_activation_estimate_follows_xlas_buffer_plan():
  """`dsbs-train --plan` sizes a step before a slice is rented: its activation estimate
  must stay near XLA's own buffer plan for the gradient when it accumulates gradients
  (one microbatch's activations exist at a time)."""
  shapes = {'encoder_input_tokens': (16, 256), 'decoder_input_tokens': (16, 128)}
  config = tiny_config(
      emb_dim=64, mlp_dim=256, head_dim=16, num_encoder_layers=2, num_decoder_layers=2, remat=True
  )
  temp = _gradient_temp_bytes(tiny_student(config), shapes, num_microbatches=4)
  estimate = memory.activation_bytes_estimate(config, shapes, {'data': 1}, microbatch_rows=4)
  assert 0.5 < estimate / temp < 2, (estimate, temp)


def test_a_chunked_loss_keeps_one_chunks_logits():
  """At a large vocabulary the float32 logits and their softmax dominate a step's
  activations; `loss_chunk_length` keeps one chunk's at a time, in XLA's buffer
  plan for the gradient and in `--plan`'s estimate alike."""
  shapes = {'encoder_input_tokens': (8, 64), 'decoder_input_tokens': (8, 128)}
  config = tiny_config(vocab_size=8192)
  temp = {}
  for chunk in (None, 16):
    temp[chunk] = _gradient_temp_bytes(tiny_student(config, loss_chunk_length=chunk), shapes)
    estimate = memory.activation_bytes_estimate(
        config, shapes, {'data': 1}, loss_chunk_length=chunk
    )
    assert 0.5 < estimate / temp[chunk] < 2, (chunk, estimate, temp[chunk])
  assert temp[16] < 0.3 * temp[None], temp


def test_the_plan_counts_attention_blocks_in_their_logits_dtype():
  """bfloat16 attention logits halve the one block of [b, h, q, k] tensors
  (logits, probabilities, gradient) that the plan counts."""
  config = tiny_config(dtype='bfloat16')
  estimate = {
      f32: memory.activation_bytes_estimate(
          dataclasses.replace(config, float32_attention_logits=f32), SHAPES, {'data': 1}
      )
      for f32 in (True, False)
  }
  block = 3 * 8 * config.num_heads * 16 * 16  # three [8, h, 16, 16] tensors
  assert estimate[True] - estimate[False] == block * (4 - 2)


@pytest.mark.parametrize('remat', [False, True])
def test_dropout_depends_on_step_rng_only(remat):
  t = _trainer(dataclasses.replace(CONFIG, remat=remat, num_encoder_layers=2))
  a, b = t.create_state(SHAPES), t.create_state(SHAPES)
  step = t.compile_train_step(SHAPES)
  batch = t.partitioner.shard_batch(_batch())
  _, ma = step(a, batch)
  _, mb = step(b, batch)
  assert float(ma['loss']) == float(mb['loss'])
  params, rng = t.create_state(SHAPES).params, jax.random.PRNGKey(1)
  loss = jax.jit(lambda p, r: t.model.loss_fn(p, _batch(), r)[0])  # eager: 11 s of compiles
  dropped = float(loss(params, rng))
  assert dropped != float(loss(params, None))  # dropout is applied
  assert dropped == float(loss(params, rng))


@pytest.mark.parametrize(
    'name,kwargs,message',
    [
        ('sgd', {}, 'unknown optimizer'),
        ('adamw', {'schedule_name': 'cosine'}, 'unknown learning-rate schedule'),
        ('adamw', {'schedule_name': 'linear'}, 'needs total_steps'),
    ],
)
def test_optimizer_errors(name, kwargs, message):
  with pytest.raises(ValueError, match=message):
    optimizers.create_optimizer(name, **kwargs)


def test_schedules():
  linear = optimizers.schedule('linear', 1.0, warmup_steps=10, total_steps=110)
  assert [float(linear(s)) for s in (0, 5, 10, 60, 110)] == pytest.approx([0, 0.5, 1, 0.5, 0])
  rsqrt = optimizers.schedule('rsqrt', 1.0, warmup_steps=100)
  assert float(rsqrt(10)) == pytest.approx(0.1) and float(rsqrt(400)) == pytest.approx(0.05)
