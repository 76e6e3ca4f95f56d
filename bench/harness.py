"""What the benchmarks share: the same real examples for both sides, the same
weights, model FLOPs, the machine's measured matmul peak, and peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from dsbs_jax import hf_checkpoint, losses, network
from dsbs_jax.data import benchmarks, tasks
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = seqio.ByteVocabulary()
CONFIGS = {
    # T5 v1.1 small with the byte vocabulary both sides use.
    'small': network.T5Config(vocab_size=384, emb_dim=512, num_heads=6, num_encoder_layers=8,
                              num_decoder_layers=8, head_dim=64, mlp_dim=1024,
                              dropout_rate=0.0),
    # A config that runs in seconds on a CPU.
    'mini': network.T5Config(vocab_size=384, emb_dim=128, num_heads=4, num_encoder_layers=2,
                             num_decoder_layers=2, head_dim=32, mlp_dim=512, dropout_rate=0.0),
}


def data_root() -> str:
  return os.environ.get(benchmarks.DATA_ROOT_ENV) or os.path.join(REPO, '..', 'shared', 'datasets')


def encode(text: str, limit: int) -> list[int]:
  """Token ids as `tasks.tokenize` makes them (`</s>` -> EOS), truncated, with EOS."""
  ids: list[int] = []
  for i, part in enumerate(text.split(tasks.SEPARATOR)):
    ids += ([VOCAB.eos_id] if i else []) + VOCAB.encode(part)
  return ids[:limit - 1] + [VOCAB.eos_id]


def examples(datasets: Sequence[str], split: str, lengths: dict[str, int],
             limit: int | None = None) -> list[dict[str, list[int]]]:
  """Real rows as token ids: predict/explain inputs, label and rationale targets (with EOS),
  truncated to `lengths`, interleaved across datasets; at most `limit` of them."""
  per_dataset = []
  for name in datasets:
    rows = benchmarks.split_rows(name, split, root=data_root())[:limit]
    per_dataset.append([{
        'predict': encode(tasks.LABEL_PREFIX + r['input'], lengths['inputs']),
        'explain': encode(tasks.RATIONALE_PREFIX + r['input'], lengths['inputs']),
        'label': encode(r['label_llm'], lengths['targets']),
        'rationale': encode(r['rationale'], lengths['targets'])} for r in rows])
  return [ex for group in zip(*per_dataset) for ex in group][:limit]


def packed_batches(rows: Sequence[dict[str, list[int]]], lengths: dict[str, int],
                   batch_size: int, rationale: bool = True) -> Iterator[tuple[dict, int]]:
  """Our input: the same examples' two tasks packed into fixed-shape rows.

  Yields (batch, examples in it), counting an example once per task half, /2
  for step-by-step, so examples/s compares with the reference's batch.
  """
  def gen():
    for r in rows:
      yield {'inputs': r['predict'], 'targets': r['label'], 'task_id': [losses.LABEL_TASK]}
      if rationale:
        yield {'inputs': r['explain'], 'targets': r['rationale'],
               'task_id': [losses.RATIONALE_TASK]}
  spec = {k: tf.TensorSpec([None], tf.int32) for k in ('inputs', 'targets', 'task_id')}
  ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
  ds = StepByStepFeatureConverter(pack=True)(ds, {**lengths, 'task_id': 1})
  for batch in ds.batch(batch_size, drop_remainder=True).as_numpy_iterator():
    segments = sum(len(set(row[row > 0].tolist())) for row in batch['encoder_segment_ids'])
    yield batch, segments / (2 if rationale else 1)


def same_weights(config: network.T5Config, seed: int = 0) -> tuple[Any, Any]:
  """(HF torch model, our params) holding identical weights."""
  from bench import reference_torch
  model = reference_torch.build_model(hf_checkpoint.config_to_hf(config), seed)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model, hf_checkpoint.params_from_hf_state_dict(state, config)


def forward_flops_per_token(config: network.T5Config, enc_len: int, dec_len: int
                            ) -> tuple[float, float]:
  """(encoder, decoder) forward FLOPs per real token: 2 x matmul weights + attention."""
  inner = config.num_heads * config.head_dim
  mlp_mats = len(config.mlp_activations) + 1
  enc = 2 * (4 * config.emb_dim * inner + mlp_mats * config.emb_dim * config.mlp_dim) \
      + 4 * inner * enc_len
  dec = 2 * (8 * config.emb_dim * inner + mlp_mats * config.emb_dim * config.mlp_dim) \
      + 4 * inner * (dec_len + enc_len)
  return (config.num_encoder_layers * enc,
          config.num_decoder_layers * dec + 2 * config.emb_dim * config.vocab_size)


def train_flops(config: network.T5Config, enc_tokens: float, dec_tokens: float,
                enc_len: int, dec_len: int) -> float:
  """Model FLOPs of a train step on these real tokens (backward = 2 x forward)."""
  enc, dec = forward_flops_per_token(config, enc_len, dec_len)
  return 3 * (enc * enc_tokens + dec * dec_tokens)


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """The machine's dense float32 matmul rate (best of `repeats`), measured now."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_time(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n**3 / best


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def reset_peak_rss() -> float:
  """Restarts the kernel's peak-RSS count (Linux `clear_refs` 5); returns the current RSS."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
  return _status_bytes('VmRSS')


def peak_rss() -> float:
  """This process's peak resident memory since `reset_peak_rss`, in bytes."""
  return _status_bytes('VmHWM')


def _status_bytes(field: str) -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return float(line.split()[1]) * 1024.0
  raise RuntimeError(f'{field} not in /proc/self/status')


def run_child(argv: Sequence[str]) -> str:
  """stdout of `python argv` run from the repository root."""
  return subprocess.run([sys.executable, *argv], check=True, cwd=REPO, capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=REPO)).stdout


def summary(times: Sequence[float]) -> float:
  return float(np.median(times))
