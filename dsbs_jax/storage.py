"""Storage: every file dsbs-jax reads or writes, on local disk or at a URL (`gs://...`).

All paths go through `etils.epath`, the layer T5X and Orbax use, so `MODEL_DIR`,
`DATA_ROOT`, vocabularies and checkpoints may live in Cloud Storage as well as
on disk. Object stores have no append and no rename, so:

  * `write_atomic` writes a whole file at once (a local temporary file renamed
    into place; on an object store one upload, which is atomic by itself);
  * `AppendFile` appends on disk and rewrites the whole object on a flush
    elsewhere, the way TensorFlow's gfile writes to Cloud Storage.

Readers raise `DataError` naming the file (and line, for bad UTF-8).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from typing import Union

import fsspec
from etils import epath

from dsbs_jax.errors import ConfigError, DataError

PathLike = Union[str, os.PathLike]

# Listings are read again every time: Orbax writes arrays through TensorStore,
# past fsspec, so a cached listing of a checkpoint directory could be stale.
fsspec.config.conf.setdefault('gs', {}).setdefault('use_listings_cache', False)


def is_url(path: PathLike) -> bool:
  return '://' in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """`path` as an epath.Path: URLs unchanged, local paths absolute with `~` expanded."""
  text = os.fspath(path)
  if is_url(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def read_bytes(path: PathLike) -> bytes:
  """The file's bytes; a missing file is a `DataError` naming it."""
  p = resolve(path)
  try:
    return p.read_bytes()
  except FileNotFoundError:
    raise DataError(f'{path}: file not found') from None
  except IsADirectoryError:
    raise DataError(f'{path}: is a directory, expected a file') from None


def decode_utf8(data: bytes, where: str) -> str:
  """`data` as text; invalid UTF-8 is a `DataError` naming `where` and the line."""
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b'\n') + 1
    raise DataError(
        f'{where}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8'
    ) from None


def read_text(path: PathLike) -> str:
  return decode_utf8(read_bytes(path), os.fspath(path))


def exists(path: PathLike) -> bool:
  return resolve(path).exists()


def write_atomic(path: PathLike, data: Union[str, bytes]) -> None:
  """Writes the whole file so that readers see the old content or the new, never a part."""
  p = resolve(path)
  raw = data.encode('utf-8') if isinstance(data, str) else data
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_url(path):
    p.write_bytes(raw)
    return
  fd, tmp = tempfile.mkstemp(dir=os.fspath(p.parent), prefix=f'.{p.name}.')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(raw)
    os.replace(tmp, os.fspath(p))
  except BaseException:
    os.unlink(tmp)
    raise


def check_writable(directory: PathLike, setting: str) -> epath.Path:
  """Creates `directory` and proves it writable with a probe file of this process's own
  (every process of a multi-host run probes the same directory at once)."""
  p = resolve(directory)
  probe = p / f'.write_test.{uuid.uuid4().hex}'
  try:
    p.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b'')
    probe.unlink()
  except (OSError, ValueError) as e:
    reason = getattr(e, 'strerror', None) or str(e).splitlines()[0]
    raise ConfigError(f'{setting} {os.fspath(directory)!r} cannot be written: {reason}') from None
  return p


class AppendFile:
  """A file that grows by appends: metrics JSONL, TensorBoard event files.

  On disk it is a file opened for appending. On an object store, which cannot
  append, the content is kept in memory and the whole object is uploaded again
  on every `flush`; what existed before is read first, so a resumed run keeps
  its earlier lines.
  """

  def __init__(self, path: PathLike):
    self.path = resolve(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._remote = is_url(path)
    if self._remote:
      self._content = bytearray(self.path.read_bytes() if self.path.exists() else b'')
      self._dirty = False
    else:
      self._file = open(os.fspath(self.path), 'ab')  # noqa: SIM115 (held until close())

  def start_line(self) -> None:
    """Ends a last line that a killed process left cut short, so the next write
    starts a line of its own; the cut line is kept, for readers to skip."""
    if self._remote:
      last = bytes(self._content[-1:])
    else:
      with open(os.fspath(self.path), 'rb') as f:
        f.seek(max(f.seek(0, os.SEEK_END) - 1, 0))
        last = f.read(1)
    if last not in (b'', b'\n'):
      self.write(b'\n')

  def write(self, data: Union[str, bytes]) -> None:
    raw = data.encode('utf-8') if isinstance(data, str) else data
    if self._remote:
      self._content += raw
      self._dirty = True
    else:
      self._file.write(raw)

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()
    elif self._dirty:
      self.path.write_bytes(bytes(self._content))
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._file.close()

  @property
  def closed(self) -> bool:
    return not self._remote and self._file.closed


def local_copy(path: PathLike, cache_dir: PathLike = '~/.cache/dsbs_jax') -> str:
  """A local path holding `path`'s bytes, for readers that only open local files
  (SentencePiece through TensorFlow's gfile). URLs are copied once per content."""
  if not is_url(path):
    if not os.path.isfile(os.fspath(resolve(path))):
      raise DataError(f'{os.fspath(path)}: file not found')
    return os.fspath(resolve(path))
  data = read_bytes(path)
  target = resolve(cache_dir) / hashlib.sha256(data).hexdigest()[:16] / resolve(path).name
  if not target.exists():
    write_atomic(target, data)
  return os.fspath(target)
