"""The paper's two figures for an experiment grid (matplotlib's object API: no
display, no pyplot state).

`against_data`: the test metric against the percentage of training data, a
line per method with error bars over seeds (the paper's Figures 4-5).
`against_size`: the test metric against model size at the largest fraction,
with the teacher's accuracy as a horizontal line (Figures 6-7).
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from dsbs_jax.experiment import LABELS, Grid

FIGSIZE = (6.0, 4.0)
DPI = 100


def _series(
    records: Sequence[Mapping[str, Any]], x_key: str, **where: Any
) -> dict[tuple[str, float], tuple[list[float], list[float], list[float]]]:
  """{(method, λ): (x, mean, std)} over the records matching `where`, sorted by x."""
  groups: dict[tuple[str, float], dict[float, list[float]]] = {}
  for r in records:
    if all(r[k] == v for k, v in where.items()):
      groups.setdefault((r['method'], r['lambda_']), {}).setdefault(r[x_key], []).append(r['value'])
  out = {}
  for key, by_x in groups.items():
    xs = sorted(by_x)
    means = [statistics.fmean(by_x[x]) for x in xs]
    stds = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs]
    out[key] = (xs, means, stds)
  return out


def _label(method: str, lam: float, lambdas: Sequence[float]) -> str:
  several = method.startswith('step_by_step') and len(lambdas) > 1
  return LABELS[method] + (f' (λ={lam:g})' if several else '')


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
  figure = Figure(figsize=FIGSIZE, dpi=DPI, layout='constrained')
  axes = figure.subplots()
  axes.set_title(title)
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  axes.grid(alpha=0.3)
  return figure, axes


def against_data(grid: Grid, records: Sequence[Mapping[str, Any]]) -> Figure:
  size = list(grid.sizes)[-1]
  metric = records[0]['metric']
  figure, axes = _axes(f'{grid.name} ({size})', '% of training data', f'test {metric}')
  for (method, lam), (xs, means, stds) in _series(records, 'train_fraction', size=size).items():
    axes.errorbar(
        [100 * x for x in xs],
        means,
        yerr=stds,
        marker='o',
        capsize=3,
        label=_label(method, lam, grid.lambdas),
    )
  axes.legend(fontsize='small')
  return figure


def against_size(grid: Grid, records: Sequence[Mapping[str, Any]]) -> Figure:
  fraction = max(grid.train_fractions)
  metric = records[0]['metric']
  figure, axes = _axes(
      f'{grid.name} ({fraction:.0%} of training data)', 'model size (parameters)', f'test {metric}'
  )
  axes.set_xscale('log')
  for (method, lam), (xs, means, stds) in _series(
      records, 'parameters', train_fraction=fraction
  ).items():
    axes.errorbar(
        xs, means, yerr=stds, marker='o', capsize=3, label=_label(method, lam, grid.lambdas)
    )
  sizes = {r['parameters']: r['size'] for r in records if r['train_fraction'] == fraction}
  axes.set_xticks(sorted(sizes), [f'{sizes[n]}\n{_count(n)}' for n in sorted(sizes)])
  axes.minorticks_off()
  if sizes:
    axes.set_xlim(min(sizes) / 2, max(sizes) * 2)
  if grid.teacher_accuracy is not None:
    axes.axhline(
        grid.teacher_accuracy, color='black', linestyle='--', label='Teacher (few-shot CoT)'
    )
  axes.legend(fontsize='small')
  return figure


def _count(parameters: int) -> str:
  """1279740 -> '1.3M', 247577856 -> '248M', 11e9 -> '11B'."""
  for unit, scale in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if parameters >= scale:
      return (
          f'{parameters / scale:.2g}{unit}'
          if parameters < 10 * scale
          else f'{parameters / scale:.0f}{unit}'
      )
  return str(parameters)


def png(figure: Figure) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png')
  return buffer.getvalue()
