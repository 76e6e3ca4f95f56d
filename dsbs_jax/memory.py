"""The memory plan: each parameter's sharding and the bytes per device of a train step,
for any mesh, from shapes alone, so an XXL layout can be checked on a laptop before a
pod slice is rented (`dsbs-train --plan=32x8`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec

from dsbs_jax.trainer import Trainer, path_names


def _shards(spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> int:
  count = 1
  for axes in spec:
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      count *= mesh_shape.get(axis, 1) if axis else 1
  return count


def activation_bytes_estimate(
    config: Any,
    input_shapes: Mapping[str, tuple[int, ...]],
    mesh_shape: Mapping[str, int],
    microbatch_rows: Optional[int] = None,
    loss_chunk_length: Optional[int] = None,
) -> float:
  """Rough bytes per device of the activations a train step keeps for backprop.

  With gradient accumulation only one microbatch's activations exist at a time,
  so they are those of `microbatch_rows` rows (default: the whole batch), as in
  XLA's own buffer plan.

  Per token and layer: ~10 (encoder) / 14 (decoder) embed-sized tensors and 3
  mlp-sized; attention keeps none of its [b, h, q, k] tensors, but one block
  of them (logits, probabilities, gradient, in `attention_logits_dtype`)
  exists at a time; plus float32 logits (x3 for softmax and its gradient),
  only `loss_chunk_length` target positions' of them when the loss takes a
  chunk at a time. Model-parallel axes divide heads, mlp and vocab. With
  remat only each layer's input is kept, plus one layer's worth at a time.
  """
  batch, enc = input_shapes['encoder_input_tokens']
  dec = input_shapes['decoder_input_tokens'][1]
  b = (batch if microbatch_rows is None else microbatch_rows) / mesh_shape.get('data', 1)
  m = mesh_shape.get('model', 1)
  size = config.activation_dtype.itemsize
  heads, mlp = config.num_heads / m, config.mlp_dim / m
  per_enc = b * enc * (10 * config.emb_dim + 3 * mlp)
  per_dec = b * dec * (14 * config.emb_dim + 3 * mlp)
  longest = max(enc, dec)
  attention_block = 3 * b * heads * min(config.attention_block_size, longest) * longest
  if config.remat:
    elements = b * config.emb_dim * (
        config.num_encoder_layers * enc + config.num_decoder_layers * dec
    ) + max(per_enc, per_dec)
  else:
    elements = config.num_encoder_layers * per_enc + config.num_decoder_layers * per_dec
  logits = 3 * b * min(loss_chunk_length or dec, dec) * config.vocab_size / m
  attention_size = config.attention_logits_dtype.itemsize
  return elements * size + attention_block * attention_size + logits * 4


def memory_plan(
    trainer: Trainer, input_shapes: Mapping[str, tuple[int, ...]], mesh_shape: Mapping[str, int]
) -> str:
  """The mesh, each parameter's sharding, and bytes per device of the train state.

  Works from shapes alone (`jax.eval_shape`), for any mesh shape, so an XXL
  layout can be checked on a laptop before a pod slice is rented. It counts one
  gradient per parameter; the optimizer's update and gradient accumulation hold
  more (on XLA CPU, 0.2-2x the parameters again, `bench/README.md`).
  """
  rules = trainer.partitioner.rules
  specs, abstract = trainer.state_logical_specs(input_shapes)
  logical, opt_logical = specs.params, specs.opt_state

  def to_mesh(spec: PartitionSpec) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(spec), rules) or PartitionSpec()

  lines = [
      f'mesh {dict(mesh_shape)} ({_shards(PartitionSpec(*mesh_shape), mesh_shape)} devices)',
      f'{"parameter":60} {"shape":>18} {"logical axes":>28} {"mesh axes":>22} {"MiB/dev":>9}',
  ]
  param_bytes = 0.0
  flat = jax.tree_util.tree_flatten_with_path(
      logical, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )[0]
  for (path, spec), leaf in zip(flat, jax.tree_util.tree_leaves(abstract.params), strict=True):
    mesh_spec = to_mesh(spec)
    n = leaf.size * leaf.dtype.itemsize / _shards(mesh_spec, mesh_shape)
    param_bytes += n
    lines.append(
        f'{"/".join(path_names(path)):60} {leaf.shape!s:>18} '
        f'{tuple(spec)!s:>28} {tuple(mesh_spec)!s:>22} {n / 2**20:9.2f}'
    )
  opt_flat = jax.tree_util.tree_leaves(opt_logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
  opt_bytes = sum(
      leaf.size * leaf.dtype.itemsize / _shards(to_mesh(spec), mesh_shape)
      for spec, leaf in zip(opt_flat, jax.tree_util.tree_leaves(abstract.opt_state), strict=True)
  )
  m, data = trainer.num_microbatches, mesh_shape.get('data', 1)
  # The input pipeline pads a step to whole microbatches over the data axis.
  rows = -(-input_shapes['encoder_input_tokens'][0] // (data * m)) * data
  model = trainer.model
  act = activation_bytes_estimate(
      model.module.config, input_shapes, mesh_shape, rows, model.loss_chunk_length
  )
  micro = f', one of {m} microbatches' if m > 1 else ''
  gib = 2.0**30
  lines.append(
      f'per device: params {param_bytes / gib:.2f} GiB, gradients '
      f'{param_bytes / gib:.2f} GiB, optimizer state {opt_bytes / gib:.2f} GiB, '
      f'activations ~{act / gib:.2f} GiB (estimate{micro}); total '
      f'~{(2 * param_bytes + opt_bytes + act) / gib:.2f} GiB'
  )
  return '\n'.join(lines)
