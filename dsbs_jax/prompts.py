"""Few-shot chain-of-thought prompts for asking a teacher LLM for rationales.

A `Prompt` renders one input as the exemplars' worked answers followed by the
input's question, in the answer format `data.teacher` parses (the released
PaLM outputs' formats):

    Q: <exemplar input>
    A: <exemplar rationale> The answer is (84 / 2).

    Q: <the input>
    A:

The teacher continues after `A:` and is stopped at the next question (`stop`).
The built-in prompts (`PROMPTS`) are ours, written for each benchmark and the
demo. `load` reads a user's prompt (a JSON file, for their own task), and
`with_exemplars` swaps in a user's exemplars (a JSON-lines file) for a built-in
prompt. `zero_shot` drops the exemplars and asks "Let's think step by step."
(Kojima et al., 2022).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any, Optional

from dsbs_jax import storage, teachers
from dsbs_jax.data import benchmarks, tasks
from dsbs_jax.errors import DataError

ZERO_SHOT_TRIGGER = "Let's think step by step."
_FIELD = re.compile(r'\{[a-z]+\}')
# Between an NLI premise and hypothesis in a task's input.
_NLI_SEPARATOR = tasks.SEPARATOR


@dataclasses.dataclass(frozen=True)
class Exemplar:
  """A worked example: `answer` is written verbatim after the answer phrase."""

  input: str
  rationale: str
  answer: str


@dataclasses.dataclass(frozen=True)
class Prompt:
  """How a task's inputs are put to the teacher.

  question: the text before the teacher's turn, with `{input}` (or, for NLI,
    `{premise}` and `{hypothesis}`).
  answer: the worked answer after it, with `{rationale}` and `{answer}`.
  stop: where the teacher's continuation is cut (the next exemplar's start).
  """

  question: str
  answer: str
  stop: tuple[str, ...]
  exemplars: tuple[Exemplar, ...] = ()
  instruction: str = ''
  zero_shot: bool = False

  def question_text(self, text: str) -> str:
    if '{premise}' in self.question:
      premise, _, hypothesis = text.partition(_NLI_SEPARATOR)
      return self.question.format(premise=premise, hypothesis=hypothesis)
    return self.question.format(input=text)

  def render(self, text: str) -> str:
    """The whole prompt for one input."""
    parts = [self.instruction] if self.instruction else []
    if self.zero_shot:
      parts.append(f'{self.question_text(text)} {ZERO_SHOT_TRIGGER}')
      return '\n\n'.join(parts)
    for ex in self.exemplars:
      parts.append(
          self.question_text(ex.input)
          + self.answer.format(rationale=ex.rationale, answer=ex.answer)
      )
    parts.append(self.question_text(text))
    return '\n\n'.join(parts)

  def fingerprint(self) -> str:
    """A hash of everything that shapes the rendered prompts."""
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def parse(self, completion: str) -> tuple[str, str, bool]:
    """(rationale, answer, parsed) from a completion in this prompt's answer format:
    the text up to the first stop, matched against `answer` with its fields free."""
    completion = teachers.cut_at_stop(completion, self.stop)
    before, _, after = self.answer.partition('{rationale}')
    middle, _, tail = after.partition('{answer}')
    pattern = (
        r'\s*'
        + re.escape(before.strip())
        + r'\s*(?P<rationale>.*?)\s*'
        + re.escape(middle.strip())
        + r'\s*(?P<answer>.+?)\s*'
        + re.escape(tail.strip())
        + r'\s*$'
    )
    match = re.fullmatch(pattern, completion, flags=re.DOTALL)
    if match is None or not match['answer'].strip():
      return completion.strip(), '', False
    return match['rationale'], match['answer'], True


_SVAMP = Prompt(
    question='Q: {input}\nA:',
    answer=' {rationale} The answer is {answer}.',
    stop=('\n\nQ:', '\nQ:'),
    exemplars=(
        Exemplar(
            'Mia baked 48 muffins and put them into boxes of 6.\nHow many boxes did she fill?',
            'She has 48 muffins and each box holds 6. 48 / 6 = 8.',
            '(48 / 6)',
        ),
        Exemplar(
            'A train had 35 passengers. At the station 12 got off and 20 got on.\n'
            'How many passengers are on the train now?',
            'It started with 35. 12 got off, so 35 - 12 = 23. 20 got on, so 23 + 20 = 43.',
            '((35 - 12) + 20)',
        ),
        Exemplar(
            'Each of 7 shelves holds 9 books. Dan also owns 3 lamps.\n'
            'How many books are on the shelves?',
            'There are 7 shelves with 9 books each. The lamps do not matter. 7 * 9 = 63.',
            '(7 * 9)',
        ),
        Exemplar(
            'Rosa had some stickers. She gave 14 to her brother and has 26 left.\n'
            'How many stickers did she have at first?',
            'She has 26 after giving away 14, so she had 26 + 14 = 40.',
            '(26 + 14)',
        ),
    ),
)

_CQA = Prompt(
    question='Q: {input}\nA:',
    answer=' {rationale} So the answer is {answer}.',
    stop=('\n\nQ:', '\nQ:'),
    exemplars=(
        Exemplar(
            'Where would you keep milk cold?\nAnswer Choices:\n(a) cupboard\n(b) refrigerator\n'
            '(c) oven\n(d) table\n(e) bag',
            'Milk spoils when warm. A refrigerator keeps food cold.',
            '(b) refrigerator',
        ),
        Exemplar(
            'What do people usually do when they are tired?\nAnswer Choices:\n(a) run\n(b) shout\n'
            '(c) sleep\n(d) cook\n(e) swim',
            'Being tired means needing rest. People rest by sleeping.',
            '(c) sleep',
        ),
        Exemplar(
            'Where can you borrow a book for free?\nAnswer Choices:\n(a) library\n(b) bookstore\n'
            '(c) printer\n(d) office\n(e) school bus',
            'A bookstore sells books. A library lends books to its members for free.',
            '(a) library',
        ),
    ),
)

_ANLI = Prompt(
    question='Premise: {premise}\nHypothesis: {hypothesis}\nAnswer:',
    answer=' {rationale} So the answer is {answer}.',
    stop=('\n\nPremise:', '\nPremise:'),
    exemplars=(
        Exemplar(
            'The bakery on Elm Street opened in 1998 and sells bread and cakes every day.'
            f'{_NLI_SEPARATOR}The bakery sells cakes.',
            'The premise says the bakery sells bread and cakes every day.',
            'entailment',
        ),
        Exemplar(
            f'Maria Lopez is a Spanish painter born in Seville.{_NLI_SEPARATOR}'
            'Maria Lopez has painted portraits of her family.',
            'The premise says she is a painter but not what she painted.',
            'neutral',
        ),
        Exemplar(
            f'The bridge was closed for repairs during all of 2019.{_NLI_SEPARATOR}'
            'Cars crossed the bridge in July 2019.',
            'The bridge was closed for the whole of 2019, so no cars crossed it in July 2019.',
            'contradiction',
        ),
    ),
)

_ESNLI = Prompt(
    question='Premise: {premise}\nHypothesis: {hypothesis}\nReasonings:',
    answer=' {rationale}\nAnswer: {answer}',
    stop=('\n\nPremise:', '\nPremise:'),
    exemplars=(
        Exemplar(
            f'A man in a red jacket rides a bike down the street.{_NLI_SEPARATOR}A man is riding.',
            'Riding a bike down the street is riding.',
            'entailment',
        ),
        Exemplar(
            f'Two children play in the sand at a beach.{_NLI_SEPARATOR}The children are siblings.',
            'Children playing together are not necessarily siblings.',
            'neutral',
        ),
        Exemplar(
            f'A woman sleeps on a couch.{_NLI_SEPARATOR}A woman runs a marathon.',
            'A woman cannot sleep on a couch and run a marathon at the same time.',
            'contradiction',
        ),
    ),
)

PROMPTS: dict[str, Prompt] = {
    'svamp': _SVAMP,
    'demo': _SVAMP,
    'cqa': _CQA,
    'anli1': _ANLI,
    'esnli': _ESNLI,
}


def _strings(row: dict[str, Any], keys: Sequence[str], where: str) -> list[str]:
  values = []
  for key in keys:
    if not isinstance(row.get(key), str):
      raise DataError(f'{where}: field {key!r} must be a string (fields: {sorted(row)})')
    values.append(row[key])
  return values


def read_exemplars(path: str) -> tuple[Exemplar, ...]:
  """Exemplars from JSON lines with `input`, `rationale` and `answer` (what follows the
  answer phrase, e.g. `(48 / 6)` or `(b) refrigerator`)."""
  rows = benchmarks.read_jsonl(path)
  if not rows:
    raise DataError(f'{path}: no exemplars (expected JSON lines with input, rationale, answer)')
  return tuple(
      Exemplar(*_strings(row, ('input', 'rationale', 'answer'), f'{path}:{line}'))
      for line, row in rows
  )


def load(path: str) -> Prompt:
  """A prompt for one's own task from a JSON file:

  {"question": "Q: {input}\\nA:", "answer": " {rationale} So the answer is {answer}.",
   "stop": ["\\nQ:"], "instruction": "", "exemplars": [{"input":..., "rationale":..., "answer":...}]}
  """
  try:
    spec = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from None
  if not isinstance(spec, dict):
    raise DataError(f'{path}: expected a JSON object with question, answer, stop, exemplars')
  unknown = sorted(set(spec) - {'question', 'answer', 'stop', 'exemplars', 'instruction'})
  if unknown:
    raise DataError(
        f'{path}: unknown field {", ".join(map(repr, unknown))}; the fields are question, '
        'answer, stop, exemplars and instruction'
    )
  question, answer = _strings(spec, ('question', 'answer'), path)
  if '{input}' not in question and not {'{premise}', '{hypothesis}'} <= set(
      _FIELD.findall(question)
  ):
    raise DataError(
        f"{path}: field 'question' must contain {{input}} (or {{premise}} and {{hypothesis}})"
    )
  for field in ('{rationale}', '{answer}'):
    if field not in answer:
      raise DataError(f"{path}: field 'answer' must contain {field}")
  stop = spec.get('stop', [])
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise DataError(f"{path}: field 'stop' must be a list of non-empty strings")
  exemplars = spec.get('exemplars', [])
  if not isinstance(exemplars, list):
    raise DataError(f"{path}: field 'exemplars' must be a list")
  prompt = Prompt(
      question=question,
      answer=answer,
      stop=tuple(stop),
      exemplars=tuple(
          Exemplar(
              *_strings(
                  ex if isinstance(ex, dict) else {},
                  ('input', 'rationale', 'answer'),
                  f'{path}: exemplars[{i}]',
              )
          )
          for i, ex in enumerate(exemplars)
      ),
      instruction=_strings(spec, ('instruction',), path)[0] if 'instruction' in spec else '',
  )
  try:  # a literal brace or an unknown {field} in the templates
    prompt.render('a' + _NLI_SEPARATOR + 'b')
    prompt.parse('')
  except (KeyError, IndexError, ValueError) as e:
    raise DataError(
        f'{path}: the templates may use only {{input}} (or {{premise}}, {{hypothesis}}), '
        f'{{rationale}} and {{answer}}; write a literal brace as {{{{ or }}}} ({e!r})'
    ) from None
  return prompt


def resolve(
    task: str,
    prompt_file: Optional[str] = None,
    exemplars_file: Optional[str] = None,
    zero_shot: bool = False,
) -> Prompt:
  """The prompt a run uses: the task's built-in one or `prompt_file`, with
  `exemplars_file`'s exemplars if given, or none when zero-shot."""
  if prompt_file is not None:
    prompt = load(prompt_file)
  elif task in PROMPTS:
    prompt = PROMPTS[task]
  else:
    raise DataError(
        f'--task {task}: no built-in prompt (they are {", ".join(sorted(PROMPTS))}); '
        'write one and pass --prompt_file'
    )
  if exemplars_file is not None and zero_shot:
    raise DataError('--exemplars and --zero_shot: a zero-shot prompt has no exemplars; choose one')
  if exemplars_file is not None:
    prompt = dataclasses.replace(prompt, exemplars=read_exemplars(exemplars_file))
  if zero_shot:
    prompt = dataclasses.replace(prompt, exemplars=(), zero_shot=True)
  elif not prompt.exemplars:
    raise DataError(f'{prompt_file or task}: the prompt has no exemplars; add some or --zero_shot')
  return prompt
