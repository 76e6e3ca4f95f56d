"""The Partitioner: a (data, model) device mesh and T5X-style logical axis rules.

The network names the axes of every parameter and activation (`batch`,
`embed`, `mlp`, `heads`, ...); the rules map those names onto mesh axes. A
`jax.jit` with the resulting `NamedSharding`s is what T5X calls pjit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from flax.linen import partitioning as flax_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsbs_jax.errors import ConfigError

LogicalRules = Sequence[tuple[str, Optional[str]]]

# T5X's `standard_logical_axis_rules()`: data-parallel batch, model-parallel
# heads/mlp/vocab, everything else replicated.
STANDARD_RULES: LogicalRules = (
    ('batch', 'data'),
    ('vocab', 'model'),
    ('embed', None),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('joined_kv', 'model'),
    ('relpos_buckets', None),
    ('length', None),
)
PRESETS = ('data_parallel', 'data_model', 'fsdp')


def preset_rules(name: str = 'data_model') -> LogicalRules:
  """Logical-axis rules for a named layout (gin: `PARTITIONING`).

  data_parallel  parameters replicated, the batch split over `data`;
  data_model     T5X's standard rules: the batch over `data`, heads/mlp/vocab over
                 `model` (tensor parallelism; with NUM_PARTITIONS = 1 it is data parallel);
  fsdp           as data_model, and every parameter's `embed` axis (so its optimizer
                 state too) sharded over `data`, T5X's 2-D parameter partitioning.
                 Activations keep `batch` on `data`: a mesh axis is used once per array.
  """
  if name == 'data_parallel':
    return (('batch', 'data'), *tuple((axis, None) for axis, _ in STANDARD_RULES[1:]))
  if name == 'data_model':
    return STANDARD_RULES
  if name == 'fsdp':
    return tuple(
        ('embed', 'data') if axis == 'embed' else (axis, mesh) for axis, mesh in STANDARD_RULES
    )
  raise ConfigError(f'unknown partitioning preset {name!r}; choose from {PRESETS}')


def params_axes(boxed_params: Any) -> dict[str, Any]:
  """T5X's `params_axes` collection for logically partitioned (boxed) params.

  T5X's train state reads each parameter's logical axes from a parallel tree
  whose leaf `<name>_axes` holds an `AxisMetadata`, the form the older
  `param_with_axes` API emitted; our network boxes its params instead
  (`nn.with_logical_partitioning`), so the T5X bridge derives that tree.
  """
  axes = {}
  for path, leaf in traverse_util.flatten_dict(boxed_params).items():
    if not isinstance(leaf, nn.LogicallyPartitioned):
      raise ConfigError(
          f'parameter {"/".join(path)} has no logical axis names; T5X needs '
          'every parameter declared with nn.with_logical_partitioning'
      )
    axes[(*path[:-1], f'{path[-1]}_axes')] = flax_partitioning.AxisMetadata(names=leaf.names)
  return traverse_util.unflatten_dict(axes)


class Partitioner:
  """Builds the mesh and turns logical axis names into shardings.

  The mesh is built on first use, so a partitioner can describe a layout for
  devices this host does not have (`memory.memory_plan`).
  """

  def __init__(
      self,
      num_partitions: int = 1,
      logical_axis_rules: LogicalRules = STANDARD_RULES,
      devices: Optional[Sequence[jax.Device]] = None,
  ):
    if num_partitions < 1:
      raise ConfigError(f'NUM_PARTITIONS must be >= 1; got {num_partitions}')
    if num_partitions > 1 and all(mesh != 'model' for _, mesh in logical_axis_rules):
      raise ConfigError(
          f'NUM_PARTITIONS={num_partitions} but the partitioning rules place '
          'nothing on the model axis; use the data_model or fsdp preset'
      )
    self.num_partitions = num_partitions
    self.rules: LogicalRules = tuple((axis, mesh) for axis, mesh in logical_axis_rules)
    self._devices = devices

  @functools.cached_property
  def mesh(self) -> Mesh:
    devices = list(self._devices if self._devices is not None else jax.devices())
    if len(devices) % self.num_partitions:
      raise ConfigError(
          f'NUM_PARTITIONS={self.num_partitions} must divide the {len(devices)} devices'
      )
    grid = np.asarray(devices).reshape(len(devices) // self.num_partitions, self.num_partitions)
    return Mesh(grid, ('data', 'model'))

  @property
  def data_size(self) -> int:
    return self.mesh.shape['data']

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """Mesh and rules in scope, so activation constraints in the network apply."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def shardings(self, logical_specs: Any) -> Any:
    """A tree of logical PartitionSpecs -> the same tree of NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.rules)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def batch_sharding(self) -> NamedSharding:
    """Leading (batch) dimension split over the data axis."""
    return self.shardings(PartitionSpec('batch'))

  def shard_global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A batch that every process holds whole -> global arrays; each process
    contributes its own consecutive block of rows (evaluation reads this way)."""
    index, count = jax.process_index(), jax.process_count()
    return self.shard_batch({k: np.array_split(v, count)[index] for k, v in batch.items()})

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host numpy batch (this process's rows) -> global arrays sharded over `data`."""
    sharding = self.batch_sharding()
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

  def describe(self) -> str:
    return (
        f'mesh {dict(self.mesh.shape)} over {self.mesh.devices.size} '
        f'{self.mesh.devices.flat[0].platform} device(s)'
    )
