"""What produced a run: its operative configuration, the package versions and the commit.

T5X writes the operative gin config to `MODEL_DIR/config.gin` and to TensorBoard;
dsbs-train does the same, and adds the versions and the source commit to
`MODEL_DIR/run.json`, to TensorBoard's text tab and to `results.json`. The
configuration text comes from the caller (the CLI, which owns gin).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import subprocess
from collections.abc import Callable
from typing import Optional

PACKAGES = (
    'dsbs-jax',
    'jax',
    'jaxlib',
    'flax',
    'optax',
    'orbax-checkpoint',
    'seqio',
    'tensorflow',
    'transformers',
    'gin-config',
    't5x',
)


def package_versions() -> dict[str, str]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return versions


def source_commit() -> Optional[str]:
  """The git commit of the dsbs_jax source, with `-dirty` for uncommitted changes; None
  outside a checkout (an installed wheel)."""
  source = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(
        ['git', 'rev-parse', 'HEAD'],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ['git', 'status', '--porcelain', '--untracked-files=no'],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return f'{commit}-dirty' if dirty else commit


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """The configuration (gin's operative config, read when the run starts, once every
  configurable it uses has been called) and where the code came from."""

  config: Callable[[], str]
  versions: dict[str, str] = dataclasses.field(default_factory=package_versions)
  commit: Optional[str] = dataclasses.field(default_factory=source_commit)

  def summary(self) -> dict[str, object]:
    return {'versions': self.versions, 'commit': self.commit}
