"""The student model: T5X `BaseModel`'s interface over the T5 network and the objective.

Method names and signatures follow `t5x.models.EncoderDecoderModel`
(`get_initial_variables`, `loss_fn`, `predict_batch`, `score_batch`), so the
T5X bridge only has to subclass and forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, cast

import jax
import jax.numpy as jnp

from dsbs_jax import decoding, losses, network
from dsbs_jax.errors import ConfigError

if TYPE_CHECKING:
  import seqio

Array = jax.Array
Batch = Mapping[str, Array]
Params = Any


class StepByStepModel:
  """A T5 student trained on L = sum_k w_k * mean CE of task k (label, rationale)."""

  @property
  def FEATURE_CONVERTER_CLS(self) -> type[seqio.FeatureConverter]:  # noqa: N802 (T5X's name)
    """The converter T5X and our trainer build batches with.

    Imported on use: the model and trainer then import without TensorFlow, so a
    host that only runs steps or serves `predict:` (a GPU box with JAX alone)
    needs no input-pipeline stack.
    """
    from dsbs_jax.data.feature_converters import StepByStepFeatureConverter

    return StepByStepFeatureConverter

  def __init__(
      self,
      module: network.Transformer,
      input_vocabulary: seqio.Vocabulary,
      output_vocabulary: seqio.Vocabulary,
      task_weights: Sequence[float] = (1.0, 1.0),
      label_smoothing: float = 0.0,
      z_loss: float = 0.0,
      loss_chunk_length: Optional[int] = None,
  ):
    """`loss_chunk_length`: target positions whose logits the loss computes at a
    time (`losses.head_cross_entropy`); None, or a length >= the targets',
    computes all at once."""
    if loss_chunk_length is not None and (
        isinstance(loss_chunk_length, bool)
        or not isinstance(loss_chunk_length, int)
        or loss_chunk_length < 1
    ):
      raise ConfigError(
          'LOSS_CHUNK_LENGTH (StepByStepModel.loss_chunk_length) must be an int >= 1, '
          f'or None for all positions at once; got {loss_chunk_length!r}'
      )
    if module.config.vocab_size < output_vocabulary.vocab_size:
      raise ValueError(
          f'T5Config.vocab_size={module.config.vocab_size} is smaller than the '
          f'output vocabulary ({output_vocabulary.vocab_size} ids)'
      )
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.task_weights = tuple(float(w) for w in task_weights)
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    self.loss_chunk_length = loss_chunk_length

  def get_initial_variables(
      self,
      rng: Array,
      input_shapes: Mapping[str, Sequence[int]],
      input_types: Optional[Mapping[str, Any]] = None,
  ) -> Mapping[str, Any]:
    """Boxed (logically partitioned) variables for inputs of these shapes."""
    del input_types
    enc = jnp.ones(input_shapes['encoder_input_tokens'], jnp.int32)
    dec = jnp.ones(input_shapes['decoder_input_tokens'], jnp.int32)
    return self.module.init({'params': rng}, enc, dec, dec, enable_dropout=False)

  def _token_losses(
      self,
      params: Params,
      batch: Batch,
      dropout_rng: Optional[Array],
      label_smoothing: float = 0.0,
      z_loss: float = 0.0,
  ) -> tuple[Array, Array, Array]:
    """Teacher-forced (loss, z_loss, correct), each [b, l], the head applied
    `loss_chunk_length` positions at a time."""
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    hidden = self.module.apply(
        {'params': params},
        batch['encoder_input_tokens'],
        batch['decoder_input_tokens'],
        batch['decoder_target_tokens'],
        batch.get('encoder_segment_ids'),
        batch.get('decoder_segment_ids'),
        enable_dropout=dropout_rng is not None,
        logits=False,
        rngs=rngs,
    )
    config = self.module.config
    # Cast once, not in every chunk of the loss's loop (a no-op in float32).
    weight = network.head_weight(params, config).astype(config.activation_dtype)
    return losses.head_cross_entropy(
        cast(Array, hidden),
        batch['decoder_target_tokens'],
        lambda h: network.head_logits(h, weight, config),
        self.loss_chunk_length,
        label_smoothing,
        z_loss,
    )

  @staticmethod
  def task_ids(batch: Batch) -> Array:
    """[b, l] task of each target token; plain SeqIO batches count as label tokens."""
    if 'decoder_task_ids' in batch:
      return batch['decoder_task_ids']
    weights = batch.get('decoder_loss_weights', batch['decoder_target_tokens'] > 0)
    return jnp.where(weights > 0, losses.LABEL_TASK, losses.PAD_TASK)

  def loss_fn(
      self,
      params: Params,
      batch: Batch,
      dropout_rng: Optional[Array],
      task_token_counts: Optional[Array] = None,
  ) -> tuple[Array, dict[str, Array]]:
    """(scalar loss, metrics) for a (possibly packed, multi-task) batch.

    `task_token_counts` [k], the whole batch's, makes a microbatch's loss and
    metrics its additive share of the whole batch's (gradient accumulation).
    """
    token_loss, token_z, correct = self._token_losses(
        params, batch, dropout_rng, self.label_smoothing, self.z_loss
    )
    task_ids = self.task_ids(batch)
    loss, task_losses, counts = losses.multitask_loss(
        token_loss, task_ids, self.task_weights, task_token_counts
    )
    task_acc, _ = losses.per_task_mean(correct, task_ids, len(self.task_weights), counts)
    z_means, _ = losses.per_task_mean(token_z, task_ids, len(self.task_weights), counts)
    metrics = {'loss': loss, 'z_loss': jnp.sum(jnp.asarray(self.task_weights) * z_means)}
    for i, name in enumerate(losses.TASK_NAMES[k] for k in range(1, len(self.task_weights) + 1)):
      metrics[f'{name}/loss'] = task_losses[i]
      metrics[f'{name}/accuracy'] = task_acc[i]
      metrics[f'{name}/tokens'] = counts[i]
    return loss, metrics

  def score_batch(self, params: Params, batch: Batch) -> Array:
    """[b] log-likelihood of each (unpacked) row's targets."""
    token_loss, _, _ = self._token_losses(params, batch, None)
    weights = batch.get('decoder_loss_weights', batch['decoder_target_tokens'] > 0)
    return -jnp.sum(token_loss * weights, axis=-1)

  def init_cache(
      self, params: Params, encoded: Array, encoder_input_tokens: Array, length: int
  ) -> Any:
    """The decoding cache for `length` steps, given the encoder output [b, l_in, e].

    Cross-attention projects `encoded` into the cache here, once, so the cache
    must be built from the real encoding (the T5X bridge relies on this too).
    """
    tokens = jnp.zeros((encoder_input_tokens.shape[0], length), jnp.int32)
    _, variables = self.module.apply(
        {'params': params},
        encoded,
        encoder_input_tokens,
        tokens,
        enable_dropout=False,
        decode=True,
        max_decode_length=length,
        method=network.Transformer.decode,
        mutable=['cache'],
    )
    return variables['cache']

  def predict_batch(
      self,
      params: Params,
      batch: Batch,
      rng: Optional[Array] = None,
      max_decode_length: Optional[int] = None,
  ) -> Array:
    """[b, l] greedy tokens; l defaults to the batch's decoder length."""
    del rng
    enc_tokens = batch['encoder_input_tokens']
    length = max_decode_length or batch['decoder_input_tokens'].shape[1]
    encoded = cast(
        Array,
        self.module.apply(
            {'params': params}, enc_tokens, enable_dropout=False, method=network.Transformer.encode
        ),
    )

    def run_decoder(tokens, cache):
      logits, new_vars = self.module.apply(
          {'params': params, 'cache': cache},
          encoded,
          enc_tokens,
          tokens,
          enable_dropout=False,
          decode=True,
          max_decode_length=length,
          method=network.Transformer.decode,
          mutable=['cache'],
      )
      return logits[:, -1], new_vars['cache']

    return decoding.greedy_decode(
        run_decoder,
        self.init_cache(params, encoded, enc_tokens, length),
        enc_tokens.shape[0],
        length,
        eos_id=self.output_vocabulary.eos_id,
    )
