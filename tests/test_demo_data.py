"""The embedded demo data and its SeqIO tasks, feature conversion and vocabularies."""

import re

import numpy as np
import pytest
import seqio

from dsbs_jax.data import demo, metrics, tasks
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter
from dsbs_jax.errors import ConfigError

LENGTHS = {'inputs': 256, 'targets': 128}


def test_generator_is_deterministic_and_splits_are_disjoint():
  a, b = demo.generate(seed=0), demo.generate(seed=0)
  assert a == b
  assert {k: len(v) for k, v in a.items()} == demo.SPLIT_SIZES
  inputs = {k: {e['input'] for e in v} for k, v in a.items()}
  assert not inputs['train'] & inputs['test']
  assert not inputs['train'] & inputs['validation']
  assert not inputs['validation'] & inputs['test']
  assert demo.generate(seed=1)['test'] != a['test']


def test_examples_are_consistent_and_varied():
  rows = demo.generate()['train']
  n_ops = []
  for e in rows[:2000]:
    # The rationale's final equation, the label and the last step all agree.
    final = re.search(r'The answer is (.*)\.$', e['rationale']).group(1)
    last_step = float(re.findall(r'= (\d+)\.', e['rationale'])[-1])
    assert metrics.safe_eval_equation(final) == metrics.safe_eval_equation(e['label']) == last_step
    assert e['label'].startswith('(') and '.0' in e['label']
    n_ops.append(sum(e['label'].count(op) for op in ['+', '-', '*', '/']))
  assert set(n_ops) == {1, 2, 3}
  assert len({e['label'] for e in rows}) > 0.5 * len(rows)
  # Distractor numbers appear in inputs but not in the label.
  distracted = [e for e in rows if 'years old' in e['input'] or 'miles away' in e['input']]
  assert len(distracted) > 0.2 * len(rows)


def test_constant_answer_baseline_is_low():
  rows = demo.generate()
  values = [metrics.safe_eval_equation(e['label']) for e in rows['train']]
  most_common = max(set(values), key=values.count)
  test_values = [metrics.safe_eval_equation(e['label']) for e in rows['test']]
  assert sum(v == most_common for v in test_values) / len(test_values) < 0.05


def test_registered_tasks_and_mixture():
  family = demo.register()
  assert family.names == [
      'demo_gt_label',
      'demo_rationale',
      'demo_gt_step_by_step',
      'demo_gt_step_by_step_mixture',
      'demo_gt_standard',
      'demo_span_corruption',
  ]
  mixture = seqio.get_mixture_or_task('demo_gt_step_by_step_mixture')
  assert sorted(t.name for t in mixture.tasks) == ['demo_gt_label', 'demo_rationale']
  # The paired task gives each row's label example, then its rationale example.
  paired = list(
      seqio.get_mixture_or_task('demo_gt_step_by_step')
      .get_dataset(LENGTHS, split='test', shuffle=False)
      .take(4)
      .as_numpy_iterator()
  )
  rows = demo.generate()['test']
  assert [ex['inputs_pretokenized'].decode() for ex in paired] == [
      'predict: ' + rows[0]['input'],
      'explain: ' + rows[0]['input'],
      'predict: ' + rows[1]['input'],
      'explain: ' + rows[1]['input'],
  ]
  assert [ex['task_id'].tolist() for ex in paired] == [[1], [2], [1], [2]]
  vocab = seqio.ByteVocabulary()
  label = next(
      seqio.get_mixture_or_task('demo_gt_label')
      .get_dataset(LENGTHS, split='test', shuffle=False)
      .as_numpy_iterator()
  )
  rationale = next(
      seqio.get_mixture_or_task('demo_rationale')
      .get_dataset(LENGTHS, split='test', shuffle=False)
      .as_numpy_iterator()
  )
  first = demo.generate()['test'][0]
  assert vocab.decode(label['inputs'].tolist()) == 'predict: ' + first['input']
  assert vocab.decode(label['targets'].tolist()) == first['label']
  assert vocab.decode(rationale['inputs'].tolist()) == 'explain: ' + first['input']
  assert vocab.decode(rationale['targets'].tolist()) == first['rationale']
  assert label['targets'][-1] == 1 and label['task_id'].tolist() == [1]
  assert rationale['task_id'].tolist() == [2]


def test_packed_mixture_keeps_each_tokens_task():
  demo.register()
  ds = seqio.get_dataset(
      'demo_gt_step_by_step_mixture',
      LENGTHS,
      dataset_split='validation',
      shuffle=False,
      seed=0,
      feature_converter=StepByStepFeatureConverter(pack=True),
  )
  vocab = seqio.ByteVocabulary()
  seen = set()
  for row in ds.take(20).as_numpy_iterator():
    for seg in set(row['decoder_segment_ids'].tolist()) - {0}:
      ids = set(row['decoder_task_ids'][row['decoder_segment_ids'] == seg].tolist())
      assert len(ids) == 1
      (task,) = ids
      text = vocab.decode(row['encoder_input_tokens'][row['encoder_segment_ids'] == seg].tolist())
      assert text.startswith({1: 'predict: ', 2: 'explain: '}[task])
      seen.add(task)
    assert np.array_equal(row['decoder_task_ids'] == 0, row['decoder_target_tokens'] == 0)
  assert seen == {1, 2}


def test_task_name_helper():
  assert tasks.task_name('svamp', 'step_by_step', 'llm') == 'svamp_llm_step_by_step'
  assert tasks.task_name('cqa', 'rationale', 'gt') == 'cqa_rationale'
  with pytest.raises(ConfigError, match="TASK_VARIANT 'distill' is unknown"):
    tasks.task_name('cqa', 'distill')


def test_sentencepiece_vocabulary_by_path(tmp_path):
  spm = pytest.importorskip('sentencepiece')
  text = tmp_path / 'demo.txt'
  rows = demo.generate()['train'][:3000]
  text.write_text('\n'.join(e['input'] + '\n' + e['rationale'] + '\n' + e['label'] for e in rows))
  prefix = tmp_path / 'demo_spm'
  spm.SentencePieceTrainer.train(
      input=str(text),
      model_prefix=str(prefix),
      vocab_size=150,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      user_defined_symbols=['(', ')', '.'],
  )
  vocab = seqio.SentencePieceVocabulary(str(prefix) + '.model')
  family = demo.register(vocabulary=vocab, name='demo_spm')
  ex = next(
      seqio.get_mixture_or_task(family.label_tasks['gt'])
      .get_dataset(LENGTHS, split='test', shuffle=False)
      .as_numpy_iterator()
  )
  first = demo.generate()['test'][0]
  assert vocab.decode(ex['targets'].tolist()) == first['label']
  assert len(ex['inputs']) < 0.75 * len('predict: ' + first['input'])  # subwords, not bytes
