"""The T5X bridge under the real T5X: its train state, decoding, microbatches, `t5x.train`,
`t5x.eval`, `t5x.infer`, and checkpoints crossing between T5X and dsbs-train both ways,
T5X's example T5 network (what the public T5 1.1 checkpoints hold) included.

The axis conversion and the T5X checkpoint format (read and written without T5X)
always run; everything else needs t5x, which is not on PyPI, and skips where it
cannot be imported (this project's CI).
"""

import functools
import json
import os
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.linen import partitioning as flax_partitioning

from conftest import (
    NO_EVALUATION,
    REPO,
    XLA_FLAGS,
    cli,
    synthetic_batch,
    tiny_config,
    tiny_student,
)
from dsbs_jax import export, network, partitioning, t5x_checkpoints
from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.errors import ConfigError

CONFIG = tiny_config(num_decoder_layers=2)
SHAPES = {'encoder_input_tokens': (4, 16), 'decoder_input_tokens': (4, 12)}
TYPES = dict.fromkeys(SHAPES, np.int32)  # what t5x.train passes: the dataset's dtypes


def _student():
  return tiny_student(CONFIG, task_weights=(1.0, 0.5))


def _batch():
  return synthetic_batch(rows=4, input_length=13)


def test_params_axes_carry_every_parameters_logical_axes():
  boxed = _student().get_initial_variables(jax.random.PRNGKey(0), SHAPES)['params']
  axes = partitioning.params_axes(boxed)
  flat_axes = traverse_util.flatten_dict(axes)
  assert all(path[-1].endswith('_axes') for path in flat_axes)
  names = traverse_util.flatten_dict(flax_partitioning.get_axis_names(axes))
  expected = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
  assert names == expected and len(names) == len(traverse_util.flatten_dict(boxed))
  assert names[('decoder', 'layers_1', 'mlp', 'wi_0', 'kernel')] == jax.sharding.PartitionSpec(
      'embed', 'mlp'
  )


def test_params_axes_name_an_unpartitioned_parameter():
  boxed = {'encoder': {'scale': np.ones(3)}}
  with pytest.raises(ConfigError, match='encoder/scale'):
    partitioning.params_axes(boxed)


def _bridge(decode_fn=None):
  pytest.importorskip('t5x')
  from t5x import decoding, optimizers

  from dsbs_jax import t5x_bridge

  student = _student()
  model = t5x_bridge.StepByStepT5XModel(
      student,
      optimizers.OptaxWrapper(optax.adamw(5e-5, weight_decay=0.0)),
      decode_fn=decode_fn or decoding.beam_search,
  )
  return student, model


def test_loss_and_metrics_are_the_students():
  student, model = _bridge()
  variables = model.get_initial_variables(jax.random.PRNGKey(0), SHAPES, TYPES)
  batch = _batch()
  loss, metrics = model.loss_fn(variables['params'], batch, None)
  expected, scalars = student.loss_fn(variables['params'], batch, None)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  for name in ('label/loss', 'rationale/loss', 'label/accuracy', 'rationale/tokens'):
    np.testing.assert_allclose(metrics[name].compute(), scalars[name], rtol=1e-6)
  merged = metrics['rationale/loss'].merge(metrics['rationale/loss'])
  np.testing.assert_allclose(merged.compute(), scalars['rationale/loss'], rtol=1e-6)
  # A task absent from an evaluation reports 0 beside its 0 tokens, not NaN.
  label_only = {**batch, 'decoder_task_ids': np.where(batch['decoder_task_ids'] > 0, 1, 0)}
  _, metrics = model.loss_fn(variables['params'], label_only, None)
  assert float(metrics['rationale/loss'].compute()) == 0.0
  assert float(metrics['rationale/tokens'].compute()) == 0.0


@pytest.mark.parametrize('num_microbatches', [2, 4])
def test_t5x_microbatches_equal_the_big_batch(num_microbatches):
  """T5X's own accumulation, fed by StepByStepTrainer's per-batch token counts."""
  _, model = _bridge()
  from t5x import metrics as metrics_lib
  from t5x import train_state as train_state_lib
  from t5x import trainer as t5x_trainer

  from dsbs_jax import t5x_bridge

  variables = model.get_initial_variables(jax.random.PRNGKey(0), SHAPES, TYPES)
  state = train_state_lib.FlaxOptimTrainState.create(model.optimizer_def, variables)
  batch = t5x_bridge.with_batch_task_tokens(synthetic_batch(rows=4, ragged=True, seed=3), 2)

  def run(m):
    grads, metrics, _ = t5x_trainer.accumulate_grads_microbatched(
        model, state, batch, jax.random.PRNGKey(1), m
    )
    metrics = metrics_lib.set_step_metrics_num_steps(metrics, 1)  # as T5X's trainer does
    return grads, {k: float(v.compute()) for k, v in metrics.items()}

  big_grads, big = run(None)
  grads, small = run(num_microbatches)
  for key in ('loss', 'label/loss', 'rationale/loss', 'label/accuracy', 'label/tokens'):
    assert small[key] == pytest.approx(big[key], rel=1e-5), key
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, big_grads
  )


def test_t5x_train_state_takes_the_logical_axes():
  _, model = _bridge()
  from t5x import train_state as train_state_lib

  variables = model.get_initial_variables(jax.random.PRNGKey(0), SHAPES, TYPES)
  state = train_state_lib.FlaxOptimTrainState.create(model.optimizer_def, variables)
  axes = state.as_logical_axes()
  assert axes.params['encoder']['layers_0']['mlp']['wo']['kernel'] == (
      jax.sharding.PartitionSpec('mlp', 'embed')
  )


def test_t5x_greedy_decoding_matches_ours():
  decoding = pytest.importorskip('t5x.decoding')
  student, model = _bridge(functools.partial(decoding.temperature_sample, temperature=0.0))
  params = model.get_initial_variables(jax.random.PRNGKey(1), SHAPES, TYPES)['params']
  batch = _batch()
  theirs = np.asarray(model.predict_batch(params, batch))
  ours = np.asarray(student.predict_batch(params, batch))
  eos = student.output_vocabulary.eos_id
  for a, b in zip(theirs, ours, strict=True):
    end = next((i + 1 for i, t in enumerate(b) if t == eos), len(b))
    np.testing.assert_array_equal(a[:end], b[:end])


def test_t5x_checkpoint_layout_round_trips_without_t5x(tmp_path):
  params = tiny_student().get_initial_variables(jax.random.PRNGKey(0), SHAPES)['params']
  params = jax.device_get(nn.meta.unbox(params))
  path = t5x_checkpoints.write_params(str(tmp_path / 'out'), params, 7)
  assert path == str(tmp_path / 'out' / 'checkpoint_7')
  for where in (path, str(tmp_path / 'out')):
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, t5x_checkpoints.read_params(where), params
    )
  with pytest.raises(ConfigError, match='no T5X checkpoint'):
    t5x_checkpoints.read_params(str(tmp_path))


# --- Everything below runs the real T5X, in processes of its own where T5X has a CLI.

# The demo's network, narrowed; the same flags shape dsbs-train's demo run.
NARROW = [
    '--gin.network.T5Config.emb_dim=32',
    '--gin.network.T5Config.num_heads=2',
    '--gin.network.T5Config.head_dim=16',
    '--gin.network.T5Config.mlp_dim=64',
]
ONE_LAYER = [
    '--gin.network.T5Config.num_encoder_layers=1',
    '--gin.network.T5Config.num_decoder_layers=1',
]
DEMO = [
    '--gin_file=t5x/demo.gin',
    '--gin.TRAIN_STEPS=4',
    '--gin.EVAL_PERIOD=2',
    '--gin.utils.SaveCheckpointConfig.period=2',
    '--gin.BATCH_SIZE=4',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 192, 'targets': 64}",
    '--gin.EVALUATOR_NUM_EXAMPLES=8',
    *NARROW,
]
DSBS_DEMO = ['--gin_file=demo.gin', *NARROW, *NO_EVALUATION]


def _t5x(script, tmp_path, *args):
  """`python -m t5x.<script> ARGS` with dsbs-jax's and T5X's config directories searched;
  returns its log."""
  t5x = pytest.importorskip('t5x')
  t5x_root = os.path.dirname(os.path.dirname(t5x.__file__))
  log = tmp_path / f'{script}.log'
  # One CPU device: on CPU, T5X puts every device on the model axis unless it is
  # given `model_parallel_submesh` (the README's 2x2 mesh command gives one).
  env = dict(os.environ, XLA_FLAGS=XLA_FLAGS.format(1))
  with open(log, 'a') as out:
    run = subprocess.run(
        [sys.executable, '-m', f't5x.{script}', f'--gin_search_paths={REPO}/gin,{t5x_root}', *args],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        timeout=900,
    )
  assert run.returncode == 0, log.read_text()[-5000:]
  return log.read_text()


def _metrics(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_t5x_train_eval_and_infer_run_our_experiment(tmp_path):
  model_dir = tmp_path / 'model'
  _t5x('train', tmp_path, '--gin_file=t5x/finetune.gin', *DEMO, f"--gin.MODEL_DIR='{model_dir}'")
  assert {'checkpoint_2', 'checkpoint_4'} <= set(os.listdir(model_dir))
  # Training decoded the label task alone, on validation, at steps 2 and 4.
  trained = _metrics(model_dir / 'inference_eval' / 'demo_gt_label-metrics.jsonl')
  assert [m['step'] for m in trained] == [2, 4]
  # t5x.eval on the saved checkpoint reproduces the training run's inference metric.
  _t5x(
      'eval',
      tmp_path,
      '--gin_file=t5x/configs/runs/eval.gin',
      *DEMO,
      "--gin.utils.DatasetConfig.split='validation'",
      '--gin.seqio.Evaluator.num_examples=8',
      f"--gin.CHECKPOINT_PATH='{model_dir}/checkpoint_4'",
      f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'",
  )
  evaluated = _metrics(tmp_path / 'eval' / 'inference_eval' / 'demo_gt_label-metrics.jsonl')
  assert evaluated[-1]['equation_accuracy'] == trained[-1]['equation_accuracy']
  # t5x.infer writes the label task's predictions.
  _t5x(
      'infer',
      tmp_path,
      '--gin_file=t5x/configs/runs/infer.gin',
      *DEMO,
      f"--gin.CHECKPOINT_PATH='{model_dir}/checkpoint_4'",
      f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'",
      '--gin.utils.DatasetConfig.batch_size=8',
  )
  rows = _metrics(tmp_path / 'infer' / 'demo_gt_label-predict.jsonl-00000-of-00001')
  assert len(rows) == 500 and rows[0]['inputs']['inputs_pretokenized'].startswith('predict: ')
  assert all(isinstance(row['prediction'], str) for row in rows)
  # dsbs-train starts from the t5x.train checkpoint: with a zero learning rate its
  # saved parameters are the T5X checkpoint's.
  ours = tmp_path / 'dsbs'
  assert (
      cli(
          *DSBS_DEMO,
          '--gin.TRAIN_STEPS=1',
          '--gin.LEARNING_RATE=0.0',
          f"--gin.INITIAL_CHECKPOINT_PATH='{model_dir}'",
          f"--gin.MODEL_DIR='{ours}'",
      )
      == 0
  )
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, _dsbs_params(ours), t5x_checkpoints.read_params(str(model_dir))
  )


def _dsbs_params(model_dir):
  checkpointer = Checkpointer(str(model_dir / 'checkpoints'), async_save=False)
  try:
    return checkpointer.restore_params(None)
  finally:
    checkpointer.close()


@pytest.mark.slow
def test_t5x_train_starts_from_a_dsbs_checkpoint(tmp_path):
  pytest.importorskip('t5x')
  ours = tmp_path / 'dsbs'
  assert cli(*DSBS_DEMO, '--gin.TRAIN_STEPS=2', f"--gin.MODEL_DIR='{ours}'") == 0
  assert (
      export.main(['--checkpoint', str(ours), '--output', str(tmp_path / 'converted'), '--to=t5x'])
      == 0
  )
  model_dir = tmp_path / 'model'
  _t5x(
      'train',
      tmp_path,
      '--gin_file=t5x/finetune.gin',
      *DEMO,
      '--gin.LEARNING_RATE=0.0',
      f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'converted' / 'checkpoint_2'}'",
      '--gin.TRAIN_STEPS=3',
      f"--gin.MODEL_DIR='{model_dir}'",
  )
  jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      t5x_checkpoints.read_params(str(model_dir / 'checkpoint_3')),
      _dsbs_params(ours),
  )


@pytest.mark.slow
@pytest.mark.parametrize('layout', ['legacy', 'orbax'])
def test_a_t5x_example_network_checkpoint_restores_into_both_trainers(tmp_path, layout):
  """What T5X's public T5 1.1 checkpoints hold: T5X's own example network, trained
  with Adafactor, saved by T5X's checkpointer (legacy msgpack, or Orbax)."""
  pytest.importorskip('t5x')
  import seqio
  from t5x import adafactor
  from t5x import checkpoints as t5x_ckpt
  from t5x import models as t5x_models
  from t5x import partitioning as t5x_partitioning
  from t5x import train_state as train_state_lib
  from t5x.examples.t5 import network as t5x_network

  config = t5x_network.T5Config(
      vocab_size=384,
      emb_dim=32,
      num_heads=2,
      num_encoder_layers=1,
      num_decoder_layers=1,
      head_dim=16,
      mlp_dim=64,
      mlp_activations=('gelu', 'linear'),
      dropout_rate=0.0,
  )
  vocab = seqio.ByteVocabulary()
  model = t5x_models.EncoderDecoderModel(
      t5x_network.Transformer(config), vocab, vocab, optimizer_def=adafactor.Adafactor()
  )
  shapes = {'encoder_input_tokens': (4, 16), 'decoder_input_tokens': (4, 12)}
  variables = model.get_initial_variables(jax.random.PRNGKey(3), shapes, TYPES)
  state = train_state_lib.FlaxOptimTrainState.create(model.optimizer_def, variables)
  state = state.replace_step(np.asarray(1000, np.int32))
  directory = tmp_path / 'pretrained'
  partitioner = t5x_partitioning.PjitPartitioner(num_partitions=1)
  if layout == 'legacy':
    t5x_ckpt.Checkpointer(state, partitioner, str(directory)).save(state)
    assert (directory / 'checkpoint_1000' / 'checkpoint').is_file()
  else:  # T5X writes into the parent of a directory that does not exist yet
    directory.mkdir()
    manager = t5x_ckpt.OrbaxCheckpointManagerInterface(str(directory), state, partitioner)
    manager.save(state)
    manager.close()
  expected = flax.core.unfreeze(jax.device_get(state.params))
  # Read without T5X, the same tensors, computing the same function as T5X's network.
  params = t5x_checkpoints.read_params(str(directory))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
  batch = synthetic_batch(rows=4, input_length=13)
  ours = network.Transformer(
      network.T5Config(
          vocab_size=384,
          emb_dim=32,
          num_heads=2,
          num_encoder_layers=1,
          num_decoder_layers=1,
          head_dim=16,
          mlp_dim=64,
          dropout_rate=0.0,
      )
  ).apply(
      {'params': params},
      batch['encoder_input_tokens'],
      batch['decoder_input_tokens'],
      batch['decoder_target_tokens'],
      enable_dropout=False,
  )
  theirs = model.module.apply(
      {'params': expected},
      batch['encoder_input_tokens'],
      batch['decoder_input_tokens'],
      batch['decoder_target_tokens'],
      enable_dropout=False,
  )
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  # dsbs-train takes it as INITIAL_CHECKPOINT_PATH.
  dsbs_dir = tmp_path / 'dsbs'
  assert (
      cli(
          *DSBS_DEMO,
          *ONE_LAYER,
          '--gin.TRAIN_STEPS=1',
          '--gin.LEARNING_RATE=0.0',
          f"--gin.INITIAL_CHECKPOINT_PATH='{directory}'",
          f"--gin.MODEL_DIR='{dsbs_dir}'",
      )
      == 0
  )
  jax.tree_util.tree_map(np.testing.assert_array_equal, _dsbs_params(dsbs_dir), expected)
  # t5x.train with the bridge starts from it, as the README's command does (the
  # Adafactor state is dropped; AdamW starts afresh).
  model_dir = tmp_path / 'model'
  _t5x(
      'train',
      tmp_path,
      '--gin_file=t5x/finetune.gin',
      *DEMO,
      *ONE_LAYER,
      '--gin.LEARNING_RATE=0.0',
      f"--gin.INITIAL_CHECKPOINT_PATH='{directory}/checkpoint_1000'",
      '--gin.TRAIN_STEPS_RELATIVE=1',
      f"--gin.MODEL_DIR='{model_dir}'",
  )
  jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      t5x_checkpoints.read_params(str(model_dir / 'checkpoint_1001')),
      expected,
  )
