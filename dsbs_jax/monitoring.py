"""Where training reports to: TensorBoard event files, a JSONL copy, and a progress line."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping, Optional

import tensorflow as tf

log = logging.getLogger('dsbs_jax')


class MetricWriter:
  """Scalars to TensorBoard (`<dir>/events.*`) and to `<dir>/metrics.jsonl`."""

  def __init__(self, directory: str, enabled: bool = True):
    self.directory = directory
    self.enabled = enabled
    if enabled:
      os.makedirs(directory, exist_ok=True)
      self._tb = tf.summary.create_file_writer(directory)
      self._jsonl = open(os.path.join(directory, 'metrics.jsonl'), 'a')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    with self._tb.as_default(step=step):
      for name, value in scalars.items():
        tf.summary.scalar(name, float(value))
    self._jsonl.write(json.dumps({'step': step, **{k: float(v) for k, v in scalars.items()}}) + '\n')
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """Steps/s and ETA over the interval since the last report (compile time excluded)."""

  def __init__(self, total_steps: int, start_step: int = 0):
    self.total_steps = total_steps
    self._last_step = start_step
    self._last_time: Optional[float] = None

  def start(self, step: int) -> None:
    """Starts timing after the first (compiling) step."""
    self._last_step, self._last_time = step, time.perf_counter()

  def report(self, step: int, scalars: Mapping[str, float]) -> float:
    """Logs one line and returns steps/s since the previous report."""
    now = time.perf_counter()
    rate = 0.0
    if self._last_time is not None and step > self._last_step:
      rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = _duration((self.total_steps - step) / rate) if rate else '?'
    shown = ' '.join(f'{k}={v:.4g}' for k, v in scalars.items())
    log.info('step %d/%d (%.0f%%) %s | %.2f steps/s | ETA %s', step, self.total_steps,
             100.0 * step / max(self.total_steps, 1), shown, rate, eta)
    return rate
