"""The command line's contract: every setting takes effect or is refused, and a user error
is one line on stderr with exit status 2."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import seqio

import gin
from conftest import NO_EVALUATION, REPO, TINY_MODEL, cli
from dsbs_jax import gin_utils
from dsbs_jax.errors import ConfigError

QUICK = [*TINY_MODEL, '--gin.TRAIN_STEPS=1', *NO_EVALUATION]
SVAMP = [
    '--gin_file=train.gin',
    '--gin_file=models/t5_1_1/tiny.gin',
    '--gin_file=tasks/svamp.gin',
    '--gin_file=runs/step_by_step.gin',
]


def _one_line_error(capsys, *args) -> str:
  capsys.readouterr()
  assert cli(*args) == 2
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in err, err
  assert lines[0].startswith('dsbs-train: error: ')
  return lines[0]


def _write_jsonl(path, rows, blank_lines_after=()):
  lines = []
  for i, row in enumerate(rows):
    lines.append(json.dumps(row))
    if i in blank_lines_after:
      lines.append('')
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def _custom_rows(n):
  return [
      {'input': f'question {i}', 'label': f'answer {i % 3}', 'rationale': f'because {i}'}
      for i in range(n)
  ]


def _custom(tmp_path, test_rows=None):
  files = {
      'train': _write_jsonl(tmp_path / 'train.jsonl', _custom_rows(30)),
      'test': _write_jsonl(tmp_path / 'test.jsonl', test_rows or _custom_rows(5)),
  }
  return [
      '--gin_file=train.gin',
      '--gin_file=models/t5_1_1/tiny.gin',
      '--gin_file=tasks/custom.gin',
      '--gin_file=runs/step_by_step.gin',
      f'--gin.custom.register.files={files!r}',
  ]


@pytest.mark.parametrize(
    'args,message',
    [
        (
            ["--gin.MIXTURE_OR_TASK_NAME='demo_gt_label'"],
            "MIXTURE_OR_TASK_NAME 'demo_gt_label' disagrees with DATASET (demo)",
        ),
        (
            ["--gin.TASK_FEATURE_LENGTHS={'inputs': 0, 'targets': 64}"],
            "TASK_FEATURE_LENGTHS['inputs'] must be an integer >= 1",
        ),
        (['--gin.BATCH_SIZE=0'], 'BATCH_SIZE must be >= 1'),
        (
            ['--gin.evaluation.EvaluationConfig.max_input_widths=0'],
            'evaluation.EvaluationConfig.max_input_widths must be an integer >= 1; got 0',
        ),
        (
            ['--gin.evaluation.EvaluationConfig.max_input_widths=2.5'],
            'evaluation.EvaluationConfig.max_input_widths must be an integer >= 1; got 2.5',
        ),
        (['--gin.undefined_thing.x=1'], 'gin configuration error: No configurable matching'),
        (['--gin.NOPE=1'], 'the macro NOPE (--gin.NOPE) is set but nothing in this run reads it'),
        (
            ["--gin_bindings=include 'models/demo.gin'", '--gin.NOPE=1'],
            'the macro NOPE (--gin.NOPE) is set but nothing in this run reads it',
        ),
        (['--gin.TRAIN_STEP=5'], 'nothing in this run reads it (did you mean TRAIN_STEPS'),
        (['--gin.LAMBDA=-1.0'], 'LAMBDA must be >= 0; got -1.0'),
        (
            ['--gin.network.T5Config.float32_attention_logits=False'],
            'T5Config.float32_attention_logits=False has no effect with dtype float32',
        ),
        (['--gin.ALPHA=0.5'], 'set exactly one of LAMBDA'),
        (
            ['--gin.LAMBDA=0.0'],
            "gives no weight to the rationales that 'demo_gt_step_by_step' trains on",
        ),
        (["--gin.TASK_VARIANT='standard'"], "'demo_gt_standard' has no rationale examples"),
        (['--gin_file=nowhere.gin'], 'gin configuration error: Unable to open file: nowhere.gin'),
        (
            ["--gin.INITIAL_CHECKPOINT_PATH='/nonexistent/ckpt'"],
            'INITIAL_CHECKPOINT_PATH /nonexistent/ckpt: neither a HF save_pretrained directory',
        ),
        (["--gin.vocabularies.sentencepiece.path='x'"], 'gin configuration error: No configurable'),
        (
            ['--gin.MODEL_DIR=/tmp/run'],
            "binding 'MODEL_DIR = /tmp/run': Unable to parse value (a value is a Python literal",
        ),
        (
            ["--gin.TASK_FEATURE_LENGTHS={'inputs': 8"],
            '8": EOF in multi-line statement (a bracket or quote left open)',
        ),
    ],
)
def test_bad_settings_get_one_clear_line(tmp_path, capsys, args, message):
  line = _one_line_error(capsys, *QUICK, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", *args)
  assert message in line


@pytest.mark.parametrize('files', [[], ['--gin_file=model.gin']])
def test_gin_files_that_configure_no_training_are_refused(capsys, files):
  line = _one_line_error(capsys, *files)
  assert 'no gin file configures train.train' in line
  assert f"--gin_file: {'model.gin' if files else 'none'}" in line


def test_a_binding_no_configurable_in_the_run_reads_names_its_file_and_line(tmp_path, capsys):
  extra = tmp_path / 'extra.gin'
  extra.write_text(
      'from __gin__ import dynamic_registration\n'
      'from dsbs_jax.data import vocabularies\n\n'
      "vocabularies.sentencepiece.path = 'my.model'\n"
  )
  line = _one_line_error(
      capsys, *QUICK, f'--gin_file={extra}', f"--gin.MODEL_DIR='{tmp_path / 'run'}'"
  )
  assert (
      f'the binding dsbs_jax.data.vocabularies.sentencepiece.path ({extra}:4) is set but '
      'nothing in this run reads it'
  ) in line


def test_a_gin_file_that_does_not_parse_names_its_file_and_line(tmp_path, capsys):
  inner, outer = tmp_path / 'inner.gin', tmp_path / 'outer.gin'
  inner.write_text("include 'demo.gin'\n\nBATCH_SIZE = eight\n")
  outer.write_text(f"include '{inner}'\n")
  line = _one_line_error(capsys, f'--gin_file={outer}')
  assert f"{inner}:3: gin cannot parse 'BATCH_SIZE = eight': Unable to parse value" in line


def test_the_syntax_check_reads_as_gin_reads(tmp_path):
  """Old Mac line ends, and a value or block split over several bindings (gin joins
  them), parse; bindings that only fail together are refused, naming one."""
  cr = tmp_path / 'cr.gin'
  cr.write_bytes(b'X = 1\rY = [2,\r  3]\r')
  split = ['Z = [1,', '2]', 'f:', '  a = 3']
  gin_utils._all_statements([str(cr)], split)  # pylint: disable=protected-access
  gin.parse_config_files_and_bindings([str(cr)], split, finalize_config=False, skip_unknown=True)
  gin.clear_config()
  with pytest.raises(ConfigError, match=r"gin cannot parse the binding '  Y = 2': unindent"):
    gin_utils._all_statements([], ['    X = 1', '  Y = 2'])  # pylint: disable=protected-access
  with pytest.raises(ConfigError, match=r"the binding 'X = \[1': EOF in multi-line"):
    gin_utils._all_statements([], ['X = [1', 'Y = 2'])  # pylint: disable=protected-access


def test_an_override_that_another_binding_undoes_is_refused(tmp_path, capsys):
  # Binding train.train.model_dir directly leaves demo.gin's MODEL_DIR unread.
  line = _one_line_error(capsys, *QUICK, f"--gin.train.train.model_dir='{tmp_path / 'run'}'")
  assert 'the macro MODEL_DIR' in line and 'gin/demo.gin:' in line


def test_explicit_task_names_keep_every_data_setting(tmp_path, data_root):
  """Naming the task adds nothing and loses nothing: DATA_ROOT, TRAIN_FRACTION and
  DATA_SEED given in gin still pick the rows (this once trained on all 800 rows)."""
  from dsbs_jax.data import benchmarks

  assert (
      cli(
          *SVAMP,
          f"--gin.DATA_ROOT='{data_root}'",
          '--gin.TRAIN_FRACTION=0.25',
          '--gin.DATA_SEED=3',
          "--gin.MIXTURE_OR_TASK_NAME='svamp_gt_step_by_step'",
          '--plan=1x1',
      )
      == 0
  )
  rows = list(
      seqio.get_mixture_or_task('svamp_gt_label')
      .get_dataset({'inputs': 512, 'targets': 64}, split='train', shuffle=False)
      .as_numpy_iterator()
  )
  expected = benchmarks.split_rows('svamp', 'train', root=data_root, train_fraction=0.25, seed=3)
  assert [r['inputs_pretokenized'].decode() for r in rows] == [
      'predict: ' + r['input'] for r in expected
  ]
  assert len(rows) == 180  # 800 * 0.25, less the 10% held out for validation


def test_explicit_name_of_a_custom_dataset_registers_it(tmp_path):
  args = _custom(tmp_path)
  assert cli(*args, "--gin.MIXTURE_OR_TASK_NAME='custom_gt_step_by_step'", '--plan=1x1') == 0
  assert 'custom_gt_step_by_step' in seqio.TaskRegistry.names()  # the paired task


def test_a_name_the_settings_would_not_select_is_refused(tmp_path, data_root, capsys):
  line = _one_line_error(
      capsys,
      *SVAMP,
      f"--gin.DATA_ROOT='{data_root}'",
      "--gin.MIXTURE_OR_TASK_NAME='svamp_gt_label'",
      '--plan=1x1',
  )
  assert (
      "MIXTURE_OR_TASK_NAME 'svamp_gt_label' disagrees with DATASET (svamp), TASK_VARIANT "
      "('step_by_step') and LABEL_SOURCE ('gt'), which select 'svamp_gt_step_by_step'"
  ) in line


@pytest.mark.parametrize(
    'rows,message',
    [
        ([{'input': 'q', 'rationale': 'r'}], "test.jsonl:1: field 'label' (label_gt) is missing"),
        ('blank', "test.jsonl:5: field 'label' (label_gt) is missing"),
        ('latin1', 'test.jsonl:3: not valid UTF-8 (byte 0xe9)'),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, capsys, rows, message):
  args = _custom(tmp_path)
  if rows == 'blank':  # blank lines count: the bad row is on line 5, its third row
    bad = _custom_rows(3)
    del bad[2]['label']
    _write_jsonl(tmp_path / 'test.jsonl', bad, blank_lines_after=(0, 1))
  elif rows == 'latin1':
    (tmp_path / 'test.jsonl').write_bytes(
        b'{"input": "a", "label": "b", "rationale": "c"}\n\n{"input": "caf\xe9"}\n'
    )
  else:
    _write_jsonl(tmp_path / 'test.jsonl', rows)
  line = _one_line_error(
      capsys, *args, *TINY_MODEL[1:], '--gin.TRAIN_STEPS=1', f"--gin.MODEL_DIR='{tmp_path / 'run'}'"
  )
  assert message in line


def test_an_unknown_split_key_is_refused_with_the_known_ones(tmp_path, capsys):
  files = {'train': 'a.jsonl', 'valid': 'b.jsonl', 'test': 'c.jsonl'}
  line = _one_line_error(
      capsys, *_custom(tmp_path), f'--gin.custom.register.files={files!r}', '--plan=1x1'
  )
  assert "files= has unknown split 'valid'; the splits are 'train', 'validation', 'test'" in line


def test_garbage_hf_config_names_the_file(tmp_path, capsys):
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'config.json').write_text('{"d_model": 32,')
  line = _one_line_error(
      capsys,
      *QUICK,
      f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
      f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'hf'}'",
  )
  assert f'{tmp_path}/hf/config.json:1: not valid JSON' in line


@pytest.mark.parametrize(
    'field,value',
    [
        ('relative_attention_max_distance', 37),
        ('relative_attention_num_buckets', 16),
        ('layer_norm_epsilon', 1e-5),
    ],
)
def test_an_hf_checkpoint_of_another_network_is_refused_by_field(tmp_path, capsys, field, value):
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
      **{field: value},
  )
  transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / 'hf')
  line = _one_line_error(
      capsys,
      *QUICK,
      f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
      f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'hf'}'",
  )
  assert 'the model differs from its config.json in' in line and f'{field} (' in line


def test_gin_dot_flags_are_rewritten_as_bindings():
  assert gin_utils.rewrite_gin_args(['x', '--gin.A.b=3', '--gin_file=f.gin']) == [
      'x',
      '--gin_bindings=A.b = 3',
      '--gin_file=f.gin',
  ]


@pytest.mark.parametrize(
    'args,missing',
    [
        (['--gin_file=train.gin', '--gin_file=models/t5_1_1/tiny.gin'], 'no training data'),
        (['--gin_file=train.gin', '--gin_file=tasks/svamp.gin'], "'emb_dim'"),  # no model size
    ],
)
def test_missing_required_binding(tmp_path, capsys, args, missing):
  line = _one_line_error(capsys, *args, f"--gin.MODEL_DIR='{tmp_path}'")
  assert missing in line


class _Syntax(gin.config_parser.ParserDelegate):

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return scoped_configurable_name

  def macro(self, macro_name):
    return macro_name


def test_every_gin_file_parses_and_its_includes_exist():
  """Syntax and includes of every shipped file, the T5X ones too (which only t5x can load)."""
  root = gin_utils.shipped_gin_dir()
  files = glob.glob(os.path.join(root, '**', '*.gin'), recursive=True)
  assert len(files) > 25
  for path in files:
    with open(path) as f:
      statements = list(gin.config_parser.ConfigParser(f, _Syntax()))
    for s in statements:
      if isinstance(s, gin.config_parser.IncludeStatement) and not s.filename.startswith(
          't5x/configs/'
      ):
        assert os.path.isfile(os.path.join(root, s.filename)), (path, s.filename)


_EXITING = textwrap.dedent("""
    import atexit, sys, threading, time
    from dsbs_jax import cli

    def main():
      def late_write():
        time.sleep(0.5)
        open(sys.argv[1], 'w').write('written')

      threading.Thread(target=late_write).start()
      atexit.register(print, 'the atexit handler ran', flush=True)
      print('buffered, without a newline', end='')
      if sys.argv[2] == 'raise':
        raise RuntimeError('a bug')
      return int(sys.argv[2])

    cli.exit_with(main)
""")


@pytest.mark.parametrize('outcome', ['0', '3', 'raise'])
def test_a_command_exits_with_its_code_after_its_threads_handlers_and_output(tmp_path, outcome):
  written = tmp_path / 'late'
  done = subprocess.run(
      [sys.executable, '-c', _EXITING, str(written), outcome],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert done.returncode == (1 if outcome == 'raise' else int(outcome)), done.stderr
  assert done.stdout == 'buffered, without a newlinethe atexit handler ran\n'
  assert written.read_text() == 'written'
  assert ('RuntimeError: a bug' in done.stderr) == (outcome == 'raise')


def test_process_defaults_raise_the_collectors_threshold_and_keep_a_higher_one():
  """In a fresh interpreter: Python's 700 becomes GC_YOUNG_THRESHOLD, the older
  generations' thresholds stay, and a process that set more, or turned
  collection off (0), keeps its own."""
  probe = textwrap.dedent("""
      import gc, sys
      from dsbs_jax import cli
      gc.set_threshold(int(sys.argv[1]), 7, 9)
      cli.set_process_defaults()
      print(*gc.get_threshold())
      """)
  seen = [
      subprocess.run(
          [sys.executable, '-c', probe, young], cwd=REPO, capture_output=True, text=True, check=True
      ).stdout.split()
      for young in ('700', '50000', '0')
  ]
  assert seen == [['10000', '7', '9'], ['50000', '7', '9'], ['0', '7', '9']]
