"""Rationale extraction: a task's inputs through a teacher, into files the tasks read.

    inputs (a benchmark split, the demo, or a JSON-lines/CSV file)
      -> prompts (`prompts.Prompt.render`)
      -> teacher completions, cached by key (`AnswerCache`)
      -> parsed rows, filtered as asked
      -> <out>/<task>/<split>.jsonl                  input, label, teacher_label, rationale, raw
         <out>/<name>/<name>_<split>.json            the benchmarks: the authors' layout, so
         <out>/<name>/llm/<split>_CoT_<i>.json       `--gin.DATA_ROOT=<out>` trains on it
         <out>/<task>/teacher_<split>.json           settings and summary of the run

Every answer is appended to `<out>/<task>/teacher_cache/<split>.jsonl` as it
arrives, keyed by the hash of the prompt, the teacher (backend, server, model) and the
sampling settings. A rerun after a crash or Ctrl-C reads the cache and queries
only what is missing; the final files are written, atomically, once every input
is answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Protocol

from dsbs_jax import prompts as prompts_lib
from dsbs_jax import storage, teachers
from dsbs_jax.data import benchmarks, custom, metrics, tasks
from dsbs_jax.errors import ConfigError, DataError

log = logging.getLogger('dsbs_jax')
SPLITS = ('train', 'validation', 'test')
# How often (seconds) the cache reaches an object store, which cannot append;
# local files are flushed after every answer.
REMOTE_FLUSH_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Source:
  """A split's inputs: `rows[i]` is written back beside input i's answers (the
  authors' layout keeps the original row); `gold[i]` is None without a gold label."""

  task: str
  split: str
  inputs: list[str]
  gold: list[Optional[str]]
  rows: list[dict[str, Any]]
  benchmark: Optional[benchmarks.Benchmark] = None


def benchmark_source(name: str, split: str, data_root: Optional[str]) -> Source:
  bench = benchmarks.BENCHMARKS[name]
  root = benchmarks.resolve_root(data_root)
  path = benchmark_file(root, name, split)
  inputs, rows = [], []
  gold: list[Optional[str]] = []
  for line, row in benchmarks.read_jsonl(path):
    text, label = bench.example(row, f'{path}:{line}')
    inputs.append(text)
    gold.append(label)
    rows.append(row)
  return Source(name, split, inputs, gold, rows, bench)


def benchmark_file(root: str, name: str, split: str) -> str:
  return os.path.join(root, name, f'{name}_{benchmarks.FILE_SPLITS[split]}.json')


def demo_source(split: str) -> Source:
  from dsbs_jax.data import demo

  rows = demo.generate()[split]
  gold: list[Optional[str]] = [r['label'] for r in rows]
  return Source('demo', split, [r['input'] for r in rows], gold, [dict(r) for r in rows])


def file_source(
    task: str, split: str, path: str, input_field: str, label_field: Optional[str]
) -> Source:
  inputs, rows = [], []
  gold: list[Optional[str]] = []
  for where, row in custom.read_file(path):
    fields = (('input', input_field), *((('label', label_field),) if label_field else ()))
    example = custom.examples([(where, row)], fields)[0]
    inputs.append(example['input'])
    gold.append(example.get('label'))
    rows.append(row)
  return Source(task, split, inputs, gold, rows)


def cache_key(prompt: str, teacher_id: Mapping[str, Any], sampling: teachers.Sampling) -> str:
  blob = json.dumps([prompt, dict(teacher_id), dataclasses.asdict(sampling)], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


class AnswerCache:
  """Answers by key, in a JSON-lines file that only grows. A line that does not
  parse (a crash mid-write) is skipped with a warning and left in place."""

  def __init__(self, path: str):
    self.path = path
    self.answers: dict[str, teachers.Completions] = {}
    existing = storage.read_text(path) if storage.exists(path) else ''
    for number, line in enumerate(existing.splitlines(), start=1):
      try:
        entry = json.loads(line)
        self.answers[entry['key']] = teachers.Completions(
            tuple(entry['texts']), entry['prompt_tokens'], entry['completion_tokens']
        )
      except (json.JSONDecodeError, KeyError, TypeError):
        log.warning('%s:%d: skipping an unreadable cache line (left in place)', path, number)
    self._file = storage.AppendFile(path)
    self._file.start_line()
    self._remote = storage.is_url(path)
    self._flushed = time.monotonic()

  def add(self, key: str, answer: teachers.Completions) -> None:
    self.answers[key] = answer
    entry = {'key': key, **dataclasses.asdict(answer)}
    self._file.write(json.dumps(entry) + '\n')
    if not self._remote or time.monotonic() - self._flushed > REMOTE_FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    self._file.flush()
    self._flushed = time.monotonic()

  def close(self) -> None:
    self._file.close()


@dataclasses.dataclass(frozen=True)
class Filters:
  """Off by default. gold_match: keep a sample only if its label is the gold one
  (Fine-tune-CoT). drop_degenerate: drop empty or looping rationales."""

  gold_match: bool = False
  drop_degenerate: bool = False


def degenerate(rationale: str) -> bool:
  """Empty, or a loop: one word trigram making up half the rationale's trigrams or more."""
  words = rationale.split()
  if not words:
    return True
  trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
  if len(trigrams) < 6:
    return False
  top = max(trigrams.count(t) for t in set(trigrams))
  return top * 2 >= len(trigrams)


@dataclasses.dataclass
class Summary:
  inputs: int = 0
  from_cache: int = 0
  samples: int = 0
  parsed: int = 0
  unparsed: int = 0
  degenerate_dropped: int = 0
  gold_mismatch_dropped: int = 0
  rows_written: int = 0  # to <split>.jsonl: train's parsed samples that passed the filters
  layout_rows: Optional[int] = None  # to the authors' layout, which keeps unparsed ones
  queried: int = 0
  prompt_tokens: int = 0
  completion_tokens: int = 0
  teacher_accuracy: Optional[float] = None

  def lines(self) -> list[str]:
    accuracy = (
        'no gold labels'
        if self.teacher_accuracy is None
        else f'{self.teacher_accuracy:.1f}% against gold'
    )
    cached = self.from_cache
    layout = '' if self.layout_rows is None else f", {self.layout_rows} (authors' layout)"
    return [
        (
            f'inputs {self.inputs} ({self.queried} queried now, {cached} from the cache); '
            f'samples {self.samples}'
        ),
        f'parsed {self.parsed}, failed to parse {self.unparsed}; teacher label accuracy {accuracy}',
        (
            f'dropped: {self.degenerate_dropped} degenerate, {self.gold_mismatch_dropped} not '
            f'matching gold; rows written {self.rows_written} (JSON lines){layout}'
        ),
        f'tokens: {self.prompt_tokens} prompt, {self.completion_tokens} completion',
    ]


def parser_for(
    task: str, prompt: prompts_lib.Prompt, custom_prompt: bool
) -> Callable[[str], tuple[str, str, bool]]:
  """The authors' parser for a benchmark's (and the demo's SVAMP-style) built-in
  format, so the summary counts what training will read; else the prompt's own."""
  name = 'svamp' if task == 'demo' else task
  if name in benchmarks.BENCHMARKS and not custom_prompt:
    parse = benchmarks.BENCHMARKS[name].parse

    def authors(text: str) -> tuple[str, str, bool]:
      out = parse(text)
      return out.rationale, out.label, out.parsed

    return authors
  return prompt.parse


def label_metric(source: Source, metric: str) -> Callable[[Sequence[str], Sequence[str]], dict]:
  if source.benchmark is not None:
    return source.benchmark.label_metric
  if source.task == 'demo':
    return metrics.equation_accuracy
  return custom.METRICS[metric]


class Progress(Protocol):

  def start(self, to_query: int, cached: int) -> None:
    ...

  def update(self, inputs: int, prompt_tokens: int, completion_tokens: int) -> None:
    ...


@dataclasses.dataclass(frozen=True)
class Extraction:
  """One split through one teacher."""

  source: Source
  teacher: teachers.Teacher
  prompt: prompts_lib.Prompt
  sampling: teachers.Sampling
  out: str
  filters: Filters = Filters()
  custom_prompt: bool = False
  metric: str = 'accuracy'
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def task_dir(self) -> str:
    return os.path.join(self.out, self.source.task)

  def __post_init__(self):
    training = self.source.split == 'train'
    if not training and (self.filters.gold_match or self.filters.drop_degenerate):
      raise ConfigError(
          f'--split {self.source.split}: filters would bias evaluation; they apply to train only'
      )
    if not training and self.sampling.n > 1:
      raise ConfigError(f'--num_samples {self.sampling.n}: several samples are for train only')
    if self.filters.gold_match and all(g is None for g in self.source.gold):
      raise ConfigError('--filter_gold_match: these inputs have no gold labels')

  def run(self, progress: Optional[Progress] = None) -> Summary:
    """Answers every input (from the cache or the teacher), then writes the files."""
    rendered = [self.prompt.render(text) for text in self.source.inputs]
    teacher_id = self.teacher.describe()
    keys = [cache_key(p, teacher_id, self.sampling) for p in rendered]
    cache = AnswerCache(os.path.join(self.task_dir, 'teacher_cache', f'{self.source.split}.jsonl'))
    summary = Summary(inputs=len(keys), from_cache=sum(k in cache.answers for k in keys))
    try:
      self._query(keys, rendered, cache, summary, progress)
    finally:
      cache.close()
    self._write([cache.answers[k] for k in keys], summary)
    return summary

  def _query(
      self,
      keys: list[str],
      rendered: list[str],
      cache: AnswerCache,
      summary: Summary,
      progress: Optional[Progress],
  ) -> None:
    """Asks the teacher each prompt the cache lacks, once, caching each answer as it comes."""
    todo = list(dict.fromkeys(k for k in keys if k not in cache.answers))
    prompt_of = dict(zip(keys, rendered, strict=True))
    if progress is not None:
      progress.start(len(todo), summary.from_cache)
    try:
      for i, answer in self.teacher.complete([prompt_of[k] for k in todo], self.sampling):
        cache.add(todo[i], answer)
        summary.queried += 1
        if progress is not None:
          progress.update(1, answer.prompt_tokens, answer.completion_tokens)
    except teachers.TeacherError as e:
      if e.index is None:
        raise
      row = keys.index(todo[e.index])
      raise teachers.TeacherError(
          f'{self.source.task}/{self.source.split} input {row}: {e}'
      ) from None

  def _write(self, answers: list[teachers.Completions], summary: Summary) -> None:
    """The JSON lines, the authors' layout (benchmarks) and the run's record."""
    kept_rows, raw_texts, jsonl = self._select(answers, summary)
    split = self.source.split
    storage.write_atomic(
        os.path.join(self.task_dir, f'{split}.jsonl'), ''.join(json.dumps(r) + '\n' for r in jsonl)
    )
    if self.source.benchmark is not None:
      summary.layout_rows = len(kept_rows)
      self._write_authors_layout(kept_rows, raw_texts)
    record = {'settings': dict(self.settings), 'summary': dataclasses.asdict(summary)}
    storage.write_atomic(
        os.path.join(self.task_dir, f'teacher_{split}.json'), json.dumps(record, indent=2)
    )

  def _select(
      self, answers: list[teachers.Completions], summary: Summary
  ) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """Parses and filters every sample, counting in `summary`; returns the source rows
    and raw texts the authors' layout keeps, and the JSON-lines rows."""
    parse = parser_for(self.source.task, self.prompt, self.custom_prompt)
    score = label_metric(self.source, self.metric)
    kept_rows, raw_texts, jsonl, judged = [], [], [], []
    for i, answer in enumerate(answers):
      summary.prompt_tokens += answer.prompt_tokens
      summary.completion_tokens += answer.completion_tokens
      gold = self.source.gold[i]
      for text in answer.texts:
        summary.samples += 1
        rationale, label, parsed = parse(text)
        summary.parsed += parsed
        summary.unparsed += not parsed
        matches = gold is not None and list(score([gold], [label]).values()) == [100.0]
        if gold is not None:
          judged.append(matches)
        if self.filters.drop_degenerate and degenerate(rationale):
          summary.degenerate_dropped += 1
          continue
        if self.filters.gold_match and gold is not None and not matches:
          summary.gold_mismatch_dropped += 1
          continue
        kept_rows.append(self.source.rows[i])
        raw_texts.append(text)
        row = {'input': self.source.inputs[i], **({'label': gold} if gold is not None else {})}
        if parsed:
          row.update(teacher_label=label.strip(), rationale=rationale.strip(), raw=text)
        elif self.source.split == 'train':  # no teacher label to learn (the authors' layout
          continue  # keeps it blank); evaluation keeps every row, scored against gold
        jsonl.append(row)
    summary.rows_written = len(jsonl)
    if judged:
      summary.teacher_accuracy = 100.0 * sum(judged) / len(judged)
    return kept_rows, raw_texts, jsonl

  def _write_authors_layout(self, rows: list[dict[str, Any]], texts: list[str]) -> None:
    bench = self.source.benchmark
    assert bench is not None
    file_split = benchmarks.FILE_SPLITS[self.source.split]
    storage.write_atomic(
        benchmark_file(self.out, bench.name, self.source.split),
        ''.join(json.dumps(r) + '\n' for r in rows),
    )
    llm = os.path.join(self.task_dir, 'llm')
    count = max(1, -(-len(texts) // bench.chunk_size))
    for i in range(count):
      chunk = texts[i * bench.chunk_size : (i + 1) * bench.chunk_size]
      storage.write_atomic(os.path.join(llm, f'{file_split}_CoT_{i}.json'), json.dumps(chunk))
    # A longer earlier run's later chunks would misalign with these rows.
    while storage.exists(stale := os.path.join(llm, f'{file_split}_CoT_{count}.json')):
      storage.resolve(stale).unlink()
      count += 1


def check_out(
    out: str, source: Source, data_root: Optional[str], input_file: Optional[str] = None
) -> None:
  """Refuses to write over the released data, and proves `out` writable."""
  written = os.path.join(out, source.task, f'{source.split}.jsonl')
  if input_file is not None and storage.resolve(input_file) == storage.resolve(written):
    raise ConfigError(f'--input_file {input_file}: is where the output goes; choose another --out')
  if source.benchmark is not None:
    root = benchmarks.resolve_root(data_root)
    if os.fspath(storage.resolve(root)) == os.fspath(storage.resolve(out)):
      raise ConfigError(
          f'--out {out}: is the data root; the teacher files would replace the released '
          'ones. Write them to another directory (it gets its own copy of the split files)'
      )
  storage.check_writable(out, '--out')


def copy_other_splits(out: str, source: Source, data_root: Optional[str]) -> list[str]:
  """The benchmark's other split files into `out`, when missing, so that
  `DATA_ROOT=<out>` has every split; their teacher outputs are not needed (they
  are evaluated against gold)."""
  if source.benchmark is None:
    return []
  root = benchmarks.resolve_root(data_root)
  copied = []
  for split in SPLITS:
    src = benchmark_file(root, source.task, split)
    dst = benchmark_file(out, source.task, split)
    if split != source.split and storage.exists(src) and not storage.exists(dst):
      storage.write_atomic(dst, storage.read_bytes(src))
      copied.append(dst)
  return copied


def write_demo_eval_splits(out: str, source: Source) -> None:
  """The demo's other splits as gold-only JSON lines beside the extracted one."""
  from dsbs_jax.data import demo

  for split, rows in demo.generate().items():
    path = os.path.join(out, 'demo', f'{split}.jsonl')
    if split != source.split and not storage.exists(path):
      storage.write_atomic(
          path, ''.join(json.dumps({'input': r['input'], 'label': r['label']}) + '\n' for r in rows)
      )


def _byte_length(texts: Iterator[str], prefix: str = '') -> int:
  """The longest of `texts` in bytes (an upper bound in any subword vocabulary), with
  `prefix` and EOS, rounded up to a multiple of 64."""
  longest = max((len((prefix + t).encode()) + 1 for t in texts), default=1)
  return -(-longest // 64) * 64


def task_gin(out: str, task: str, metric: str) -> tuple[Optional[str], str]:
  """(path, '') of a gin/tasks-style file registering `<out>/<task>/<split>.jsonl` as
  the family `<task>_teacher`, trained on the teacher's labels, with feature lengths
  that truncate nothing; or (None, what is missing for it)."""
  files = {s: os.path.join(out, task, f'{s}.jsonl') for s in SPLITS}
  files = {s: p for s, p in files.items() if storage.exists(p)}
  by_split = {s: [row for _, row in benchmarks.read_jsonl(p)] for s, p in files.items()}
  if not any('teacher_label' in row for row in by_split.get('train', [])):
    return None, 'no training row has a teacher label yet (extract --split=train)'
  if 'test' not in files:
    return None, 'training needs a test split too (extract --split=test)'
  rows = [row for split_rows in by_split.values() for row in split_rows]
  inputs = _byte_length((r['input'] for r in rows), prefix=tasks.RATIONALE_PREFIX)
  targets = _byte_length(
      text
      for r in rows
      for text in (r.get('rationale', ''), r.get('teacher_label', ''), r.get('label', ''))
  )
  gold = "'label'" if all('label' in r for r in rows) else 'None'
  path = os.path.join(out, task, 'task.gin')
  storage.write_atomic(
      path,
      '# Written by dsbs-teacher: the extracted rationales as a task (gin/tasks/custom.gin),\n'
      "# distilled from the teacher's labels. Lengths: the longest texts in bytes.\n"
      "include 'tasks/custom.gin'\n"
      f"custom.register.name = '{task}_teacher'\n"
      f'custom.register.files = {files!r}\n'
      f'custom.register.gt_label_field = {gold}\n'
      "custom.register.llm_label_field = 'teacher_label'\n"
      "custom.register.rationale_field = 'rationale'\n"
      f"custom.register.metric = '{metric}'\n"
      "LABEL_SOURCE = 'llm'\n"
      f"TASK_FEATURE_LENGTHS = {{'inputs': {inputs}, 'targets': {targets}}}\n",
  )
  return path, ''


def source_for(
    task: str,
    split: str,
    data_root: Optional[str],
    input_file: Optional[str],
    input_field: str,
    label_field: Optional[str],
    limit: Optional[int],
) -> Source:
  if split not in SPLITS:
    raise ConfigError(f'--split {split}: choose one of {", ".join(SPLITS)}')
  if input_file is not None:
    source = file_source(task, split, input_file, input_field, label_field)
  elif task in benchmarks.BENCHMARKS:
    source = benchmark_source(task, split, data_root)
  elif task == 'demo':
    source = demo_source(split)
  else:
    raise ConfigError(
        f'--task {task}: not a benchmark ({", ".join(benchmarks.BENCHMARKS)}) or the demo; '
        'for your own task pass --input_file'
    )
  if not source.inputs:
    raise DataError(f'{task}/{split}: no inputs')
  if limit is not None and limit < 1:
    raise ConfigError(f'--limit {limit}: must be at least 1')
  if limit is not None:
    source = dataclasses.replace(
        source,
        inputs=source.inputs[:limit],
        gold=source.gold[:limit],
        rows=source.rows[:limit],
    )
  return source
