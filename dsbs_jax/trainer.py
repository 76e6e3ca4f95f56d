"""The Trainer: a sharded train state and the jitted step of the combined objective."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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
  """The step (int32), params, optimizer state and dropout RNG; the same tree also
  carries their logical specs, shapes or shardings (`state_logical_specs`)."""

  step: Any
  params: Any
  opt_state: Any
  rng: Any


def path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def optimizer_state_specs(opt_shapes: Any, param_specs: Any, param_shapes: Any) -> Any:
  """Logical specs for optimizer state: a leaf shaped like the parameter it tracks
  (Adam's mu/nu, found by the parameter's path as a suffix) shards like it;
  anything else (counts, Adafactor's factored moments) is replicated."""
  by_path = {}
  for (path, spec), shape in zip(
      jax.tree_util.tree_flatten_with_path(
          param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
      )[0],
      jax.tree_util.tree_leaves(param_shapes),
      strict=True,
  ):
    by_path[path_names(path)] = (spec, shape.shape)

  def spec_for(path, leaf):
    names = path_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[1] == leaf.shape:
        return hit[0]
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec_for, opt_shapes)


class Trainer:
  """Owns the jitted, sharded train step; the loop around it lives in `dsbs_jax.train`."""

  def __init__(
      self,
      model: StepByStepModel,
      optimizer: Optimizer,
      partitioner: Partitioner,
      seed: int = 0,
      num_microbatches: int = 1,
  ):
    if num_microbatches < 1:
      raise ConfigError(f'num_microbatches must be >= 1; got {num_microbatches}')
    self.model = model
    self.optimizer = optimizer
    self.partitioner = partitioner
    self.seed = seed
    self.num_microbatches = num_microbatches
    self._specs: dict[tuple, tuple[TrainState, TrainState]] = {}

  def _init_state(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
    rng = jax.random.PRNGKey(self.seed)
    init_rng, train_rng = jax.random.split(rng)
    variables = self.model.get_initial_variables(init_rng, input_shapes)
    params = nn.meta.unbox(variables['params'])
    return TrainState(
        step=jnp.array(0, jnp.int32),
        params=params,
        opt_state=self.optimizer.tx.init(params),
        rng=train_rng,
    )

  def state_logical_specs(
      self, input_shapes: Mapping[str, tuple[int, ...]]
  ) -> tuple[TrainState, TrainState]:
    """(logical PartitionSpecs, shapes) of every leaf of the train state, from shapes alone.

    Kept per input shapes: tracing the model's initialisation twice took about a
    second of every run's start, and a run asks three times.
    """
    key = tuple(sorted((k, tuple(v)) for k, v in input_shapes.items()))
    if key not in self._specs:
      boxed = jax.eval_shape(
          lambda: self.model.get_initial_variables(jax.random.PRNGKey(0), input_shapes)
      )
      param_specs = nn.get_partition_spec(boxed['params'])
      abstract = jax.eval_shape(lambda: self._init_state(input_shapes))
      opt_specs = optimizer_state_specs(abstract.opt_state, param_specs, abstract.params)
      specs = TrainState(
          step=PartitionSpec(), params=param_specs, opt_state=opt_specs, rng=PartitionSpec()
      )
      self._specs[key] = (specs, abstract)
    return self._specs[key]

  def state_shardings(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
    """NamedShardings of every leaf of the train state, from the logical axes."""
    return self.partitioner.shardings(self.state_logical_specs(input_shapes)[0])

  def abstract_state(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
    """The state's shapes, dtypes and shardings, without allocating it."""
    specs, shapes = self.state_logical_specs(input_shapes)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes,
        self.partitioner.shardings(specs),
    )

  def create_state(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
    """A freshly initialised state, created directly in its sharded layout."""
    with self.partitioner.activate():
      return jax.jit(
          lambda: self._init_state(input_shapes), out_shardings=self.state_shardings(input_shapes)
      )()

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
    micro = {k: v.reshape((rows // m, m, *v.shape[1:])).swapaxes(0, 1) for k, v in batch.items()}

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
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['param_norm'] = optax.tree.norm(params)
    metrics['learning_rate'] = jnp.asarray(self.optimizer.learning_rate_fn(state.step), jnp.float32)
    new_state = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  def compile_train_step(self, input_shapes: Mapping[str, tuple[int, ...]]):
    """`(state, batch) -> (state, metrics)`, jitted with explicit shardings; the
    incoming state's buffers are donated."""
    state_sh = self.state_shardings(input_shapes)
    step = jax.jit(
        self.train_step,
        in_shardings=(state_sh, self.partitioner.batch_sharding()),
        out_shardings=(state_sh, self.partitioner.replicated()),
        donate_argnums=(0,),
    )

    def run(state, batch):
      with self.partitioner.activate():
        return step(state, batch)

    return run
