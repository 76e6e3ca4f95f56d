"""dsbs-jax's tasks, network and objective under the real `t5x.train`, `t5x.eval` and
`t5x.infer`.

T5X trains any `t5x.models.BaseModel`. `StepByStepT5XModel` is T5X's own
`EncoderDecoderModel` around our `models.StepByStepModel`, so T5X's trainer,
partitioner, checkpoints, decoding functions and SeqIO evaluation run
unchanged, while the loss (L = L_label + lambda * L_rationale over each task's
tokens) and the feature converter (which keeps every target token's task
through packing) are ours. `StepByStepTrainer` is T5X's `Trainer` that gives
every microbatch the whole batch's per-task token counts, so gradient
accumulation equals the big batch exactly, as in `dsbs-train`.
`gin/t5x_bridge.gin` binds both.

Importing this module needs t5x (not on PyPI: install it from its repository).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics
from t5x import decoding as t5x_decoding
from t5x import metrics as metrics_lib
from t5x import models as t5x_models
from t5x import trainer as t5x_trainer

from dsbs_jax import losses, models, partitioning
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter

if not hasattr(t5x_models.EncoderDecoderModel, '_compute_kv_cache'):
  raise ImportError(
      'dsbs_jax.t5x_bridge needs a T5X from 2023 or later '
      '(one whose EncoderDecoderModel has _compute_kv_cache)'
  )

# The feature StepByStepTrainer adds inside the train step: [rows, tasks], the whole
# batch's token count of each task in every row, for microbatches to normalise by.
BATCH_TASK_TOKENS = 'batch_task_token_counts'


@flax.struct.dataclass
class TokenAverage(clu_metrics.Average):
  """A per-task token mean. An evaluation without that task's tokens (the label task's
  loss on the rationale task's own eval) reports 0 beside its 0 tokens, not NaN."""

  def compute(self) -> jax.Array:
    return jnp.where(self.count > 0, self.total / jnp.maximum(self.count, 1e-9), 0.0)


def t5x_metrics(
    scalars: Mapping[str, jax.Array], own_tokens: jax.Array
) -> dict[str, clu_metrics.Metric]:
  """`StepByStepModel.loss_fn`'s scalars as the CLU metrics T5X merges.

  `scalars` are means over `{task}/tokens` tokens (the whole batch's, for a
  microbatch); `own_tokens` [k] are the tokens of this (micro)batch. Totals are
  sums over these tokens, so T5X's merge over microbatches and steps gives the
  mean over all of them.
  """
  metrics: dict[str, clu_metrics.Metric] = {
      'loss': metrics_lib.AveragePerStep(total=scalars['loss']),
      'z_loss': metrics_lib.AveragePerStep(total=scalars['z_loss']),
  }
  for i, task in enumerate(losses.TASK_NAMES[k] for k in range(1, own_tokens.shape[0] + 1)):
    denominators = scalars[f'{task}/tokens']
    metrics[f'{task}/tokens'] = metrics_lib.Sum(total=own_tokens[i])
    for name in ('loss', 'accuracy'):
      metrics[f'{task}/{name}'] = TokenAverage(
          total=scalars[f'{task}/{name}'] * denominators, count=own_tokens[i]
      )
  return metrics


class StepByStepT5XModel(t5x_models.EncoderDecoderModel):
  """T5X's EncoderDecoderModel with the step-by-step objective of `student`."""

  FEATURE_CONVERTER_CLS = StepByStepFeatureConverter

  def __init__(
      self,
      student: models.StepByStepModel,
      optimizer_def: Any,
      decode_fn: Any = t5x_decoding.beam_search,
  ):
    self.student = student
    super().__init__(
        module=student.module,
        input_vocabulary=student.input_vocabulary,
        output_vocabulary=student.output_vocabulary,
        optimizer_def=optimizer_def,
        decode_fn=decode_fn,
        label_smoothing=student.label_smoothing,
        z_loss=student.z_loss,
    )

  def get_initial_variables(
      self,
      rng: jax.Array,
      input_shapes: Mapping[str, Any],
      input_types: Optional[Mapping[str, Any]] = None,
  ) -> flax.core.FrozenDict:
    """Plain params plus the `params_axes` collection T5X's train state reads.

    Tokens are ids: `t5x.eval` and `t5x.infer` pass no `input_types`, for which T5X
    would build float32 dummy tokens.
    """
    types = {k: jnp.int32 for k in input_shapes if k.endswith('_tokens')}
    types.update(input_types or {})
    variables = flax.core.unfreeze(super().get_initial_variables(rng, input_shapes, types))
    boxed = variables.pop('params')
    return flax.core.freeze(
        {
            **variables,
            'params': nn.meta.unbox(boxed),
            'params_axes': partitioning.params_axes(boxed),
        }
    )

  def loss_fn(
      self,
      params: Any,
      batch: Mapping[str, jax.Array],
      dropout_rng: Optional[jax.Array],
      flax_mutables: Optional[Any] = None,
  ) -> tuple[jax.Array, dict[str, clu_metrics.Metric]]:
    del flax_mutables  # the network's only mutable collection is the decoding cache
    batch = dict(batch)
    whole = batch.pop(BATCH_TASK_TOKENS, None)
    loss, scalars = self.student.loss_fn(
        params, batch, dropout_rng, None if whole is None else whole[0]
    )
    own = losses.task_token_counts(self.student.task_ids(batch), len(self.student.task_weights))
    return loss, t5x_metrics(scalars, own)

  def _compute_kv_cache(
      self,
      params: Any,
      encoded_inputs: jax.Array,
      encoder_input_tokens: jax.Array,
      decoder_input_tokens: jax.Array,
      prefill_decoder_prompt: bool = False,
      flax_mutables: Optional[Any] = None,
  ) -> tuple[Any, None]:
    """The decoding cache, built from the real encoder output (`init_cache`).

    T5X builds it from dummy inputs, which suits layers that project the
    encoder output at every step; our cross-attention projects it once, into
    the cache. Prompts are not prefilled (`module.decode` takes no `prefill`),
    as T5X does for such modules.
    """
    del prefill_decoder_prompt, flax_mutables
    return (
        self.student.init_cache(
            params, encoded_inputs, encoder_input_tokens, decoder_input_tokens.shape[1]
        ),
        None,
    )


def with_batch_task_tokens(batch: Mapping[str, jax.Array], num_tasks: int) -> dict[str, jax.Array]:
  """The batch plus BATCH_TASK_TOKENS: its per-task token counts [k], on every row."""
  counts = losses.task_token_counts(models.StepByStepModel.task_ids(batch), num_tasks)
  rows = next(iter(batch.values())).shape[0]
  return {**batch, BATCH_TASK_TOKENS: jnp.broadcast_to(counts, (rows, num_tasks))}


class StepByStepTrainer(t5x_trainer.Trainer):
  """T5X's Trainer; its train step hands the whole batch's per-task token counts to
  every microbatch (T5X slices microbatches out of the batch it is given), so each
  microbatch's loss is its exact share of the big batch's."""

  @functools.cached_property
  def _partitioned_train_step(self) -> t5x_trainer.PartitionedTrainCallable:
    num_tasks = len(self._model.student.task_weights)

    def train_step(train_state, batch):
      return t5x_trainer.train_with_lr(
          train_state,
          with_batch_task_tokens(batch, num_tasks),
          learning_rate=self._learning_rate_fn(train_state.step),
          dropout_rng=self._get_step_rng(train_state.step),
          model=self._model,
          num_microbatches=self._num_microbatches,
          weight_metrics_computer=self._weight_metrics_computer,
          data_partition_spec=self._partitioner.data_partition_spec,
      )

    return self._partitioner.partition(
        train_step,
        in_axis_resources=(self._train_state_axes, self._partitioner.data_partition_spec),
        out_axis_resources=(self._train_state_axes, None),
        donate_argnums=(0,),
    )
