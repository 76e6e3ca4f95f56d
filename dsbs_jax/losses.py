"""The distilling-step-by-step objective as pure functions.

Every target token carries a task id (0 = padding, 1 = label, 2 = rationale;
see `dsbs_jax.data.feature_converters`). The objective averages the token loss
within each task and then weights the tasks:

    L = sum_k w_k * mean_{tokens of task k} CE

With w = (1, lambda) this is L_label + lambda * L_rationale (the paper); with
w = (alpha, 1 - alpha) it is the reference code's form. Because each task is
averaged over its own tokens, a packed batch that mixes both tasks gives the
same value as the reference's two separate forward passes.

Shapes: b = batch, l = target length, e = embed, v = vocabulary, k = number of tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import jax
import jax.numpy as jnp

from dsbs_jax.errors import ConfigError

Array = jax.Array

PAD_TASK = 0
LABEL_TASK = 1
RATIONALE_TASK = 2
TASK_NAMES = {LABEL_TASK: 'label', RATIONALE_TASK: 'rationale'}


def task_weights(
    lambda_: Optional[float] = None, alpha: Optional[float] = None
) -> tuple[float, float]:
  """(w_label, w_rationale) from exactly one of the paper's λ or the reference's α."""
  if (lambda_ is None) == (alpha is None):
    raise ConfigError(
        f"set exactly one of LAMBDA (the paper's form) and ALPHA (the reference "
        f"code's; then LAMBDA = None); got LAMBDA={lambda_}, ALPHA={alpha}"
    )
  if lambda_ is not None:
    if lambda_ < 0:
      raise ConfigError(f'LAMBDA must be >= 0; got {lambda_}')
    return 1.0, float(lambda_)
  assert alpha is not None  # exactly one is set
  if not 0.0 <= alpha <= 1.0:
    raise ConfigError(f'ALPHA must be in [0, 1]; got {alpha}')
  return float(alpha), 1.0 - float(alpha)


def token_cross_entropy(
    logits: Array, targets: Array, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[Array, Array]:
  """Per-token cross-entropy with T5X's label smoothing and z-loss.

  logits [b, l, v] float, targets [b, l] int -> (loss [b, l], z_loss [b, l]).
  `loss` includes the z-loss term; with label smoothing the constant entropy of
  the smoothed distribution is subtracted, so a perfect model scores 0.
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  # -log p(target) = log_z - logit(target): no [b, l, v] log-probabilities or one-hot
  # targets are built, which at T5's 32k vocabulary made the loss's backward pass
  # slower than the head's matmuls on a CPU (`bench/README.md`).
  loss = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  if label_smoothing > 0.0:
    # The smoothed target puts `low` on every id and `confidence` on the target,
    # and sums to 1: -sum(soft * log_probs) = log_z - sum(soft * logits).
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    loss = (confidence - low) * loss + low * (vocab * log_z - jnp.sum(logits, axis=-1))
    loss -= -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  z = z_loss * jnp.square(log_z)
  return loss + z, z


def head_cross_entropy(
    hidden: Array,
    targets: Array,
    head: Callable[[Array], Array],
    chunk_length: Optional[int] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[Array, Array, Array]:
  """`token_cross_entropy` of the output head's logits, `chunk_length` target
  positions at a time.

  hidden [b, l, e], targets [b, l] int, head [b, c, e] -> float32 logits [b, c, v]
  -> (loss [b, l], z_loss [b, l], correct [b, l]: 1.0 where the argmax is the target).

  With `chunk_length` < l one chunk's [b, chunk_length, v] logits exist at a
  time, in the forward pass and, recomputed, in the backward pass, instead of
  all [b, l, v] logits and their softmax: at T5's 32k vocabulary those are a
  large share of a step's activations. The length is padded to whole chunks and
  the padding sliced off again.
  """

  def per_token(h: Array, t: Array) -> tuple[Array, Array, Array]:
    logits = head(h)
    loss, z = token_cross_entropy(logits, t, label_smoothing, z_loss)
    return loss, z, (jnp.argmax(logits, -1) == t).astype(jnp.float32)

  batch, length = targets.shape
  if chunk_length is None or chunk_length >= length:
    return per_token(hidden, targets)
  n = -(-length // chunk_length)
  pad = n * chunk_length - length
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))

  def chunks(x: Array) -> Array:
    return x.reshape(batch, n, chunk_length, *x.shape[2:]).swapaxes(0, 1)

  # A loop body needs no CSE barriers against the backward pass (JAX's advice for
  # checkpoint inside scan).
  recomputed = jax.checkpoint(per_token, prevent_cse=False)
  out = jax.lax.map(lambda xs: recomputed(*xs), (chunks(hidden), chunks(targets)))
  loss, z, correct = (o.swapaxes(0, 1).reshape(batch, n * chunk_length)[:, :length] for o in out)
  return loss, z, correct


def task_token_counts(task_ids: Array, num_tasks: int) -> Array:
  """task_ids [b, l] int in [0, num_tasks] -> [num_tasks] tokens of task id i + 1."""
  onehot = jax.nn.one_hot(task_ids, num_tasks + 1, dtype=jnp.float32)[..., 1:]
  return jnp.sum(onehot, axis=(0, 1))


def per_task_mean(
    token_values: Array, task_ids: Array, num_tasks: int, counts: Optional[Array] = None
) -> tuple[Array, Array]:
  """Mean of a per-token quantity within each task.

  token_values [b, l] float, task_ids [b, l] int in [0, num_tasks] ->
  (means [num_tasks], token counts [num_tasks]); entry i is task id i + 1. A
  task absent from the batch has mean 0 and count 0. `counts` [num_tasks]
  overrides the denominators: with the whole batch's counts, the values of its
  microbatches add up to the whole batch's means.
  """
  onehot = jax.nn.one_hot(task_ids, num_tasks + 1, dtype=jnp.float32)[..., 1:]
  if counts is None:
    counts = jnp.sum(onehot, axis=(0, 1))
  sums = jnp.einsum('bl,blk->k', token_values.astype(jnp.float32), onehot)
  return sums / jnp.maximum(counts, 1.0), counts


def multitask_loss(
    token_loss: Array, task_ids: Array, weights: Sequence[float], counts: Optional[Array] = None
) -> tuple[Array, Array, Array]:
  """The weighted sum of per-task mean losses.

  token_loss [b, l], task_ids [b, l], weights [k] (weight of task id i at i-1),
  optional denominators counts [k] (see `per_task_mean`)
  -> (loss [], per-task mean losses [k], per-task token counts [k]).
  """
  w = jnp.asarray(weights, jnp.float32)
  means, counts = per_task_mean(token_loss, task_ids, w.shape[0], counts)
  return jnp.sum(w * means), means, counts
