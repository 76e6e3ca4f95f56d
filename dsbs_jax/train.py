"""The training run: `train()`, the one function `dsbs-train`'s gin files configure.

It takes plain objects (model, optimizer, partitioner and small config
dataclasses, as T5X's `train` does) and checks everything the run will need
before its first step: the task and its objective, MODEL_DIR, the splits it will
evaluate and the initial weights. The command line lives in `dsbs_jax.cli`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any, Optional

import jax
import numpy as np
import seqio
from etils import epath
from jax.experimental import multihost_utils

from dsbs_jax import monitoring, storage
from dsbs_jax.checkpoints import (
    BestCheckpoint,
    CheckpointConfig,
    Checkpointer,
    config_to_dict,
    load_initial_params,
)
from dsbs_jax.data import input_pipeline, tasks, vocabularies
from dsbs_jax.data.input_pipeline import DatasetConfig
from dsbs_jax.errors import ConfigError
from dsbs_jax.evaluation import EvaluationConfig, Evaluator, LossEvaluator
from dsbs_jax.memory import memory_plan
from dsbs_jax.models import StepByStepModel
from dsbs_jax.optimizers import Optimizer
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.run_record import RunRecord
from dsbs_jax.trainer import Trainer, TrainState

log = logging.getLogger('dsbs_jax')


def check_objective(mixture_or_task_name: str, task_weights: tuple[float, ...]) -> None:
  """Refuses a rationale weight that the training data would silently undo."""
  rationale_weight = task_weights[1] if len(task_weights) > 1 else 0.0
  if tasks.has_rationales(mixture_or_task_name) and rationale_weight == 0:
    raise ConfigError(
        f'LAMBDA = 0 (or ALPHA = 1) gives no weight to the rationales that '
        f'{mixture_or_task_name!r} trains on; set LAMBDA > 0, or use '
        'gin/runs/standard.gin to train the label task alone'
    )
  if not tasks.has_rationales(mixture_or_task_name) and rationale_weight != 0:
    raise ConfigError(
        f'the rationale weight is {rationale_weight} (LAMBDA or ALPHA), but '
        f'{mixture_or_task_name!r} has no rationale examples; set LAMBDA = 0 '
        '(gin/runs/standard.gin) or train a step-by-step mixture'
    )


def _mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def _flatten(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  return {
      f'{group}/{name}': value
      for group, values in results.items()
      for name, value in values.items()
  }


class _Preemption:
  """SIGTERM (how preemptible TPU VMs are stopped) asks the loop to save and exit 0.

  With several processes, all of them agree on the step to stop at.
  """

  def __enter__(self) -> _Preemption:
    self._requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._requested = True

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._requested
    return bool(multihost_utils.process_allgather(np.int32(self._requested)).any())

  def __exit__(self, *_: object) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Evaluation:
  """The run's evaluations: model selection on validation and the final split.

  Built before the first step, so that every split the run will evaluate is read
  and checked (and its SeqIO targets cached) before any training happens.
  """

  def __init__(
      self,
      config: EvaluationConfig,
      dataset: DatasetConfig,
      model_dir: epath.Path,
      checkpoint_period: int,
      model: StepByStepModel,
      partitioner: Partitioner,
      param_shardings: Any,
      checkpoint_metadata: dict[str, Any],
  ):
    name = dataset.mixture_or_task_name
    splits = set(seqio.get_mixture_or_task(name).splits)
    period = config.period
    if period is None:
      period = checkpoint_period if config.split in splits else 0
      log.info(
          'model selection: %s',
          f'{config.split} every {period} steps (evaluation.'
          'EvaluationConfig.period; 0 turns it off)'
          if period
          else f'off ({name} has no {config.split} split)',
      )
    self.period = period
    wanted = ([config.split] if period else []) + (
        [config.final_split] if config.final_split else []
    )
    missing = [s for s in wanted if s not in splits]
    if missing:
      raise ConfigError(
          f'{name} has no {" or ".join(missing)} split to evaluate (it has '
          f'{", ".join(sorted(splits))}); see evaluation.EvaluationConfig'
      )
    self.config = config
    self.tasks = tasks.evaluation_tasks(name, config.rationales)
    self.model_dir = model_dir
    self._is_chief = jax.process_index() == 0
    batch_size = config.batch_size or dataset.batch_size
    evaluators = {
        split: (
            LossEvaluator(
                name,
                split,
                dataset.task_feature_lengths,
                model,
                partitioner,
                batch_size,
                param_shardings,
                config.num_examples,
            ),
            Evaluator(
                self.tasks,
                split,
                model,
                partitioner,
                batch_size,
                param_shardings,
                os.fspath(model_dir / 'inference_eval' / split) if self._is_chief else None,
                config.num_examples,
                config.max_input_widths,
            ),
        )
        for split in wanted
    }
    self._evaluators = {
        split: (monitoring.MetricWriter(model_dir / 'eval' / split, enabled=self._is_chief), *pair)
        for split, pair in evaluators.items()
    }
    self.best = (
        BestCheckpoint(
            model_dir / 'best', config.best_metric, config.best_mode, checkpoint_metadata
        )
        if period
        else None
    )

  def evaluate(self, split: str, params: Any, step: int) -> dict[str, dict[str, float]]:
    writer, losses_, decoded = self._evaluators[split]
    results = {'teacher_forced': losses_.evaluate(params), **decoded.evaluate(params, step)}
    writer.write(step, _flatten(results))
    log.info('%s metrics at step %d: %s', split, step, results)
    return results

  def select(self, step: int, state: TrainState, consumed: int) -> None:
    """Evaluates the selection split and keeps the state if it is the best so far."""
    best = self.best
    assert best is not None, 'model selection is off'
    flat = _flatten(self.evaluate(self.config.split, state.params, step))
    best.metric = best.metric or next(k for k in flat if k.startswith(f'{self.tasks[0]}/'))
    best.update(step, state, consumed, flat)

  def close(self) -> None:
    for writer, _, _ in self._evaluators.values():
      writer.close()
    if self.best is not None:
      self.best.close()


def _record(
    model_dir: epath.Path, record: RunRecord, writer: monitoring.MetricWriter, step: int
) -> None:
  """MODEL_DIR/config.gin (the operative config, as T5X writes it) and run.json."""
  config = record.config()
  header = ''.join(f'# {k}: {v}\n' for k, v in {**record.versions, 'commit': record.commit}.items())
  storage.write_atomic(model_dir / 'config.gin', header + config)
  storage.write_atomic(model_dir / 'run.json', json.dumps(record.summary(), indent=2))
  writer.write_text(
      step,
      {
          'config': f'```\n{config}\n```',
          'run': f'```\n{json.dumps(record.summary(), indent=2)}\n```',
      },
  )


def train(
    *,
    model_dir: str,
    train_steps: int,
    dataset: DatasetConfig,
    model: StepByStepModel,
    optimizer: Optimizer,
    partitioner: Optional[Partitioner] = None,
    checkpoint: Optional[CheckpointConfig] = None,
    evaluation: Optional[EvaluationConfig] = None,
    num_microbatches: int = 1,
    log_period: int = 50,
    seed: int = 0,
    run_record: Optional[RunRecord] = None,
    plan_mesh: Optional[Mapping[str, int]] = None,
) -> dict[str, Any]:
  """Trains `model` on `dataset`, resuming from MODEL_DIR if it holds a checkpoint.

  With model selection on (`evaluation`), the validation split is evaluated every
  period: teacher-forced loss per task, and SeqIO metrics of the decoded label
  task. The best state is kept in MODEL_DIR/best and evaluates the final (test)
  split, which never takes part in selection. SIGTERM saves a checkpoint and
  returns. `seed` initialises the parameters and draws dropout.

  Returns {'step', 'train': last logged metrics, 'eval': {split: metrics}, ...};
  the same summary is written to MODEL_DIR/results.json. With `plan_mesh` (e.g.
  {'data': 32, 'model': 8}) it prints the memory plan for that mesh and returns.
  """
  checkpoint = checkpoint or CheckpointConfig()
  evaluation = evaluation or EvaluationConfig()
  converter = model.FEATURE_CONVERTER_CLS(pack=dataset.pack)
  input_shapes = input_pipeline.model_input_shapes(dataset, converter)
  partitioner = partitioner or Partitioner()
  trainer = Trainer(model, optimizer, partitioner, seed, num_microbatches)
  if plan_mesh is not None:
    if plan_mesh['model'] != partitioner.num_partitions:
      raise ConfigError(
          f'--plan mesh {plan_mesh["data"]}x{plan_mesh["model"]} has '
          f'{plan_mesh["model"]} devices on model, but NUM_PARTITIONS = '
          f'{partitioner.num_partitions}'
      )
    plan = memory_plan(trainer, input_shapes, dict(plan_mesh))
    print(plan)
    return {'plan': plan}
  tasks.check_registered(dataset.mixture_or_task_name)
  check_objective(dataset.mixture_or_task_name, model.task_weights)
  if train_steps < 1:
    raise ConfigError(f'TRAIN_STEPS must be >= 1; got {train_steps}')
  directory = storage.check_writable(model_dir, 'MODEL_DIR')
  log.info('%s; model %s', partitioner.describe(), model.module.config)
  # What serving a checkpoint needs without the run's gin (dsbs-serve).
  metadata = {
      'model_config': config_to_dict(model.module.config),
      'vocabulary': vocabularies.describe(model.output_vocabulary),
      'task_feature_lengths': dict(dataset.task_feature_lengths),
  }
  param_shardings = trainer.state_shardings(input_shapes).params
  evaluations = _Evaluation(
      evaluation,
      dataset,
      directory,
      checkpoint.period,
      model,
      partitioner,
      param_shardings,
      metadata,
  )
  checkpointer = Checkpointer(directory / 'checkpoints', checkpoint.period, checkpoint.keep)
  writer = monitoring.MetricWriter(directory / 'train', enabled=jax.process_index() == 0)
  try:  # a failure still waits for in-flight saves, so they stay restorable
    state, consumed = _restore_or_initialise(checkpointer, checkpoint, trainer, input_shapes)
    if run_record is not None and jax.process_index() == 0:
      _record(directory, run_record, writer, int(state.step))
    state, consumed, last_logged, preempted = _loop(
        trainer,
        state,
        consumed,
        dataset,
        converter,
        input_shapes,
        train_steps,
        log_period,
        checkpointer,
        metadata,
        writer,
        evaluations,
    )
  except BaseException:
    evaluations.close()
    raise
  finally:
    checkpointer.close()
    writer.close()
  step = int(state.step)
  if preempted:
    evaluations.close()
    log.info('SIGTERM: saved step %d to %s; exiting', step, checkpointer.directory)
    return {'step': step, 'preempted': True}
  results = _finish(evaluations, trainer, input_shapes, state, consumed, last_logged)
  results['parameters'] = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  if run_record is not None:
    results['run'] = run_record.summary()
  if jax.process_index() == 0:
    storage.write_atomic(directory / 'results.json', json.dumps(results, indent=2))
  log.info('Done. Outputs in %s', directory)
  return results


def _restore_or_initialise(
    checkpointer: Checkpointer,
    config: CheckpointConfig,
    trainer: Trainer,
    input_shapes: Mapping[str, tuple[int, ...]],
) -> tuple[TrainState, int]:
  if checkpointer.latest_step() is not None:
    state, consumed = checkpointer.restore(trainer.abstract_state(input_shapes))
    log.info('Resumed from %s at step %d', checkpointer.directory, int(state.step))
    return state, consumed
  if config.initial_path:
    abstract = trainer.abstract_state(input_shapes)
    params = load_initial_params(config.initial_path, trainer.model.module.config, abstract.params)
    state = dataclasses.replace(trainer.create_state(input_shapes), params=params)
    log.info('Initialised parameters from %s', config.initial_path)
  else:
    state = trainer.create_state(input_shapes)
  log.info('%.2fM parameters', sum(x.size for x in jax.tree_util.tree_leaves(state.params)) / 1e6)
  return state, 0


def _loop(
    trainer: Trainer,
    state: TrainState,
    consumed: int,
    dataset: DatasetConfig,
    converter: seqio.FeatureConverter,
    input_shapes: Mapping[str, tuple[int, ...]],
    train_steps: int,
    log_period: int,
    checkpointer: Checkpointer,
    metadata: dict[str, Any],
    writer: monitoring.MetricWriter,
    evaluations: _Evaluation,
) -> tuple[TrainState, int, dict[str, float], bool]:
  """Steps until `train_steps` or SIGTERM; returns (state, batches consumed, the last
  logged metrics, whether SIGTERM stopped it)."""
  batches = input_pipeline.batches(
      dataset,
      converter,
      skip=consumed,
      row_unit=trainer.partitioner.data_size * trainer.num_microbatches,
  )
  train_step = trainer.compile_train_step(input_shapes)
  partitioner = trainer.partitioner
  step = int(state.step)
  progress = monitoring.Progress(train_steps, step)
  history, last_logged, compiled, preempted = [], {}, False, False
  t_start = time.perf_counter()
  metrics: dict[str, Any] = {}
  with _Preemption() as preemption:
    while step < train_steps:
      state, metrics = train_step(state, partitioner.shard_batch(next(batches)))
      step, consumed = step + 1, consumed + 1
      history.append(metrics)
      if not compiled:  # the rate is timed from here on; the step's metrics are kept
        compiled = True
        jax.block_until_ready(metrics)
        log.info('First step (with compilation) took %.1fs', time.perf_counter() - t_start)
        progress.start(step)
      if step % log_period == 0 or step == train_steps:
        last_logged = _mean_metrics(history)
        history = []
        _check_finite(last_logged, step, checkpointer)
        _report(progress, writer, step, last_logged, dataset.batch_size)
      if checkpointer.should_save(step):
        _check_finite(metrics, step, checkpointer)
        checkpointer.save(step, state, consumed, metadata=metadata)
      if evaluations.period and step % evaluations.period == 0:
        evaluations.select(step, state, consumed)
      if preemption.requested():
        preempted = True
        break
  if checkpointer.latest_step() != step:
    _check_finite(metrics, step, checkpointer)
    checkpointer.save(step, state, consumed, force=True, metadata=metadata)
  return state, consumed, last_logged, preempted


def _report(
    progress: monitoring.Progress,
    writer: monitoring.MetricWriter,
    step: int,
    metrics: dict[str, float],
    batch_size: int,
) -> None:
  shown: dict[str, float] = {
      k: metrics[k] for k in ('loss', 'label/loss', 'rationale/loss') if k in metrics
  }
  rate = progress.report(step, shown)
  tokens = metrics.get('label/tokens', 0) + metrics.get('rationale/tokens', 0)
  if rate:  # none at a run's first step, which compiles: there is nothing to time
    metrics = {
        **metrics,
        'steps_per_sec': rate,
        'examples_per_sec': rate * batch_size,
        'tokens_per_sec': rate * tokens,
    }
  writer.write(step, metrics)


def _finish(
    evaluations: _Evaluation,
    trainer: Trainer,
    input_shapes: Mapping[str, tuple[int, ...]],
    state: TrainState,
    consumed: int,
    last_logged: dict[str, float],
) -> dict[str, Any]:
  """Selects on the last step too, restores the best state and evaluates the final split."""
  step = int(state.step)
  results: dict[str, Any] = {'step': step, 'train': last_logged, 'eval': {}}
  best = evaluations.best
  if best is not None:
    if step % evaluations.period:
      evaluations.select(step, state, consumed)
    results['best'] = {'step': best.step, 'metric': best.metric, 'value': best.value}
    log.info('Best %s: %s at step %d', best.metric, best.value, best.step)
    state = best.restore(trainer.abstract_state(input_shapes))
  final = evaluations.config.final_split
  if final:
    results['eval'][final] = evaluations.evaluate(final, state.params, int(state.step))
  evaluations.close()
  return results


def _check_finite(metrics: Mapping[str, Any], step: int, checkpointer: Checkpointer) -> None:
  """Stops on a non-finite loss or parameters, before they reach a checkpoint."""
  for key in ('loss', 'param_norm'):
    value = float(metrics[key])
    if not np.isfinite(value):
      raise FloatingPointError(
          f'{key} is {value} at step {step}; stopping before saving it. The last good '
          f'checkpoint in {checkpointer.directory} is kept (step {checkpointer.latest_step()})'
      )
