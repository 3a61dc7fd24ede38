"""One run per directory: an exclusive `flock` that a killed run cannot leave behind.

`hold(directory)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `<directory>/.flaxdistil-lock.<i>`
(i = this process's index, so the processes of one multi-host run do not exclude each other while
a second run's process i collides with the first run's), writes who holds it into the file, and
keeps it until the process releases it or ends. The kernel drops an flock when its holder dies,
SIGKILL included, so there is nothing stale to clean up; the file itself stays (deleting a lock
file races with the next locker). A second holder fails at once with `DirectoryLockedError`,
naming the holder. `flock` is honoured by local file systems and by NFS (as a whole-file lock);
a FUSE mount of an object store (gcsfuse) may not enforce it across machines.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time


class DirectoryLockedError(RuntimeError):
  """Another live process holds the directory's lock; the message names it and the fix.

  Attributes:
    exit_code: 6, the command lines' exit status for it.
  """

  exit_code = 6


class DirectoryLock:
  """A held lock (`hold`); `release()` (or the end of the process) frees it."""

  def __init__(self, path: str, fh):
    self.path, self._fh = path, fh

  def release(self) -> None:
    """Unlocks and closes the lock file; idempotent."""
    if self._fh is not None:
      fcntl.flock(self._fh, fcntl.LOCK_UN)
      self._fh.close()
      self._fh = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def lock_path(directory: str, process_index: int = 0) -> str:
  """`<directory>/.flaxdistil-lock.<process_index>`."""
  return os.path.join(directory, f'.flaxdistil-lock.{process_index}')


def hold(directory: str, what: str, fix: str, process_index: int = 0) -> DirectoryLock:
  """Takes the lock of `directory` for this process or fails at once.

  Args:
    directory: an existing directory (a run's --workdir, a cache's --out).
    what: what the directory is, for the message ('--workdir /w').
    fix: the advice of the message, e.g. 'wait for it to finish, stop it, or pass another
      --workdir'.
    process_index: this process's index in a multi-process job.

  Returns:
    The held `DirectoryLock`.

  Raises:
    DirectoryLockedError: another live process holds it (`<what> is in use by pid P on host H
      since T (<its command line>): ...`).
    OSError: the lock file cannot be created (e.g. a read-only directory).
  """
  path = lock_path(directory, process_index)
  fh = open(path, 'a+')  # never truncated before the lock is ours: it names the holder
  try:
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    fh.seek(0)
    try:
      holder = json.loads(fh.read() or '{}')
    except ValueError:
      holder = {}
    fh.close()
    who = (f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")} since '
           f'{holder.get("started", "?")} ({holder.get("command", "?")})') if holder else (
               'another process')
    raise DirectoryLockedError(
        f'{what} is in use by {who}: two runs writing one directory would overwrite each other\'s '
        f'checkpoints and logs. {fix} (lock: {path})') from None
  fh.seek(0)
  fh.truncate()
  fh.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                       'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                       'command': ' '.join([os.path.basename(sys.executable)] + sys.argv)}))
  fh.flush()
  return DirectoryLock(path, fh)
