"""The Checkpointer: Orbax checkpoints of the train state and the data position.

A checkpoint at step s holds the params, optimizer state, step and RNG
(`state`), and `data`: how many batches of the deterministic training stream
were consumed (so a restart resumes the stream exactly where it stopped) and
the network's config (so a checkpoint can be exported or served on its own).
Directories may be local or URLs (`gs://...`).

A newest checkpoint that does not restore (a truncated file, a crash in the
middle of a copy) is skipped with a warning for the newest one that does; the
skipped step is renamed `<step>.corrupt`, never deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dsbs_jax import hf_checkpoint, storage, t5x_checkpoints
from dsbs_jax.errors import ConfigError
from dsbs_jax.network import T5Config

log = logging.getLogger('dsbs_jax')


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When a run saves, how many saves it keeps, and what it starts from.

  period: save every this many steps (and at the end, and on SIGTERM).
  keep: the newest checkpoints kept in MODEL_DIR/checkpoints.
  initial_path: weights to start from when MODEL_DIR holds no checkpoint
    (gin: INITIAL_CHECKPOINT_PATH); see `load_initial_params`.
  """

  period: int = 1000
  keep: int = 3
  initial_path: Optional[str] = None

  def __post_init__(self):
    if self.period < 1 or self.keep < 1:
      raise ConfigError(
          f'checkpoints.CheckpointConfig: period and keep must be >= 1; got '
          f'period={self.period}, keep={self.keep}'
      )


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'


class Checkpointer:
  """Saves every `save_interval_steps`, keeps the newest `max_to_keep`."""

  def __init__(
      self,
      directory: storage.PathLike,
      save_interval_steps: int = 1000,
      max_to_keep: int = 3,
      async_save: bool = True,
  ):
    self.directory = storage.resolve(directory)
    self._options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(
      self,
      step: int,
      state: Any,
      batches_consumed: int,
      force: bool = False,
      metadata: Optional[dict[str, Any]] = None,
  ) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved.

    Orbax finalises a checkpoint only once it is complete (a rename on disk, a
    commit marker on object stores), so a process killed mid-save leaves the
    previous checkpoint the latest.
    """
    data = {'batches_consumed': int(batches_consumed), **(metadata or {})}
    return self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
        force=force,
    )

  def metadata(self, step: int) -> dict[str, Any]:
    """The JSON saved beside the state at `step`."""
    return self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data']

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, int]:
    """(state, batches_consumed) at `step`, placed as `abstract_state` (a tree of
    `jax.ShapeDtypeStruct` with shardings) says.

    Without `step`, the newest checkpoint that restores: newer ones that do not
    are renamed `<step>.corrupt` with a warning. If none restores, a one-line
    `ConfigError` names the directory and why.
    """

    def restore_step(s: int) -> tuple[Any, int]:
      restored = self._manager.restore(
          s,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
      )
      return restored['state'], int(restored['data']['batches_consumed'])

    return self._restore_newest(restore_step, step)

  def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
    """Only the params of a checkpoint (initialising another run from it), placed as
    `abstract_params` says (any optimizer state is not read), or with None as host
    numpy arrays."""

    def restore_step(s: int) -> Any:
      if abstract_params is None:
        return self._manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
            'state'
        ]['params']
      restored = self._manager.restore(
          s,
          args=ocp.args.Composite(
              state=ocp.args.PyTreeRestore(
                  item={'params': abstract_params},
                  partial_restore=True,
                  restore_args=ocp.checkpoint_utils.construct_restore_args(
                      {'params': abstract_params}
                  ),
              )
          ),
      )
      return restored['state']['params']

    return self._restore_newest(restore_step, step)

  def _restore_newest(self, restore_step: Callable[[int], Any], step: Optional[int]) -> Any:
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      raise ConfigError(f'{self.directory}: no checkpoint to restore')
    failures = []
    for s in steps:
      try:
        result = restore_step(s)
      except (ValueError, KeyError, OSError, TypeError, RuntimeError) as e:
        log.warning(
            'checkpoint step %d in %s does not restore (%s); trying an older one',
            s,
            self.directory,
            _first_line(e),
        )
        failures.append((s, e))
        continue
      if failures:
        self._set_aside([f for f, _ in failures])
      return result
    newest, error = failures[0]
    raise ConfigError(
        f'{self.directory}: no checkpoint restores (steps '
        f'{", ".join(str(s) for s, _ in failures)}); step {newest}: '
        f'{_first_line(error)}'
    )

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unrestorable steps newer than the one restored to `<step>.corrupt`, so
    that the run can save those steps again; nothing is deleted."""
    if jax.process_index() == 0:
      for s in steps:
        source = self.directory / str(s)
        target = self.directory / f'{s}.corrupt'
        suffix = 0
        while target.exists():
          suffix += 1
          target = self.directory / f'{s}.corrupt{suffix}'
        source.rename(target)
        log.warning('kept the unrestorable checkpoint as %s', target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('dsbs_jax.checkpoints.set_aside')
    self._manager.close()
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class BestCheckpoint:
  """Keeps the state with the best validation metric, in its own directory.

  `metric` names a key of the flattened validation results (e.g.
  `cqa_llm_label/accuracy` or `teacher_forced/loss`); `mode` is `max` or `min`.
  The best value and its metric are stored with the checkpoint, so a restarted
  run keeps them.
  """

  def __init__(
      self,
      directory: storage.PathLike,
      metric: Optional[str],
      mode: str = 'max',
      metadata: Optional[dict[str, Any]] = None,
  ):
    self.metric, self.mode = metric, mode
    self._metadata = dict(metadata or {})
    self._checkpointer = Checkpointer(
        directory, save_interval_steps=1, max_to_keep=1, async_save=False
    )
    self.step = self._checkpointer.latest_step()
    self.value = None
    if self.step is not None:
      saved = self._checkpointer.metadata(self.step)
      if metric in (None, saved['metric']):
        self.metric, self.value = saved['metric'], saved['metric_value']

  def update(self, step: int, state: Any, batches_consumed: int, metrics: dict[str, float]) -> bool:
    """Saves `state` if `metrics[metric]` beats the best so far; returns whether it did."""
    if self.metric not in metrics:
      raise ConfigError(
          f'best_metric {self.metric!r} is not among the validation metrics {sorted(metrics)}'
      )
    value = float(metrics[self.metric])
    better = self.value is None or (
        value > self.value if self.mode == 'max' else value < self.value
    )
    if better:
      self._checkpointer.save(
          step,
          state,
          batches_consumed,
          force=True,
          metadata={**self._metadata, 'metric': self.metric, 'metric_value': value},
      )
      self.step, self.value = step, value
    return better

  def restore(self, abstract_state: Any) -> Any:
    return self._checkpointer.restore(abstract_state, self.step)[0]

  def close(self) -> None:
    self._checkpointer.close()


def checkpoint_directory(path: str) -> Optional[storage.PathLike]:
  """The Orbax checkpoints directory `path` names: itself, or its `checkpoints/` (a
  MODEL_DIR); None if neither holds a step."""
  for candidate in (path, os.path.join(path, 'checkpoints')):
    p = storage.resolve(candidate)
    if p.is_dir() and any(child.name.isdigit() for child in p.iterdir()):
      return candidate
  return None


def _architecture_mismatch(ours: T5Config, theirs: T5Config) -> list[str]:
  a, b = ours.architecture(), theirs.architecture()
  return [f'{name} ({a[name]!r} here, {b[name]!r} there)' for name in a if a[name] != b[name]]


def load_initial_params(path: str, config: T5Config, abstract_params: Any) -> Any:
  """Params to start a run from (gin: INITIAL_CHECKPOINT_PATH), placed as `abstract_params`
  (shapes and shardings) says.

  `path` is a HuggingFace `save_pretrained` directory, a dsbs-jax checkpoints
  directory or MODEL_DIR (its newest restorable step), or a T5X checkpoint (a
  `checkpoint_<step>` directory, or a T5X MODEL_DIR; `t5x_checkpoints`). A
  checkpoint's network config must agree with `config` in every field that gives
  the weights their meaning, each field that differs named; T5X checkpoints record
  none, so their parameter names and shapes are checked.
  """
  setting = f'INITIAL_CHECKPOINT_PATH {path}'
  if storage.exists(os.path.join(path, 'config.json')):
    theirs = hf_checkpoint.read_hf_config(path)
    mismatch = _architecture_mismatch(config, theirs)
    if mismatch:
      raise ConfigError(
          f'{setting}: the model differs from its config.json in '
          f'{"; ".join(mismatch)}; choose the matching gin/models file'
      )
    _, params = hf_checkpoint.load_hf_checkpoint(path)
    return _placed(setting, params, abstract_params)
  directory = checkpoint_directory(path)
  if directory is None:
    if t5x_checkpoints.find(path) is not None:
      return _placed(setting, t5x_checkpoints.read_params(path), abstract_params)
    raise ConfigError(
        f'{setting}: neither a HF save_pretrained directory (config.json), a '
        'dsbs-jax MODEL_DIR or checkpoints directory, nor a T5X checkpoint'
    )
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    step = checkpointer.latest_step()
    assert step is not None  # checkpoint_directory found a step
    saved = checkpointer.metadata(step).get('model_config')
    if saved is not None:
      mismatch = _architecture_mismatch(config, config_from_dict(saved))
      if mismatch:
        raise ConfigError(
            f"{setting}: the model differs from the checkpoint's in "
            f'{"; ".join(mismatch)}; choose the matching gin/models file'
        )
    return checkpointer.restore_params(abstract_params)
  finally:
    checkpointer.close()


def _placed(setting: str, params: Any, abstract_params: Any) -> Any:
  """`params` on the devices `abstract_params` says, once their names and shapes agree."""

  def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {
        jax.tree_util.keystr(p, simple=True, separator='/'): tuple(np.shape(x))
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }

  ours, theirs = shapes(abstract_params), shapes(params)
  problems = (
      [f'{k} missing' for k in sorted(set(ours) - set(theirs))]
      + [f'{k} unexpected' for k in sorted(set(theirs) - set(ours))]
      + [
          f'{k} is {theirs[k]} there, {ours[k]} here'
          for k in sorted(set(ours) & set(theirs))
          if theirs[k] != ours[k]
      ]
  )
  if problems:
    more = f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''
    raise ConfigError(
        f'{setting}: its parameters do not fit the model: '
        f'{"; ".join(problems[:4])}{more}; choose the matching gin/models file'
    )
  return jax.tree_util.tree_map(
      lambda x, a: jax.device_put(np.asarray(x), a.sharding), params, abstract_params
  )


def config_to_dict(config: T5Config) -> dict[str, Any]:
  """The network config as JSON, stored with every checkpoint."""
  return dataclasses.asdict(config)


def config_from_dict(fields: dict[str, Any]) -> T5Config:
  return T5Config(**{**fields, 'mlp_activations': tuple(fields['mlp_activations'])})


def read_checkpoint(
    directory: storage.PathLike, step: Optional[int] = None
) -> tuple[int, T5Config, Any, dict[str, Any]]:
  """(step, network config, params as host arrays, metadata) of a checkpoints
  directory's `step`, the newest by default: what tools without the run's gin read
  (dsbs-export, dsbs-serve)."""
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step not in checkpointer.all_steps():
      raise ConfigError(f'--step {step}: {directory} holds steps {checkpointer.all_steps()}')
    metadata = checkpointer.metadata(step)
    if 'model_config' not in metadata:
      raise ConfigError(
          f'{directory}/{step}: this checkpoint records no network config (it '
          'predates dsbs-jax 0.2); load it with hf_checkpoint.save_hf_checkpoint'
      )
    config = config_from_dict(metadata['model_config'])
    return step, config, checkpointer.restore_params(None, step), metadata
  finally:
    checkpointer.close()
