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

  def save(self, step: int, state: Any, batches_consumed: int, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved."""
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'batches_consumed': int(batches_consumed)})), force=force)

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
