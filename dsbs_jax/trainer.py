"""The Trainer: a sharded train state and the jitted step of the combined objective."""

from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from dsbs_jax import losses
from dsbs_jax.errors import ConfigError
from dsbs_jax.models import StepByStepModel
from dsbs_jax.optimizers import Optimizer
from dsbs_jax.partitioning import Partitioner

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  rng: Array


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def optimizer_state_specs(opt_shapes: Any, param_specs: Any, param_shapes: Any) -> Any:
  """Logical specs for optimizer state: a leaf shaped like the parameter it tracks
  (Adam's mu/nu, found by the parameter's path as a suffix) shards like it;
  anything else (counts, Adafactor's factored moments) is replicated."""
  by_path = {}
  for (path, spec), shape in zip(
      jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0],
      jax.tree_util.tree_leaves(param_shapes)):
    by_path[_path_names(path)] = (spec, shape.shape)

  def spec_for(path, leaf):
    names = _path_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[1] == leaf.shape:
        return hit[0]
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec_for, opt_shapes)


class Trainer:
  """Owns the jitted, sharded train step; the loop around it lives in `dsbs_jax.train`."""

  def __init__(self, model: StepByStepModel, optimizer: Optimizer, partitioner: Partitioner,
               seed: int = 0, num_microbatches: int = 1):
    if num_microbatches < 1:
      raise ConfigError(f'num_microbatches must be >= 1; got {num_microbatches}')
    self.model = model
    self.optimizer = optimizer
    self.partitioner = partitioner
    self.seed = seed
    self.num_microbatches = num_microbatches

  def _init_state(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
    rng = jax.random.PRNGKey(self.seed)
    init_rng, train_rng = jax.random.split(rng)
    variables = self.model.get_initial_variables(init_rng, input_shapes)
    params = nn.meta.unbox(variables['params'])
    return TrainState(step=jnp.array(0, jnp.int32), params=params,
                      opt_state=self.optimizer.tx.init(params), rng=train_rng)

  def state_logical_specs(self, input_shapes: Mapping[str, tuple[int, ...]]
                          ) -> tuple[TrainState, TrainState]:
    """(logical PartitionSpecs, shapes) of every leaf of the train state, from shapes alone."""
    boxed = jax.eval_shape(
        lambda: self.model.get_initial_variables(jax.random.PRNGKey(0), input_shapes))
    param_specs = nn.get_partition_spec(boxed['params'])
    abstract = jax.eval_shape(lambda: self._init_state(input_shapes))
    opt_specs = optimizer_state_specs(abstract.opt_state, param_specs, abstract.params)
    specs = TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs,
                       rng=PartitionSpec())
    return specs, abstract

  def state_shardings(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
    """NamedShardings of every leaf of the train state, from the logical axes."""
    return self.partitioner.shardings(self.state_logical_specs(input_shapes)[0])

  def abstract_state(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
    """The state's shapes, dtypes and shardings, without allocating it."""
    specs, shapes = self.state_logical_specs(input_shapes)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, self.partitioner.shardings(specs))

  def create_state(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
    """A freshly initialised state, created directly in its sharded layout."""
    with self.partitioner.activate():
      return jax.jit(lambda: self._init_state(input_shapes),
                     out_shardings=self.state_shardings(input_shapes))()

  def _grads(self, params: Any, batch: Mapping[str, Array], rng: Array) -> tuple[Any, dict]:
    """Gradients and metrics of the whole batch, accumulated over microbatches.

    Every microbatch is normalised by the whole batch's per-task token counts,
    so the accumulated loss and gradients equal the whole batch's.
    Microbatch i takes rows i, i + m, i + 2m, ...: each stays spread over the
    data-parallel devices.
    """
    grad_fn = jax.value_and_grad(self.model.loss_fn, has_aux=True)
    m = self.num_microbatches
    if m == 1:
      (_, metrics), grads = grad_fn(params, batch, rng)
      return grads, metrics
    rows = next(iter(batch.values())).shape[0]
    if rows % m:
      raise ConfigError(f'the batch ({rows} rows per step) must divide into {m} microbatches')
    counts = losses.task_token_counts(self.model.task_ids(batch), len(self.model.task_weights))
    micro = {k: v.reshape((rows // m, m) + v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}

    def accumulate(carry, xs):
      i, microbatch = xs
      (_, metrics), grads = grad_fn(params, microbatch, jax.random.fold_in(rng, i), counts)
      return jax.tree_util.tree_map(jnp.add, carry, (grads, metrics)), None

    first = {k: v[0] for k, v in micro.items()}
    shapes = jax.eval_shape(lambda: grad_fn(params, first, rng, counts))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(m), micro))
    for i, name in enumerate(losses.TASK_NAMES[k] for k in range(1, counts.shape[0] + 1)):
      metrics[f'{name}/tokens'] = counts[i]
    return grads, metrics

  def train_step(self, state: TrainState, batch: Mapping[str, Array]) -> tuple[TrainState, dict]:
    """One optimizer step, unjitted (T5X's `train_step`): `compile_train_step` jits it;
    tracing it inside `partitioner.activate()` shows what a step computes."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics = self._grads(state.params, batch, dropout_rng)
    updates, opt_state = self.optimizer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['param_norm'] = optax.global_norm(params)
    metrics['learning_rate'] = jnp.asarray(self.optimizer.learning_rate_fn(state.step), jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def compile_train_step(self, input_shapes: Mapping[str, tuple[int, ...]]):
    """`(state, batch) -> (state, metrics)`, jitted with explicit shardings; the
    incoming state's buffers are donated."""
    state_sh = self.state_shardings(input_shapes)
    step = jax.jit(self.train_step, in_shardings=(state_sh, self.partitioner.batch_sharding()),
                   out_shardings=(state_sh, self.partitioner.replicated()), donate_argnums=(0,))

    def run(state, batch):
      with self.partitioner.activate():
        return step(state, batch)

    return run


def _shards(spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> int:
  count = 1
  for axes in spec:
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      count *= mesh_shape.get(axis, 1) if axis else 1
  return count


def activation_bytes_estimate(config: Any, input_shapes: Mapping[str, tuple[int, ...]],
                              mesh_shape: Mapping[str, int]) -> float:
  """Rough bytes per device of the activations a train step keeps for backprop.

  Per token and layer: ~10 (encoder) / 14 (decoder) embed-sized tensors and 3
  mlp-sized; attention keeps none of its [b, h, q, k] tensors, but one block
  of them (logits, probabilities, gradient) exists at a time; plus float32
  logits (x3 for softmax and its gradient). Model-parallel axes divide heads,
  mlp and vocab. With remat only each layer's input is kept, plus one layer's
  worth at a time.
  """
  batch, enc = input_shapes['encoder_input_tokens']
  dec = input_shapes['decoder_input_tokens'][1]
  b = batch / mesh_shape.get('data', 1)
  m = mesh_shape.get('model', 1)
  size = 2 if config.dtype == 'bfloat16' else 4
  heads, mlp = config.num_heads / m, config.mlp_dim / m
  per_enc = b * enc * (10 * config.emb_dim + 3 * mlp)
  per_dec = b * dec * (14 * config.emb_dim + 3 * mlp)
  longest = max(enc, dec)
  attention_block = 3 * b * heads * min(config.attention_block_size, longest) * longest
  if config.remat:
    elements = (b * config.emb_dim * (config.num_encoder_layers * enc
                                      + config.num_decoder_layers * dec) + max(per_enc, per_dec))
  else:
    elements = config.num_encoder_layers * per_enc + config.num_decoder_layers * per_dec
  logits = 3 * b * dec * config.vocab_size / m
  return elements * size + (attention_block + logits) * 4


def memory_plan(trainer: 'Trainer', input_shapes: Mapping[str, tuple[int, ...]],
                mesh_shape: Mapping[str, int]) -> str:
  """The mesh, each parameter's sharding, and bytes per device of the train state.

  Works from shapes alone (`jax.eval_shape`), for any mesh shape, so an XXL
  layout can be checked on a laptop before a pod slice is rented.
  """
  rules = trainer.partitioner.rules
  specs, abstract = trainer.state_logical_specs(input_shapes)
  logical, opt_logical = specs.params, specs.opt_state
  to_mesh = lambda spec: nn.logical_to_mesh_axes(spec, rules)  # noqa: E731
  lines = [f'mesh {dict(mesh_shape)} ({_shards(PartitionSpec(*mesh_shape), mesh_shape)} devices)',
           f'{"parameter":60} {"shape":>18} {"logical axes":>28} {"mesh axes":>22} {"MiB/dev":>9}']
  param_bytes = 0.0
  flat = jax.tree_util.tree_flatten_with_path(
      logical, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
  for (path, spec), leaf in zip(flat, jax.tree_util.tree_leaves(abstract.params)):
    mesh_spec = to_mesh(spec)
    n = leaf.size * leaf.dtype.itemsize / _shards(mesh_spec, mesh_shape)
    param_bytes += n
    lines.append(f'{"/".join(_path_names(path)):60} {str(leaf.shape):>18} '
                 f'{str(tuple(spec)):>28} {str(tuple(mesh_spec)):>22} {n / 2**20:9.2f}')
  opt_flat = jax.tree_util.tree_leaves(opt_logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
  opt_bytes = sum(leaf.size * leaf.dtype.itemsize / _shards(to_mesh(spec), mesh_shape)
                  for spec, leaf in zip(opt_flat, jax.tree_util.tree_leaves(abstract.opt_state)))
  act = activation_bytes_estimate(trainer.model.module.config, input_shapes, mesh_shape)
  gib = 2.0**30
  lines.append(f'per device: params {param_bytes / gib:.2f} GiB, gradients '
               f'{param_bytes / gib:.2f} GiB, optimizer state {opt_bytes / gib:.2f} GiB, '
               f'activations ~{act / gib:.2f} GiB (estimate); total '
               f'~{(2 * param_bytes + opt_bytes + act) / gib:.2f} GiB')
  return '\n'.join(lines)
