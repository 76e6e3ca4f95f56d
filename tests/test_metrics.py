"""The safe arithmetic evaluator and equation accuracy."""

import pytest

from dsbs_jax.data import metrics


@pytest.mark.parametrize(
    'text,value',
    [
        ('( ( 17.0 + 15.0 ) + 2.0 )', 34.0),
        ('(84 / 2)', 42.0),
        ('-3 * (2 - 5)', 9.0),
        ('  7.5  ', 7.5),
        ('+4', 4.0),
    ],
)
def test_evaluates_arithmetic(text, value):
  assert metrics.safe_eval_equation(text) == value


@pytest.mark.parametrize(
    'text',
    [
        "__import__('os')",
        "__import__('os').system('echo pwned')",
        'open("/etc/passwd")',
        '(1).__class__',
        'x + 1',
        '2 ** 10',
        '9 ** 9 ** 9',
        '1 if 1 else 2',
        '[1, 2]',
        'lambda: 1',
        '1 / 0',
        '(',
        '',
        'True + 1',
        '1e308 * 10',
        '"a" + "b"',
        '1 ' + '+ 1 ' * 5000,
        '(' * 499 + '1' + ')' * 499,
        None,
        3,
    ],
)
def test_hostile_or_invalid_input_gives_none(text):
  assert metrics.safe_eval_equation(text) is None


def test_nesting_within_the_parser_limit_evaluates():
  assert metrics.safe_eval_equation('(' * 150 + '1' + ')' * 150) == 1.0


def test_equation_accuracy():
  targets = ['( 1.0 + 2.0 )', '( 6.0 / 4.0 )', '( 2.0 * 3.0 )', '( 1.0 - 1.0 )']
  predictions = ['( 2.0 + 1.0 )', '1.5', '__import__("os")', '( 1.0 - 1.0']
  assert metrics.equation_accuracy(targets, predictions) == {'equation_accuracy': 50.0}
  with pytest.raises(ValueError, match='2 targets but 1 predictions'):
    metrics.equation_accuracy(targets[:2], predictions[:1])
