"""A full disk, reported as one error that names the directory, the space needed and the fix.

A write that hits ENOSPC (or EDQUOT, a full quota) surfaces differently in each library: an
`OSError` with `errno` 28 from Python and numpy, an `ArrowIOError`/`OSError` from pyarrow, a
`ValueError('RESOURCE_EXHAUSTED: ... No space left on device [os_error_code=\\'28\\']')` from
Orbax's tensorstore, wrapped in other exceptions on the way up. `is_disk_full` recognises all of
them; `reporting_disk_full` turns one into `DiskFullError`, whose message says what was being
written where, about how much space it needs, how much is free, and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Callable, Iterator

_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TEXTS = ('no space left on device', 'disk quota exceeded', "os_error_code='28'",
          "os_error_code='122'")


class DiskFullError(OSError):
  """No space left where a run, a cache build or an export writes; the message has the fix.

  Attributes:
    directory: where the write failed (absolute).
    needed: about how many bytes the write needs, or None if unknown.
    free: bytes free in `directory` when the error was raised.
    exit_code: 4, the command lines' exit status for it.
  """

  exit_code = 4

  def __init__(self, message: str, directory: str, needed: int | None, free: int | None):
    super().__init__(errno.ENOSPC, message)
    self.directory, self.needed, self.free = directory, needed, free

  def __str__(self) -> str:
    return self.strerror


def is_disk_full(error: BaseException | None) -> bool:
  """True if `error`, or an exception it was raised from, is an ENOSPC / EDQUOT failure.

  Follows `__cause__` / `__context__`; counts an `OSError` with that `errno`, or any exception
  whose message has the C library's or tensorstore's text for it.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _ERRNOS:
      return True
    if any(t in str(error).lower() for t in _TEXTS):
      return True
    error = error.__cause__ or error.__context__
  return False


def free_bytes(path: str) -> int | None:
  """Bytes available to this user on the file system of `path` (or of its nearest existing
  parent); None if it cannot be determined."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def tree_bytes(path: str) -> int:
  """Total size in bytes of the regular files under `path` (0 if it does not exist)."""
  total = 0
  for parent, _, files in os.walk(path):
    for f in files:
      with contextlib.suppress(OSError):
        total += os.lstat(os.path.join(parent, f)).st_size
  return total


def fmt_bytes(n: int | None) -> str:
  """`n` bytes for a message: '512 B', '3.4 MiB', '1.2 GiB'; 'an unknown amount' for None."""
  if n is None:
    return 'an unknown amount'
  for unit, size in (('GiB', 1 << 30), ('MiB', 1 << 20), ('KiB', 1 << 10)):
    if n >= size:
      return f'{n / size:.1f} {unit}'
  return f'{n} B'


def disk_full_error(directory: str, what: str, needed: int | None, fix: str) -> DiskFullError:
  """The `DiskFullError` of a failed write.

  Args:
    directory: where `what` was being written.
    what: e.g. 'checkpoint step 16', 'token cache shard-00003.npy'.
    needed: about how many more bytes it needs (None: unknown).
    fix: the last sentence(s): how to go on once there is space (e.g. 'rerun the same command:
      it resumes from step 8').

  Returns:
    The error; its message: `No space left on device writing {what} in {directory}: it needs
    about N, M free there. Free space there (or ...) and {fix}`.
  """
  directory = os.path.abspath(directory)
  free = free_bytes(directory)
  return DiskFullError(
      f'No space left on device writing {what} in {directory}: it needs about '
      f'{fmt_bytes(needed)}, {fmt_bytes(free)} free there. Free space on that file system (or '
      f'point the output to a larger one), then {fix}', directory, needed, free)


@contextlib.contextmanager
def reporting_disk_full(directory: str, what: str, needed: int | None | Callable[[], int | None],
                        fix: str) -> Iterator[None]:
  """Turns a full-disk failure inside the block into `disk_full_error(...)`; others pass.

  Args:
    directory / what / fix: as `disk_full_error`.
    needed: bytes needed, or a function computing it (called only on failure).

  Raises:
    DiskFullError: the block failed with ENOSPC / EDQUOT (`is_disk_full`), raised from it.
  """
  try:
    yield
  except DiskFullError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not is_disk_full(e):
      raise
    raise disk_full_error(directory, what, needed() if callable(needed) else needed, fix) from e
