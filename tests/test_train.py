"""End to end through the CLI: a short run learns, writes its outputs, resumes; bad input
gets one clear message."""

import concurrent.futures
import glob
import json
import os

import gin
import pytest
import seqio
import tensorflow as tf

from dsbs_jax import train

TINY = [
    '--gin_file=demo.gin',
    '--gin.network.T5Config.emb_dim=32', '--gin.network.T5Config.num_heads=2',
    '--gin.network.T5Config.head_dim=16', '--gin.network.T5Config.mlp_dim=64',
    '--gin.network.T5Config.num_encoder_layers=1', '--gin.network.T5Config.num_decoder_layers=1',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 64}", '--gin.BATCH_SIZE=8',
    '--gin.train.train.log_period=10', '--gin.train.train.checkpoint_period=20',
    '--gin.train.train.eval_num_examples=16', '--gin.optimizers.create_optimizer.warmup_steps=5',
    '--gin.train.train.eval_period=20',
]


@pytest.fixture(autouse=True)
def _fresh_gin():
  yield
  gin.clear_config()


def _run(model_dir, *extra):
  gin.clear_config()
  return train.main(['dsbs-train', *TINY, f"--gin.MODEL_DIR='{model_dir}'", *extra])


def _events(path):
  scalars = {}
  for f in glob.glob(os.path.join(path, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(f):
      for v in event.summary.value:
        scalars.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
  return scalars


def test_short_run_learns_writes_outputs_and_resumes(tmp_path, capsys):
  model_dir = tmp_path / 'run'
  assert _run(model_dir, '--gin.TRAIN_STEPS=40') == 0
  out = capsys.readouterr().out
  assert 'steps/s' in out and 'ETA' in out
  rows = [json.loads(line) for line in (model_dir / 'train' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [10, 20, 30, 40]
  assert rows[-1]['loss'] < 0.7 * rows[0]['loss']
  assert rows[-1]['label/loss'] < rows[0]['label/loss']
  assert rows[-1]['rationale/loss'] < rows[0]['rationale/loss']
  # TensorBoard events round-trip to the same numbers as the JSONL copy.
  events = _events(model_dir / 'train')
  for r in rows:
    assert events['loss'][r['step']] == pytest.approx(r['loss'], rel=1e-6)
  assert {'steps_per_sec', 'tokens_per_sec', 'learning_rate', 'grad_norm'} <= set(events)
  assert sorted(os.listdir(model_dir / 'checkpoints'))[-1] == '40'
  assert (model_dir / 'inference_eval' / 'validation' / 'demo_gt_label-000020.jsonl').exists()
  # Model selection on validation: the best state is kept and scores the test split once.
  results = json.loads((model_dir / 'results.json').read_text())
  best = results['best']
  assert best['metric'] == 'demo_gt_label/equation_accuracy' and best['step'] in (20, 40)
  assert sorted(os.listdir(model_dir / 'best')) == [str(best['step'])]
  validation = [json.loads(line) for line in
                (model_dir / 'eval' / 'validation' / 'metrics.jsonl').read_text().splitlines()]
  assert [v['step'] for v in validation] == [20, 40]
  assert best['value'] == max(v[best['metric']] for v in validation)
  assert {'teacher_forced/label/loss', 'teacher_forced/rationale/loss'} <= set(validation[0])
  predictions = model_dir / 'inference_eval' / 'test' / f'demo_gt_label-{best["step"]:06d}.jsonl'
  lines = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert len(lines) == 16 and {'prediction', 'target'} <= set(lines[0])
  assert 0.0 <= results['eval']['test']['demo_gt_label']['equation_accuracy'] <= 100.0
  assert list(results['eval']) == ['test']
  # Running again with more steps resumes from the checkpoint at step 40.
  assert _run(model_dir, '--gin.TRAIN_STEPS=50') == 0
  assert 'Resumed from' in capsys.readouterr().out
  assert sorted(os.listdir(model_dir / 'checkpoints'), key=int)[-1] == '50'


def test_paper_dataset_trains_from_its_gin_files(tmp_path, data_root, capsys):
  from dsbs_jax.data import benchmarks, demo, vocabularies
  demo.register()
  spm = vocabularies.train_sentencepiece(vocabularies.task_texts('demo_gt_step_by_step'),
                                         str(tmp_path / 'spm'), vocab_size=200)
  gin.clear_config()
  benchmarks._released.cache_clear()  # so that the parse report is logged by this run
  model_dir = tmp_path / 'svamp'
  assert train.main([
      'dsbs-train', '--gin_file=train.gin', '--gin_file=models/t5_1_1/tiny.gin',
      '--gin_file=tasks/svamp.gin', '--gin_file=runs/step_by_step.gin',
      '--gin_file=vocabularies/sentencepiece.gin', f"--gin.SENTENCEPIECE_MODEL='{spm}'",
      '--gin.EXTRA_IDS=0', '--gin.VOCAB_SIZE=256', *TINY[1:],
      f"--gin.DATA_ROOT='{data_root}'", "--gin.LABEL_SOURCE='llm'", '--gin.TRAIN_FRACTION=0.5',
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 192, 'targets': 16}", '--gin.TRAIN_STEPS=10',
      f"--gin.MODEL_DIR='{model_dir}'"]) == 0
  out = capsys.readouterr().out
  assert 'svamp/train: parsed 787/800 teacher outputs, 13 unparseable' in out
  results = json.loads((model_dir / 'results.json').read_text())
  assert set(results['eval']['test']) == {'svamp_llm_label', 'teacher_forced'}
  assert 0.0 <= results['eval']['test']['svamp_llm_label']['equation_accuracy'] <= 100.0
  # The task was registered with the SentencePiece vocabulary the model uses.
  vocab = seqio.get_mixture_or_task('svamp_llm_label').output_features['targets'].vocabulary
  assert isinstance(vocab, seqio.SentencePieceVocabulary) and vocab.vocab_size <= 256


@pytest.mark.parametrize('args,message', [
    (["--gin.DATASET='demoo'"], "'demoo_gt_step_by_step' is not a registered SeqIO task or "
                                'mixture. Did you mean: demo_gt_step_by_step'),
    (["--gin.TASK_FEATURE_LENGTHS={'inputs': 0, 'targets': 64}"],
     "TASK_FEATURE_LENGTHS['inputs'] must be an integer >= 1"),
    (['--gin.BATCH_SIZE=0'], 'BATCH_SIZE must be >= 1'),
    (['--gin.undefined_thing.x=1'], 'gin configuration error'),
])
def test_bad_settings_get_one_clear_message(tmp_path, capsys, args, message):
  assert _run(tmp_path / 'run', '--gin.TRAIN_STEPS=1', *args) == 2
  err = capsys.readouterr().err
  assert message in err
  assert 'Traceback' not in err


def test_unwritable_model_dir(tmp_path, capsys):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  assert _run(blocker / 'run', '--gin.TRAIN_STEPS=1') == 2
  assert f"MODEL_DIR '{blocker / 'run'}' cannot be written" in capsys.readouterr().err


def test_processes_check_one_model_dir_at_the_same_time(tmp_path):
  # Every process of a multi-host run probes the shared MODEL_DIR as it starts.
  def probe_many(_):
    for _ in range(200):
      train._check_model_dir(str(tmp_path / 'run'))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(probe_many, range(4)))
  assert os.listdir(tmp_path / 'run') == []


@pytest.mark.parametrize('args,missing', [
    (['--gin_file=train.gin', '--gin_file=models/t5_1_1/tiny.gin'],
     'the macro DATASET has no value'),
    (['--gin_file=train.gin', "--gin.DATASET='demo'"], "'emb_dim'"),  # no model size
])
def test_missing_required_binding(tmp_path, capsys, args, missing):
  gin.clear_config()
  assert train.main(['dsbs-train', *args, f"--gin.MODEL_DIR='{tmp_path}'"]) == 2
  err = capsys.readouterr().err
  assert 'gin configuration error' in err and missing in err and 'Traceback' not in err


def test_gin_dot_flags_are_rewritten_as_bindings():
  assert train._rewrite_gin_args(['x', '--gin.A.b=3', '--gin_file=f.gin']) == [
      'x', '--gin_bindings=A.b = 3', '--gin_file=f.gin']


def test_initial_checkpoint_from_huggingface(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  import numpy as np
  from dsbs_jax import hf_checkpoint
  from dsbs_jax.checkpoints import Checkpointer
  cfg = transformers.T5Config(vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                              num_heads=2, feed_forward_proj='gated-gelu',
                              tie_word_embeddings=False, decoder_start_token_id=0)
  torch.manual_seed(0)
  hf_dir = tmp_path / 'hf'
  transformers.T5ForConditionalGeneration(cfg).save_pretrained(hf_dir)
  model_dir = tmp_path / 'run'
  assert _run(model_dir, '--gin.TRAIN_STEPS=1', '--gin.LEARNING_RATE=0.0',
              '--gin.train.train.final_eval_split=None',
              f"--gin.INITIAL_CHECKPOINT_PATH='{hf_dir}'") == 0
  # With a zero learning rate the saved parameters are exactly the HF weights.
  _, expected = hf_checkpoint.load_hf_checkpoint(str(hf_dir))
  restored = Checkpointer(str(model_dir / 'checkpoints'), async_save=False)._manager.restore(1)
  import jax
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get(restored['state']['params']), expected)


def test_initial_checkpoint_from_a_dsbs_run(tmp_path):
  first = tmp_path / 'first'
  quiet = ['--gin.train.train.final_eval_split=None', '--gin.train.train.eval_period=0']
  assert _run(first, '--gin.TRAIN_STEPS=3', *quiet) == 0
  second = tmp_path / 'second'
  assert _run(second, '--gin.TRAIN_STEPS=1', '--gin.LEARNING_RATE=0.0', *quiet,
              f"--gin.INITIAL_CHECKPOINT_PATH='{first / 'checkpoints'}'") == 0
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  params = [jax.device_get(ocp.CheckpointManager(str(d / 'checkpoints')).restore(s)['state'][
      'params']) for d, s in ((first, 3), (second, 1))]
  jax.tree_util.tree_map(np.testing.assert_array_equal, *params)


def test_memory_plan_for_a_mesh_without_its_devices(capsys):
  gin.clear_config()
  assert train.main(['dsbs-train', '--gin_file=train.gin', '--gin_file=models/t5_1_1/xxl.gin',
                     "--gin.DATASET='demo'", '--gin.VOCAB_SIZE=32128', "--gin.PARTITIONING='fsdp'",
                     '--gin.BATCH_SIZE=128', '--plan=32x8']) == 0
  out = capsys.readouterr().out
  assert "mesh {'data': 32, 'model': 8} (256 devices)" in out
  line = next(l for l in out.splitlines() if l.startswith('decoder/layers_0/mlp/wi_0/kernel'))
  assert "('data', 'model')" in line and line.split()[-1] == f'{4096 * 10240 * 4 / 256 / 2**20:.2f}'
  total = next(l for l in out.splitlines() if l.startswith('per device:'))
  # 11B float32 parameters over 256 devices: ~0.16 GiB each; Adam moments twice that.
  assert 'params 0.16 GiB' in total and 'optimizer state 0.32 GiB' in total


class _Syntax(gin.config_parser.ParserDelegate):
  def configurable_reference(self, scoped_configurable_name, evaluate):
    return scoped_configurable_name

  def macro(self, macro_name):
    return macro_name


def test_every_gin_file_parses_and_its_includes_exist():
  """Syntax and includes of every file, t5x_bridge.gin too (which only t5x can load)."""
  root = os.path.join(os.path.dirname(train.__file__), '..', 'gin')
  files = glob.glob(os.path.join(root, '**', '*.gin'), recursive=True)
  assert len(files) > 20
  for path in files:
    with open(path) as f:
      statements = list(gin.config_parser.ConfigParser(f, _Syntax()))
    for s in statements:
      if isinstance(s, gin.config_parser.IncludeStatement) and not s.filename.startswith('t5x/'):
        assert os.path.isfile(os.path.join(root, s.filename)), (path, s.filename)
