"""The paper's datasets read from the released files: parsing, splits, tasks, errors."""

import json
import os
import re
import shutil

import datasets as hf_datasets
import numpy as np
import pytest
import seqio

from conftest import cli
from dsbs_jax.data import benchmarks, metrics, splits, tasks, teacher
from dsbs_jax.errors import ConfigError, DataError

LENGTHS = {'inputs': 1024, 'targets': 512}


# The authors' loaders, restated with their exception-driven fallbacks: an
# independent reference for what `teacher` must reproduce.
def _authors_cqa(output):
  rationale, label = output.split('Q:')[0].rstrip().split('So the answer is')
  try:
    label = re.split(r'\(.\)', label)[1].strip()
    label = label if label[-1] != '.' else label[:-1]
  except IndexError:
    label = ' '
  return rationale.rstrip(), label


def _authors_svamp(output):
  try:
    rationale, label = output.split('Q:')[0].rstrip().split('The answer is')
  except ValueError:
    return ' ', ' '
  try:
    label = re.search(r'\(.*\)', label).group(0)
  except AttributeError:
    label = ' '
  return rationale.rstrip(), label


def _authors_anli(output):
  try:
    rationale, label = output.split('Premise:')[0].rstrip().split('So the answer is')
  except ValueError:
    rationale, label = '', ''
  return rationale.rstrip(), label.lstrip()[:-1]


def _authors_esnli(output):
  rationale = output.split('Answer:')[0].rstrip()
  try:
    label = output.split('Answer: ')[1].split('Premise')[0].rstrip()
  except IndexError:
    label = ' '
  return rationale, label


REFERENCE = {
    'cqa': _authors_cqa,
    'svamp': _authors_svamp,
    'anli1': _authors_anli,
    'esnli': _authors_esnli,
}
RELEASED = [
    ('cqa', 'train'),
    ('cqa', 'test'),
    ('svamp', 'train'),
    ('svamp', 'test'),
    ('anli1', 'validation'),
    ('anli1', 'test'),
    ('esnli', 'test'),
]


@pytest.mark.parametrize('name,split', RELEASED)
def test_parsers_reproduce_the_authors_on_released_files(data_root, name, split):
  rows, report = benchmarks.load_split(benchmarks.BENCHMARKS[name], data_root, split)
  file_split = {'validation': 'valid'}.get(split, split)
  raw = []
  i = 0
  while os.path.exists(p := f'{data_root}/{name}/llm/{file_split}_CoT_{i}.json'):
    with open(p) as f:
      raw += json.load(f)
    i += 1
  with open(f'{data_root}/{name}/{name}_{file_split}.json') as f:
    n_rows = sum(1 for line in f if line.strip())
  assert len(rows) == len(raw) == n_rows == report.total
  expected = [REFERENCE[name](o) for o in raw]
  assert [(r['rationale'], r['label_llm']) for r in rows] == expected
  assert report.unparsed == sum(not benchmarks.BENCHMARKS[name].parse(o).parsed for o in raw)
  assert report.unparsed < 0.02 * report.total
  assert f'{report.total - report.unparsed}/{report.total}' in report.summary()


def test_teacher_label_accuracy_matches_the_paper_sanity_figure(data_root):
  rows, _ = benchmarks.load_split(benchmarks.BENCHMARKS['cqa'], data_root, 'test')
  score = metrics.accuracy([r['label_gt'] for r in rows], [r['label_llm'] for r in rows])
  assert round(score['accuracy'], 1) == 77.2
  rows, _ = benchmarks.load_split(benchmarks.BENCHMARKS['svamp'], data_root, 'test')
  score = metrics.equation_accuracy([r['label_gt'] for r in rows], [r['label_llm'] for r in rows])
  assert score['equation_accuracy'] == pytest.approx(74.0)


def test_inputs_are_formatted_as_in_the_paper(data_root):
  cqa, _ = benchmarks.load_split(benchmarks.BENCHMARKS['cqa'], data_root, 'test')
  assert cqa[0]['input'] == (
      'A beaver is know for building prowess, their supplies come from '
      'where?\nAnswer Choices:\n(a) british columbia\n(b) body of water\n'
      '(c) wooded area\n(d) pay debts\n(e) zoo'
  )
  assert cqa[0]['label_gt'] == 'wooded area' == cqa[0]['label_llm']
  anli, _ = benchmarks.load_split(benchmarks.BENCHMARKS['anli1'], data_root, 'test')
  premise, hypothesis = anli[0]['input'].split(tasks.SEPARATOR)
  assert premise.startswith('Ernest Jones is a British jeweller')
  assert hypothesis == 'The first Ernest Jones store was opened on the continent of Europe.'
  assert anli[0]['label_gt'] == 'entailment'
  assert {r['label_gt'] for r in anli} == set(benchmarks.NLI_LABELS)


@pytest.mark.parametrize(
    'n,test_size,seed', [(800, 0.1, 0), (9741, 0.1, 0), (800, 0.875, 3), (97, 0.25, 1)]
)
def test_split_indices_match_huggingface_train_test_split(n, test_size, seed):
  reference = hf_datasets.Dataset.from_dict({'i': list(range(n))}).train_test_split(
      test_size=test_size, seed=seed
  )
  train, test = splits.train_test_split_indices(n, test_size, seed)
  assert train.tolist() == reference['train']['i']
  assert test.tolist() == reference['test']['i']


def test_paper_splits_subsample_and_hold_out_deterministically(data_root):
  full = {
      s: benchmarks.split_rows('cqa', s, root=data_root) for s in ('train', 'validation', 'test')
  }
  assert (len(full['train']), len(full['validation']), len(full['test'])) == (8766, 975, 1221)
  inputs = {s: {r['input'] for r in rows} for s, rows in full.items()}
  assert not inputs['train'] & inputs['validation']
  for fraction in (0.125, 0.5):
    sub = benchmarks.split_rows('cqa', 'train', root=data_root, train_fraction=fraction, seed=2)
    again = benchmarks.split_rows('cqa', 'train', root=data_root, train_fraction=fraction, seed=2)
    assert sub == again
    n_train = 9741 - int(np.ceil((1 - fraction) * 9741))
    assert len(sub) == n_train - int(np.ceil(0.1 * n_train))
  other_seed = benchmarks.split_rows('cqa', 'train', root=data_root, train_fraction=0.5, seed=3)
  assert other_seed != benchmarks.split_rows(
      'cqa', 'train', root=data_root, train_fraction=0.5, seed=2
  )
  # The test split is never subsampled, and never a source of validation rows.
  assert benchmarks.split_rows('cqa', 'test', root=data_root, train_fraction=0.125) == full['test']
  # ANLI has a released validation split: it is used as is.
  assert len(benchmarks.split_rows('anli1', 'validation', root=data_root)) == 1000


def test_evaluation_targets_are_gold_and_training_targets_are_the_teachers(data_root):
  train = benchmarks.split_rows('svamp', 'train', root=data_root)
  valid = benchmarks.split_rows('svamp', 'validation', root=data_root)
  assert any(r['label_llm'] != r['label_gt'] for r in train)
  assert all(r['label_llm'] == r['label_gt'] for r in valid)
  assert any(r['rationale'] for r in valid)


def test_seqio_tasks_read_the_configured_root(data_root, monkeypatch):
  monkeypatch.setenv(benchmarks.DATA_ROOT_ENV, data_root)
  family = benchmarks.register('anli1')
  assert family.names == [
      'anli1_gt_label',
      'anli1_llm_label',
      'anli1_rationale',
      'anli1_gt_step_by_step',
      'anli1_llm_step_by_step',
      'anli1_gt_step_by_step_mixture',
      'anli1_llm_step_by_step_mixture',
      'anli1_gt_standard',
      'anli1_llm_standard',
      'anli1_span_corruption',
  ]
  vocab = seqio.ByteVocabulary()
  ex = next(
      seqio.get_mixture_or_task('anli1_llm_label')
      .get_dataset(LENGTHS, split='test', shuffle=False)
      .as_numpy_iterator()
  )
  assert ex['inputs_pretokenized'].decode().startswith('predict: Ernest Jones')
  ids = ex['inputs'].tolist()
  # The premise</s>hypothesis separator is one EOS id, as the HF tokenizer makes it.
  assert ids.count(vocab.eos_id) == 2 and ids[-1] == vocab.eos_id
  sep = ids.index(vocab.eos_id)
  assert vocab.decode(ids[:sep]).startswith('predict: Ernest Jones')
  assert vocab.decode(ids[sep + 1 :]).startswith('The first Ernest Jones store')
  assert ex['targets_pretokenized'] == b'entailment'
  standard = next(
      seqio.get_mixture_or_task('anli1_gt_standard')
      .get_dataset(LENGTHS, split='test', shuffle=False)
      .as_numpy_iterator()
  )
  assert standard['inputs_pretokenized'].decode().startswith('Ernest Jones')
  rationale = next(
      seqio.get_mixture_or_task('anli1_rationale')
      .get_dataset(LENGTHS, split='test', shuffle=False)
      .as_numpy_iterator()
  )
  assert rationale['targets_pretokenized'].decode().startswith('The premise mentions that')
  mixture = seqio.get_mixture_or_task('anli1_llm_step_by_step_mixture')
  assert sorted(t.name for t in mixture.tasks) == ['anli1_llm_label', 'anli1_rationale']


def test_cli_lists_every_builtin_family(capsys):
  assert cli('--list_tasks') == 0
  listing = capsys.readouterr().out
  assert listing.strip() == tasks.describe_families()
  for name in ('esnli', 'anli1', 'cqa', 'svamp', 'demo'):
    assert f'{name}: {name}_gt_label' in listing
    assert f'{name}_gt_standard' in listing
  assert 'cqa_llm_step_by_step' in listing and 'cqa_llm_standard' in listing


def test_missing_root_is_a_config_error(monkeypatch):
  monkeypatch.delenv(benchmarks.DATA_ROOT_ENV, raising=False)
  with pytest.raises(ConfigError, match='DSBS_DATA_ROOT'):
    benchmarks.split_rows('cqa', 'test')
  with pytest.raises(ConfigError, match='TRAIN_FRACTION'):
    benchmarks.register('cqa', train_fraction=1.5)


def _copy_dataset(data_root, tmp_path, name):
  (tmp_path / name / 'llm').mkdir(parents=True)
  for rel in (f'{name}_test.json', 'llm/test_CoT_0.json', 'llm/test_CoT_1.json'):
    if os.path.exists(f'{data_root}/{name}/{rel}'):
      shutil.copy(f'{data_root}/{name}/{rel}', tmp_path / name / rel)
  return tmp_path / name


def test_bad_files_name_the_file_line_and_field(data_root, tmp_path):
  cqa = benchmarks.BENCHMARKS['cqa']
  folder = _copy_dataset(data_root, tmp_path, 'cqa')
  lines = (folder / 'cqa_test.json').read_text().splitlines()
  (folder / 'cqa_test.json').write_text('\n'.join([*lines[:2], '{"question": "x"', *lines[3:]]))
  with pytest.raises(DataError, match=r'cqa_test\.json:3: not valid JSON'):
    benchmarks.load_split(cqa, str(tmp_path), 'test')
  row = json.loads(lines[4])
  del row['answer']
  (folder / 'cqa_test.json').write_text('\n'.join([*lines[:4], json.dumps(row), *lines[5:]]))
  with pytest.raises(DataError, match=r"cqa_test\.json:5: missing field 'answer'"):
    benchmarks.load_split(cqa, str(tmp_path), 'test')
  (folder / 'cqa_test.json').write_text('\n'.join(lines[:-1]))
  with pytest.raises(DataError, match='1220 rows but 1221 teacher outputs'):
    benchmarks.load_split(cqa, str(tmp_path), 'test')
  first = json.loads((folder / 'llm' / 'test_CoT_0.json').read_text())
  (folder / 'llm' / 'test_CoT_0.json').write_text(json.dumps(first[:-1]))
  with pytest.raises(DataError, match=r'test_CoT_0\.json: holds 999 outputs'):
    benchmarks.load_split(cqa, str(tmp_path), 'test')
  with pytest.raises(DataError, match=r'cqa_train.json: file not found'):
    benchmarks.load_split(cqa, str(tmp_path), 'train')


def test_unparseable_outputs_are_kept_blank_and_counted():
  outputs = ['No answer here.', 'Reasoning. So the answer is (b) lake.\n\nQ: next', 'x Q: y']
  parsed = [teacher.parse_cqa(o) for o in outputs]
  assert parsed[1] == teacher.TeacherOutput('Reasoning.', 'lake', True)
  assert parsed[0] == teacher.TeacherOutput(' ', ' ', False)
  # A choice with no text: the authors' loader strips its period and keeps a blank label.
  assert teacher.parse_cqa('R. So the answer is (a).') == teacher.TeacherOutput('R.', '', False)
  summary = teacher.report('cqa/test', parsed).summary()
  assert 'parsed 1/3 teacher outputs, 2 unparseable' in summary
  assert teacher.parse_svamp('8 / 2 = 4. The answer is 4.') == teacher.TeacherOutput(
      '8 / 2 = 4.', ' ', False
  )


def test_mixtures_are_evaluated_on_their_label_task():
  benchmarks.register('cqa')
  assert tasks.evaluation_tasks('cqa_llm_step_by_step') == ['cqa_llm_label']
  assert tasks.evaluation_tasks('cqa_gt_step_by_step', rationales=True) == [
      'cqa_gt_label',
      'cqa_rationale',
  ]
  assert tasks.evaluation_tasks('cqa_llm_step_by_step_mixture') == ['cqa_llm_label']
  assert tasks.evaluation_tasks('cqa_llm_standard') == ['cqa_llm_standard']
  assert tasks.deployed_task('cqa_gt_step_by_step') == 'cqa_gt_label'
  assert tasks.deployed_task('cqa_llm_standard') == 'cqa_llm_standard'
