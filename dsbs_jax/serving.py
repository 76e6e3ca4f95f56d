"""What `dsbs-serve` runs: a model that answers batches of texts, and the batcher
that gathers concurrent requests into those batches.

`Student` is a trained T5 student decoding greedily, `predict:` (the label)
and on request `explain:` (the rationale), jitted once per shape bucket: a
batch is padded to the next power of two rows (up to `max_batch`) and its
inputs to the next multiple of 64 tokens (up to `max_input_length`), so a
server compiles one program per (rows, width) bucket it meets, however requests vary:
at most (log2(max_batch) + 1) x (max_input_length / 64). `CausalLM`
serves a transformers causal LM (e.g. a teacher) with sampling.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Optional

import numpy as np

from dsbs_jax import storage, teachers
from dsbs_jax.errors import ConfigError

log = logging.getLogger('dsbs_jax')
OVERLONG = ('refuse', 'truncate')
# Inputs are padded to a multiple of this many tokens: a fixed grid, since a
# server cannot choose its widths from requests it has not seen.
INPUT_LENGTH_MULTIPLE = 64


class RequestError(ValueError):
  """A request the model cannot take: HTTP 400 with this message."""


@dataclasses.dataclass(frozen=True)
class Answer:
  text: str
  prompt_tokens: int
  completion_tokens: int
  finish_reason: str = 'stop'
  truncated_from: Optional[int] = None  # the input's length when it was truncated


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A request's encoder ids, ready to batch."""

  ids: list[int]
  max_tokens: Optional[int]
  truncated_from: Optional[int] = None


def _bucket(n: int, sizes: Sequence[int]) -> int:
  return next(s for s in sizes if s >= n)


class Student:
  """A T5 student from a dsbs-jax checkpoint or an HF directory, greedy, jitted per bucket."""

  def __init__(
      self,
      config: Any,
      params: Any,
      vocabulary: Any,
      max_input_length: int,
      max_decode_length: int,
      max_batch: int = 16,
      overlong: str = 'refuse',
  ):
    import jax

    from dsbs_jax import models, network
    from dsbs_jax.data import tasks

    self._prefixes = {False: tasks.LABEL_PREFIX, True: tasks.RATIONALE_PREFIX}
    self._separator = tasks.SEPARATOR

    if overlong not in OVERLONG:
      raise ConfigError(f'--overlong {overlong}: choose {" or ".join(OVERLONG)}')
    self.vocabulary, self.overlong = vocabulary, overlong
    self.max_decode_length = max_decode_length
    multiple = INPUT_LENGTH_MULTIPLE
    self.max_input_length = -(-max_input_length // multiple) * multiple
    self.lengths = list(range(multiple, self.max_input_length + 1, multiple))
    self.batch_sizes = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
    self.model = models.StepByStepModel(network.Transformer(config), vocabulary, vocabulary)
    self.params = jax.device_put(params)
    self.compiled: set[tuple[int, int]] = set()
    self._predict = jax.jit(
        lambda params, tokens: self.model.predict_batch(
            params, {'encoder_input_tokens': tokens}, max_decode_length=max_decode_length
        )
    )

  def _encode(self, text: str) -> list[int]:
    """`text`'s ids, each literal `</s>` the EOS id (as the tasks encode NLI pairs), then EOS."""
    eos = self.vocabulary.eos_id
    ids: list[int] = []
    for i, part in enumerate(text.split(self._separator)):
      ids += ([eos] if i else []) + list(self.vocabulary.encode(part))
    return [*ids, eos]

  def prepare(self, text: str, explain: bool, max_tokens: Optional[int]) -> Prepared:
    """One request's row, checked before it joins a batch: an overlong input is
    refused (`RequestError`) or truncated, as `overlong` says."""
    ids = self._encode(self._prefixes[explain] + text)
    if len(ids) <= self.max_input_length:
      return Prepared(ids, max_tokens)
    if self.overlong == 'refuse':
      raise RequestError(
          f'the input is {len(ids)} tokens; this model takes at most {self.max_input_length} '
          '(the server refuses longer inputs: --overlong=refuse)'
      )
    return Prepared(
        [*ids[: self.max_input_length - 1], self.vocabulary.eos_id], max_tokens, len(ids)
    )

  def precompile(self) -> None:
    """Compiles every bucket now, so that no request waits on the compiler."""
    for batch in self.batch_sizes:
      for width in self.lengths:
        log.info('compiling the decoder for %d rows x %d input tokens', batch, width)
        self._predict(self.params, np.zeros((batch, width), np.int32)).block_until_ready()
        self.compiled.add((batch, width))

  def answer(self, rows: Sequence[Prepared]) -> list[Answer]:
    """The rows decoded in one batch padded to its bucket."""
    batch = _bucket(len(rows), self.batch_sizes)
    width = _bucket(max(len(r.ids) for r in rows), self.lengths)
    tokens = np.zeros((batch, width), np.int32)
    for i, r in enumerate(rows):
      tokens[i, : len(r.ids)] = r.ids
    if (batch, width) not in self.compiled:
      log.info('compiling the decoder for %d rows x %d input tokens', batch, width)
      self.compiled.add((batch, width))
    out = np.asarray(self._predict(self.params, tokens))
    answers = []
    for i, r in enumerate(rows):
      row = out[i].tolist()
      ended = self.vocabulary.eos_id in row
      row = row[: row.index(self.vocabulary.eos_id)] if ended else row
      finish = 'stop' if ended else 'length'
      if r.max_tokens is not None and len(row) > r.max_tokens:
        row, finish = row[: r.max_tokens], 'length'
      answers.append(
          Answer(self.vocabulary.decode(row), len(r.ids), len(row), finish, r.truncated_from)
      )
    return answers


def load_student(
    path: str,
    vocabulary: Optional[str] = None,
    max_input_length: Optional[int] = None,
    max_decode_length: Optional[int] = None,
    **kwargs: Any,
) -> Student:
  """A `Student` from MODEL_DIR (its newest step), its `best/` or `checkpoints/`, or an
  HF directory. Vocabulary and lengths come from what the checkpoint recorded; the
  arguments override them (and are needed where nothing was recorded)."""
  from dsbs_jax import checkpoints, export, hf_checkpoint
  from dsbs_jax.data import vocabularies

  if storage.exists(os.path.join(path, 'config.json')):
    config, params = hf_checkpoint.load_hf_checkpoint(path)
    recorded_file = os.path.join(path, export.SERVING_FILE)
    recorded = json.loads(storage.read_text(recorded_file)) if storage.exists(recorded_file) else {}
  else:
    directory = checkpoints.checkpoint_directory(path)
    if directory is None:
      raise ConfigError(
          f'--model {path}: neither a dsbs-jax MODEL_DIR, best/ or checkpoints/, nor an HF '
          'directory (config.json)'
      )
    step, config, params, recorded = checkpoints.read_checkpoint(directory)
    log.info('serving step %d of %s', step, directory)
  lengths = recorded.get('task_feature_lengths') or {}
  max_input_length = max_input_length or lengths.get('inputs')
  max_decode_length = max_decode_length or lengths.get('targets')
  if vocabulary is not None:
    vocab = vocabularies.from_description(
        {'kind': 'bytes'}
        if vocabulary == 'bytes'
        else {'kind': 'sentencepiece', 'path': vocabulary}
    )
  elif recorded.get('vocabulary'):
    vocab = vocabularies.from_description(recorded['vocabulary'])
  else:
    raise ConfigError(f'--model {path}: records no vocabulary; pass --vocabulary=bytes or a .model')
  if not max_input_length or not max_decode_length:
    raise ConfigError(
        f'--model {path}: records no feature lengths; pass --max_input_length and '
        '--max_decode_length'
    )
  return Student(config, params, vocab, max_input_length, max_decode_length, **kwargs)


class CausalLM:
  """A transformers causal LM directory (`teachers.CausalLM`), sampling as asked."""

  def __init__(self, model_dir: str, device: str = 'cpu'):
    self.lm = teachers.CausalLM(model_dir, device)

  def check(self, prompt: str, sampling: teachers.Sampling) -> None:
    """Refuses a prompt that, with `max_tokens`, would not fit the model's context."""
    length = self.lm.count_tokens(prompt)
    if self.lm.context and length + sampling.max_tokens > self.lm.context:
      raise RequestError(
          f'the prompt is {length} tokens; with max_tokens={sampling.max_tokens} it exceeds '
          f"this model's context of {self.lm.context} tokens"
      )

  def answer(
      self, prompts: Sequence[str], sampling: teachers.Sampling
  ) -> list[teachers.Completions]:
    return self.lm.generate(prompts, sampling)


def is_causal_lm(path: str) -> bool:
  """Whether `path` is an HF directory of a model other than T5 (served as a causal LM)."""
  config = os.path.join(path, 'config.json')
  if not storage.exists(config):
    return False
  return json.loads(storage.read_text(config)).get('model_type') != 't5'


@dataclasses.dataclass
class _Item:
  payload: Any
  key: Hashable
  future: concurrent.futures.Future


class Batcher:
  """Gathers submitted items into batches of up to `max_batch` with the same key,
  waiting at most `wait_ms` for a batch to fill; `run` answers a batch in one call.
  `max_batch=1` turns batching off."""

  def __init__(
      self, run: Callable[[list[Any], Hashable], list[Any]], max_batch: int, wait_ms: float
  ):
    self._run, self.max_batch, self._wait = run, max_batch, wait_ms / 1000.0
    self._queue: queue.Queue[_Item] = queue.Queue()
    self.batches = self.items = 0
    threading.Thread(target=self._loop, name='batcher', daemon=True).start()

  def submit(self, payload: Any, key: Hashable = None) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put(_Item(payload, key, future))
    return future

  def _gather(self) -> list[_Item]:
    batch = [self._queue.get()]
    deadline = time.monotonic() + self._wait
    while len(batch) < self.max_batch:
      remaining = deadline - time.monotonic()
      try:
        batch.append(
            self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
        )
      except queue.Empty:
        break
    return batch

  def _loop(self) -> None:
    while True:
      batch = self._gather()
      by_key: dict[Hashable, list[_Item]] = {}
      for item in batch:
        by_key.setdefault(item.key, []).append(item)
      for key, group in by_key.items():
        # A request whose client went away was cancelled; the rest cannot be any more.
        items = [item for item in group if item.future.set_running_or_notify_cancel()]
        if not items:
          continue
        self.batches += 1
        self.items += len(items)
        try:
          results = self._run([item.payload for item in items], key)
        except Exception as e:  # handed to each request's handler, which answers for it (500)
          for item in items:
            item.future.set_exception(e)
          continue
        for item, result in zip(items, results, strict=True):
          item.future.set_result(result)
