"""The Partitioner: a (data, model) device mesh and T5X-style logical axis rules.

The network names the axes of every parameter and activation (`batch`,
`embed`, `mlp`, `heads`, ...); the rules map those names onto mesh axes. A
`jax.jit` with the resulting `NamedSharding`s is what T5X calls pjit.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


class Partitioner:
  """Builds the mesh and turns logical axis names into shardings."""

  def __init__(self, num_partitions: int = 1, logical_axis_rules: LogicalRules = STANDARD_RULES,
               devices: Optional[Sequence[jax.Device]] = None):
    devices = list(devices if devices is not None else jax.devices())
    if num_partitions < 1 or len(devices) % num_partitions:
      raise ValueError(f'num_partitions={num_partitions} must divide the {len(devices)} devices')
    grid = np.asarray(devices).reshape(len(devices) // num_partitions, num_partitions)
    self.mesh = Mesh(grid, ('data', 'model'))
    self.rules = tuple(tuple(r) for r in logical_axis_rules)

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

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host numpy batch (this process's rows) -> global arrays sharded over `data`."""
    sharding = self.batch_sharding()
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

  def describe(self) -> str:
    return (f'mesh {dict(self.mesh.shape)} over {self.mesh.devices.size} '
            f'{self.mesh.devices.flat[0].platform} device(s)')
