"""Greedy decoding as a pure `lax.while_loop` over a key/value cache, and the input
ordering and trimming that keep decoding's batches narrow and its compiled shapes few."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache], tuple[Array, Cache]]


def greedy_decode(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    batch_size: int,
    max_length: int,
    eos_id: int = 1,
    bos_id: int = 0,
) -> Array:
  """Decodes argmax tokens until every row has emitted EOS or `max_length` is reached.

  tokens_to_logits: ([b, 1] int tokens, cache) -> ([b, v] logits, cache).
  Returns [b, max_length] int32 tokens; positions after a row's EOS are 0.
  """

  def cond(state):
    step, _, _, _, finished = state
    return (step < max_length) & ~jnp.all(finished)

  def body(state):
    step, current, out, cache, finished = state
    logits, cache = tokens_to_logits(current, cache)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt = jnp.where(finished, 0, nxt)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
    return step + 1, nxt[:, None], out, cache, finished | (nxt == eos_id)

  init = (
      jnp.array(0, jnp.int32),
      jnp.full((batch_size, 1), bos_id, jnp.int32),
      jnp.zeros((batch_size, max_length), jnp.int32),
      cache,
      jnp.zeros((batch_size,), bool),
  )
  return jax.lax.while_loop(cond, body, init)[2]


# Decoded inputs are trimmed to a multiple of this many tokens (`trim_inputs`).
INPUT_LENGTH_MULTIPLE = 64


def trim_inputs(batch: Mapping[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """The batch without the encoder columns past its longest input, rounded up to
  a multiple of `multiple`.

  Decoding cost grows with the encoder length (the encoder pass and every
  step's cross-attention), so a batch should not pay for the longest input of
  the whole split; rounding bounds the compiled shapes to
  feature_length / multiple. All processes agree on the width (SPMD).
  """
  tokens = batch['encoder_input_tokens']
  longest = max(int(input_lengths(tokens).max(initial=0)), 1)
  width = min(tokens.shape[1], -(-longest // multiple) * multiple)
  if jax.process_count() > 1:
    width = int(np.max(multihost_utils.process_allgather(np.asarray(width))))
  return {k: v[:, :width] if k.startswith('encoder_') else v for k, v in batch.items()}


def input_lengths(encoder_input_tokens: np.ndarray) -> np.ndarray:
  """[n] each row's input length: one past its last non-padding token ([n, l] in)."""
  used = encoder_input_tokens > 0
  last = encoder_input_tokens.shape[1] - np.argmax(used[:, ::-1], axis=1)
  return np.where(used.any(axis=1), last, 0)


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """Row indices in batches of `batch_size`, longest inputs first ([n] lengths in).

  Batched in the split's order, a batch is as wide as its longest input, so a
  mixed split pays for its long inputs in almost every batch (the encoder and
  every step's cross-attention). Sorted, each batch's trimmed width fits its
  rows. The sort is stable, so equal lengths keep the split's order and every
  process of a multi-host run forms the same batches. Longest first, so the
  widest batch compiles (and would run out of memory) first.
  """
  order = np.argsort(-np.asarray(lengths), kind='stable')
  return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
