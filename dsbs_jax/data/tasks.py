"""Registration of a step-by-step task family as SeqIO Tasks and Mixtures.

From one data source whose examples hold an input text, labels (gold and/or
teacher) and a teacher rationale, `register_step_by_step` registers:

  {name}_{source}_label          predict: x -> label       (one per label source)
  {name}_rationale               explain: x -> rationale
  {name}_{source}_step_by_step   mixture of the two, equal rates

Standard finetuning trains on `{name}_gt_label`, standard distillation on
`{name}_llm_label`, distilling step-by-step on `{name}_llm_step_by_step`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from dsbs_jax import losses
from dsbs_jax.data.feature_converters import TASK_ID

LABEL_PREFIX = 'predict: '
RATIONALE_PREFIX = 'explain: '
VARIANTS = ('label', 'rationale', 'step_by_step')


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """inputs/targets in `vocabulary`, plus the scalar task id the converter packs."""
  return {
      'inputs': seqio.Feature(vocabulary, add_eos=True),
      'targets': seqio.Feature(vocabulary, add_eos=True),
      TASK_ID: seqio.Feature(seqio.PassThroughVocabulary(size=3), add_eos=False,
                             dtype=tf.int32, required=False),
  }


def format_example(ds: tf.data.Dataset, *, prefix: str, input_field: str, target_field: str,
                   task_id: int) -> tf.data.Dataset:
  """Maps a source example to `{inputs: prefix + x, targets: y, task_id: [k]}`."""

  def fn(ex):
    return {
        'inputs': tf.strings.join([prefix, ex[input_field]]),
        'targets': ex[target_field],
        TASK_ID: tf.constant([task_id], tf.int32),
    }

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def task_name(dataset: str, variant: str, label_source: str = 'gt') -> str:
  """The registered name for a dataset, variant and label source."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown task variant {variant!r}; choose from {VARIANTS}')
  if variant == 'rationale':
    return f'{dataset}_rationale'
  return f'{dataset}_{label_source}_{variant}'


@dataclasses.dataclass(frozen=True)
class StepByStepFamily:
  """The names registered for one dataset."""

  label_tasks: Mapping[str, str]
  rationale_task: str
  mixtures: Mapping[str, str]

  @property
  def names(self) -> list[str]:
    return [*self.label_tasks.values(), self.rationale_task, *self.mixtures.values()]


def _replace(registry, name: str) -> None:
  if name in registry.names():
    registry.remove(name)


def register_step_by_step(
    name: str,
    source: seqio.DataSource,
    vocabulary: seqio.Vocabulary,
    *,
    label_fields: Mapping[str, str],
    input_field: str = 'input',
    rationale_field: str = 'rationale',
    label_metric_fns: Sequence[Callable] = (),
    label_postprocess_fn: Optional[Callable] = None,
    rationale_metric_fns: Sequence[Callable] = (),
) -> StepByStepFamily:
  """Registers the label task(s), the rationale task and the step-by-step mixtures.

  `label_fields` maps a label source (`gt`, `llm`) to the source field holding
  that label. Registering a name again replaces the earlier registration, so a
  gin file may re-register a family with another vocabulary.
  """
  if not label_fields:
    raise ValueError(f'{name}: label_fields must name at least one label source')
  features = output_features(vocabulary)
  common = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim]

  def add_task(task: str, prefix: str, target_field: str, task_id: int, metric_fns,
               postprocess_fn) -> None:
    _replace(seqio.TaskRegistry, task)
    fmt = functools.partial(format_example, prefix=prefix, input_field=input_field,
                            target_field=target_field, task_id=task_id)
    seqio.TaskRegistry.add(task, source=source, preprocessors=[fmt, *common],
                           output_features=features, metric_fns=list(metric_fns),
                           postprocess_fn=postprocess_fn)

  rationale = task_name(name, 'rationale')
  add_task(rationale, RATIONALE_PREFIX, rationale_field, losses.RATIONALE_TASK,
           rationale_metric_fns, None)
  label_tasks, mixtures = {}, {}
  for label_source, field in label_fields.items():
    label = task_name(name, 'label', label_source)
    add_task(label, LABEL_PREFIX, field, losses.LABEL_TASK, label_metric_fns,
             label_postprocess_fn)
    mixture = task_name(name, 'step_by_step', label_source)
    _replace(seqio.MixtureRegistry, mixture)
    seqio.MixtureRegistry.add(mixture, [(label, 1.0), (rationale, 1.0)])
    label_tasks[label_source], mixtures[label_source] = label, mixture
  return StepByStepFamily(label_tasks, rationale, mixtures)
