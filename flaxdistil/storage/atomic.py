"""Atomic writes: a reader sees the old file (or directory) or the new one, never a partial one.

Every writer of the project that publishes a file others read (token cache shards, teacher cache
shards and manifests, exported model directories) goes through here: write to a temporary name in
the same directory (same file system, so the final `os.replace` / `os.rename` is atomic), publish
world-readable (0644 files, 0755 directories: caches and exports are shared between jobs and users,
and `tempfile` creates 0600 / 0700), and delete the temporary on any failure, KeyboardInterrupt
included, so nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Any, Iterator

FILE_MODE, DIR_MODE = 0o644, 0o755


@contextlib.contextmanager
def atomic_file(path: str, mode: str = 'wb') -> Iterator[IO[Any]]:
  """Opens a temporary file beside `path`; on a clean exit it replaces `path` (mode 0644).

  Args:
    path: the final file path (its directory must exist).
    mode: `open` mode of the temporary file, 'wb' or 'w'.

  Yields:
    The open file object. If the block raises, the temporary file is removed
    and `path` is left as it was.

  Raises:
    OSError: the temporary cannot be created (e.g. the directory is missing)
      or `path` cannot be replaced. Whatever the block raises is re-raised.
  """
  directory = os.path.dirname(path) or '.'
  suffix = os.path.splitext(path)[1]
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp_', suffix=suffix)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any, indent: int = 1) -> None:
  """`json.dump(obj)` to `path` atomically (`atomic_file`).

  Args:
    path: the JSON file to write (its directory must exist).
    obj: a JSON-serialisable value.
    indent: `json.dump` indentation.

  Raises:
    TypeError: `obj` is not JSON-serialisable (`path` is left as it was).
  """
  with atomic_file(path, 'w') as f:
    json.dump(obj, f, indent=indent)


def make_readable(root: str) -> None:
  """chmods `root` and everything under it to 0755 (directories) / 0644 (files)."""
  os.chmod(root, DIR_MODE)
  for parent, dirs, files in os.walk(root):
    for d in dirs:
      os.chmod(os.path.join(parent, d), DIR_MODE)
    for f in files:
      os.chmod(os.path.join(parent, f), FILE_MODE)


def move_into_place(tmp: str, out_dir: str, overwrite: bool) -> None:
  """Makes `tmp` readable (`make_readable`) and renames it to `out_dir`.

  An existing `out_dir` is swapped out (renamed aside, then deleted), never
  merged, so readers see either the old or the new directory; if the second
  rename fails the old directory is renamed back.

  Args:
    tmp: the finished temporary directory (same file system as `out_dir`).
    out_dir: the final directory path.
    overwrite: replace an existing `out_dir`.

  Raises:
    FileExistsError: `out_dir` exists and not `overwrite`.
  """
  make_readable(tmp)
  if not os.path.exists(out_dir):
    os.rename(tmp, out_dir)
    return
  if not overwrite:
    raise FileExistsError(f'{out_dir} appeared while it was being written; not replacing it.')
  backup = tmp + '.old'  # unique: tmp came from mkdtemp
  os.rename(out_dir, backup)
  try:
    os.rename(tmp, out_dir)
  except BaseException:
    os.rename(backup, out_dir)
    raise
  shutil.rmtree(backup, ignore_errors=True)


def check_writable_target(out_dir: str, overwrite: bool) -> str:
  """The absolute `out_dir` (`~` expanded), after checking it may be written.

  Args:
    out_dir: the directory to be written.
    overwrite: whether an existing directory may be replaced.

  Returns:
    `out_dir` as an absolute path.

  Raises:
    FileExistsError: `out_dir` exists and not `overwrite`, or it is a file.
  """
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(out_dir) and (not overwrite or not os.path.isdir(out_dir)):
    raise FileExistsError(f'{out_dir} already exists; pass overwrite=True (--overwrite; only for a '
                          'directory) or choose another directory.')
  return out_dir


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
  """A temporary directory beside `out_dir` that becomes `out_dir` when the block succeeds.

  Write (and verify) everything inside the yielded directory; on a clean exit it
  is published with `move_into_place`, on an exception it is deleted and
  `out_dir` is untouched.

  Args:
    out_dir: the final directory; its parent is created if missing.
    overwrite: replace an existing `out_dir` (a directory, not a file).

  Yields:
    The path of the temporary directory (a sibling of `out_dir`).

  Raises:
    FileExistsError: `out_dir` exists and not `overwrite` (checked before anything is
      written, and again when publishing, in case it appeared meanwhile).
  """
  out_dir = check_writable_target(out_dir, overwrite)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)
  try:
    yield tmp
    move_into_place(tmp, out_dir, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
