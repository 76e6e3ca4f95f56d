"""The Evaluator: SeqIO inference evaluation by greedy decoding.

Only `predict:` runs at deployment, so training evaluates the label task
(`tasks.evaluation_tasks`), and the rationale task only on request. SeqIO
computes each task's metrics and its loggers write TensorBoard summaries and
`<task>-<step>.jsonl` predictions under `log_dir`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

from dsbs_jax.models import StepByStepModel
from dsbs_jax.partitioning import Partitioner


class Evaluator:
  """Decodes one split of some tasks with fixed-shape batches and scores them with SeqIO."""

  def __init__(self, task_names: Sequence[str], split: str, task_feature_lengths: Mapping[str, int],
               model: StepByStepModel, partitioner: Partitioner, batch_size: int,
               param_shardings: Any, log_dir: Optional[str],
               num_examples: Optional[int] = None):
    loggers = (seqio.TensorBoardLogger, seqio.JSONLogger) if log_dir else ()
    self._seqio = [seqio.Evaluator(
        mixture_or_task_name=name, feature_converter=model.FEATURE_CONVERTER_CLS(pack=False),
        eval_split=split, sequence_length=dict(task_feature_lengths), num_examples=num_examples,
        logger_cls=loggers, log_dir=log_dir, async_compute_metrics=False) for name in task_names]
    self.batch_size = batch_size
    self.partitioner = partitioner
    self._predict = jax.jit(model.predict_batch,
                            in_shardings=(param_shardings, partitioner.batch_sharding()),
                            out_shardings=partitioner.batch_sharding())

  def _predict_fn(self, params: Any):
    def predict_fn(ds, model_feature_shapes=None):
      del model_feature_shapes
      results = []
      for indices, batch in ds.batch(self.batch_size).as_numpy_iterator():
        n = len(indices)
        padded = {k: np.pad(v, [(0, self.batch_size - n)] + [(0, 0)] * (v.ndim - 1))
                  for k, v in batch.items()}
        with self.partitioner.activate():
          tokens = np.asarray(self._predict(params, self.partitioner.shard_batch(padded)))
        results.extend(zip(indices.tolist(), tokens[:n].tolist()))
      return results
    return predict_fn

  def evaluate(self, params: Any, step: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for the split, logged at `step`."""
    results = {}
    for evaluator in self._seqio:
      metrics, _ = evaluator.evaluate(compute_metrics=True, step=step,
                                      predict_fn=self._predict_fn(params))
      results.update({task: {name: float(getattr(v, 'value', v)) for name, v in values.items()}
                      for task, values in metrics.result().items()})
    return results
