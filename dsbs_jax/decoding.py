"""Greedy decoding as a pure `lax.while_loop` over a key/value cache, and the input
ordering and widths that keep decoding's batches narrow and its compiled shapes few."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


# Decoded input widths are multiples of this many tokens (`batch_widths`).
WIDTH_ALIGNMENT = 8
# Evaluation compiles at most this many input widths per task and split
# (evaluation.EvaluationConfig.max_input_widths).
MAX_INPUT_WIDTHS = 8


def batch_widths(
    lengths: np.ndarray,
    batches: Sequence[np.ndarray],
    max_widths: int,
    alignment: int = WIDTH_ALIGNMENT,
) -> np.ndarray:
  """Each batch's input width: at most `max_widths` distinct widths, multiples of
  `alignment`, with the least total ([n] input lengths and batches of row
  indices in, [len(batches)] widths out).

  Every batch has the same number of rows, so a batch costs about its width
  (the encoder and every step's cross-attention), and each distinct width
  compiles once. A fixed grid of widths (multiples of 64) pads a batch of
  130-token inputs to 192; chosen from the split, its widths fit its batches.
  Exact by dynamic programming over the m distinct aligned widths the batches
  need: O(m^2 k).
  """
  if max_widths < 1:
    raise ValueError(f'max_widths must be >= 1, got {max_widths}')
  longest = np.array([max(int(np.max(lengths[b], initial=0)), 1) for b in batches], np.int64)
  needs = -(-longest // alignment) * alignment
  widths, counts = np.unique(needs, return_counts=True)
  if len(widths) > max_widths:
    widths = widths[_least_padding_widths(widths, np.cumsum(counts), max_widths)]
  return widths[np.searchsorted(widths, needs)]


def _least_padding_widths(widths: np.ndarray, covered: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k of the m > k sorted `widths` (the widest among them) that
  minimise the total width when each batch takes the narrowest chosen width it
  fits ([m] widths and [m] covered in, [k] indices out); covered[j] is how many
  batches need widths[j] or less."""
  m = len(widths)
  # cost[j]: least total width of the batches needing widths[:j + 1] with
  # level + 1 chosen widths, the widest widths[j]; choice[level, j]: the next narrower.
  cost = widths * covered
  choice = np.zeros((k, m), np.int64)
  for level in range(1, k):
    new = np.zeros_like(cost)
    for j in range(level, m):
      options = cost[level - 1 : j] + widths[j] * (covered[j] - covered[level - 1 : j])
      best = int(np.argmin(options))
      choice[level, j], new[j] = level - 1 + best, options[best]
    cost = new
  chosen = [m - 1]
  for level in range(k - 1, 0, -1):
    chosen.append(int(choice[level, chosen[-1]]))
  return np.array(chosen[::-1])


def with_input_width(batch: Mapping[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
  """The batch with its encoder features cut, or zero-padded, to `width` columns
  ([b, l] in, [b, width] out; the other features as they are).

  Decoding cost grows with the encoder length, so a batch should not pay for
  the longest input of the whole split. Cutting drops only padding.
  """
  longest = int(input_lengths(batch['encoder_input_tokens']).max(initial=0))
  if width < longest:
    raise ValueError(f'width {width} would cut an input of {longest} tokens')

  def fit(v: np.ndarray) -> np.ndarray:
    return v[:, :width] if v.shape[1] >= width else np.pad(v, ((0, 0), (0, width - v.shape[1])))

  return {k: fit(v) if k.startswith('encoder_') else v for k, v in batch.items()}


def input_lengths(encoder_input_tokens: np.ndarray) -> np.ndarray:
  """[n] each row's input length: one past its last non-padding token ([n, l] in)."""
  used = encoder_input_tokens > 0
  last = encoder_input_tokens.shape[1] - np.argmax(used[:, ::-1], axis=1)
  return np.where(used.any(axis=1), last, 0)


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """Row indices in batches of `batch_size`, longest inputs first ([n] lengths in).

  Batched in the split's order, a batch is as wide as its longest input, so a
  mixed split pays for its long inputs in almost every batch (the encoder and
  every step's cross-attention). Sorted, each batch's width (`batch_widths`)
  fits its rows. The sort is stable, so equal lengths keep the split's order
  and every process of a multi-host run forms the same batches. Longest first,
  so the widest batch compiles (and would run out of memory) first.
  """
  order = np.argsort(-np.asarray(lengths), kind='stable')
  return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
