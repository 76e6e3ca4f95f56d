"""dsbs-jax's tasks, network and objective under the real `python -m t5x.train`.

T5X trains any `t5x.models.BaseModel`. `StepByStepT5XModel` is T5X's own
`EncoderDecoderModel` around our `models.StepByStepModel`, so T5X's trainer,
partitioner, checkpoints, decoding functions and SeqIO evaluation run
unchanged, while the loss (L = L_label + lambda * L_rationale over each task's
tokens) and the feature converter (which keeps every target token's task
through packing) are ours. `gin/t5x_bridge.gin` binds it as T5X's `MODEL`.

Importing this module needs t5x (not on PyPI: install it from its repository).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
from clu import metrics as clu_metrics
from t5x import decoding as t5x_decoding
from t5x import metrics as metrics_lib
from t5x import models as t5x_models

from dsbs_jax import losses, models, partitioning
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter

if not hasattr(t5x_models.EncoderDecoderModel, '_compute_kv_cache'):
  raise ImportError('dsbs_jax.t5x_bridge needs a T5X from 2023 or later '
                    '(one whose EncoderDecoderModel has _compute_kv_cache)')


def t5x_metrics(scalars: Mapping[str, jax.Array]) -> dict[str, clu_metrics.Metric]:
  """`StepByStepModel.loss_fn`'s scalars as the CLU metrics T5X aggregates.

  Per-task means are weighted by their token counts, so T5X's merge over steps
  and microbatches gives the mean over all of those tokens.
  """
  metrics: dict[str, clu_metrics.Metric] = {
      'loss': metrics_lib.AveragePerStep(total=scalars['loss']),
      'z_loss': metrics_lib.AveragePerStep(total=scalars['z_loss']),
  }
  for task in losses.TASK_NAMES.values():
    if f'{task}/tokens' not in scalars:
      continue
    tokens = scalars[f'{task}/tokens']
    metrics[f'{task}/tokens'] = metrics_lib.Sum(total=tokens)
    for name in ('loss', 'accuracy'):
      metrics[f'{task}/{name}'] = clu_metrics.Average(
          total=scalars[f'{task}/{name}'] * tokens, count=tokens)
  return metrics


class StepByStepT5XModel(t5x_models.EncoderDecoderModel):
  """T5X's EncoderDecoderModel with the step-by-step objective of `student`."""

  FEATURE_CONVERTER_CLS = StepByStepFeatureConverter

  def __init__(self, student: models.StepByStepModel, optimizer_def: Any,
               decode_fn: Any = t5x_decoding.beam_search):
    self.student = student
    super().__init__(module=student.module, input_vocabulary=student.input_vocabulary,
                     output_vocabulary=student.output_vocabulary, optimizer_def=optimizer_def,
                     decode_fn=decode_fn, label_smoothing=student.label_smoothing,
                     z_loss=student.z_loss)

  def get_initial_variables(self, rng: jax.Array, input_shapes: Mapping[str, Any],
                            input_types: Optional[Mapping[str, Any]] = None
                            ) -> flax.core.FrozenDict:
    """Plain params plus the `params_axes` collection T5X's train state reads."""
    variables = flax.core.unfreeze(super().get_initial_variables(rng, input_shapes, input_types))
    boxed = variables.pop('params')
    return flax.core.freeze({**variables, 'params': nn.meta.unbox(boxed),
                             'params_axes': partitioning.params_axes(boxed)})

  def loss_fn(self, params: Any, batch: Mapping[str, jax.Array],
              dropout_rng: Optional[jax.Array], flax_mutables: Optional[Any] = None
              ) -> tuple[jax.Array, dict[str, clu_metrics.Metric]]:
    del flax_mutables  # the network's only mutable collection is the decoding cache
    loss, scalars = self.student.loss_fn(params, batch, dropout_rng)
    return loss, t5x_metrics(scalars)

  def _compute_kv_cache(self, params: Any, encoded_inputs: jax.Array,
                        encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array,
                        prefill_decoder_prompt: bool = False, flax_mutables: Optional[Any] = None
                        ) -> tuple[Any, None]:
    """The decoding cache, built from the real encoder output (`init_cache`).

    T5X builds it from dummy inputs, which suits layers that project the
    encoder output at every step; our cross-attention projects it once, into
    the cache. Prompts are not prefilled (`module.decode` takes no `prefill`),
    as T5X does for such modules.
    """
    del prefill_decoder_prompt, flax_mutables
    return self.student.init_cache(params, encoded_inputs, encoder_input_tokens,
                                   decoder_input_tokens.shape[1]), None
