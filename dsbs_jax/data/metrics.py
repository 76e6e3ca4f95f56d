"""SeqIO metric functions, each `(targets, predictions) -> {name: value}`.

Equations are evaluated with a small AST interpreter (numbers and + - * / only),
never `eval`: model outputs are untrusted strings.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from typing import Optional, cast

_MAX_EQUATION_CHARS = 1000
_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _evaluate(node: ast.AST) -> float:
  if isinstance(node, ast.Expression):
    return _evaluate(node.body)
  if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool
    return float(cast(float, node.value))
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    value = _evaluate(node.operand)
    return -value if isinstance(node.op, ast.USub) else value
  raise ValueError(f'disallowed expression element {type(node).__name__}')


def safe_eval_equation(text: str) -> Optional[float]:
  """The value of an arithmetic expression, or None if it is not one.

  Accepts only numeric literals, parentheses, unary +/- and binary + - * /.
  Anything else (names, calls, attributes, powers, over-long input) and any
  arithmetic error (division by zero, overflow) gives None.
  """
  if not isinstance(text, str) or len(text) > _MAX_EQUATION_CHARS:
    return None
  try:
    value = _evaluate(ast.parse(text.strip(), mode='eval'))
  except (
      SyntaxError,
      ValueError,
      ZeroDivisionError,
      OverflowError,
      RecursionError,
      MemoryError,
      TypeError,
  ):
    return None
  return value if math.isfinite(value) else None


def equations_match(
    target: str, prediction: str, rel_tol: float = 1e-6, abs_tol: float = 1e-6
) -> bool:
  """True when both equations evaluate and their values agree within tolerance."""
  t, p = safe_eval_equation(target), safe_eval_equation(prediction)
  return t is not None and p is not None and math.isclose(t, p, rel_tol=rel_tol, abs_tol=abs_tol)


def equation_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions whose value equals the target equation's (SVAMP's metric)."""
  _check_lengths(targets, predictions)
  hits = sum(equations_match(t, p) for t, p in zip(targets, predictions, strict=True))
  return {'equation_accuracy': 100.0 * hits / max(len(targets), 1)}


def _check_lengths(targets: Sequence[str], predictions: Sequence[str]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')


def normalize_text(text: str) -> str:
  """Whitespace-collapsed and stripped, as the reference's tokenizer decode leaves labels."""
  return ' '.join(text.split())


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of exact matches after `normalize_text` (e-SNLI, ANLI, CQA)."""
  _check_lengths(targets, predictions)
  hits = sum(
      normalize_text(t) == normalize_text(p) for t, p in zip(targets, predictions, strict=True)
  )
  return {'accuracy': 100.0 * hits / max(len(targets), 1)}


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measure (x100) of generated rationales, via `rouge_score`."""
  # Imported here: it loads NLTK (1.5 s), which only runs that evaluate rationales need.
  from rouge_score import rouge_scorer

  _check_lengths(targets, predictions)
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
  scores = [scorer.score(t, p) for t, p in zip(targets, predictions, strict=True)]
  return {
      name: 100.0 * sum(s[name].fmeasure for s in scores) / max(len(scores), 1)
      for name in ('rouge1', 'rouge2', 'rougeL')
  }
