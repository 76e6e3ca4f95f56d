"""The Evaluator: SeqIO inference evaluation by greedy decoding.

Only `predict:` runs at deployment, so training evaluates the label task
(`tasks.evaluation_tasks`), and the rationale task only on request. SeqIO
computes each task's metrics and its loggers write TensorBoard summaries and
`<task>-<step>.jsonl` predictions under `log_dir`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils

from dsbs_jax import losses, monitoring
from dsbs_jax.data import tasks
from dsbs_jax.data.input_pipeline import numpy_iterator
from dsbs_jax.decoding import (
    MAX_INPUT_WIDTHS,
    batch_widths,
    input_lengths,
    length_sorted_batches,
    with_input_width,
)
from dsbs_jax.errors import ConfigError
from dsbs_jax.models import StepByStepModel
from dsbs_jax.partitioning import Partitioner


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  """Model selection on validation, and the final evaluation.

  period: evaluate `split` every this many steps and keep the best state in
    MODEL_DIR/best. None (the default) evaluates at every checkpoint period when the
    task has a validation split, and never otherwise; 0 turns selection off.
  split: the split that selects; never the test split.
  final_split: evaluated once at the end, with the best state (None: skipped).
  batch_size: rows per evaluation batch (default: BATCH_SIZE).
  num_examples: evaluate only the first this many examples (a quick look).
  best_metric: the flattened metric that selects, e.g. `cqa_llm_label/accuracy` or
    `teacher_forced/loss`; default: the label task's first metric.
  best_mode: `max` or `min`.
  rationales: also decode the rationale task and score it (ROUGE).
  max_input_widths: decoding compiles at most this many input widths per task
    and split, multiples of 8 chosen from the split's lengths to pad the least;
    1 pads every batch to the split's longest input rounded up to 8 (one shape).
  """

  period: Optional[int] = None
  split: str = 'validation'
  final_split: Optional[str] = 'test'
  batch_size: Optional[int] = None
  num_examples: Optional[int] = None
  best_metric: Optional[str] = None
  best_mode: str = 'max'
  rationales: bool = False
  max_input_widths: int = MAX_INPUT_WIDTHS

  def __post_init__(self):
    widths = self.max_input_widths
    if isinstance(widths, bool) or not isinstance(widths, int) or widths < 1:
      raise ConfigError(
          f'evaluation.EvaluationConfig.max_input_widths must be an integer >= 1; got '
          f'{widths!r}'
      )
    if self.period is not None and self.period < 0:
      raise ConfigError(f'evaluation.EvaluationConfig.period must be >= 0; got {self.period}')
    if self.best_mode not in ('max', 'min'):
      raise ConfigError(
          f'evaluation.EvaluationConfig.best_mode must be "max" or "min"; got '
          f'{self.best_mode!r}'
      )
    if self.split == 'test':
      raise ConfigError(
          'evaluation.EvaluationConfig.split is "test": model selection must not '
          'see the test split; select on "validation"'
      )


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """A final, short batch padded with all-zero rows to the fixed batch shape (no recompiling).

  Zero rows decode to ignored predictions and carry task id 0, so they add no loss.
  """
  return {k: np.pad(v, [(0, rows - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def _read_split(ds: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """SeqIO's (index, features) dataset as [n] indices and {feature: [n, ...]} rows.

  Evaluation splits fit in host memory (e-SNLI's test split, the largest, is
  9,824 rows), and sorting by length needs the whole split at once.
  """
  indices, batches = [], []
  for index, batch in numpy_iterator(ds.batch(4096)):
    indices.append(index)
    batches.append(batch)
  if not batches:
    return np.zeros((0,), np.int64), {}
  return np.concatenate(indices), {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class Evaluator:
  """Decodes one split of some tasks and scores them with SeqIO.

  As T5X's inference evaluation, it reads the split at its own lengths (SeqIO
  measures them), so no input is cut and decoding stops at the longest target.
  The split is decoded longest inputs first (`length_sorted_batches`), so each
  batch is about as wide as its own rows. Batches have a fixed number of rows,
  and their inputs take at most `max_input_widths` widths, chosen from the
  split to pad the least (`batch_widths`), so at most that many shapes compile
  per task and split, and evaluating the same split again compiles none.
  """

  def __init__(
      self,
      task_names: Sequence[str],
      split: str,
      model: StepByStepModel,
      partitioner: Partitioner,
      batch_size: int,
      param_shardings: Any,
      log_dir: Optional[str],
      num_examples: Optional[int] = None,
      max_input_widths: int = MAX_INPUT_WIDTHS,
  ):
    loggers = monitoring.seqio_loggers() if log_dir else ()
    self._seqio = [
        seqio.Evaluator(
            mixture_or_task_name=name,
            feature_converter=model.FEATURE_CONVERTER_CLS(pack=False),
            eval_split=split,
            sequence_length=None,
            num_examples=num_examples,
            logger_cls=loggers,
            log_dir=log_dir,
            async_compute_metrics=False,
        )
        for name in task_names
    ]
    self.batch_size = batch_size
    self.max_input_widths = max_input_widths
    self.partitioner = partitioner
    self._predict = jax.jit(
        model.predict_batch,
        in_shardings=(param_shardings, partitioner.batch_sharding()),
        out_shardings=partitioner.batch_sharding(),
    )

  def _predict_fn(self, params: Any):
    def predict_fn(ds, model_feature_shapes=None):
      del model_feature_shapes
      indices, rows = _read_split(ds)
      results: list[tuple[int, list[int]]] = []
      if not len(indices):
        return results
      lengths = input_lengths(rows['encoder_input_tokens'])
      batches = length_sorted_batches(lengths, self.batch_size)
      widths = batch_widths(lengths, batches, self.max_input_widths)
      if jax.process_count() > 1:  # SPMD: each process holds the whole split
        multihost_utils.assert_equal(widths, 'the processes read different evaluation splits')
      for chosen, width in zip(batches, widths, strict=True):
        batch = {k: v[chosen] for k, v in rows.items()}
        padded = with_input_width(pad_rows(batch, self.batch_size), int(width))
        with self.partitioner.activate():
          tokens = self._predict(params, self.partitioner.shard_global_batch(padded))
        tokens = multihost_utils.process_allgather(tokens, tiled=True)
        results.extend(zip(indices[chosen].tolist(), tokens[: len(chosen)].tolist(), strict=True))
      return results  # SeqIO puts them back in the split's order by index

    return predict_fn

  def evaluate(self, params: Any, step: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for the split, logged at `step`."""
    results = {}
    for evaluator in self._seqio:
      metrics, _ = evaluator.evaluate(
          compute_metrics=True, step=step, predict_fn=self._predict_fn(params)
      )
      results.update(
          {
              task: {name: float(getattr(v, 'value', v)) for name, v in values.items()}
              for task, values in metrics.result().items()
          }
      )
    return results


class LossEvaluator:
  """Teacher-forced loss and token accuracy per task on one split (packed, fixed shapes).

  Complements the decoding `Evaluator`: it covers the rationale task too and
  costs one forward pass per batch. `num_examples` takes the split's first
  examples (both sequences of each, for a paired task), as the decoding
  `Evaluator` does, before they are packed (first-fit packing reorders them).
  """

  def __init__(
      self,
      mixture_or_task_name: str,
      split: str,
      task_feature_lengths: Mapping[str, int],
      model: StepByStepModel,
      partitioner: Partitioner,
      batch_size: int,
      param_shardings: Any,
      num_examples: Optional[int] = None,
  ):
    examples = seqio.get_mixture_or_task(mixture_or_task_name).get_dataset(
        dict(task_feature_lengths), split=split, shuffle=False, num_epochs=1
    )
    if num_examples:
      examples = examples.take(num_examples * tasks.sequences_per_example(mixture_or_task_name))
    converter = model.FEATURE_CONVERTER_CLS(pack=True)
    self._dataset = converter(examples, dict(task_feature_lengths))
    self.batch_size = batch_size
    self.partitioner = partitioner
    self.num_tasks = len(model.task_weights)
    self.task_weights = np.asarray(model.task_weights)
    self._loss = jax.jit(
        lambda p, b: model.loss_fn(p, b, None)[1],
        in_shardings=(param_shardings, partitioner.batch_sharding()),
    )

  def evaluate(self, params: Any) -> dict[str, float]:
    """{'loss', '<task>/loss', '<task>/accuracy'} over the whole split."""
    names = [losses.TASK_NAMES[k] for k in range(1, self.num_tasks + 1)]
    sums = {f'{n}/{m}': 0.0 for n in names for m in ('loss', 'accuracy')}
    tokens = dict.fromkeys(names, 0.0)
    for batch in numpy_iterator(self._dataset.batch(self.batch_size)):
      padded = pad_rows(batch, self.batch_size)
      with self.partitioner.activate():
        metrics = jax.device_get(self._loss(params, self.partitioner.shard_global_batch(padded)))
      for name in names:
        count = float(metrics[f'{name}/tokens'])
        tokens[name] += count
        for m in ('loss', 'accuracy'):
          sums[f'{name}/{m}'] += float(metrics[f'{name}/{m}']) * count
    out = {k: v / max(tokens[k.split('/')[0]], 1.0) for k, v in sums.items()}
    out['loss'] = float(
        sum(w * out[f'{n}/loss'] for w, n in zip(self.task_weights, names, strict=True))
    )
    return out
