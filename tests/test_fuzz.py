"""Property tests of everything that reads untrusted text: teacher outputs, users' JSONL and
CSV files, and model predictions scored as equations. On any input they return, or raise
the project's own one-line errors; they never hang, and they count what they cannot parse."""

import csv
import io
import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dsbs_jax.data import benchmarks, custom, metrics, teacher
from dsbs_jax.errors import DataError

FAST = settings(
    max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Text built from the parsers' own markers, so that the cuts and splits are exercised.
MARKERS = st.sampled_from(
    [
        'Q:',
        'So the answer is',
        'The answer is',
        'Answer:',
        'Answer: ',
        'Premise:',
        'Premise',
        '(a)',
        '(c) ',
        '(',
        ')',
        '.',
        '\n',
        ' ',
    ]
)
TEXT = st.lists(st.one_of(st.text(max_size=20), MARKERS), max_size=30).map(''.join)
PARSERS = [teacher.parse_cqa, teacher.parse_svamp, teacher.parse_anli, teacher.parse_esnli]


@FAST
@given(outputs=st.lists(TEXT, max_size=10))
@example(outputs=['So the answer is(0).'])  # found by this test: a choice marker, then only '.'
def test_teacher_parsers_take_any_text_and_count_what_they_cannot_parse(outputs):
  for parse in PARSERS:
    parsed = [parse(o) for o in outputs]
    for out in parsed:
      assert isinstance(out.rationale, str) and isinstance(out.label, str)
      if out.parsed:
        assert out.label.strip()
    report = teacher.report('fuzz', parsed)
    assert report.unparsed == sum(not o.parsed for o in parsed)
    assert report.total == len(outputs) and sum(report.labels.values()) == len(outputs)


@FAST
@given(text=TEXT)
def test_the_equation_metric_takes_any_prediction(text):
  value = metrics.safe_eval_equation(text)
  assert value is None or isinstance(value, float)
  score = metrics.equation_accuracy(['( 1.0 + 2.0 )', text], [text, '( 3.0 )'])
  assert 0.0 <= score['equation_accuracy'] <= 100.0


@FAST
@given(depth=st.integers(1, 5000), op=st.sampled_from(['+', '*', '-', '/']))
def test_deep_or_huge_equations_end_quickly(depth, op):
  nested = '(' * depth + '1' + ')' * depth
  chained = op.join(['9' * 300] * 3)
  for text in (nested, chained, f'{nested}{op}0'):
    value = metrics.safe_eval_equation(text)
    assert value is None or isinstance(value, float)


@FAST
@given(data=st.binary(max_size=400))
def test_the_jsonl_reader_takes_any_bytes(tmp_path, data):
  path = tmp_path / 'fuzz.jsonl'
  path.write_bytes(data)
  try:
    rows = benchmarks.read_jsonl(str(path))
  except DataError as e:
    assert str(e).startswith(str(path))
    return
  lines = data.decode('utf-8').splitlines()
  assert [n for n, _ in rows] == [i for i, line in enumerate(lines, 1) if line.strip()]
  assert [row for _, row in rows] == [json.loads(lines[n - 1]) for n, _ in rows]


@FAST
@given(
    rows=st.lists(
        st.dictionaries(
            st.sampled_from(['input', 'label', 'rationale', 'x']),
            st.one_of(TEXT, st.integers(), st.none()),
            max_size=4,
        ),
        max_size=6,
    ),
    blank_every=st.integers(1, 4),
)
def test_custom_rows_are_kept_whole_or_refused_with_their_line(tmp_path, rows, blank_every):
  lines = []
  for i, row in enumerate(rows):
    lines.append(json.dumps(row))
    if i % blank_every == 0:
      lines.append('')
  path = tmp_path / 'rows.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  fields = (('input', 'input'), ('rationale', 'rationale'), ('label_gt', 'label'))
  try:
    examples = custom.examples(custom.read_file(str(path)), fields)
  except DataError as e:
    message = str(e)
    assert message.startswith(f'{path}:')
    line = int(message[len(str(path)) + 1 :].split(':')[0])
    assert json.loads(lines[line - 1]) in rows  # the line named holds a row
    return
  assert len(examples) == len(rows)  # nothing dropped


@FAST
@given(text=st.text(max_size=300))
def test_the_csv_reader_takes_any_text(tmp_path, text):
  path = tmp_path / 'fuzz.csv'
  path.write_text(text, encoding='utf-8')
  try:
    rows = custom.read_csv(str(path))
  except DataError as e:
    assert str(e).startswith(f'{path}:')
    return
  assert len(rows) == len(list(csv.DictReader(io.StringIO(text, newline=''))))
