"""Bring-your-own data (JSONL, CSV, HF datasets), vocabularies and the text metrics."""

import csv
import json

import datasets as hf_datasets
import pytest
import seqio

from dsbs_jax.data import custom, demo, metrics, tasks, vocabularies
from dsbs_jax.errors import ConfigError, DataError

LENGTHS = {'inputs': 256, 'targets': 128}
COLUMNS = {
    'input_field': 'q',
    'gt_label_field': 'gold',
    'llm_label_field': 'teacher',
    'rationale_field': 'why',
}


def _rows(n, offset=0):
  return [
      {
          'q': f'question {i}',
          'gold': f'answer {i % 3}',
          'teacher': f'answer {(i + 1) % 3}',
          'why': f'because {i}',
      }
      for i in range(offset, offset + n)
  ]


def _write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _write_csv(path, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


def _examples(name, split):
  ds = seqio.get_mixture_or_task(name).get_dataset(LENGTHS, split=split, shuffle=False)
  return list(ds.as_numpy_iterator())


def test_jsonl_and_csv_files_register_the_whole_family(tmp_path):
  family = custom.register(
      'byo_files',
      files={
          'train': _write_jsonl(tmp_path / 'train.jsonl', _rows(50)),
          'test': _write_csv(tmp_path / 'test.csv', _rows(7, offset=100)),
      },
      **COLUMNS,
  )
  assert family.paired_tasks == {
      'gt': 'byo_files_gt_step_by_step',
      'llm': 'byo_files_llm_step_by_step',
  }
  assert family.mixtures == {
      'gt': 'byo_files_gt_step_by_step_mixture',
      'llm': 'byo_files_llm_step_by_step_mixture',
  }
  train = _examples('byo_files_llm_label', 'train')
  valid = _examples('byo_files_llm_label', 'validation')
  test = _examples('byo_files_llm_label', 'test')
  assert (len(train), len(valid), len(test)) == (45, 5, 7)
  # Teacher labels train; gold labels score validation and test.
  source = {r['q']: r for r in _rows(50) + _rows(7, offset=100)}
  for ex in train:
    assert (
        ex['targets_pretokenized'].decode()
        == source[ex['inputs_pretokenized'].decode()[9:]]['teacher']
    )
  for ex in valid + test:
    assert (
        ex['targets_pretokenized'].decode()
        == source[ex['inputs_pretokenized'].decode()[9:]]['gold']
    )
  rationale = _examples('byo_files_rationale', 'test')[0]
  assert rationale['inputs_pretokenized'] == b'explain: question 100'
  assert rationale['targets_pretokenized'] == b'because 100'


def test_huggingface_dataset_from_disk(tmp_path):
  path = str(tmp_path / 'hf')
  hf_datasets.DatasetDict(
      {
          'train': hf_datasets.Dataset.from_list(_rows(20)),
          'validation': hf_datasets.Dataset.from_list(_rows(4, offset=50)),
          'test': hf_datasets.Dataset.from_list(_rows(6, offset=100)),
      }
  ).save_to_disk(path)
  custom.register('byo_hf', hf_dataset=path, **{**COLUMNS, 'llm_label_field': None})
  assert 'byo_hf_llm_label' not in seqio.TaskRegistry.names()
  assert len(_examples('byo_hf_gt_label', 'train')) == 20
  assert [e['inputs_pretokenized'] for e in _examples('byo_hf_gt_standard', 'validation')] == [
      f'question {i}'.encode() for i in range(50, 54)
  ]


def test_bad_custom_data_is_reported_with_location(tmp_path):
  rows = _rows(10)
  rows[3] = {k: v for k, v in rows[3].items() if k != 'gold'}
  custom.register(
      'byo_bad',
      files={
          'train': _write_csv(tmp_path / 'train.csv', _rows(10)),
          'test': _write_jsonl(tmp_path / 'test.jsonl', rows),
      },
      **COLUMNS,
  )
  with pytest.raises(DataError, match=r"test.jsonl:4: field 'gold' \(label_gt\) is missing"):
    _examples('byo_bad_gt_label', 'test')
  with pytest.raises(ConfigError, match='exactly one of files= and hf_dataset='):
    custom.register('byo_none', **COLUMNS)
  with pytest.raises(ConfigError, match='unknown metric'):
    custom.register('byo_metric', files={'train': 'a.csv', 'test': 'b.csv'}, metric='bleu')
  with pytest.raises(ConfigError, match='unsupported file type'):
    custom.register('byo_ext', files={'train': 'a.txt', 'test': 'b.txt'}, **COLUMNS)


def test_trained_sentencepiece_vocabulary_serves_the_tasks(tmp_path):
  demo.register()
  path = vocabularies.train_sentencepiece(
      vocabularies.task_texts('demo_gt_step_by_step'), str(tmp_path / 'demo_spm'), vocab_size=300
  )
  vocab = vocabularies.sentencepiece(path, extra_ids=0)
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  text = 'Tom has 12 marbles. ( 12.0 * 3.0 )'
  assert vocab.decode(vocab.encode(text)) == text
  demo.register(vocab, name='demo_spm')
  ex = _examples('demo_spm_gt_label', 'test')[0]
  assert vocab.decode(ex['targets'].tolist()) == ex['targets_pretokenized'].decode()
  # SentencePiece ids are far fewer than bytes.
  assert len(ex['inputs']) < 0.5 * len(ex['inputs_pretokenized'])
  # The NLI separator becomes the EOS id with SentencePiece too.
  ids = tasks.encode_text(vocab, tasks.SEPARATOR.join(['a b', 'c']))
  assert ids.numpy().tolist() == [*vocab.encode('a b'), 1, *vocab.encode('c')]
  with pytest.raises(ConfigError, match='not found'):
    vocabularies.sentencepiece(str(tmp_path / 'missing.model'))


def test_text_accuracy_normalises_whitespace_and_rouge_is_bounded():
  assert metrics.accuracy(['wooded area', 'lake'], [' wooded  area', 'sea']) == {'accuracy': 50.0}
  same = metrics.rouge(['the cat sat'], ['the cat sat'])
  assert same == {'rouge1': 100.0, 'rouge2': 100.0, 'rougeL': 100.0}
  assert metrics.rouge(['the cat sat'], ['dogs run far'])['rougeL'] == 0.0
  with pytest.raises(ValueError, match='2 targets but 1 predictions'):
    metrics.accuracy(['a', 'b'], ['a'])
