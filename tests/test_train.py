"""End to end through the CLI: a short run learns, writes and records its outputs, resumes,
survives a corrupted checkpoint, and trains on the paper's data."""

import glob
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from conftest import NO_EVALUATION, TINY_MODEL, cli, serves_its_test_predictions
from dsbs_jax import hf_checkpoint
from dsbs_jax.checkpoints import Checkpointer

TINY = [
    *TINY_MODEL,
    '--gin.train.train.log_period=10',
    '--gin.checkpoints.CheckpointConfig.period=20',
    '--gin.evaluation.EvaluationConfig.num_examples=16',
    '--gin.optimizers.create_optimizer.warmup_steps=5',
]


def _run(model_dir, *extra):
  return cli(*TINY, f"--gin.MODEL_DIR='{model_dir}'", *extra)


def _events(path):
  scalars, texts = {}, {}
  for f in glob.glob(os.path.join(path, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(f):
      for v in event.summary.value:
        value = tf.make_ndarray(v.tensor)
        if value.dtype == object:
          texts[v.tag] = value.item().decode()
        else:
          scalars.setdefault(v.tag, {})[event.step] = float(value)
  return scalars, texts


def test_short_run_learns_writes_outputs_and_resumes(tmp_path, capsys):
  model_dir = tmp_path / 'run'
  assert _run(model_dir, '--gin.TRAIN_STEPS=40') == 0
  out = capsys.readouterr().out
  assert 'steps/s' in out and 'ETA' in out
  assert 'model selection: validation every 20 steps' in out  # on by default, at the save period
  rows = [
      json.loads(line) for line in (model_dir / 'train' / 'metrics.jsonl').read_text().splitlines()
  ]
  assert [r['step'] for r in rows] == [10, 20, 30, 40]
  assert rows[-1]['loss'] < 0.7 * rows[0]['loss']
  assert rows[-1]['label/loss'] < rows[0]['label/loss']
  assert rows[-1]['rationale/loss'] < rows[0]['rationale/loss']
  # TensorBoard events round-trip to the same numbers as the JSONL copy.
  events, texts = _events(model_dir / 'train')
  for r in rows:
    assert events['loss'][r['step']] == pytest.approx(r['loss'], rel=1e-6)
  assert {'steps_per_sec', 'tokens_per_sec', 'learning_rate', 'grad_norm'} <= set(events)
  # The run is recorded: the operative gin config (as T5X writes it), versions, commit.
  config = (model_dir / 'config.gin').read_text()
  assert 'TRAIN_STEPS = 40' in config and '# jax: ' + jax.__version__ in config
  assert 'TRAIN_STEPS = 40' in texts['config']
  run = json.loads((model_dir / 'run.json').read_text())
  assert run['versions']['jax'] == jax.__version__ and 'commit' in run
  assert sorted(os.listdir(model_dir / 'checkpoints'))[-1] == '40'
  assert (model_dir / 'inference_eval' / 'validation' / 'demo_gt_label-000020.jsonl').exists()
  # Model selection on validation: the best state is kept and scores the test split once.
  results = json.loads((model_dir / 'results.json').read_text())
  assert results['run'] == run
  best = results['best']
  assert best['metric'] == 'demo_gt_label/equation_accuracy' and best['step'] in (20, 40)
  assert sorted(os.listdir(model_dir / 'best')) == [str(best['step'])]
  validation = [
      json.loads(line)
      for line in (model_dir / 'eval' / 'validation' / 'metrics.jsonl').read_text().splitlines()
  ]
  assert [v['step'] for v in validation] == [20, 40]
  assert best['value'] == max(v[best['metric']] for v in validation)
  assert {'teacher_forced/label/loss', 'teacher_forced/rationale/loss'} <= set(validation[0])
  predictions = model_dir / 'inference_eval' / 'test' / f'demo_gt_label-{best["step"]:06d}.jsonl'
  lines = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert len(lines) == 16 and {'input', 'prediction', 'target'} <= set(lines[0])
  assert lines[0]['input']['inputs_pretokenized'].startswith('predict: ')
  seqio_metrics = model_dir / 'inference_eval' / 'test' / 'demo_gt_label-metrics.jsonl'
  assert json.loads(seqio_metrics.read_text())['equation_accuracy'] == (
      results['eval']['test']['demo_gt_label']['equation_accuracy']
  )
  assert 0.0 <= results['eval']['test']['demo_gt_label']['equation_accuracy'] <= 100.0
  assert list(results['eval']) == ['test']
  _exports_to_huggingface(model_dir / 'best', best['step'], tmp_path / 'hf', capsys)
  serves_its_test_predictions(str(model_dir / 'best'), lines[:4])
  # Running again with more steps resumes from the checkpoint at step 40.
  assert _run(model_dir, '--gin.TRAIN_STEPS=50') == 0
  assert 'Resumed from' in capsys.readouterr().out
  assert sorted(os.listdir(model_dir / 'checkpoints'), key=int)[-1] == '50'
  assert 'TRAIN_STEPS = 50' in (model_dir / 'config.gin').read_text()


def _exports_to_huggingface(checkpoint, step, output, capsys):
  """dsbs-export writes a directory transformers loads, computing our logits."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from dsbs_jax import export, network

  capsys.readouterr()
  assert export.main(['--checkpoint', str(checkpoint), '--output', str(output)]) == 0
  assert capsys.readouterr().out.strip() == f'exported step {step} of {checkpoint} to {output}'
  config, params = hf_checkpoint.load_hf_checkpoint(str(output))
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, params, _params(checkpoint.parent, step, checkpoint.name)
  )
  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(str(output)).eval()
  tokens = np.random.RandomState(0).randint(2, 384, size=(2, 20))
  decoder_in = np.concatenate([np.zeros((2, 1), int), tokens[:, :9]], axis=1)
  ours = jax.jit(
      lambda p: network.Transformer(config).apply(
          {'params': p}, tokens, decoder_in, tokens[:, :10], enable_dropout=False
      )
  )(params)
  with torch.no_grad():
    theirs = hf_model(
        input_ids=torch.tensor(tokens), decoder_input_ids=torch.tensor(decoder_in)
    ).logits.numpy()
  assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4


def _corrupt(step_dir, how):
  if how == 'array':
    for f in glob.glob(str(step_dir / 'state' / '**' / 'd' / '*'), recursive=True):
      with open(f, 'r+b') as handle:
        handle.truncate(8)
  else:
    (step_dir / 'state' / '_METADATA').write_text('{"tree_metadata": ')


@pytest.mark.parametrize('how', ['array', 'metadata'])
def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, how):
  model_dir = tmp_path / 'run'
  flags = [*NO_EVALUATION, '--gin.checkpoints.CheckpointConfig.period=3']
  assert _run(model_dir, '--gin.TRAIN_STEPS=6', *flags) == 0
  _corrupt(model_dir / 'checkpoints' / '6', how)
  capsys.readouterr()
  assert _run(model_dir, '--gin.TRAIN_STEPS=8', *flags) == 0
  out = capsys.readouterr().out
  assert 'checkpoint step 6 in' in out and 'does not restore' in out
  assert 'Resumed from' in out and 'at step 3' in out
  # Nothing is deleted: the bad step is kept aside, and the run saved step 6 anew.
  assert sorted(os.listdir(model_dir / 'checkpoints')) == ['3', '6', '6.corrupt', '8']
  # When no step restores, one line names the directory.
  for step in ('3', '6', '8'):
    _corrupt(model_dir / 'checkpoints' / step, how)
  assert _run(model_dir, '--gin.TRAIN_STEPS=9', *flags) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f'{model_dir}/checkpoints: no checkpoint restores' in err[0]
  assert sorted(os.listdir(model_dir / 'checkpoints')) == ['3', '6', '6.corrupt', '8']


def test_paper_dataset_trains_from_its_gin_files(tmp_path, data_root, capsys):
  from dsbs_jax.data import demo, vocabularies

  demo.register()
  spm = vocabularies.train_sentencepiece(
      vocabularies.task_texts('demo_gt_step_by_step'), str(tmp_path / 'spm'), vocab_size=200
  )
  root = tmp_path / 'data'  # a root no earlier test read, so this run parses and logs it
  shutil.copytree(os.path.join(data_root, 'svamp'), root / 'svamp')
  model_dir = tmp_path / 'svamp'
  assert (
      cli(
          '--gin_file=train.gin',
          '--gin_file=models/t5_1_1/tiny.gin',
          '--gin_file=tasks/svamp.gin',
          '--gin_file=runs/step_by_step.gin',
          '--gin_file=vocabularies/sentencepiece.gin',
          f"--gin.SENTENCEPIECE_MODEL='{spm}'",
          '--gin.EXTRA_IDS=0',
          '--gin.VOCAB_SIZE=256',
          *TINY[1:],
          f"--gin.DATA_ROOT='{root}'",
          "--gin.LABEL_SOURCE='llm'",
          '--gin.TRAIN_FRACTION=0.5',
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 192, 'targets': 16}",
          '--gin.TRAIN_STEPS=10',
          f"--gin.MODEL_DIR='{model_dir}'",
      )
      == 0
  )
  out = capsys.readouterr().out
  assert 'svamp/train: parsed 787/800 teacher outputs, 13 unparseable' in out
  results = json.loads((model_dir / 'results.json').read_text())
  assert set(results['eval']['test']) == {'svamp_llm_label', 'teacher_forced'}
  assert 0.0 <= results['eval']['test']['svamp_llm_label']['equation_accuracy'] <= 100.0
  # The task was registered with the SentencePiece vocabulary the model uses.
  vocab = seqio.get_mixture_or_task('svamp_llm_label').output_features['targets'].vocabulary
  assert isinstance(vocab, seqio.SentencePieceVocabulary) and vocab.vocab_size <= 256


def test_missing_evaluation_data_stops_the_run_before_its_first_step(tmp_path, data_root, capsys):
  root = tmp_path / 'data'
  shutil.copytree(os.path.join(data_root, 'svamp'), root / 'svamp')
  os.remove(root / 'svamp' / 'svamp_test.json')
  model_dir = tmp_path / 'run'
  assert (
      cli(
          '--gin_file=train.gin',
          '--gin_file=models/t5_1_1/tiny.gin',
          '--gin_file=tasks/svamp.gin',
          '--gin_file=runs/step_by_step.gin',
          *TINY[1:],
          f"--gin.DATA_ROOT='{root}'",
          '--gin.TRAIN_STEPS=10',
          f"--gin.MODEL_DIR='{model_dir}'",
      )
      == 2
  )
  captured = capsys.readouterr()
  assert captured.err.strip() == (
      f'dsbs-train: error: {root}/svamp/svamp_test.json: file not found'
  )
  assert 'First step' not in captured.out and not (model_dir / 'checkpoints').exists()


def test_initial_checkpoint_from_huggingface(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = transformers.T5Config(
      vocab_size=384,
      d_model=32,
      d_kv=16,
      d_ff=64,
      num_layers=1,
      num_heads=2,
      feed_forward_proj='gated-gelu',
      tie_word_embeddings=False,
      decoder_start_token_id=0,
  )
  torch.manual_seed(0)
  hf_dir = tmp_path / 'hf'
  transformers.T5ForConditionalGeneration(cfg).save_pretrained(hf_dir)
  model_dir = tmp_path / 'run'
  assert (
      _run(
          model_dir,
          '--gin.TRAIN_STEPS=1',
          '--gin.LEARNING_RATE=0.0',
          *NO_EVALUATION,
          f"--gin.INITIAL_CHECKPOINT_PATH='{hf_dir}'",
      )
      == 0
  )
  # With a zero learning rate the saved parameters are exactly the HF weights.
  _, expected = hf_checkpoint.load_hf_checkpoint(str(hf_dir))
  jax.tree_util.tree_map(np.testing.assert_array_equal, _params(model_dir, 1), expected)


def _params(model_dir, step, directory='checkpoints'):
  checkpointer = Checkpointer(str(model_dir / directory), async_save=False)
  try:
    return checkpointer.restore_params(None, step)
  finally:
    checkpointer.close()


def test_initial_checkpoint_from_a_dsbs_run_with_another_optimizer(tmp_path):
  first = tmp_path / 'first'
  assert _run(first, '--gin.TRAIN_STEPS=3', *NO_EVALUATION) == 0
  second = tmp_path / 'second'
  # Only the params are read: the second run's Adafactor state has another structure.
  assert (
      _run(
          second,
          '--gin.TRAIN_STEPS=1',
          '--gin.LEARNING_RATE=0.0',
          *NO_EVALUATION,
          "--gin.optimizers.create_optimizer.name='adafactor'",
          f"--gin.INITIAL_CHECKPOINT_PATH='{first}'",
      )
      == 0
  )
  jax.tree_util.tree_map(np.testing.assert_array_equal, _params(first, 3), _params(second, 1))


def test_memory_plan_for_a_mesh_without_its_devices(capsys):
  # 16 devices on the model axis: more than this process has (8).
  assert (
      cli(
          '--gin_file=train.gin',
          '--gin_file=models/t5_1_1/xxl.gin',
          '--gin_file=tasks/svamp.gin',
          '--gin.VOCAB_SIZE=32128',
          "--gin.PARTITIONING='fsdp'",
          '--gin.NUM_PARTITIONS=16',
          '--gin.BATCH_SIZE=128',
          '--plan=16x16',
      )
      == 0
  )
  out = capsys.readouterr().out
  assert "mesh {'data': 16, 'model': 16} (256 devices)" in out
  lines = out.splitlines()
  line = next(row for row in lines if row.startswith('decoder/layers_0/mlp/wi_0/kernel'))
  assert "('data', 'model')" in line and line.split()[-1] == f'{4096 * 10240 * 4 / 256 / 2**20:.2f}'
  total = next(row for row in lines if row.startswith('per device:'))
  # 11B float32 parameters over 256 devices: ~0.16 GiB each; Adam moments twice that.
  assert 'params 0.16 GiB' in total and 'optimizer state 0.32 GiB' in total
  assert (
      cli(
          '--gin_file=train.gin',
          '--gin_file=models/t5_1_1/tiny.gin',
          '--gin_file=tasks/svamp.gin',
          '--gin.NUM_PARTITIONS=8',
          '--plan=32x4',
      )
      == 2
  )
  assert 'NUM_PARTITIONS = 8' in capsys.readouterr().err
  plan = ('--gin_file=train.gin', '--gin_file=models/t5_1_1/tiny.gin', '--gin_file=tasks/svamp.gin')
  assert cli(*plan, '--gin.NUM_MICROBATCHES=4', '--plan=8x1') == 0
  assert 'activations ~0.24 GiB (estimate, one of 4 microbatches)' in capsys.readouterr().out
  assert cli(*plan, '--gin.NUM_MICROBATCHES=3', '--plan=8x1') == 0  # 128 rows padded to 144
  assert 'activations ~0.35 GiB (estimate, one of 3 microbatches)' in capsys.readouterr().out
  # At T5's vocabulary the logits dominate; LOSS_CHUNK_LENGTH keeps 64 positions' of 384.
  activations = {}
  for chunk in ('None', '64'):
    assert (
        cli(*plan, '--gin.VOCAB_SIZE=32128', f'--gin.LOSS_CHUNK_LENGTH={chunk}', '--plan=8x1') == 0
    )
    (activations[chunk],) = re.findall(r'activations ~([\d.]+) GiB', capsys.readouterr().out)
  assert activations == {'None': '3.12', '64': '1.28'}
