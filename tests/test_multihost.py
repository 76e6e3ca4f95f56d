"""Multi-host training for real: jax.distributed processes on localhost (gloo collectives),
started by launch/local_multihost.sh, against one process with the same global devices."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_MODEL, XLA_FLAGS

FLAGS = [
    *TINY_MODEL,
    '--gin.TRAIN_STEPS=6',
    '--gin.train.train.log_period=1',
    '--gin.evaluation.EvaluationConfig.period=0',
    '--gin.evaluation.EvaluationConfig.num_examples=8',
    '--gin.input_pipeline.DatasetConfig.num_input_shards=2',
    '--gin.NUM_PARTITIONS=2',
    '--gin.checkpoints.CheckpointConfig.period=3',
]


def _env(devices):
  return dict(
      os.environ,
      XLA_FLAGS=XLA_FLAGS.format(devices),
      JAX_PLATFORMS='cpu',
      PYTHONPATH=REPO,
      # launch/local_multihost.sh runs `python3`: this interpreter's, venv activated or not.
      PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')]),
  )


def _losses(model_dir):
  rows = [
      json.loads(line) for line in (model_dir / 'train' / 'metrics.jsonl').read_text().splitlines()
  ]
  return [(r['step'], r['loss']) for r in rows]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path):
  single = tmp_path / 'single'
  subprocess.run(
      [sys.executable, '-m', 'dsbs_jax', *FLAGS, f"--gin.MODEL_DIR='{single}'"],
      env=_env(8),
      cwd=REPO,
      check=True,
      capture_output=True,
      timeout=300,
  )
  multi = tmp_path / 'multi'
  run = subprocess.run(
      ['bash', 'launch/local_multihost.sh', '2', '4', *FLAGS, f"--gin.MODEL_DIR='{multi}'"],
      env=dict(_env(4), LOG_DIR=str(tmp_path / 'logs')),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  logs = {p.name: p.read_text() for p in (tmp_path / 'logs').iterdir()}
  assert run.returncode == 0, logs
  assert 'process 1 of 2; 4 local / 8 global devices' in logs['process_1.log']
  single_losses, multi_losses = _losses(single), _losses(multi)
  assert [s for s, _ in multi_losses] == [1, 2, 3, 4, 5, 6]
  assert [s for s, _ in single_losses] == [s for s, _ in multi_losses]
  for (_, a), (_, b) in zip(single_losses, multi_losses, strict=True):
    assert b == pytest.approx(a, rel=1e-5)
  # Evaluation decodes across both processes and scores the same as one process.
  results = [json.loads((d / 'results.json').read_text())['eval'] for d in (single, multi)]
  assert results[0]['test']['demo_gt_label'] == results[1]['test']['demo_gt_label']
  assert results[1]['test']['teacher_forced']['loss'] == pytest.approx(
      results[0]['test']['teacher_forced']['loss'], rel=1e-5
  )
  # The processes wrote each checkpoint together, as the single process did.
  assert os.listdir(multi / 'checkpoints') and sorted(os.listdir(multi / 'checkpoints')) == sorted(
      os.listdir(single / 'checkpoints')
  )
