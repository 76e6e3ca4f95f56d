"""Greedy decoding as a pure `lax.while_loop` over a key/value cache."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache], tuple[Array, Cache]]


def greedy_decode(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int,
                  max_length: int, eos_id: int = 1, bos_id: int = 0) -> Array:
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

  init = (jnp.array(0, jnp.int32), jnp.full((batch_size, 1), bos_id, jnp.int32),
          jnp.zeros((batch_size, max_length), jnp.int32), cache,
          jnp.zeros((batch_size,), bool))
  return jax.lax.while_loop(cond, body, init)[2]
