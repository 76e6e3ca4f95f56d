"""T5X checkpoints, read and written without T5X installed.

Two layouts hold a T5X train state `{'target': params, 'state': {'step', ...}}`:

  * T5X's current one, Orbax: `checkpoint_<step>/state` (what `t5x.train` writes);
  * the legacy one of T5X's public checkpoints (e.g. T5 1.1's
    `gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000`):
    `checkpoint_<step>/checkpoint`, a msgpack file whose large arrays are zarr
    arrays beside it, named `target.<path>`.

`read_params` takes either (a `checkpoint_<step>` directory, or a MODEL_DIR for
its newest one); `write_params` writes the Orbax layout, which `t5x.train`
starts from with `gin/t5x/finetune.gin` (params only; its optimizer starts
afresh). T5X's example T5 network and ours share parameter names and shapes.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import serialization

from dsbs_jax import storage
from dsbs_jax.errors import ConfigError

_STEP_DIR = re.compile(r'checkpoint_(\d+)')
LEGACY_FILE = 'checkpoint'
ORBAX_ITEM = 'state'


def find(path: str) -> Optional[str]:
  """The T5X checkpoint directory `path` names, itself or its newest `checkpoint_<step>`;
  None if there is none."""
  p = storage.resolve(path)
  if (p / LEGACY_FILE).exists() or (p / ORBAX_ITEM).is_dir():
    return path
  if not p.is_dir():
    return None
  steps = [
      int(m.group(1))
      for child in p.iterdir()
      if (m := _STEP_DIR.fullmatch(child.name)) and find(os.path.join(path, child.name))
  ]
  return os.path.join(path, f'checkpoint_{max(steps)}') if steps else None


def _legacy_kvstore(directory: str, spec: dict[str, Any]) -> dict[str, Any]:
  """A zarr array's kvstore, relative to the checkpoint directory (T5X writes a dummy
  bucket for Cloud Storage, so that a checkpoint can move)."""
  kvstore = spec['kvstore']
  name = kvstore['path'] if kvstore.get('driver') == 'file' else spec['path']
  if storage.is_url(directory):
    bucket, _, prefix = directory[len('gs://') :].partition('/')
    return {'driver': 'gcs', 'bucket': bucket, 'path': f'{prefix.rstrip("/")}/{name}'}
  return {'driver': 'file', 'path': os.path.join(os.fspath(storage.resolve(directory)), name)}


def _read_legacy(directory: str) -> dict[str, Any]:
  contents = serialization.msgpack_restore(storage.read_bytes(os.path.join(directory, LEGACY_FILE)))
  tree = contents['optimizer'] if contents.get('version', 0) >= 1 else contents
  if 'target' not in tree:
    raise ConfigError(f'{directory}/{LEGACY_FILE}: no `target` (params) in this T5X checkpoint')

  def load(leaf: Any) -> np.ndarray:
    if isinstance(leaf, dict) and 'driver' in leaf:
      spec = {'driver': leaf['driver'], 'kvstore': _legacy_kvstore(directory, leaf)}
      return np.asarray(ts.open(spec).result().read().result())
    return np.asarray(leaf)

  return _map_leaves(load, tree['target'])


def _map_leaves(fn, tree: Any) -> Any:
  if isinstance(tree, dict) and not ('driver' in tree and 'kvstore' in tree):
    return {k: _map_leaves(fn, v) for k, v in tree.items()}
  return fn(tree)


def read_params(path: str) -> dict[str, Any]:
  """The params (`target`) of a T5X checkpoint, as host numpy arrays."""
  directory = find(path)
  if directory is None:
    raise ConfigError(
        f'{path}: no T5X checkpoint (checkpoint_<step>/checkpoint or '
        'checkpoint_<step>/state) there'
    )
  if storage.exists(os.path.join(directory, LEGACY_FILE)):
    return _read_legacy(directory)
  item = os.path.join(directory, ORBAX_ITEM)
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(item).item_metadata.tree
    target = {'target': metadata['target']}
    restore_args = _host_restore_args(target)
    restored = checkpointer.restore(
        item,
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
  return restored['target']


def _host_restore_args(tree: Any) -> Any:
  """Every array read back as numpy on the host, whatever devices wrote it."""
  return _map_leaves(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def write_params(output: str, params: Any, step: int) -> str:
  """Writes `params` as a T5X checkpoint `<output>/checkpoint_<step>`; returns its path."""
  state = {'target': _map_leaves(np.asarray, params), 'state': {'step': np.asarray(step)}}
  options = ocp.CheckpointManagerOptions(
      step_prefix='checkpoint', create=True, enable_async_checkpointing=False
  )
  with ocp.CheckpointManager(storage.resolve(output), options=options) as manager:
    manager.save(step, args=ocp.args.Composite(**{ORBAX_ITEM: ocp.args.PyTreeSave(state)}))
  return os.path.join(output, f'checkpoint_{step}')
