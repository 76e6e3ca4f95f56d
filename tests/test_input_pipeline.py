"""Batches count examples: a step-by-step run's steps hold the same label examples as a
standard run's with the same seed, each with its rationale in the same step, packed
first-fit into few rows; and a restart resumes the stream exactly."""

import itertools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from dsbs_jax.data import demo, input_pipeline
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter

LENGTHS = {'inputs': 256, 'targets': 128}
VOCAB = seqio.ByteVocabulary()


def _steps(task, steps, batch_size=6, seed=3, skip=0, pack=True, row_unit=1, register=True):
  if register:
    demo.register()
  config = input_pipeline.DatasetConfig(task, LENGTHS, batch_size, pack=pack, seed=seed)
  stream = input_pipeline.batches(
      config, StepByStepFeatureConverter(pack=pack), skip=skip, row_unit=row_unit
  )
  return list(itertools.islice(stream, steps))


def _sequences(step, task_id):
  """The input texts of a step's sequences of one task, in row order."""
  inputs = step['encoder_input_tokens']
  # Unpacked rows hold one sequence each: segment 1 wherever there are tokens.
  encoder_segments = step.get('encoder_segment_ids', (inputs > 0).astype(np.int32))
  decoder_segments = step.get('decoder_segment_ids', (step['decoder_task_ids'] > 0) * 1)
  texts = []
  for row in range(len(inputs)):
    for segment in sorted(set(decoder_segments[row].tolist()) - {0}):
      task = set(step['decoder_task_ids'][row][decoder_segments[row] == segment].tolist())
      if task == {task_id}:
        texts.append(VOCAB.decode(inputs[row][encoder_segments[row] == segment].tolist()))
  return texts


def test_paired_steps_hold_the_standard_runs_label_examples_with_their_rationales():
  standard = _steps('demo_gt_standard', steps=5)
  paired = _steps('demo_gt_step_by_step', steps=5)
  for plain, both in zip(standard, paired, strict=True):
    inputs = _sequences(plain, 1)
    assert len(inputs) == 6  # BATCH_SIZE examples, not rows
    # Within a step, rows are in packing order.
    assert sorted(_sequences(both, 1)) == sorted('predict: ' + x for x in inputs)
    assert sorted(_sequences(both, 2)) == sorted('explain: ' + x for x in inputs)
  # Packed: 12 sequences share fewer rows, a multiple of the row bucket.
  rows = {len(step['encoder_input_tokens']) for step in paired}
  assert all(r % input_pipeline.ROW_BUCKET == 0 and r <= 12 for r in rows), rows
  assert min(rows) < 12


def _rows(step):
  """Each row's sequences as (input tokens, target tokens), in the row's order."""
  rows = []
  for tokens, targets, encoder, decoder in zip(
      step['encoder_input_tokens'],
      step['decoder_target_tokens'],
      step.get('encoder_segment_ids', step['encoder_input_tokens'] > 0),
      step.get('decoder_segment_ids', step['decoder_target_tokens'] > 0),
      strict=True,
  ):
    segments = sorted(set(encoder.tolist()) - {0})
    rows += [[(tokens[encoder == s].tolist(), targets[decoder == s].tolist()) for s in segments]]
  return [row for row in rows if row]


def _pack(sequences, first_fit, lengths=LENGTHS):
  """Plain-Python packing of (inputs, targets) pairs into rows of `lengths`."""
  rows, used = [], []
  for inputs, targets in sequences:
    candidates = range(len(rows)) if first_fit else range(len(rows))[-1:]
    for r in candidates:
      if used[r][0] + len(inputs) <= lengths['inputs'] and used[r][1] + len(targets) <= (
          lengths['targets']
      ):
        rows[r].append((inputs, targets))
        used[r] = [used[r][0] + len(inputs), used[r][1] + len(targets)]
        break
    else:
      rows.append([(inputs, targets)])
      used.append([len(inputs), len(targets)])
  return rows


def test_each_step_is_packed_first_fit():
  packed = _steps('demo_gt_step_by_step', steps=4, batch_size=8)
  unpacked = _steps('demo_gt_step_by_step', steps=4, batch_size=8, pack=False)
  fewer = 0
  for step, sequences in zip(packed, unpacked, strict=True):
    sequences = [row for [row] in _rows(sequences)]  # one sequence a row, in the stream's order
    assert _rows(step) == _pack(sequences, first_fit=True)
    fewer += len(_rows(step)) < len(_pack(sequences, first_fit=False))
  assert fewer  # some step where next-fit, SeqIO's own packing, would need more rows


def test_the_converter_packs_each_window_first_fit():
  """Over several of SeqIO's packing windows (as many examples as the longest
  length), some examples longer than a row: each window's rows are first-fit's
  over its examples as SeqIO cuts them, and every target token keeps its task."""
  rng = np.random.default_rng(0)
  lengths = {'inputs': 12, 'targets': 10}
  examples = [
      {
          'inputs': rng.integers(2, 50, rng.integers(1, 15), dtype=np.int32),
          'targets': rng.integers(2, 50, rng.integers(1, 12), dtype=np.int32),
          'task_id': np.array([i % 2 + 1], np.int32),
      }
      for i in range(37)
  ]
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in examples[0]},
  )
  converter = StepByStepFeatureConverter(pack=True, apply_length_check=False)
  packed = list(converter(ds, lengths).as_numpy_iterator())
  rows = _rows({k: np.stack([row[k] for row in packed]) for k in packed[0]})
  cut = [(e['inputs'][:12].tolist(), e['targets'][:10].tolist()) for e in examples]
  windows = [cut[start : start + 12] for start in range(0, len(cut), 12)]  # SeqIO's windows
  assert rows == [row for w in windows for row in _pack(w, first_fit=True, lengths=lengths)]
  assert len(rows) < sum(len(_pack(w, first_fit=False, lengths=lengths)) for w in windows)
  tasks = {tuple(e['targets'][:10]): e['task_id'][0] for e in examples}
  for row in packed:
    for s in set(row['decoder_segment_ids'].tolist()) - {0}:
      segment = row['decoder_segment_ids'] == s
      assert set(row['decoder_task_ids'][segment]) == {
          tasks[tuple(row['decoder_target_tokens'][segment])]
      }


def test_steps_differ_with_the_seed_and_over_epochs():
  a = [_sequences(s, 1) for s in _steps('demo_gt_standard', steps=3, seed=0)]
  b = [_sequences(s, 1) for s in _steps('demo_gt_standard', steps=3, seed=1)]
  assert a != b
  flat = [x for step in a for x in step]
  assert len(set(flat)) == len(flat)  # no repeats within an epoch


def test_each_epoch_of_a_small_fraction_is_shuffled_anew():
  # 60 rows (SeqIO would cache so small a split in memory and replay its order).
  demo.register(name='demo_small', train_fraction=0.006)
  steps = _steps('demo_small_gt_standard', steps=20, register=False)
  first, second = ([x for s in steps[i : i + 10] for x in _sequences(s, 1)] for i in (0, 10))
  assert len(set(first)) == 60 and set(first) == set(second)
  assert first != second


def test_a_restart_skips_exactly_the_consumed_steps():
  whole = _steps('demo_gt_step_by_step', steps=6)
  resumed = _steps('demo_gt_step_by_step', steps=3, skip=3)
  for a, b in zip(whole[3:], resumed, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('pack,row_unit,expected', [(False, 1, {12}), (True, 16, {16})])
def test_rows_are_padded_to_the_units_the_mesh_needs(pack, row_unit, expected):
  steps = _steps('demo_gt_step_by_step', steps=3, pack=pack, row_unit=row_unit)
  assert {len(step['encoder_input_tokens']) for step in steps} == expected
  for step in steps:
    assert len(_sequences(step, 1)) == len(_sequences(step, 2)) == 6


@pytest.mark.parametrize('row_unit,processes', [(8, 2), (4, 8), (3, 2), (6, 4), (12, 8), (1, 4)])
def test_the_processes_rows_together_make_whole_units(row_unit, processes):
  """Each process pads its rows to this unit; together they must divide into the data
  axis and the microbatches (`row_unit`), with no more padding than that needs."""
  unit = input_pipeline.process_row_unit(row_unit, processes)
  assert processes * unit % row_unit == 0
  assert all(processes * smaller % row_unit for smaller in range(1, unit))


def test_the_independent_mixture_counts_sequences():
  """The option the paper does not use: label and rationale examples drawn independently."""
  steps = _steps('demo_gt_step_by_step_mixture', steps=4)
  for step in steps:
    assert len(_sequences(step, 1)) + len(_sequences(step, 2)) == 6


@seqio.map_over_dataset
def _longer_text_as_inputs(ex):
  # A Python `if` on tensors: it builds only as AutoGraph converts it (to tf.cond).
  if tf.size(ex['inputs']) < tf.size(ex['targets']):
    ex = {**ex, 'inputs': ex['targets'], 'targets': ex['inputs']}
  return ex


def test_autograph_converts_seqios_packing_and_other_tasks_preprocessors_only(monkeypatch):
  """Our tasks and converter build their maps without AutoGraph (its conversions
  took about 2 s of every run's start); SeqIO's packing map, a Python loop over
  tensors, is still converted, and so is a task registered elsewhere."""
  from tensorflow.python.autograph.impl import api  # where every conversion starts

  converted = []
  convert = api._convert_actual

  def recorded(entity, program_ctx):
    converted.append(f'{entity.__module__}.{entity.__qualname__}')
    return convert(entity, program_ctx)

  monkeypatch.setattr(api, '_convert_actual', recorded)
  assert _steps('demo_gt_step_by_step', steps=1)
  assert converted and all(name.startswith('seqio.utils.') for name in converted), converted
  assert any('_pack_with_tf_ops' in name for name in converted)

  converted.clear()
  texts = {'inputs': ['a b', 'c', 'a longer text'], 'targets': ['x', 'a longer target', 'y']}
  seqio.TaskRegistry.add(
      'autograph_elsewhere',
      source=seqio.FunctionDataSource(
          lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(texts),
          splits=['train'],
      ),
      preprocessors=[
          seqio.preprocessors.tokenize,
          _longer_text_as_inputs,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features={k: seqio.Feature(VOCAB) for k in texts},
  )
  try:
    (step,) = _steps('autograph_elsewhere', steps=1, batch_size=3, register=False)
  finally:
    seqio.TaskRegistry.remove('autograph_elsewhere')
  assert any('_longer_text_as_inputs' in name for name in converted)
  assert sorted(_sequences(step, 1)) == ['a b', 'a longer target', 'a longer text']
