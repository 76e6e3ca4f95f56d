"""The T5X bridge: our model under T5X's train state, decoding and `t5x.train`.

The axis conversion is plain flax and always runs; everything else needs t5x,
which is not on PyPI, and skips where it cannot be imported.
"""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.linen import partitioning as flax_partitioning

from conftest import REPO, synthetic_batch, tiny_config, tiny_student
from dsbs_jax import partitioning
from dsbs_jax.errors import ConfigError

CONFIG = tiny_config(num_decoder_layers=2)
SHAPES = {'encoder_input_tokens': (4, 16), 'decoder_input_tokens': (4, 12)}
TYPES = {k: np.int32 for k in SHAPES}  # what t5x.train passes: the dataset's dtypes


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
      'embed', 'mlp')


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
      student, optimizers.OptaxWrapper(optax.adamw(5e-5, weight_decay=0.0)),
      decode_fn=decode_fn or decoding.beam_search)
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


def test_t5x_train_state_takes_the_logical_axes():
  _, model = _bridge()
  from t5x import train_state as train_state_lib
  variables = model.get_initial_variables(jax.random.PRNGKey(0), SHAPES, TYPES)
  state = train_state_lib.FlaxOptimTrainState.create(model.optimizer_def, variables)
  axes = state.as_logical_axes()
  assert axes.params['encoder']['layers_0']['mlp']['wo']['kernel'] == (
      jax.sharding.PartitionSpec('mlp', 'embed'))


def test_t5x_greedy_decoding_matches_ours():
  decoding = pytest.importorskip('t5x.decoding')
  student, model = _bridge(functools.partial(decoding.temperature_sample, temperature=0.0))
  params = model.get_initial_variables(jax.random.PRNGKey(1), SHAPES, TYPES)['params']
  batch = _batch()
  theirs = np.asarray(model.predict_batch(params, batch))
  ours = np.asarray(student.predict_batch(params, batch))
  eos = student.output_vocabulary.eos_id
  for a, b in zip(theirs, ours):
    end = next((i + 1 for i, t in enumerate(b) if t == eos), len(b))
    np.testing.assert_array_equal(a[:end], b[:end])


def test_t5x_train_runs_our_gin_files(tmp_path):
  t5x = pytest.importorskip('t5x')
  t5x_root = os.path.dirname(os.path.dirname(t5x.__file__))
  config = tmp_path / 'demo_t5x.gin'
  config.write_text('\n'.join([
      'from __gin__ import dynamic_registration',
      'from dsbs_jax.data import demo',
      "include 't5x/configs/runs/pretrain.gin'",
      "include 't5x_bridge.gin'",
      "include 'models/t5_1_1/tiny.gin'",
      "include 'runs/step_by_step.gin'",
      'DATASET = @demo.register()',
      'demo.register.vocabulary = %VOCABULARY',
      "TASK_FEATURE_LENGTHS = {'inputs': 256, 'targets': 128}",
      'TRAIN_STEPS = 2',
      'train/utils.DatasetConfig.batch_size = 8',
      'train_eval/utils.DatasetConfig.batch_size = 8',
      'utils.SaveCheckpointConfig.period = 2',
  ]))
  model_dir = tmp_path / 'model'
  subprocess.run(
      [sys.executable, '-m', 't5x.train', f'--gin_search_paths={REPO}/gin,{t5x_root},{tmp_path}',
       f'--gin_file={config.name}', f"--gin.MODEL_DIR='{model_dir}'"],
      check=True, cwd=REPO, timeout=900)
  assert (model_dir / 'checkpoint_2').is_dir()
