"""Paths are URLs: every file a run reads or writes, on a real Cloud Storage API on loopback
(fake-gcs-server), through gcsfs (etils.epath) and TensorStore (Orbax's arrays)."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest

from conftest import SUBPROCESS_ENV, TINY_MODEL, cli, serves_its_test_predictions
from dsbs_jax import monitoring, storage
from dsbs_jax.data import benchmarks, custom
from dsbs_jax.errors import ConfigError, DataError


def test_files_round_trip_on_the_emulator(gcs):
  storage.write_atomic('gs://dsbs/unit/a.txt', 'first')
  storage.write_atomic('gs://dsbs/unit/a.txt', 'second')
  assert storage.read_text('gs://dsbs/unit/a.txt') == 'second'
  lines = storage.AppendFile('gs://dsbs/unit/log.jsonl')
  lines.write('1\n')
  lines.flush()
  lines.close()
  resumed = storage.AppendFile('gs://dsbs/unit/log.jsonl')  # a restart keeps what was there
  resumed.write('2\n')
  resumed.close()
  assert storage.read_text('gs://dsbs/unit/log.jsonl') == '1\n2\n'
  with pytest.raises(DataError, match=r'gs://dsbs/unit/missing\.txt: file not found'):
    storage.read_text('gs://dsbs/unit/missing.txt')
  storage.write_atomic('gs://dsbs/unit/latin1.jsonl', b'{}\n{"a": "caf\xe9"}\n')
  with pytest.raises(DataError, match=r'latin1\.jsonl:2: not valid UTF-8'):
    storage.read_text('gs://dsbs/unit/latin1.jsonl')
  assert storage.check_writable('gs://dsbs/unit/dir', 'MODEL_DIR').name == 'dir'
  with pytest.raises(ConfigError, match="MODEL_DIR 'gs://no-such-bucket/x' cannot be written"):
    storage.check_writable('gs://no-such-bucket/x', 'MODEL_DIR')


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_a_metrics_line_cut_by_a_kill_is_kept_and_the_next_starts_anew(where, tmp_path, request):
  """SIGKILL can stop an append part-way; a restart's metrics start a line of their
  own after the cut one, which stays (readers skip what does not parse)."""
  base = str(tmp_path) if where == 'local' else 'gs://dsbs/cut'
  if where == 'gs':
    request.getfixturevalue('gcs')
  storage.write_atomic(f'{base}/metrics.jsonl', '{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
  for step in (3, 4):  # the second writer finds complete lines and adds no blank one
    writer = monitoring.MetricWriter(base)
    writer.write(step, {'loss': 1.0})
    writer.close()
  assert storage.read_text(f'{base}/metrics.jsonl').splitlines() == [
      '{"step": 1, "loss": 3.0}',
      '{"step": 2, "lo',
      '{"step": 3, "loss": 1.0}',
      '{"step": 4, "loss": 1.0}',
  ]


def test_processes_probe_one_model_dir_at_the_same_time(tmp_path):
  """Every process of a multi-host run checks the shared MODEL_DIR as it starts; one
  shared probe file once raced (one process removed it under another)."""

  def probe_many(_):
    for _ in range(200):
      storage.check_writable(str(tmp_path / 'run'), 'MODEL_DIR')

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(probe_many, range(4)))
  assert os.listdir(tmp_path / 'run') == []


def test_tensorboard_events_on_the_emulator_read_back(gcs, tmp_path):
  from tensorboard.backend.event_processing import event_accumulator

  writer = monitoring.MetricWriter('gs://dsbs/tb/train')
  writer.write(1, {'loss': 2.5})
  writer.write(2, {'loss': 1.5})
  writer.write_text(2, {'config': 'TRAIN_STEPS = 2'})
  writer.close()
  for path in storage.resolve('gs://dsbs/tb/train').iterdir():
    (tmp_path / path.name).write_bytes(path.read_bytes())
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={'tensors': 0})
  events.Reload()
  assert [(e.step, e.tensor_proto.float_val[0]) for e in events.Tensors('loss')] == [
      (1, 2.5),
      (2, 1.5),
  ]
  assert events.Tensors('config')[0].tensor_proto.string_val == [b'TRAIN_STEPS = 2']
  assert [
      json.loads(line)['loss']
      for line in storage.read_text('gs://dsbs/tb/train/metrics.jsonl').splitlines()
  ] == [2.5, 1.5]


def test_readers_take_urls(gcs, data_root, tmp_path):
  fs = fsspec.filesystem('gs')
  fs.put(os.path.join(data_root, 'svamp'), 'dsbs/readers/svamp', recursive=True)
  rows = benchmarks.split_rows('svamp', 'test', root='gs://dsbs/readers')
  assert len(rows) == 200 and rows[0]['label_gt'] == '( 10.0 * 45.0 )'
  storage.write_atomic('gs://dsbs/readers/own/train.csv', 'input,label,rationale\nq,a,r\n')
  storage.write_atomic(
      'gs://dsbs/readers/own/test.jsonl', '{"input": "q", "label": "a", "rationale": "r"}\n'
  )
  family = custom.register(
      'gcs_own',
      files={
          'train': 'gs://dsbs/readers/own/train.csv',
          'test': 'gs://dsbs/readers/own/test.jsonl',
      },
  )
  import seqio

  example = next(
      seqio.get_mixture_or_task(family.label_tasks['gt'])
      .get_dataset({'inputs': 32, 'targets': 8}, split='test', shuffle=False)
      .as_numpy_iterator()
  )
  assert example['inputs_pretokenized'] == b'predict: q'


def test_a_gin_file_in_a_bucket_that_does_not_parse_names_its_url_and_line(gcs, capsys):
  storage.write_atomic('gs://dsbs/gin/inner.gin', "include 'demo.gin'\nMODEL_DIR = /tmp/run\n")
  storage.write_atomic('gs://dsbs/gin/outer.gin', "include 'gs://dsbs/gin/inner.gin'\n")
  capsys.readouterr()
  assert cli('--gin_file=gs://dsbs/gin/outer.gin') == 2
  assert capsys.readouterr().err.strip() == (
      "dsbs-train: error: gs://dsbs/gin/inner.gin:2: gin cannot parse 'MODEL_DIR = /tmp/run': "
      'Unable to parse value (a value is a Python literal, @reference or %MACRO: a string '
      'needs quotes)'
  )


def _read_lines(url):
  return storage.read_text(url).splitlines() if storage.exists(url) else []


@pytest.mark.slow
def test_a_run_on_cloud_storage_trains_is_killed_resumes_and_reports_there(
    gcs, data_root, tmp_path, monkeypatch
):
  """MODEL_DIR, DATA_ROOT and the vocabulary all in the bucket; nothing written locally;
  dsbs-serve serves the run's best/ from there."""
  from dsbs_jax.data import demo, vocabularies

  fs = fsspec.filesystem('gs')
  fs.put(os.path.join(data_root, 'svamp'), 'dsbs/data/svamp', recursive=True)
  demo.register()
  spm = vocabularies.train_sentencepiece(
      vocabularies.task_texts('demo_gt_step_by_step'), 'gs://dsbs/vocab/spm', vocab_size=200
  )
  flags = [
      '--gin_file=train.gin',
      '--gin_file=models/t5_1_1/tiny.gin',
      '--gin_file=tasks/svamp.gin',
      '--gin_file=runs/step_by_step.gin',
      '--gin_file=vocabularies/sentencepiece.gin',
      f"--gin.SENTENCEPIECE_MODEL='{spm}'",
      '--gin.EXTRA_IDS=0',
      '--gin.VOCAB_SIZE=256',
      *TINY_MODEL[1:],
      "--gin.DATA_ROOT='gs://dsbs/data'",
      "--gin.MODEL_DIR='gs://dsbs/run'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 192, 'targets': 16}",
      '--gin.train.train.log_period=1',
      '--gin.checkpoints.CheckpointConfig.period=4',
      '--gin.evaluation.EvaluationConfig.num_examples=8',
  ]
  env = {**SUBPROCESS_ENV, **gcs, 'HOME': str(tmp_path)}  # the vocabulary's local cache too
  cwd = tmp_path / 'cwd'
  cwd.mkdir()

  def start(steps, log):
    return subprocess.Popen(
        [sys.executable, '-m', 'dsbs_jax', *flags, f'--gin.TRAIN_STEPS={steps}'],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

  with open(tmp_path / 'first.log', 'w') as log:
    first = start(10000, log)
    deadline = time.time() + 300
    while len(_read_lines('gs://dsbs/run/train/metrics.jsonl')) < 6:
      assert first.poll() is None, (tmp_path / 'first.log').read_text()
      assert time.time() < deadline, 'no progress'
      time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  with open(tmp_path / 'second.log', 'w') as log:
    second = start(9, log)
    second.wait(timeout=600)
  out = (tmp_path / 'second.log').read_text()
  assert second.returncode == 0, out
  assert 'Resumed from gs://dsbs/run/checkpoints at step 4' in out
  assert [json.loads(line)['step'] for line in _read_lines('gs://dsbs/run/train/metrics.jsonl')][
      -4:
  ] == [6, 7, 8, 9]
  results = json.loads(storage.read_text('gs://dsbs/run/results.json'))
  assert results['step'] == 9 and 'svamp_gt_label' in results['eval']['test']
  assert 'TRAIN_STEPS = 9' in storage.read_text('gs://dsbs/run/config.gin')
  names = {p.name for p in storage.resolve('gs://dsbs/run').iterdir()}
  assert {
      'checkpoints',
      'best',
      'train',
      'eval',
      'inference_eval',
      'config.gin',
      'run.json',
      'results.json',
  } <= names
  assert any(
      p.name.startswith('events.out.tfevents')
      for p in storage.resolve('gs://dsbs/run/train').iterdir()
  )
  steps = sorted(
      int(p.name)
      for p in storage.resolve('gs://dsbs/run/checkpoints').iterdir()
      if p.name.isdigit()
  )
  assert steps[-1] == 9
  best = results['best']['step']
  predictions = f'gs://dsbs/run/inference_eval/test/svamp_gt_label-{best:06d}.jsonl'
  lines = [json.loads(line) for line in _read_lines(predictions)]
  assert len(lines) == 8
  assert os.listdir(cwd) == []
  monkeypatch.setenv('HOME', str(tmp_path))  # the vocabulary's local cache
  serves_its_test_predictions('gs://dsbs/run/best', lines[:3], targets_cut=True)  # of 16
