"""The Checkpointer: Orbax checkpoints of the train state and the data position.

A checkpoint at step s holds the params, optimizer state, step and RNG
(`state`), and `data`: how many batches of the deterministic training stream
were consumed, so a restart resumes the stream exactly where it stopped.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from dsbs_jax.errors import ConfigError


class Checkpointer:
  """Saves every `save_interval_steps`, keeps the newest `max_to_keep`."""

  def __init__(self, directory: str, save_interval_steps: int = 1000, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(save_interval_steps=save_interval_steps,
                                             max_to_keep=max_to_keep,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, batches_consumed: int, force: bool = False,
           metadata: Optional[dict[str, Any]] = None) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved.

    Orbax writes into a temporary directory and renames it when complete, so
    a process killed mid-save leaves the previous checkpoint the latest.
    """
    data = {'batches_consumed': int(batches_consumed), **(metadata or {})}
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=force)

  def metadata(self, step: int) -> dict[str, Any]:
    """The JSON saved beside the state at `step`."""
    return self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))[
        'data']

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, int]:
    """(state, batches_consumed) at `step` (default latest), placed as `abstract_state`
    (a tree of `jax.ShapeDtypeStruct` with shardings) says."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise ConfigError(f'{self.directory}: no checkpoint to restore')
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], int(restored['data']['batches_consumed'])

  def wait(self) -> None:
    self._manager.wait_until_finished()

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

  def __init__(self, directory: str, metric: Optional[str], mode: str = 'max'):
    if mode not in ('max', 'min'):
      raise ConfigError(f'best_mode must be "max" or "min"; got {mode!r}')
    self.metric, self.mode = metric, mode
    self._checkpointer = Checkpointer(directory, save_interval_steps=1, max_to_keep=1,
                                      async_save=False)
    self.step = self._checkpointer.latest_step()
    self.value = None
    if self.step is not None:
      saved = self._checkpointer.metadata(self.step)
      if metric in (None, saved['metric']):
        self.metric, self.value = saved['metric'], saved['metric_value']

  def update(self, step: int, state: Any, batches_consumed: int,
             metrics: dict[str, float]) -> bool:
    """Saves `state` if `metrics[metric]` beats the best so far; returns whether it did."""
    if self.metric not in metrics:
      raise ConfigError(f'best_metric {self.metric!r} is not among the validation metrics '
                        f'{sorted(metrics)}')
    value = float(metrics[self.metric])
    better = (self.value is None or (value > self.value if self.mode == 'max'
                                     else value < self.value))
    if better:
      self._checkpointer.save(step, state, batches_consumed, force=True,
                              metadata={'metric': self.metric, 'metric_value': value})
      self.step, self.value = step, value
    return better

  def restore(self, abstract_state: Any) -> Any:
    return self._checkpointer.restore(abstract_state, self.step)[0]

  def close(self) -> None:
    self._checkpointer.close()
