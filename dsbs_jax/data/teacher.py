"""Parsers for raw teacher (PaLM 540B) chain-of-thought completions.

The released completions run on past the answer into invented few-shot
examples. Each parser cuts and splits them exactly as the authors' loaders
do, so labels and rationales match theirs character for character, including
their fallbacks: an output with no recognisable answer keeps the row with a
blank rationale/label (the authors' policy). `parsed=False` marks those rows
so that they are counted and reported (`ParseReport`), never hidden.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class TeacherOutput:
  rationale: str
  label: str
  parsed: bool


def _split_once(text: str, marker: str) -> tuple[str, str] | None:
  parts = text.split(marker)
  return (parts[0], parts[1]) if len(parts) == 2 else None


def parse_cqa(output: str) -> TeacherOutput:
  """`<rationale> So the answer is (c) <choice>.` then `Q:` ... -> rationale, choice text."""
  split = _split_once(output.split('Q:')[0].rstrip(), 'So the answer is')
  if split is None:
    return TeacherOutput(' ', ' ', False)
  rationale, answer = split
  pieces = re.split(r'\(.\)', answer)
  label = pieces[1].strip() if len(pieces) > 1 else ''
  if not label:
    return TeacherOutput(rationale.rstrip(), ' ', False)
  # The authors drop one final period, so an answer of only '.' leaves them a blank label.
  label = label[:-1] if label.endswith('.') else label
  return TeacherOutput(rationale.rstrip(), label, bool(label.strip()))


def parse_svamp(output: str) -> TeacherOutput:
  """`<rationale> The answer is (84 / 2).` then `Q:` ... -> rationale, `(84 / 2)`."""
  split = _split_once(output.split('Q:')[0].rstrip(), 'The answer is')
  if split is None:
    return TeacherOutput(' ', ' ', False)
  rationale, answer = split
  match = re.search(r'\(.*\)', answer)
  if match is None:
    return TeacherOutput(rationale.rstrip(), ' ', False)
  return TeacherOutput(rationale.rstrip(), match.group(0), True)


def parse_anli(output: str) -> TeacherOutput:
  """`<rationale> So the answer is neutral.` then `Premise:` ... -> rationale, `neutral`."""
  split = _split_once(output.split('Premise:')[0].rstrip(), 'So the answer is')
  if split is None:
    return TeacherOutput('', '', False)
  rationale, answer = split
  label = answer.lstrip()[:-1]
  return TeacherOutput(rationale.rstrip(), label, bool(label.strip()))


def parse_esnli(output: str) -> TeacherOutput:
  """`<rationale>\\nAnswer: neutral` then `Premise:` ... -> rationale, `neutral`."""
  rationale = output.split('Answer:')[0].rstrip()
  pieces = output.split('Answer: ')
  if len(pieces) < 2:
    return TeacherOutput(rationale, ' ', False)
  label = pieces[1].split('Premise')[0].rstrip()
  return TeacherOutput(rationale, label, bool(label.strip()))


@dataclasses.dataclass(frozen=True)
class ParseReport:
  """What parsing one split produced: how many outputs, how many unparseable."""

  source: str
  total: int
  unparsed: int
  labels: Mapping[str, int]

  def summary(self) -> str:
    if not self.total:
      return f'{self.source}: no teacher outputs (an evaluation split, scored against gold)'
    common = ', '.join(f'{k!r}: {v}' for k, v in collections.Counter(self.labels).most_common(4))
    return (
        f'{self.source}: parsed {self.total - self.unparsed}/{self.total} teacher outputs, '
        f'{self.unparsed} unparseable (kept with a blank label, as the authors do); '
        f'most common labels {{{common}}}'
    )


def report(source: str, outputs: Iterable[TeacherOutput]) -> ParseReport:
  outputs = list(outputs)
  return ParseReport(
      source,
      len(outputs),
      sum(not o.parsed for o in outputs),
      dict(collections.Counter(o.label for o in outputs)),
  )
