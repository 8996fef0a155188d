"""Every file the package writes, whole or not at all, on local disks and object stores alike.

A local file is written under a temporary name in its own directory and renamed over the target,
so an interrupted or failed write never leaves a partial file. Object stores (`gs://...` and the
other schemes `etils.epath` reads) replace an object whole, so there the bytes are built in memory
and uploaded in one piece. Paths are strings; `gs://` paths are never turned into local ones.
"""

import io
import json
import os
import tempfile
from typing import BinaryIO, Callable

from etils import epath
import numpy as np


def is_remote(path: str) -> bool:
  """Whether `path` names an object in a store (`scheme://...`) rather than a local file."""
  return '://' in str(path)


def absolute(path: str) -> str:
  """`path` made absolute if it is local; object-store paths are already absolute."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  """Whether a file (or object) exists at `path`."""
  return epath.Path(path).exists()


def write_with(path: str, write: Callable[[BinaryIO], None]) -> None:
  """Calls `write(file)` on a binary file that becomes `path` only once `write` has returned.

  The parent directory is created if needed. On failure (or interruption) nothing is left at
  `path` that was not there before, and no temporary file remains.
  """
  path = str(path)
  if is_remote(path):
    buffer = io.BytesIO()
    write(buffer)
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
    return
  directory, name = os.path.split(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f'.{name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.chmod(tmp_path, 0o644)  # mkstemp makes the file private; outputs are for reading.
    os.replace(tmp_path, path)
  except BaseException:
    os.remove(tmp_path)
    raise


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (see `write_with`)."""
  write_with(path, lambda f: f.write(data))


def write_json(path: str, value) -> None:
  """Writes `value` as indented JSON to `path` atomically."""
  write_bytes(path, json.dumps(value, indent=1).encode() + b'\n')


def write_npz(path: str, **arrays) -> None:
  """Writes `arrays` as an uncompressed .npz to `path` atomically (`path` must end in .npz)."""
  if not str(path).endswith('.npz'):
    raise ValueError(f'an .npz path must end in .npz, got {path}')
  write_with(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def read_bytes(path: str) -> bytes:
  """The bytes of the file (or object) at `path`."""
  return epath.Path(path).read_bytes()


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of the .npz at `path` (no pickled objects)."""
  with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as arrays:
    return {key: arrays[key] for key in arrays.files}
