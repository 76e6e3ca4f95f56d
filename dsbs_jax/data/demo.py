"""The embedded demo: synthetic arithmetic word problems in SVAMP's style.

Each example has an `input` (a short story and a question, with distractor
numbers), a gold `label` equation in SVAMP's format, e.g.
`( ( 17.0 + 15.0 ) - 2.0 )`, and a step-by-step `rationale` that ends the way
the released PaLM outputs do: `... The answer is ((17 + 15) - 2).` The
generator is deterministic, and the splits never share an input.
"""

from __future__ import annotations

import random
from typing import Optional

import seqio

from dsbs_jax.data import metrics, splits, tasks

NAME = 'demo'
SPLIT_SIZES = {'test': 500, 'validation': 500, 'train': 10000}
_SPLIT_ORDER = ('test', 'validation', 'train')
_OPS_WEIGHTS = (0.5, 0.3, 0.2)  # problems with one, two, three operations

_PEOPLE = [
    ('Tom', 'he', 'him'),
    ('Anna', 'she', 'her'),
    ('Luke', 'he', 'him'),
    ('Maria', 'she', 'her'),
    ('Sam', 'he', 'him'),
    ('Julia', 'she', 'her'),
    ('Omar', 'he', 'him'),
    ('Priya', 'she', 'her'),
    ('Ken', 'he', 'him'),
    ('Lena', 'she', 'her'),
    ('Ravi', 'he', 'him'),
    ('Zoe', 'she', 'her'),
]
_ITEMS = [
    'apples',
    'marbles',
    'stickers',
    'books',
    'pencils',
    'cookies',
    'shells',
    'cards',
    'coins',
    'stamps',
    'balloons',
    'candies',
]
_START = ['{name} has {a} {item}.', '{name} had {a} {item}.', "{name}'s bag holds {a} {item}."]
_START_PRODUCT = ['{name} has {a} boxes of {b} {item}.', '{name} buys {a} packs of {b} {item}.']
_ADD = ['{Subj} buys {n} more.', '{Subj} finds {n} more.', 'A friend gives {obj} {n}.']
_SUB = ['{Subj} gives away {n}.', '{Subj} loses {n}.', '{Subj} eats {n}.']
_MUL = ['Then {subj} has {n} times as many.', '{Subj} trades each for {n} new ones.']
_DIV = [
    ('{Subj} shares them among {n} friends.', 'How many does each friend get?'),
    ('{Subj} makes {n} equal piles.', 'How many are in each pile?'),
]
_DISTRACT = [
    '{Subj} also has {m} {other}.',
    '{Subj} is {m} years old.',
    'The shop is {m} miles away.',
]
_QUESTION = ['How many {item} does {subj} have now?', 'How many {item} are there now?']


def _fmt(template: str, **kw) -> str:
  return template.format(**kw)


def make_example(rng: random.Random) -> dict[str, str]:
  """One problem: {'input', 'label', 'rationale'}."""
  name, subj, obj = rng.choice(_PEOPLE)
  item, other = rng.sample(_ITEMS, 2)
  kw = {
      'name': name,
      'subj': subj,
      'Subj': subj.capitalize(),
      'obj': obj,
      'item': item,
      'other': other,
  }
  n_ops = rng.choices((1, 2, 3), weights=_OPS_WEIGHTS)[0]
  sentences, steps = [], []
  if rng.random() < 0.3:
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    sentences.append(_fmt(rng.choice(_START_PRODUCT), a=a, b=b, **kw))
    value, eq, short = a * b, f'( {a}.0 * {b}.0 )', f'({a} * {b})'
    steps.append(f'{a} * {b} = {value}.')
    n_ops -= 1
  else:
    value = rng.randint(5, 60)
    sentences.append(_fmt(rng.choice(_START), a=value, **kw))
    eq, short = f'{value}.0', f'{value}'
    steps.append(f'Start with {value}.')
  question = rng.choice(_QUESTION)
  for i in range(n_ops):
    choices = ['+', '-', '*'] + (['/'] if i == n_ops - 1 else [])
    op = rng.choice(choices)
    if op == '-' and value <= 2:
      op = '+'
    if op == '*' and value > 60:
      op = '-'
    if op == '/':
      divisors = [d for d in range(2, 13) if value % d == 0 and value // d > 0]
      if not divisors:
        op = '+'
    if op == '+':
      n = rng.randint(2, 40)
      template, result = _ADD, value + n
    elif op == '-':
      n = rng.randint(1, value - 1)
      template, result = _SUB, value - n
    elif op == '*':
      n = rng.randint(2, 5)
      template, result = _MUL, value * n
    else:
      n = rng.choice(divisors)
      sentence, question = rng.choice(_DIV)
      template, result = [sentence], value // n
    sentences.append(_fmt(rng.choice(template), n=n, **kw))
    steps.append(f'{value} {op} {n} = {result}.')
    eq, short = f'( {eq} {op} {n}.0 )', f'({short} {op} {n})'
    value = result
  for _ in range(rng.randint(0, 1)):
    pos = rng.randint(1, len(sentences))
    sentences.insert(pos, _fmt(rng.choice(_DISTRACT), m=rng.randint(2, 50), **kw))
  rationale = ' '.join(steps) + f' The answer is {short}.'
  return {
      'input': ' '.join(sentences) + '\n' + _fmt(question, **kw),
      'label': eq,
      'rationale': rationale,
  }


def generate(seed: int = 0) -> dict[str, list[dict[str, str]]]:
  """All splits, deterministic in `seed`, with no input shared between splits."""
  rng = random.Random(seed)
  seen: set[str] = set()
  by_split: dict[str, list[dict[str, str]]] = {}
  for split in _SPLIT_ORDER:
    rows: list[dict[str, str]] = []
    while len(rows) < SPLIT_SIZES[split]:
      ex = make_example(rng)
      if ex['input'] not in seen:
        seen.add(ex['input'])
        rows.append(ex)
    by_split[split] = rows
  return by_split


_SPLITS = generate()


def register(
    vocabulary: Optional[seqio.Vocabulary] = None,
    name: str = NAME,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> tasks.StepByStepFamily:
  """Registers `{name}`'s family (`tasks`) over the generated problems; `train_fraction`
  of the training rows, subsampled with `seed` as the paper's datasets are."""
  splits.check_fraction(train_fraction)

  def load(split: str) -> list[dict[str, str]]:
    rows = _SPLITS[split]
    return splits.subsample_train(rows, train_fraction, seed) if split == 'train' else rows

  source = tasks.rows_source(load, tuple(SPLIT_SIZES))
  return tasks.register_step_by_step(
      name,
      source,
      vocabulary,
      label_fields={'gt': 'label'},
      label_metric_fns=[metrics.equation_accuracy],
      rationale_metric_fns=[metrics.rouge],
  )
