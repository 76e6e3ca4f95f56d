"""Partitioning presets, gradient accumulation and checkpoints across mesh shapes,
on 8 simulated CPU devices."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import synthetic_batch, tiny_config, tiny_student
from dsbs_jax import optimizers, partitioning, trainer
from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.errors import ConfigError

CONFIG = tiny_config()
SHAPES = {'encoder_input_tokens': (8, 16), 'decoder_input_tokens': (8, 12)}


def _batch(seed=0):
  return synthetic_batch(seed=seed, ragged=True)


def _trainer(partitioner, num_microbatches=1, config=CONFIG):
  return trainer.Trainer(
      tiny_student(config),
      optimizers.create_optimizer('adamw', learning_rate=1e-2),
      partitioner,
      num_microbatches=num_microbatches,
  )


def _one_step(t, batch):
  state = t.create_state(SHAPES)
  state, metrics = t.compile_train_step(SHAPES)(state, t.partitioner.shard_batch(batch))
  return jax.device_get(metrics), jax.device_get(state.params), state


LAYOUTS = {
    '1 device': lambda: partitioning.Partitioner(devices=jax.devices()[:1]),
    '8x1 data': lambda: partitioning.Partitioner(1, partitioning.preset_rules('data_parallel')),
    '4x2 data x model': lambda: partitioning.Partitioner(
        2, partitioning.preset_rules('data_model')
    ),
    'fsdp 8x1': lambda: partitioning.Partitioner(1, partitioning.preset_rules('fsdp')),
    'fsdp 4x2': lambda: partitioning.Partitioner(2, partitioning.preset_rules('fsdp')),
}


def test_one_step_gives_the_same_numbers_on_every_layout():
  batch = _batch()
  reference_metrics, reference_params, _ = _one_step(_trainer(LAYOUTS['1 device']()), batch)
  for name, make in LAYOUTS.items():
    metrics, params, _ = _one_step(_trainer(make()), batch)
    assert metrics['loss'] == pytest.approx(reference_metrics['loss'], rel=1e-5), name
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        params,
        reference_params,
    )


def test_presets_shard_parameters_and_optimizer_state_as_named():
  kernel = lambda tree: tree['decoder']['layers_0']['mlp']['wi_0']['kernel']  # noqa: E731
  for preset, spec in [
      ('data_parallel', P(None, None)),
      ('data_model', P(None, 'model')),
      ('fsdp', P('data', 'model')),
  ]:
    t = _trainer(
        partitioning.Partitioner(
            1 if preset == 'data_parallel' else 2, partitioning.preset_rules(preset)
        )
    )
    state = t.create_state(SHAPES)
    assert kernel(state.params).sharding.spec == spec, preset
    mu = state.opt_state[0].mu
    assert kernel(mu).sharding.spec == spec, preset
  with pytest.raises(ConfigError, match='nothing on the model axis'):
    partitioning.Partitioner(2, partitioning.preset_rules('data_parallel'))
  with pytest.raises(ConfigError, match='unknown partitioning preset'):
    partitioning.preset_rules('zero3')


@pytest.mark.parametrize('layout', ['4x2 data x model', 'fsdp 4x2'])
def test_layer_remat_on_a_mesh_gives_the_same_step(layout):
  """Remat scans over the layers' stacked, sharded params; one step on a mesh
  must equal the plain step on one device."""
  config = dataclasses.replace(CONFIG, num_encoder_layers=2, num_decoder_layers=2)
  batch = _batch()
  reference_metrics, reference_params, _ = _one_step(
      _trainer(LAYOUTS['1 device'](), config=config), batch
  )
  metrics, params, _ = _one_step(
      _trainer(LAYOUTS[layout](), config=dataclasses.replace(config, remat=True)), batch
  )
  assert metrics['loss'] == pytest.approx(reference_metrics['loss'], rel=1e-5)
  assert metrics['grad_norm'] == pytest.approx(reference_metrics['grad_norm'], rel=1e-5)
  # Adam divides by the gradient's scale, so a near-zero gradient's rounding
  # moves its parameter by up to ~1e-5 of the 1e-2 step.
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, reference_params
  )


@pytest.mark.parametrize('num_microbatches', [2, 4])
def test_gradient_accumulation_equals_the_big_batch(num_microbatches):
  batch = _batch(1)
  make = LAYOUTS['4x2 data x model']
  big_metrics, big_params, _ = _one_step(_trainer(make()), batch)
  metrics, params, _ = _one_step(_trainer(make(), num_microbatches), batch)
  for key in ('loss', 'label/loss', 'rationale/loss', 'label/accuracy', 'label/tokens'):
    assert metrics[key] == pytest.approx(big_metrics[key], rel=1e-5), key
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, big_params
  )


@pytest.mark.parametrize('save_on,restore_on', [(8, 2), (2, 8)])
def test_checkpoint_restores_on_another_mesh(tmp_path, save_on, restore_on):
  def layout(n):
    return partitioning.Partitioner(2, partitioning.preset_rules('fsdp'), jax.devices()[:n])

  saver = _trainer(layout(save_on))
  _, _, state = _one_step(saver, _batch())
  checkpointer = Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  checkpointer.save(1, state, batches_consumed=1, force=True)
  checkpointer.close()
  loader = _trainer(layout(restore_on))
  restored, consumed = Checkpointer(str(tmp_path / 'ckpt')).restore(loader.abstract_state(SHAPES))
  assert consumed == 1 and int(restored.step) == 1
  leaf = restored.params['encoder']['layers_0']['mlp']['wi_0']['kernel']
  assert leaf.sharding.mesh.devices.size == restore_on
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state)
  )
  # Training continues from the restored state on the new mesh.
  loader.compile_train_step(SHAPES)(restored, loader.partitioner.shard_batch(_batch(2)))


def test_microbatches_must_divide_the_batch():
  t = _trainer(LAYOUTS['1 device'](), num_microbatches=3)
  with pytest.raises(ConfigError, match='divide into 3 microbatches'):
    _one_step(t, _batch())
  with pytest.raises(ConfigError, match='num_microbatches must be >= 1'):
    _trainer(LAYOUTS['1 device'](), num_microbatches=0)


def test_bfloat16_compute_keeps_float32_master_weights():
  t = _trainer(LAYOUTS['8x1 data'](), config=dataclasses.replace(CONFIG, dtype='bfloat16'))
  initial = jax.device_get(t.create_state(SHAPES).params)
  metrics, params, state = _one_step(t, _batch())
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype('float32')}
  assert int(state.step) == 1
  # The float32 masters take the update that bf16 activations compute: every kernel
  # moves, and the loss is the float32 step's to bf16 precision.
  for before, after in zip(
      jax.tree_util.tree_leaves(initial), jax.tree_util.tree_leaves(params), strict=True
  ):
    assert not np.array_equal(before, after)
  reference, _, _ = _one_step(_trainer(LAYOUTS['8x1 data']()), _batch())
  assert metrics['loss'] == pytest.approx(reference['loss'], rel=2e-2)
