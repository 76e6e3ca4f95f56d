"""Experiment grids: a 2x2 grid of tiny runs writes the table and the plots; killed
midway, a restart finishes it without redoing a finished run."""

import io
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import gin
from conftest import REPO, SUBPROCESS_ENV
from dsbs_jax import cli, experiment, plots

GRID = """
from __gin__ import dynamic_registration
from dsbs_jax import experiment

experiment.Grid:
  name = 'tiny'
  output_dir = '{out}'
  gin_files = ['demo.gin']
  methods = ['standard_finetuning', 'step_by_step_gold']
  train_fractions = [0.05, 1.0]
  sizes = {{'narrow': ['models/demo.gin', 'network.T5Config.emb_dim = 32',
                       'network.T5Config.num_heads = 2', 'network.T5Config.head_dim = 16',
                       'network.T5Config.mlp_dim = 64']}}
  seeds = [0]
  bindings = ['TRAIN_STEPS = 3', "TASK_FEATURE_LENGTHS = {{'inputs': 192, 'targets': 64}}",
              'checkpoints.CheckpointConfig.period = 3', 'evaluation.EvaluationConfig.num_examples = 8']
"""


@pytest.mark.slow
def test_a_grid_runs_resumes_after_a_kill_and_writes_its_table_and_plots(tmp_path, capsys):
  out = tmp_path / 'grid'
  config = tmp_path / 'tiny.gin'
  config.write_text(GRID.format(out=out))
  runs = out / 'runs'
  command = [
      sys.executable,
      '-c',
      'from dsbs_jax import cli; cli.experiment_console_main()',
      f'--gin_file={config}',
  ]
  with open(tmp_path / 'first.log', 'w') as log:
    first = subprocess.Popen(
        command, cwd=REPO, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT
    )
  deadline = time.time() + 300
  while not list(runs.glob('*/results.json')):
    assert first.poll() is None, (tmp_path / 'first.log').read_text()
    assert time.time() < deadline
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first.wait(timeout=60)
  (done,) = list(runs.glob('*/results.json'))
  finished_at = done.stat().st_mtime
  # The pod or cluster way: a command per unfinished run (in this process: it only reads).
  gin.clear_config()
  assert cli.experiment_main(['dsbs-experiment', f'--gin_file={config}', '--print_commands']) == 0
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 3 and all(
      line.startswith('dsbs-train --gin_file=demo.gin') for line in printed
  )
  assert not any(done.parent.name in line for line in printed)
  with open(tmp_path / 'second.log', 'w') as log:
    second = subprocess.run(
        command, cwd=REPO, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT, timeout=900
    )
  text = (tmp_path / 'second.log').read_text()
  assert second.returncode == 0, text
  assert 'experiment tiny: 4 runs, 1 finished, 3 to run' in text
  assert 'experiment tiny: 4/4 runs done, 0 left, ETA' in text
  assert done.stat().st_mtime == finished_at  # not redone
  # The table: a row per method, a column per fraction, each cell from one seed.
  table = (out / 'results.md').read_text().splitlines()
  assert table[2] == '| method | 5.0% | 100.0% |'
  rows = {line.split(' | ')[0].lstrip('| '): line for line in table[4:6]}
  assert set(rows) == {'Standard finetuning', 'Distilling step-by-step (gold labels) (λ=1)'}
  assert all(line.count('(1)') == 2 for line in rows.values())
  assert len((out / 'results.csv').read_text().splitlines()) == 5
  assert len((out / 'results.jsonl').read_text().splitlines()) == 4
  # The plots: PNGs of the figure's size, with one series per method.
  for name in ('accuracy_vs_data.png', 'accuracy_vs_size.png'):
    image = Image.open(io.BytesIO((out / name).read_bytes()))
    assert image.format == 'PNG'
    assert image.size == (plots.FIGSIZE[0] * plots.DPI, plots.FIGSIZE[1] * plots.DPI)
  grid = experiment.Grid(
      name='tiny',
      output_dir=str(out),
      gin_files=['demo.gin'],
      methods=['standard_finetuning', 'step_by_step_gold'],
      train_fractions=[0.05, 1.0],
      sizes={'narrow': []},
  )
  records = experiment.collect(grid)
  for figure in (plots.against_data(grid, records), plots.against_size(grid, records)):
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert legend == [
        experiment.LABELS['standard_finetuning'],
        experiment.LABELS['step_by_step_gold'],
    ]
