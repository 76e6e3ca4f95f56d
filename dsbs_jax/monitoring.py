"""Where runs report to: TensorBoard event files, JSONL copies, SeqIO loggers, a progress line.

Everything is written through `storage`, so a `gs://` MODEL_DIR gets the same
files as a local one. Event files are written with TensorBoard's own record
format and summary protos (no TensorFlow), which TensorBoard reads as it reads
`tf.summary`'s.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.record_writer import RecordWriter

from dsbs_jax import storage

log = logging.getLogger('dsbs_jax')


class EventFileWriter:
  """One TensorBoard event file in `directory`, named as TensorFlow names them."""

  _count = 0

  def __init__(self, directory: storage.PathLike):
    EventFileWriter._count += 1
    name = (
        f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.'
        f'{EventFileWriter._count}.v2'
    )
    self._file = storage.AppendFile(storage.resolve(directory) / name)
    self._records = RecordWriter(self._file)
    self._records.write(
        event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2').SerializeToString()
    )

  def write(self, step: int, summary: Any) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
    self._records.write(event.SerializeToString())

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricWriter:
  """Scalars to TensorBoard (`<dir>/events.*`) and to `<dir>/metrics.jsonl`; text to
  TensorBoard's text tab. Disabled writers (processes other than the first) write nothing."""

  def __init__(self, directory: storage.PathLike, enabled: bool = True):
    self.directory = storage.resolve(directory)
    self.enabled = enabled
    if enabled:
      self._events = EventFileWriter(self.directory)
      self._jsonl = storage.AppendFile(self.directory / 'metrics.jsonl')
      self._jsonl.start_line()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    for name, value in values.items():
      self._events.write(step, scalar_summary.scalar_pb(name, value))
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()
    self._events.flush()

  def write_text(self, step: int, texts: Mapping[str, str]) -> None:
    if not self.enabled:
      return
    for name, text in texts.items():
      self._events.write(step, text_summary.text_pb(name, text))
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._events.close()
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
    log.info(
        'step %d/%d (%.0f%%) %s | %s steps/s | ETA %s',
        step,
        self.total_steps,
        100.0 * step / max(self.total_steps, 1),
        shown,
        f'{rate:.2f}' if rate else '?',
        eta,
    )
    return rate


def _jsonable(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def _scalar(value: Any) -> Optional[float]:
  value = getattr(value, 'value', value)
  return float(value) if isinstance(value, (int, float, np.number)) else None


def seqio_loggers() -> tuple[type, type]:
  """The SeqIO logger classes an Evaluator writes through `storage` with.

  Defined on use: SeqIO (and TensorFlow) are imported only by the processes that
  evaluate.
  """
  import seqio

  class TensorBoardLogger(seqio.Logger):
    """Each task's scalar metrics to `<output_dir>/<task>/events.*` (SeqIO's layout)."""

    def __call__(
        self,
        task_name: str,
        step: Optional[int],
        metrics: Mapping[str, Any],
        dataset: Any,
        inferences: Any,
        targets: Any,
    ) -> None:
      del dataset, inferences, targets
      scalars = {f'eval/{k}': v for k, v in metrics.items() if _scalar(v) is not None}
      writer = EventFileWriter(storage.resolve(self.output_dir) / task_name)
      for name, value in scalars.items():
        writer.write(step or 0, scalar_summary.scalar_pb(name, _scalar(value)))
      writer.close()

  class JSONLogger(seqio.Logger):
    """`<task>-metrics.jsonl` (one line per step) and `<task>-<step>.jsonl` (every
    example with its target and prediction), as SeqIO's JSONLogger writes them."""

    def __call__(
        self,
        task_name: str,
        step: Optional[int],
        metrics: Mapping[str, Any],
        dataset: Any,
        inferences: Optional[Mapping[str, Sequence[Any]]],
        targets: Optional[Sequence[Any]],
    ) -> None:
      step = -1 if step is None else step
      out = storage.resolve(self.output_dir)
      values = {k: _scalar(v) for k, v in metrics.items() if _scalar(v) is not None}
      if values:
        lines = storage.AppendFile(out / f'{task_name}-metrics.jsonl')
        lines.start_line()
        lines.write(json.dumps({'step': step, **values}) + '\n')
        lines.close()
      if not inferences or targets is None or dataset is None:
        return
      kinds = [k for k in inferences if k != 'aux_value']
      from dsbs_jax.data.input_pipeline import numpy_iterator  # TensorFlow: only here

      rows = []
      for i, (example, target) in enumerate(zip(numpy_iterator(dataset), targets, strict=True)):
        row = {
            'input': _jsonable({k: v for k, v in example.items() if k.endswith('_pretokenized')}),
            'target': _jsonable(target),
        }
        row.update({k: _jsonable(inferences[k][i]) for k in kinds})
        rows.append(json.dumps(row))
      storage.write_atomic(out / f'{task_name}-{step:06d}.jsonl', '\n'.join(rows) + '\n')

  return TensorBoardLogger, JSONLogger
