"""Registration of a step-by-step task family as SeqIO Tasks and Mixtures.

From one data source whose examples hold an input text, labels (gold and/or
teacher) and a teacher rationale, `register_step_by_step` registers:

  {name}_{source}_label          predict: x -> label       (one per label source)
  {name}_rationale               explain: x -> rationale
  {name}_{source}_step_by_step   mixture of the two, equal rates
  {name}_{source}_standard       x -> label, no prefix: the paper's baselines

Distilling step-by-step trains on `{name}_llm_step_by_step` (or `_gt_` with
gold labels); standard finetuning on `{name}_gt_standard`, standard
distillation on `{name}_llm_standard`. `FAMILIES` is the one list of what is
registered; `dsbs-train --list_tasks` prints it.

Families are registered on request: a gin/tasks/* file sets `DATASET` to a
registering call, and `select` (the gin macro `MIXTURE_OR_TASK_NAME`'s
resolver) evaluates it, so its settings (data root, train fraction, seeds,
vocabulary) always take effect, and a name that contradicts them is refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import seqio
import tensorflow as tf

from dsbs_jax import losses
from dsbs_jax.data.feature_converters import TASK_ID
from dsbs_jax.errors import ConfigError

LABEL_PREFIX = 'predict: '
RATIONALE_PREFIX = 'explain: '
VARIANTS = ('label', 'rationale', 'step_by_step', 'standard')
SEPARATOR = '</s>'  # in an input text, becomes the EOS id (NLI: premise</s>hypothesis)
Row = Mapping[str, str]


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """inputs/targets in `vocabulary`, plus the scalar task id the converter packs."""
  return {
      'inputs': seqio.Feature(vocabulary, add_eos=True),
      'targets': seqio.Feature(vocabulary, add_eos=True),
      TASK_ID: seqio.Feature(
          seqio.PassThroughVocabulary(size=3), add_eos=False, dtype=tf.int32, required=False
      ),
  }


def encode_text(vocabulary: seqio.Vocabulary, text: tf.Tensor) -> tf.Tensor:
  """`text`'s ids, each literal `</s>` in it the EOS id."""
  parts = tf.strings.split(text, SEPARATOR)
  ids = tf.map_fn(
      vocabulary.encode_tf, parts, fn_output_signature=tf.RaggedTensorSpec([None], tf.int32)
  )
  eos = tf.fill([tf.shape(parts)[0], 1], tf.constant(vocabulary.eos_id, tf.int32))
  return tf.concat([ids, eos], axis=1).flat_values[:-1]


def tokenize(ds: tf.data.Dataset, output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """`seqio.preprocessors.tokenize`, except that a literal `</s>` in a text becomes
  the EOS id, as the authors' HuggingFace tokenizer makes it."""

  def fn(ex):
    out = dict(ex)
    for key, feature in output_features.items():
      if key in ex and ex[key].dtype == tf.string:
        out[f'{key}_pretokenized'] = ex[key]
        out[key] = encode_text(feature.vocabulary, ex[key])
    return out

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def rows_source(
    load: Callable[[str], Sequence[Row]],
    splits: Sequence[str],
    num_input_examples: Optional[Mapping[str, int]] = None,
) -> seqio.FunctionDataSource:
  """A SeqIO source over in-memory rows; `load(split)` runs when a split is first read."""

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    rows = load(split)
    ds = tf.data.Dataset.from_tensor_slices({k: [r[k] for r in rows] for k in rows[0]})
    return ds.shuffle(len(rows), seed=seed) if shuffle_files else ds

  return seqio.FunctionDataSource(
      dataset_fn, splits=tuple(splits), num_input_examples=num_input_examples
  )


def format_example(
    ds: tf.data.Dataset, *, prefix: str, input_field: str, target_field: str, task_id: int
) -> tf.data.Dataset:
  """Maps a source example to `{inputs: prefix + x, targets: y, task_id: [k]}`."""

  def fn(ex):
    return {
        'inputs': tf.strings.join([prefix, ex[input_field]]),
        'targets': ex[target_field],
        TASK_ID: tf.constant([task_id], tf.int32),
    }

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class StepByStepFamily:
  """The names registered for one dataset."""

  name: str
  label_tasks: Mapping[str, str]
  rationale_task: str
  mixtures: Mapping[str, str]
  standard_tasks: Mapping[str, str]

  @property
  def names(self) -> list[str]:
    return [
        *self.label_tasks.values(),
        self.rationale_task,
        *self.mixtures.values(),
        *self.standard_tasks.values(),
    ]


FAMILIES: dict[str, StepByStepFamily] = {}


def task_name(dataset: str | StepByStepFamily, variant: str, label_source: str = 'gt') -> str:
  """The registered name for a dataset (or its family), variant and label source."""
  if variant not in VARIANTS:
    raise ConfigError(f'TASK_VARIANT {variant!r} is unknown; choose from {", ".join(VARIANTS)}')
  name = dataset.name if isinstance(dataset, StepByStepFamily) else dataset
  if (
      isinstance(dataset, StepByStepFamily)
      and variant != 'rationale'
      and (label_source not in dataset.label_tasks)
  ):
    raise ConfigError(
        f'LABEL_SOURCE {label_source!r}: {name} has labels from '
        f'{", ".join(sorted(dataset.label_tasks))}'
    )
  if variant == 'rationale':
    return f'{name}_rationale'
  return f'{name}_{label_source}_{variant}'


def registered_names() -> list[str]:
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def select(
    dataset: Optional[StepByStepFamily] = None,
    variant: str = 'step_by_step',
    label_source: str = 'gt',
    name: Optional[str] = None,
) -> str:
  """The task or mixture a run trains on (gin: `MIXTURE_OR_TASK_NAME = @tasks.select()`).

  `dataset` is the family a gin/tasks/* file registered (`DATASET`); evaluating
  it here registers it with that file's settings. `name` is a name the user
  gave (`dsbs-train --gin.MIXTURE_OR_TASK_NAME=...` arrives here): it must be the
  one `DATASET`, `TASK_VARIANT` and `LABEL_SOURCE` select, or, with no
  `DATASET`, any registered SeqIO task or mixture (e.g. one that the user's own
  module registers).
  """
  if dataset is None:
    if name is None:
      raise ConfigError(
          'no training data: include a gin/tasks/* file (it sets DATASET), or set '
          'MIXTURE_OR_TASK_NAME to a registered SeqIO task or mixture'
      )
    check_registered(name)
    return name
  selected = task_name(dataset, variant, label_source)
  if name is not None and name != selected:
    raise ConfigError(
        f'MIXTURE_OR_TASK_NAME {name!r} disagrees with DATASET ({dataset.name}), '
        f'TASK_VARIANT ({variant!r}) and LABEL_SOURCE ({label_source!r}), which '
        f'select {selected!r}; set those instead, or leave MIXTURE_OR_TASK_NAME '
        'unset'
    )
  return selected


def check_registered(name: str) -> None:
  known = registered_names()
  if name not in known:
    close = difflib.get_close_matches(name, known, n=5)
    hint = f' Did you mean: {", ".join(close)}?' if close else ''
    raise ConfigError(
        f'{name!r} is not a registered SeqIO task or mixture.{hint} '
        '(`dsbs-train --list_tasks` lists them.)'
    )


def family_of(mixture_or_task_name: str) -> Optional[StepByStepFamily]:
  for family in FAMILIES.values():
    if mixture_or_task_name in family.names:
      return family
  return None


def has_rationales(mixture_or_task_name: str) -> bool:
  """Whether training on this task or mixture sees rationale examples."""
  family = family_of(mixture_or_task_name)
  if family is None:
    return False
  return (
      mixture_or_task_name == family.rationale_task
      or mixture_or_task_name in family.mixtures.values()
  )


def evaluation_tasks(mixture_or_task_name: str, rationales: bool = False) -> list[str]:
  """The tasks to decode when evaluating a training task or mixture.

  A step-by-step mixture is evaluated on its label task (what deployment runs),
  plus its rationale task when `rationales` is set; any other name as itself.
  """
  for family in FAMILIES.values():
    for label_source, mixture in family.mixtures.items():
      if mixture == mixture_or_task_name:
        return [family.label_tasks[label_source], *([family.rationale_task] if rationales else [])]
  return [mixture_or_task_name]


def deployed_task(mixture_or_task_name: str) -> str:
  """The task deployment runs for a training task or mixture: its label task
  (gin/t5x_bridge.gin makes it T5X's inference-evaluation task)."""
  return evaluation_tasks(mixture_or_task_name)[0]


def describe_families() -> str:
  """One line per registered dataset: its tasks and mixtures, for `--list_tasks`."""
  return '\n'.join(f'{name}: {" ".join(family.names)}' for name, family in sorted(FAMILIES.items()))


def _replace(registry, name: str) -> None:
  if name in registry.names():
    registry.remove(name)


def register_step_by_step(
    name: str,
    source: seqio.DataSource,
    vocabulary: Optional[seqio.Vocabulary],
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
  that label. `vocabulary` defaults to bytes. Registering a name again replaces
  the earlier registration, so a gin file may re-register a family with another
  vocabulary.
  """
  if not label_fields:
    raise ValueError(f'{name}: label_fields must name at least one label source')
  features = output_features(vocabulary or seqio.ByteVocabulary())
  common = [tokenize, seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos_after_trim]

  def add_task(
      task: str, prefix: str, target_field: str, task_id: int, metric_fns, postprocess_fn
  ) -> None:
    _replace(seqio.TaskRegistry, task)
    fmt = functools.partial(
        format_example,
        prefix=prefix,
        input_field=input_field,
        target_field=target_field,
        task_id=task_id,
    )
    seqio.TaskRegistry.add(
        task,
        source=source,
        preprocessors=[fmt, *common],
        output_features=features,
        metric_fns=list(metric_fns),
        postprocess_fn=postprocess_fn,
    )

  rationale = task_name(name, 'rationale')
  add_task(
      rationale,
      RATIONALE_PREFIX,
      rationale_field,
      losses.RATIONALE_TASK,
      rationale_metric_fns,
      None,
  )
  label_tasks, mixtures, standard_tasks = {}, {}, {}
  for label_source, field in label_fields.items():
    label = task_name(name, 'label', label_source)
    add_task(label, LABEL_PREFIX, field, losses.LABEL_TASK, label_metric_fns, label_postprocess_fn)
    standard = task_name(name, 'standard', label_source)
    add_task(standard, '', field, losses.LABEL_TASK, label_metric_fns, label_postprocess_fn)
    mixture = task_name(name, 'step_by_step', label_source)
    _replace(seqio.MixtureRegistry, mixture)
    seqio.MixtureRegistry.add(mixture, [(label, 1.0), (rationale, 1.0)])
    label_tasks[label_source], mixtures[label_source] = label, mixture
    standard_tasks[label_source] = standard
  family = StepByStepFamily(name, label_tasks, rationale, mixtures, standard_tasks)
  FAMILIES[name] = family
  return family
