"""Faults a pod has, done for real in subprocesses: SIGKILL and restart, a kill during a
save, SIGTERM preemption, and a diverging run."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import NO_EVALUATION, REPO, SUBPROCESS_ENV, TINY_MODEL, cli

# Dropout on, so that exact resume covers the dropout RNG too.
MODEL = [
    *TINY_MODEL,
    '--gin.DROPOUT_RATE=0.1',
    '--gin.train.train.log_period=1',
    *NO_EVALUATION,
    '--gin.checkpoints.CheckpointConfig.period=5',
]


def _start(model_dir, *extra):
  """A dsbs-train process whose output goes to a file (a pipe nobody reads would fill)."""
  with open(model_dir.parent / f'{model_dir.name}.log', 'a') as log:
    return subprocess.Popen(
        [sys.executable, '-m', 'dsbs_jax', *MODEL, *extra, f"--gin.MODEL_DIR='{model_dir}'"],
        cwd=REPO,
        env=SUBPROCESS_ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _output(proc, model_dir, timeout):
  proc.wait(timeout=timeout)
  return (model_dir.parent / f'{model_dir.name}.log').read_text()


def _rows(model_dir):
  """metrics.jsonl's complete records. A line without its end is being appended as
  this reads (one across a page boundary is seen in parts), and one that does not
  parse was cut short by SIGKILL: the restart begins a new line after it."""
  path = model_dir / 'train' / 'metrics.jsonl'
  text = path.read_text() if path.exists() else ''
  rows = []
  for line in text[: text.rfind('\n') + 1].splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def _steps_done(model_dir):
  rows = _rows(model_dir)
  return rows[-1]['step'] if rows else 0


def _wait_for(condition, timeout=240):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)


def _final_losses(model_dir):
  # A restart rewrites the steps after its checkpoint.
  return {row['step']: row['loss'] for row in _rows(model_dir)}


def _params(model_dir, step):
  manager = ocp.CheckpointManager(str(model_dir / 'checkpoints'))
  return jax.device_get(manager.restore(step)['state']['params'])


@pytest.mark.slow
def test_sigkill_and_sigterm_restarts_resume_exactly(tmp_path):
  """SIGKILL, a restart, SIGTERM (preemption: save and exit 0), a restart: every step
  and the final params equal an uninterrupted run's, bitwise."""
  steps = '--gin.TRAIN_STEPS=60'
  straight = tmp_path / 'straight'
  assert _start(straight, steps).wait(timeout=300) == 0
  run = tmp_path / 'run'
  proc = _start(run, steps)
  _wait_for(lambda: _steps_done(run) >= 12)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = _steps_done(run)
  assert killed_at < 60, 'the run finished before it could be killed'

  proc = _start(run, steps)  # resumes from an earlier step, then logs past `killed_at`
  _wait_for(lambda: _steps_done(run) >= killed_at + 3)
  proc.send_signal(signal.SIGTERM)
  out = _output(proc, run, timeout=120)
  assert proc.returncode == 0, out
  (resumed,) = re.findall(rf'Resumed from {run}/checkpoints at step (\d+)', out)
  assert int(resumed) <= killed_at  # after SIGKILL, from the killed run's checkpoint
  saved = max(int(s) for s in os.listdir(run / 'checkpoints'))
  assert f'SIGTERM: saved step {saved}' in out
  assert killed_at + 3 <= saved < 60, 'the run finished before SIGTERM'

  proc = _start(run, steps)
  out = _output(proc, run, timeout=300)
  assert proc.returncode == 0, out
  assert f'Resumed from {run}/checkpoints at step {saved}' in out
  assert _final_losses(run) == _final_losses(straight)  # every step, bitwise
  jax.tree_util.tree_map(np.testing.assert_array_equal, _params(run, 60), _params(straight, 60))


_SAVER = textwrap.dedent("""
    import sys, numpy as np
    from dsbs_jax.checkpoints import Checkpointer
    ckpt = Checkpointer(sys.argv[1], save_interval_steps=1, max_to_keep=2, async_save=False)
    step = (ckpt.latest_step() or 0) + 1
    while True:
      state = {'w': np.full((4_000_000,), step, np.float32), 'b': np.arange(1000) * step}
      ckpt.save(step, state, batches_consumed=step)
      print(step, flush=True)
      step += 1
""")


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_restorable(tmp_path):
  directory = str(tmp_path / 'ckpt')
  from dsbs_jax.checkpoints import Checkpointer

  for delay in (0.3, 0.55, 0.8):
    proc = subprocess.Popen(
        [sys.executable, '-c', _SAVER, directory],
        cwd=REPO,
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    proc.stdout.readline()  # at least one save finished
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    checkpointer = Checkpointer(directory, async_save=False)
    step = checkpointer.latest_step()
    abstract = {
        'w': jax.ShapeDtypeStruct((4_000_000,), np.float32),
        'b': jax.ShapeDtypeStruct((1000,), np.int64),
    }
    state, consumed = checkpointer.restore(abstract)
    checkpointer.close()
    assert consumed == step
    assert float(state['w'][0]) == float(state['w'][-1]) == step
    np.testing.assert_array_equal(state['b'], np.arange(1000) * step)


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  model_dir = tmp_path / 'run'
  code = cli(
      *MODEL,
      f"--gin.MODEL_DIR='{model_dir}'",
      '--gin.TRAIN_STEPS=20',
      '--gin.checkpoints.CheckpointConfig.period=2',
      '--gin.LEARNING_RATE=1e38',
      '--gin.optimizers.create_optimizer.warmup_steps=4',
  )
  err = capsys.readouterr().err
  assert code == 2
  assert 'param_norm is inf at step 2; stopping before saving it' in err
  assert 'kept (step 1)' in err
  assert os.listdir(model_dir / 'checkpoints') == ['1']
  params = _params(model_dir, 1)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
