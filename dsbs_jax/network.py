"""The T5 encoder-decoder in Flax linen.

Parameter names follow T5X's `t5x/examples/t5/network.py` (so T5X checkpoints
map one-to-one) and every parameter and main activation carries logical axis
names (`batch`, `length`, `embed`, `mlp`, `heads`, `kv`, `joined_kv`, `vocab`,
`relpos_buckets`) that `dsbs_jax.partitioning` maps onto a device mesh.

Attention is computed a block of query rows at a time and recomputed in the
backward pass (`dot_product_attention`), so no layer holds a [b, h, q, k]
tensor for backprop.

Shapes use b = batch, l = length (q/k for query/key), e = embed, h = heads,
d = head_dim, v = vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union, cast

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dsbs_jax.errors import ConfigError

Array = jax.Array
Initializer = Callable[..., Array]

_NEG_INF = -1e10

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'gelu': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_exact': functools.partial(jax.nn.gelu, approximate=False),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'linear': lambda x: x,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of a T5 network (T5X's field names).

  `mlp_activations=('gelu', 'linear')` with `logits_via_embedding=False` is
  T5 v1.1 (gated-GELU, untied head); `('relu',)` with `True` is T5 v1.0.
  `attention_block_size` query rows are attended at a time (memory against
  per-block overhead); `remat` recomputes whole layers in the backward pass,
  keeping only each layer's input (memory against about 16% more step time).
  `float32_attention_logits` keeps attention's logits and softmax in float32
  when the activations are bfloat16; False computes them in the activation
  dtype, as T5X does by default (half the bytes of the largest tensors in
  attention, bfloat16's rounding in its softmax). Ours defaults to True, the
  numbers this project has always computed.
  """

  vocab_size: int
  emb_dim: int
  num_heads: int
  num_encoder_layers: int
  num_decoder_layers: int
  head_dim: int
  mlp_dim: int
  mlp_activations: Sequence[str] = ('gelu', 'linear')
  logits_via_embedding: bool = False
  dropout_rate: float = 0.1
  dtype: str = 'float32'
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  remat: bool = False
  attention_block_size: int = 256
  float32_attention_logits: bool = True

  def __post_init__(self):
    for name in (
        'vocab_size',
        'emb_dim',
        'num_heads',
        'num_encoder_layers',
        'num_decoder_layers',
        'head_dim',
        'mlp_dim',
        'attention_block_size',
    ):
      if int(getattr(self, name)) < 1:
        raise ConfigError(f'T5Config.{name} must be >= 1, got {getattr(self, name)}')
    unknown = [a for a in self.mlp_activations if a not in ACTIVATIONS]
    if unknown:
      raise ConfigError(
          f'T5Config.mlp_activations: unknown {unknown}; choose from {sorted(ACTIVATIONS)}'
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f'T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}')
    if not self.float32_attention_logits and self.activation_dtype == jnp.float32:
      raise ConfigError(
          'T5Config.float32_attention_logits=False has no effect with dtype float32 (the '
          "logits are float32 already); it applies with dtype 'bfloat16'"
      )
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))

  @property
  def activation_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def attention_logits_dtype(self) -> jnp.dtype:
    return jnp.dtype(jnp.float32) if self.float32_attention_logits else self.activation_dtype

  def architecture(self) -> dict[str, Any]:
    """The fields that define the function the weights compute (not how it runs or trains):
    two configs that agree here can exchange weights."""
    return {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if f.name not in _RUNTIME_FIELDS
    }


# T5Config fields that change how the network runs or trains, not what its weights mean.
_RUNTIME_FIELDS = (
    'dropout_rate',
    'dtype',
    'remat',
    'attention_block_size',
    'float32_attention_logits',
)


def relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
  """Maps `memory_pos - query_pos` to T5's log-spaced buckets.

  Computed in float32 exactly as HF/Mesh-TF do, so bucket edges agree. Positions
  are static, so this runs in numpy at trace time.
  """
  rp = relative_position.astype(np.int64)
  buckets = np.zeros_like(rp)
  if bidirectional:
    num_buckets //= 2
    buckets += (rp > 0).astype(np.int64) * num_buckets
    rp = np.abs(rp)
  else:
    rp = -np.minimum(rp, 0)
  max_exact = num_buckets // 2
  is_small = rp < max_exact
  with np.errstate(divide='ignore'):
    large = np.log(rp.astype(np.float32) / np.float32(max_exact))
    large = large / np.float32(math.log(max_distance / max_exact))
    large = large * np.float32(num_buckets - max_exact)
  large = max_exact + np.where(is_small, 0, large).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return buckets + np.where(is_small, rp, large)


def _param(
    module: nn.Module, name: str, init: Initializer, axes: tuple[str, ...], shape: tuple[int, ...]
) -> Array:
  """A float32 parameter with logical axis names. Flax unboxes it when read, so the
  module sees the array (its static type is the box)."""
  return cast(
      Array, module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
  )


def _kernel(
    module: nn.Module, shape: tuple[int, int], axes: tuple[str, str], init: Initializer
) -> Array:
  """A projection's float32 `kernel`, stored 2-D as in T5X checkpoints."""
  return _param(module, 'kernel', init, axes, shape)


class Kernel(nn.Module):
  """A projection's kernel alone, for callers that fuse several projections."""

  shape: tuple[int, int]
  axes: tuple[str, str]
  initializer: Initializer

  @nn.compact
  def __call__(self) -> Array:
    return _kernel(self, self.shape, self.axes, self.initializer)


def project(x: Array, kernels: Sequence[Array], dtype: jnp.dtype) -> list[Array]:
  """x [..., e] through each kernel [e, f_i] -> [[..., f_i]], as one matmul.

  Concatenating the kernels gives XLA one larger matmul (and one for each
  gradient) instead of several small ones; the split outputs are views.
  """
  kernel = jnp.concatenate(kernels, axis=1) if len(kernels) > 1 else kernels[0]
  y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
  return jnp.split(y, np.cumsum([k.shape[1] for k in kernels])[:-1], axis=-1)


class Dense(nn.Module):
  """A bias-free projection; its kernel is stored 2-D, as in T5X checkpoints."""

  features: int
  kernel_axes: tuple[str, str]
  kernel_init: Initializer
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _kernel(self, (x.shape[-1], self.features), self.kernel_axes, self.kernel_init)
    return project(x, [kernel], self.dtype)[0]


class Embed(nn.Module):
  """Token embedding; with `logits_via_embedding` also T5 v1.0's tied output head."""

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = _param(
        self,
        'embedding',
        nn.initializers.normal(stddev=1.0),
        ('vocab', 'embed'),
        (self.num_embeddings, self.features),
    )

  def __call__(self, tokens: Array) -> Array:
    """[b, l] int -> [b, l, e]."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)


def head_weight(params: Any, config: T5Config) -> Array:
  """The output head's weight in a (unboxed) params tree: `logits_dense`'s kernel
  [e, v], or with `logits_via_embedding` the shared embedding [v, e]."""
  if config.logits_via_embedding:
    return params['token_embedder']['embedding']
  return params['decoder']['logits_dense']['kernel']


def head_logits(hidden: Array, weight: Array, config: T5Config) -> Array:
  """The decoder's output head: hidden [..., e] -> float32 logits [..., v].

  `weight` is `head_weight`'s: a kernel [e, v], or T5 v1.0's tied embedding
  [v, e], whose logits are scaled by 1/sqrt(e).
  """
  dtype = config.activation_dtype
  if config.logits_via_embedding:
    logits = jnp.dot(hidden.astype(dtype), weight.astype(dtype).T)
    logits = logits / jnp.sqrt(jnp.asarray(config.emb_dim, dtype))
  else:
    logits = project(hidden, [weight], dtype)[0]
  logits = nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
  return logits.astype(jnp.float32)


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, computed in float32."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    scale = _param(self, 'scale', nn.initializers.ones, ('embed',), (x.shape[-1],))
    return (y * scale).astype(self.dtype)


class RelativePositionBias(nn.Module):
  """Learned per-head bias for each relative-position bucket, shared by all layers."""

  num_buckets: int
  num_heads: int

  @nn.compact
  def __call__(self) -> Array:
    """The table [h, num_buckets]; `AttentionBias` looks it up block by block."""
    return _param(
        self,
        'rel_embedding',
        nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
        ('heads', 'relpos_buckets'),
        (self.num_heads, self.num_buckets),
    )


@flax.struct.dataclass
class AttentionBias:
  """The additive attention bias [b, h, q, k], kept as its parts.

  Attention builds the bias one block of query rows at a time (`rows`), so the
  whole [b, h, q, k] tensor never exists. query_valid [b, q] and key_valid
  [b, k] are bool; segment ids [b, q] / [b, k] confine packed examples to
  themselves; `causal` hides later keys; relpos_table [h, n] is looked up with
  the precomputed int32 relpos_buckets [q, k].
  """

  query_valid: Array
  key_valid: Array
  query_segments: Optional[Array] = None
  key_segments: Optional[Array] = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  relpos_table: Optional[Array] = None
  relpos_buckets: Optional[Array] = None

  def rows(self, start, size: int) -> Array:
    """The bias of query rows [start, start + size) -> [b, h|1, size, k] float32."""
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)  # noqa: E731
    mask = take(self.query_valid)[:, None, :, None] & self.key_valid[:, None, None, :]
    if self.query_segments is not None and self.key_segments is not None:
      mask &= take(self.query_segments)[:, None, :, None] == self.key_segments[:, None, None, :]
    if self.causal:
      query_pos = start + jnp.arange(size)
      mask &= (query_pos[:, None] >= jnp.arange(self.key_valid.shape[1])[None, :])[None, None]
    bias = jnp.where(mask, 0.0, _NEG_INF).astype(jnp.float32)
    if self.relpos_table is not None and self.relpos_buckets is not None:
      buckets = jax.lax.dynamic_slice_in_dim(self.relpos_buckets, start, size, axis=0)
      bias = bias + jnp.take(jnp.asarray(self.relpos_table), buckets, axis=1)[None]
    return bias

  def pad_queries(self, pad: int) -> AttentionBias:
    """The same bias with `pad` invalid query rows appended."""
    if pad == 0:
      return self

    def extend(x: Array) -> Array:
      return jnp.pad(x, ((0, 0), (0, pad)))

    segments, buckets = self.query_segments, self.relpos_buckets
    return dataclasses.replace(
        self,
        query_valid=extend(self.query_valid),
        query_segments=None if segments is None else extend(segments),
        relpos_buckets=None if buckets is None else jnp.pad(buckets, ((0, pad), (0, 0)), 'edge'),
    )


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: AttentionBias,
    *,
    block_size: int,
    dropout_rng: Optional[Array],
    dropout_rate: float,
    dtype: jnp.dtype,
    logits_dtype: jnp.dtype,
    query_start=0,
    kv_layout: str = 'bkhd',
) -> Array:
  """Unscaled attention (T5 folds 1/sqrt(d) into the query initialisation),
  `block_size` query rows at a time.

  query [b, q, h, d], key/value [b, k, h, d] (or [b, h, k, d] with
  kv_layout='bhkd') -> [b, q, h, d]; the queries are
  rows `query_start`.. of `bias`. Each block is rematerialised in the backward
  pass, so a layer keeps only q, k and v for it, and at most one block's
  [b, h, block, k] logits exist at a time, instead of several [b, h, q, k]
  tensors per layer. Logits, bias and softmax are in `logits_dtype`.
  """

  def block(start, q, rng):
    logits = jnp.einsum(f'bqhd,{kv_layout}->bhqk', q, key, preferred_element_type=logits_dtype)
    logits = logits + bias.rows(start, q.shape[1]).astype(logits_dtype)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if rng is not None and dropout_rate > 0.0:
      keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, weights.shape)
      weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0).astype(dtype)
    return jnp.einsum(f'bhqk,{kv_layout}->bqhd', weights, value)

  block = jax.checkpoint(block)
  batch, q_len, heads, head_dim = query.shape
  if q_len <= block_size:
    return block(query_start, query, dropout_rng)
  n = -(-q_len // block_size)
  size = -(-q_len // n)
  pad = n * size - q_len
  bias = bias.pad_queries(pad)
  blocks = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0)))
  blocks = blocks.reshape(batch, n, size, heads, head_dim).swapaxes(0, 1)
  rngs = None if dropout_rng is None else jax.random.split(dropout_rng, n)
  out = jax.lax.map(lambda xs: block(*xs), (query_start + jnp.arange(n) * size, blocks, rngs))
  return out.swapaxes(0, 1).reshape(batch, n * size, heads, head_dim)[:, :q_len]


class MultiHeadAttention(nn.Module):
  """Multi-head attention with an optional key/value cache for decoding.

  In decode mode a self-attention layer appends this step's key/value to the
  cache, and a cross-attention layer (`static_kv`) projects the encoder output
  once, when the cache is created, and reuses it at every step.
  """

  config: T5Config
  static_kv: bool = False

  @nn.compact
  def __call__(
      self,
      inputs_q: Array,
      inputs_kv: Array,
      bias: AttentionBias,
      *,
      deterministic: bool,
      decode: bool = False,
  ) -> Array:
    """inputs_q [b, q, e], inputs_kv [b, k, e] -> [b, q, e].

    In self-attention decode mode q = 1 and `bias` covers the whole cache
    length L (queries and keys); the row for the current step is used.
    """
    cfg = self.config
    dtype = cfg.activation_dtype
    hd = cfg.num_heads * cfg.head_dim
    fan_in = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
    query_init = nn.initializers.variance_scaling(1.0 / cfg.head_dim, 'fan_in', 'normal')
    proj = functools.partial(Dense, features=hd, kernel_axes=('embed', 'joined_kv'), dtype=dtype)

    def split_heads(x: Array) -> Array:
      x = x.reshape((*x.shape[:2], cfg.num_heads, cfg.head_dim))
      return nn.with_logical_constraint(x, ('batch', 'length', 'heads', 'kv'))

    # Decoding keeps keys and values (its caches) as [b, h, k, d], the layout
    # attention reads, so no step transposes a whole cache; training keeps
    # [b, k, h, d], which XLA CPU handles faster there.
    kv_layout = 'bhkd' if decode else 'bkhd'

    def split_kv_heads(x: Array) -> Array:
      if not decode:
        return split_heads(x)
      x = jnp.swapaxes(split_heads(x), 1, 2)
      return nn.with_logical_constraint(x, ('batch', 'heads', 'length', 'kv'))

    query = split_heads(proj(kernel_init=query_init, name='query')(inputs_q))
    key_proj = proj(kernel_init=fan_in, name='key')
    value_proj = proj(kernel_init=fan_in, name='value')

    if decode and self.static_kv:
      cached_key = self.variable('cache', 'cached_key', lambda: split_kv_heads(key_proj(inputs_kv)))
      cached_value = self.variable(
          'cache', 'cached_value', lambda: split_kv_heads(value_proj(inputs_kv))
      )
      key, value = cached_key.value, cached_value.value
    else:
      key = split_kv_heads(key_proj(inputs_kv))
      value = split_kv_heads(value_proj(inputs_kv))

    query_start: Union[int, Array] = 0
    if decode and not self.static_kv:
      initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
      if initialized:
        if inputs_q.shape[1] != 1:
          raise ValueError(f'Decoding consumes one token per step; got {inputs_q.shape[1]} tokens.')
        idx = cache_index.value
        key = jax.lax.dynamic_update_slice(
            cached_key.value, key.astype(cached_key.value.dtype), (0, 0, idx, 0)
        )
        value = jax.lax.dynamic_update_slice(
            cached_value.value, value.astype(cached_value.value.dtype), (0, 0, idx, 0)
        )
        cached_key.value, cached_value.value = key, value
        cache_index.value = idx + 1
        query_start = idx

    dropout_rng = None
    if not deterministic and cfg.dropout_rate > 0.0:
      dropout_rng = self.make_rng('dropout')
    out = dot_product_attention(
        query,
        key,
        value,
        bias,
        block_size=cfg.attention_block_size,
        dropout_rng=dropout_rng,
        dropout_rate=cfg.dropout_rate,
        dtype=dtype,
        logits_dtype=cfg.attention_logits_dtype,
        query_start=query_start,
        kv_layout=kv_layout,
    )
    out = out.reshape((*out.shape[:2], hd))
    out = nn.with_logical_constraint(out, ('batch', 'length', 'joined_kv'))
    return Dense(cfg.emb_dim, ('joined_kv', 'embed'), fan_in, dtype, name='out')(out)


class MlpBlock(nn.Module):
  """Position-wise feed-forward: gated when more than one activation is given."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    """[b, l, e] -> [b, l, e]."""
    cfg = self.config
    dtype = cfg.activation_dtype
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
    acts = cfg.mlp_activations
    names = [f'wi_{i}' for i in range(len(acts))] if len(acts) > 1 else ['wi']
    kernels = [Kernel((x.shape[-1], cfg.mlp_dim), ('embed', 'mlp'), init, name=n)() for n in names]
    hidden = None
    for act, h in zip(acts, project(x, kernels, dtype), strict=True):
      h = ACTIVATIONS[act](h)
      hidden = h if hidden is None else hidden * h
    hidden = nn.with_logical_constraint(hidden, ('batch', 'length', 'mlp'))
    hidden = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic=deterministic)
    return Dense(cfg.emb_dim, ('mlp', 'embed'), init, dtype, name='wo')(hidden)


def _constrain(x: Array) -> Array:
  return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: AttentionBias, deterministic: bool) -> Array:
    cfg = self.config
    dtype = cfg.activation_dtype

    def drop(y: Array) -> Array:
      return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)

    y = RMSNorm(cfg.layer_norm_epsilon, dtype, name='pre_attention_layer_norm')(x)
    y = MultiHeadAttention(cfg, name='attention')(y, y, bias, deterministic=deterministic)
    x = _constrain(x + drop(y))
    y = RMSNorm(cfg.layer_norm_epsilon, dtype, name='pre_mlp_layer_norm')(x)
    y = MlpBlock(cfg, name='mlp')(y, deterministic=deterministic)
    return _constrain(x + drop(y))


class DecoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(
      self,
      x: Array,
      encoded: Array,
      self_bias: AttentionBias,
      cross_bias: AttentionBias,
      deterministic: bool,
      decode: bool,
  ) -> Array:
    cfg = self.config
    dtype = cfg.activation_dtype

    def drop(y: Array) -> Array:
      return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)

    y = RMSNorm(cfg.layer_norm_epsilon, dtype, name='pre_self_attention_layer_norm')(x)
    y = MultiHeadAttention(cfg, name='self_attention')(
        y, y, self_bias, deterministic=deterministic, decode=decode
    )
    x = _constrain(x + drop(y))
    y = RMSNorm(cfg.layer_norm_epsilon, dtype, name='pre_cross_attention_layer_norm')(x)
    y = MultiHeadAttention(cfg, static_kv=True, name='encoder_decoder_attention')(
        y, encoded, cross_bias, deterministic=deterministic, decode=decode
    )
    x = _constrain(x + drop(y))
    y = RMSNorm(cfg.layer_norm_epsilon, dtype, name='pre_mlp_layer_norm')(x)
    y = MlpBlock(cfg, name='mlp')(y, deterministic=deterministic)
    return _constrain(x + drop(y))


def _run_layers(
    parent: nn.Module,
    layer_cls: type[nn.Module],
    cfg: T5Config,
    num_layers: int,
    remat: bool,
    deterministic: bool,
    x: Array,
    *args: Any,
) -> Array:
  """`x` through `parent`'s `layers_0..n-1`, each called as `layer(x, *args)`; `parent`
  calls this from its compact `__call__`.

  With `remat` the layers run as a `lax.scan` over their stacked params whose
  body is rematerialised, so the backward pass recomputes one layer at a time
  and keeps only each layer's input. Per-layer `nn.remat` saves almost no
  memory on XLA CPU, which drops the optimisation barriers before scheduling
  and hoists every layer's recomputation (T5 1.1 small, 13 packed rows: 4.5 GB
  of temporaries, 4.1 with `nn.remat`, 0.9 with the scan). The params stay one
  subtree per layer, as in T5X checkpoints; the dropout masks come from one rng
  split per layer, so they differ from those without remat.
  """
  if not remat or parent.is_initializing():
    for i in range(num_layers):
      x = layer_cls(cfg, name=f'layers_{i}')(x, *args)
    return x
  params = [nn.meta.unbox(parent.variables['params'][f'layers_{i}']) for i in range(num_layers)]
  stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p), *params)
  keys = None if deterministic else jax.random.split(parent.make_rng('dropout'), num_layers)
  layer = layer_cls(cfg, parent=None)

  def body(y: Array, xs: tuple[Any, Optional[Array]]) -> tuple[Array, None]:
    layer_params, key = xs
    rngs = None if key is None else {'dropout': key}
    return cast(Array, layer.apply({'params': layer_params}, y, *args, rngs=rngs)), None

  return jax.lax.scan(jax.checkpoint(body, prevent_cse=False), x, (stacked, keys))[0]


def _buckets(cfg: T5Config, length: int, bidirectional: bool) -> Array:
  """[length, length] int32 relative-position buckets of T5's position bias."""
  rp = np.arange(length)[None, :] - np.arange(length)[:, None]
  return jnp.asarray(
      relative_position_bucket(
          rp, bidirectional, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
      ),
      jnp.int32,
  )


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: Embed

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Optional[Array], deterministic: bool) -> Array:
    """[b, l] -> [b, l, e]."""
    cfg = self.config
    dtype = cfg.activation_dtype
    valid = tokens > 0
    bias = AttentionBias(
        valid,
        valid,
        segment_ids,
        segment_ids,
        relpos_table=RelativePositionBias(
            cfg.relative_attention_num_buckets, cfg.num_heads, name='relpos_bias'
        )(),
        relpos_buckets=_buckets(cfg, tokens.shape[1], bidirectional=True),
    )
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        self.shared_embedding(tokens), deterministic=deterministic
    )
    x = _constrain(x)
    x = _run_layers(
        self,
        EncoderLayer,
        cfg,
        cfg.num_encoder_layers,
        cfg.remat,
        deterministic,
        x,
        bias,
        deterministic,
    )
    x = RMSNorm(cfg.layer_norm_epsilon, dtype, name='encoder_norm')(x)
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: Embed

  @nn.compact
  def __call__(
      self,
      encoded: Array,
      encoder_tokens: Array,
      decoder_input_tokens: Array,
      decoder_target_tokens: Optional[Array],
      encoder_segment_ids: Optional[Array],
      decoder_segment_ids: Optional[Array],
      deterministic: bool,
      decode: bool,
      max_decode_length: Optional[int],
      logits: bool = True,
  ) -> Array:
    """Returns logits [b, l, v] in float32, or with `logits=False` the hidden
    states [b, l, e] the head takes (`head_logits`), for a loss that applies the
    head a chunk at a time."""
    cfg = self.config
    dtype = cfg.activation_dtype
    enc_valid = encoder_tokens > 0
    relpos_table = RelativePositionBias(
        cfg.relative_attention_num_buckets, cfg.num_heads, name='relpos_bias'
    )()
    if decode:
      # Self-attention spans the whole cache; the cache index picks the query row.
      length = max_decode_length or decoder_input_tokens.shape[1]
      dec_valid = jnp.ones(decoder_input_tokens.shape, bool)
      cache_valid = jnp.ones((decoder_input_tokens.shape[0], length), bool)
      self_bias = AttentionBias(
          cache_valid,
          cache_valid,
          causal=True,
          relpos_table=relpos_table,
          relpos_buckets=_buckets(cfg, length, bidirectional=False),
      )
    else:
      dec_valid = (
          decoder_target_tokens
          if decoder_target_tokens is not None
          else jnp.ones_like(decoder_input_tokens)
      ) > 0
      self_bias = AttentionBias(
          dec_valid,
          dec_valid,
          decoder_segment_ids,
          decoder_segment_ids,
          causal=True,
          relpos_table=relpos_table,
          relpos_buckets=_buckets(cfg, decoder_input_tokens.shape[1], bidirectional=False),
      )
    cross_bias = AttentionBias(dec_valid, enc_valid, decoder_segment_ids, encoder_segment_ids)

    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        self.shared_embedding(decoder_input_tokens), deterministic=deterministic
    )
    y = _constrain(y)
    y = _run_layers(
        self,
        DecoderLayer,
        cfg,
        cfg.num_decoder_layers,
        cfg.remat and not decode,
        deterministic,
        y,
        encoded,
        self_bias,
        cross_bias,
        deterministic,
        decode,
    )
    y = RMSNorm(cfg.layer_norm_epsilon, dtype, name='decoder_norm')(y)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    if cfg.logits_via_embedding:
      weight = self.shared_embedding.embedding
    else:
      weight = Kernel(
          (cfg.emb_dim, cfg.vocab_size),
          ('embed', 'vocab'),
          nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'),
          name='logits_dense',
      )()
    return head_logits(y, weight, cfg) if logits else y


class Transformer(nn.Module):
  """T5 encoder-decoder with T5X's call signature."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared_embedding = Embed(
        cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype, name='token_embedder'
    )
    self.encoder = Encoder(cfg, self.shared_embedding)
    self.decoder = Decoder(cfg, self.shared_embedding)

  def encode(
      self,
      encoder_input_tokens: Array,
      encoder_segment_ids: Optional[Array] = None,
      enable_dropout: bool = True,
  ) -> Array:
    """[b, l_in] -> [b, l_in, e]."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, not enable_dropout)

  def decode(
      self,
      encoded: Array,
      encoder_input_tokens: Array,
      decoder_input_tokens: Array,
      decoder_target_tokens: Optional[Array] = None,
      encoder_segment_ids: Optional[Array] = None,
      decoder_segment_ids: Optional[Array] = None,
      enable_dropout: bool = True,
      decode: bool = False,
      max_decode_length: Optional[int] = None,
      logits: bool = True,
  ) -> Array:
    """Decoder logits [b, l_out, v] given the encoder output (hidden states
    [b, l_out, e] with `logits=False`)."""
    return self.decoder(
        encoded,
        encoder_input_tokens,
        decoder_input_tokens,
        decoder_target_tokens,
        encoder_segment_ids,
        decoder_segment_ids,
        not enable_dropout,
        decode,
        max_decode_length,
        logits,
    )

  def __call__(
      self,
      encoder_input_tokens: Array,
      decoder_input_tokens: Array,
      decoder_target_tokens: Array,
      encoder_segment_ids: Optional[Array] = None,
      decoder_segment_ids: Optional[Array] = None,
      encoder_positions: Optional[Array] = None,
      decoder_positions: Optional[Array] = None,
      *,
      enable_dropout: bool = True,
      decode: bool = False,
      logits: bool = True,
  ) -> Array:
    """Teacher-forced logits [b, l_out, v] (hidden states [b, l_out, e] with
    `logits=False`).

    Positions are accepted for T5X compatibility; relative attention only needs
    offsets within a segment, which the segment ids already delimit.
    """
    del encoder_positions, decoder_positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
    return self.decode(
        encoded,
        encoder_input_tokens,
        decoder_input_tokens,
        decoder_target_tokens,
        encoder_segment_ids,
        decoder_segment_ids,
        enable_dropout,
        decode,
        logits=logits,
    )
