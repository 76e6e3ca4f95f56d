"""The wheel: built from this tree, installed into a fresh virtualenv outside the checkout,
it carries the gin configs and trains the demo with the documented spellings."""

import glob
import json
import os
import subprocess
import sys
import sysconfig

import pytest

from conftest import NO_EVALUATION, REPO, TINY_MODEL


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_ships_its_configs_and_trains(tmp_path):
  subprocess.run(
      [
          sys.executable,
          '-m',
          'pip',
          'wheel',
          '--no-deps',
          '--no-build-isolation',
          '-q',
          '-w',
          str(tmp_path / 'dist'),
          REPO,
      ],
      check=True,
      capture_output=True,
  )
  (wheel,) = glob.glob(str(tmp_path / 'dist' / 'dsbs_jax-*.whl'))
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  # The dependencies come from this environment; dsbs-jax itself only from the wheel.
  site = subprocess.run(
      [python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
      check=True,
      capture_output=True,
      text=True,
  ).stdout.strip()
  with open(os.path.join(site, 'dependencies.pth'), 'w') as f:
    f.write(sysconfig.get_path('purelib') + '\n')
  subprocess.run(
      [
          sys.executable,
          '-m',
          'pip',
          '--python',
          python,
          'install',
          '--no-deps',
          '--no-index',
          '-q',
          wheel,
      ],
      check=True,
      capture_output=True,
  )
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  where = subprocess.run(
      [python, '-c', 'import dsbs_jax; print(dsbs_jax.__file__)'],
      cwd=elsewhere,
      env=env,
      check=True,
      capture_output=True,
      text=True,
  )
  assert where.stdout.startswith(site), where.stdout
  model_dir = elsewhere / 'run'
  run = subprocess.run(
      [
          str(venv / 'bin' / 'dsbs-train'),
          '--gin_file=gin/demo.gin',
          *TINY_MODEL[1:],
          *NO_EVALUATION,
          '--gin.TRAIN_STEPS=2',
          f"--gin.MODEL_DIR='{model_dir}'",
      ],
      cwd=elsewhere,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert run.returncode == 0, run.stdout + run.stderr
  assert json.loads((model_dir / 'results.json').read_text())['step'] == 2
  # T5X's spelling, relative to the config directory, and an included size file.
  plan = subprocess.run(
      [
          str(venv / 'bin' / 'dsbs-train'),
          '--gin_file=train.gin',
          '--gin_file=models/t5_1_1/small.gin',
          '--gin_file=tasks/cqa.gin',
          '--plan=1x1',
      ],
      cwd=elsewhere,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert plan.returncode == 0, plan.stderr
  assert 'per device: params' in plan.stdout
  # The teacher and serving commands ship as console scripts.
  assert (venv / 'bin' / 'dsbs-teacher').exists() and (venv / 'bin' / 'dsbs-serve').exists()
