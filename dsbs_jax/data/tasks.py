"""Registration of a step-by-step task family as SeqIO Tasks and Mixtures.

From one data source whose examples hold an input text, labels (gold and/or
teacher) and a teacher rationale, `register_step_by_step` registers:

  {name}_{source}_label                 predict: x -> label    (one per label source)
  {name}_rationale                      explain: x -> rationale
  {name}_{source}_step_by_step          both, paired: each row gives its predict:
                                        example, then its explain: example
  {name}_{source}_step_by_step_mixture  both as a SeqIO mixture, sampled independently
  {name}_{source}_standard              x -> label, no prefix: the paper's baselines
  {name}_span_corruption                T5's span corruption of x: a warm-up on the
                                        inputs alone (`span_corruption`)

Distilling step-by-step trains on `{name}_llm_step_by_step` (or `_gt_` with
gold labels), as the authors' trainer does: every example contributes its
predict: and its explain: sequence to the same batch (`input_pipeline`
batches by example). Standard finetuning trains on `{name}_gt_standard`,
standard distillation on `{name}_llm_standard`. The source shuffles its rows
and no task shuffles again, so every task of a family sees the rows in the same
order for the same seed. `FAMILIES` is the one list of what is registered;
`dsbs-train --list_tasks` prints it.

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
from dsbs_jax.data import span_corruption
from dsbs_jax.data.feature_converters import TASK_ID
from dsbs_jax.errors import ConfigError

LABEL_PREFIX = 'predict: '
RATIONALE_PREFIX = 'explain: '
VARIANTS = (
    'label',
    'rationale',
    'step_by_step',
    'step_by_step_mixture',
    'standard',
    'span_corruption',
)
_WITHOUT_LABELS = ('rationale', 'span_corruption')  # one task per family, whatever the labels
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


class RowsSource(seqio.FunctionDataSource):
  """A SeqIO source over in-memory rows, which shuffles all of them itself (anew each
  epoch, deterministically for a seed). Its tasks shuffle nothing more, so a step-by-
  step task keeps each row's two examples together, and every task of a family reads
  the rows in the same order. It states no row counts: SeqIO caches a split with
  fewer than 10,000 rows in memory after the source, which would replay the first
  epoch's order in every epoch."""

  @property
  def performs_internal_shuffling(self) -> bool:
    return True


class StepByStepTask(seqio.Task):
  """A SeqIO Task whose datasets are built without AutoGraph.

  tf.data converts every map function with AutoGraph unless told not to, and
  these tasks' preprocessors (ours and SeqIO's) use TensorFlow ops alone, so
  converting them changes nothing; with the feature converter's maps (built the
  same way) that cost every process about 2 s (272 conversions in a demo-sized
  run) before its first step. Preprocessors of tasks registered elsewhere keep
  TensorFlow's default.
  """

  def get_dataset(self, *args, **kwargs) -> tf.data.Dataset:
    get = tf.autograph.experimental.do_not_convert(super().get_dataset)
    return get(*args, **kwargs)


def rows_source(load: Callable[[str], Sequence[Row]], splits: Sequence[str]) -> RowsSource:
  """A `RowsSource` whose `load(split)` runs when a split is first read."""

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    rows = load(split)
    ds = tf.data.Dataset.from_tensor_slices({k: [r[k] for r in rows] for k in rows[0]})
    return ds.shuffle(len(rows), seed=seed) if shuffle_files else ds

  return RowsSource(dataset_fn, splits=tuple(splits))


def _example(
    ex: Mapping[str, tf.Tensor], prefix: str, input_field: str, target_field: str, task_id: int
) -> dict[str, tf.Tensor]:
  """`{inputs: prefix + x, targets: y, task_id: [k]}` of a source example."""
  return {
      'inputs': tf.strings.join([prefix, ex[input_field]]),
      'targets': ex[target_field],
      TASK_ID: tf.constant([task_id], tf.int32),
  }


def format_example(
    ds: tf.data.Dataset, *, prefix: str, input_field: str, target_field: str, task_id: int
) -> tf.data.Dataset:
  """Maps each source example to one example of a task (`_example`)."""
  return ds.map(
      lambda ex: _example(ex, prefix, input_field, target_field, task_id),
      num_parallel_calls=tf.data.AUTOTUNE,
  )


def unlabeled_inputs(ds: tf.data.Dataset, *, input_field: str) -> tf.data.Dataset:
  """Maps a source example to `{inputs: x, task_id: [label]}`, for `span_corruption`
  (its loss counts as the label task's, so LAMBDA = 0 trains it)."""

  def fn(ex):
    return {'inputs': ex[input_field], TASK_ID: tf.constant([losses.LABEL_TASK], tf.int32)}

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def paired_examples(
    ds: tf.data.Dataset, *, input_field: str, label_field: str, rationale_field: str
) -> tf.data.Dataset:
  """Each source row as two examples, in order: `predict: x -> label`, then
  `explain: x -> rationale` (`_example`)."""

  def fn(ex):
    label = _example(ex, LABEL_PREFIX, input_field, label_field, losses.LABEL_TASK)
    rationale = _example(ex, RATIONALE_PREFIX, input_field, rationale_field, losses.RATIONALE_TASK)
    return tf.data.Dataset.from_tensors(label).concatenate(tf.data.Dataset.from_tensors(rationale))

  return ds.flat_map(fn)


@dataclasses.dataclass(frozen=True)
class StepByStepFamily:
  """The names registered for one dataset."""

  name: str
  label_tasks: Mapping[str, str]
  rationale_task: str
  paired_tasks: Mapping[str, str]
  mixtures: Mapping[str, str]
  standard_tasks: Mapping[str, str]
  span_corruption_task: str

  @property
  def names(self) -> list[str]:
    return [
        *self.label_tasks.values(),
        self.rationale_task,
        *self.paired_tasks.values(),
        *self.mixtures.values(),
        *self.standard_tasks.values(),
        self.span_corruption_task,
    ]

  def label_task_of(self, mixture_or_task_name: str) -> Optional[str]:
    """The label task a step-by-step task or mixture of this family trains."""
    for label_source in self.label_tasks:
      if mixture_or_task_name in (
          self.paired_tasks[label_source],
          self.mixtures[label_source],
      ):
        return self.label_tasks[label_source]
    return None


FAMILIES: dict[str, StepByStepFamily] = {}


def task_name(dataset: str | StepByStepFamily, variant: str, label_source: str = 'gt') -> str:
  """The registered name for a dataset (or its family), variant and label source."""
  if variant not in VARIANTS:
    raise ConfigError(f'TASK_VARIANT {variant!r} is unknown; choose from {", ".join(VARIANTS)}')
  name = dataset.name if isinstance(dataset, StepByStepFamily) else dataset
  if (
      isinstance(dataset, StepByStepFamily)
      and variant not in _WITHOUT_LABELS
      and (label_source not in dataset.label_tasks)
  ):
    raise ConfigError(
        f'LABEL_SOURCE {label_source!r}: {name} has labels from '
        f'{", ".join(sorted(dataset.label_tasks))}'
    )
  if variant in _WITHOUT_LABELS:
    return f'{name}_{variant}'
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
      or family.label_task_of(mixture_or_task_name) is not None
  )


def sequences_per_example(mixture_or_task_name: str) -> int:
  """How many sequences one example (a source row) gives: 2 for a paired
  step-by-step task (predict: and explain:), 1 for anything else."""
  family = family_of(mixture_or_task_name)
  paired = family is not None and mixture_or_task_name in family.paired_tasks.values()
  return 2 if paired else 1


def evaluation_tasks(mixture_or_task_name: str, rationales: bool = False) -> list[str]:
  """The tasks to decode when evaluating a training task or mixture.

  Step-by-step training (paired or mixed) is evaluated on its label task (what
  deployment runs), plus its rationale task when `rationales` is set; any other
  name as itself.
  """
  family = family_of(mixture_or_task_name)
  label = family.label_task_of(mixture_or_task_name) if family else None
  if family is None or label is None:
    return [mixture_or_task_name]
  return [label, *([family.rationale_task] if rationales else [])]


def deployed_task(mixture_or_task_name: str) -> str:
  """The task deployment runs for a training task or mixture: its label task
  (gin/t5x_bridge.gin makes it T5X's inference-evaluation task)."""
  return evaluation_tasks(mixture_or_task_name)[0]


def describe_families() -> str:
  """One line per registered dataset: its tasks and mixtures, for `--list_tasks`."""
  return '\n'.join(f'{name}: {" ".join(family.names)}' for name, family in sorted(FAMILIES.items()))


def _unregister(name: str) -> None:
  """Frees a name in both registries (a name is a task or a mixture, not both)."""
  for registry in (seqio.TaskRegistry, seqio.MixtureRegistry):
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
  """Registers the label task(s), the rationale task, the step-by-step tasks (paired)
  and mixtures, the standard tasks and the span-corruption task.

  `label_fields` maps a label source (`gt`, `llm`) to the source field holding
  that label. `vocabulary` defaults to bytes. Registering a name again replaces
  the earlier registration, so a gin file may re-register a family with another
  vocabulary.
  """
  if not label_fields:
    raise ValueError(f'{name}: label_fields must name at least one label source')
  features = output_features(vocabulary or seqio.ByteVocabulary())
  common = [tokenize, seqio.CacheDatasetPlaceholder()]

  def add(task: str, to_examples: Callable, metric_fns=(), postprocess_fn=None, then=()) -> None:
    _unregister(task)
    seqio.TaskRegistry.add(
        task,
        source=source,
        preprocessors=[
            to_examples,
            *common,
            *then,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=features,
        metric_fns=list(metric_fns),
        postprocess_fn=postprocess_fn,
        shuffle_buffer_size=None,  # the source shuffles (RowsSource)
        task_cls=StepByStepTask,
    )

  def add_task(
      task: str, prefix: str, target_field: str, task_id: int, metric_fns, postprocess_fn
  ) -> None:
    fmt = functools.partial(
        format_example,
        prefix=prefix,
        input_field=input_field,
        target_field=target_field,
        task_id=task_id,
    )
    add(task, fmt, metric_fns, postprocess_fn)

  rationale = task_name(name, 'rationale')
  add_task(
      rationale,
      RATIONALE_PREFIX,
      rationale_field,
      losses.RATIONALE_TASK,
      rationale_metric_fns,
      None,
  )
  label_tasks, paired_tasks, mixtures, standard_tasks = {}, {}, {}, {}
  for label_source, field in label_fields.items():
    label = task_name(name, 'label', label_source)
    add_task(label, LABEL_PREFIX, field, losses.LABEL_TASK, label_metric_fns, label_postprocess_fn)
    standard = task_name(name, 'standard', label_source)
    add_task(standard, '', field, losses.LABEL_TASK, label_metric_fns, label_postprocess_fn)
    paired = task_name(name, 'step_by_step', label_source)
    add(
        paired,
        functools.partial(
            paired_examples,
            input_field=input_field,
            label_field=field,
            rationale_field=rationale_field,
        ),
    )
    mixture = task_name(name, 'step_by_step_mixture', label_source)
    _unregister(mixture)
    seqio.MixtureRegistry.add(mixture, [(label, 1.0), (rationale, 1.0)])
    label_tasks[label_source], paired_tasks[label_source] = label, paired
    mixtures[label_source], standard_tasks[label_source] = mixture, standard
  corruption = task_name(name, 'span_corruption')
  add(
      corruption,
      functools.partial(unlabeled_inputs, input_field=input_field),
      then=[span_corruption.span_corruption],
  )
  family = StepByStepFamily(
      name, label_tasks, rationale, paired_tasks, mixtures, standard_tasks, corruption
  )
  FAMILIES[name] = family
  return family
