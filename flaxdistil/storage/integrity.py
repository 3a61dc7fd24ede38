"""Checksums of what the project writes, checked before anything reads it back.

Every directory whose files a later process trusts (a checkpoint step, the token cache, a teacher
cache, an exported model) gets a `SHA256SUMS` file in the format of coreutils' `sha256sum`
(`<64 hex>  <relative path>` per line), so a user can also check it with
`cd DIR && sha256sum -c SHA256SUMS`. `verify` compares the files against it before use; a
truncated, extended or altered file (one flipped byte) raises `CorruptFileError` naming the file
and the fix. Hashing reads every byte (`hashlib.file_digest`); for the caches, which every run
opens again, `verify(..., stamps=True)` remembers each verified file by size, inode, mtime and
ctime (`.sha256-verified`, beside `SHA256SUMS`) and hashes it again only when one of them changed.
Any write to a file changes its ctime, which a user cannot set back (`touch` sets mtime, not
ctime), so only a change below the file system (media corruption) escapes a stamp; that is the
storage's own checksums' job. `benchmarks/integrity.py` measures the cost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Iterable

from flaxdistil.storage import atomic

SUMS_FILE = 'SHA256SUMS'
STAMPS_FILE = '.sha256-verified'
_NOT_COVERED = (SUMS_FILE, STAMPS_FILE)


class CorruptFileError(ValueError):
  """A file differs from the checksum recorded when it was written; the message has the fix.

  Attributes:
    path: the file (absolute).
    fix: what to do (rebuild, delete that step, re-export), also part of the message.
    exit_code: 5, the command lines' exit status for it.
  """

  exit_code = 5

  def __init__(self, path: str, problem: str, fix: str):
    self.path, self.fix = path, fix
    super().__init__(f'{path} {problem}. {fix}')


def sha256_file(path: str) -> str:
  """The hex sha256 of a file's bytes (`hashlib.file_digest`, 1 MiB reads).

  Args:
    path: the file.

  Returns:
    64 lowercase hex digits, as `sha256sum` prints them.
  """
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def files_under(directory: str) -> list[str]:
  """Relative paths ('/'-separated) of the regular files under `directory`, sorted.

  `SHA256SUMS`, `.sha256-verified` and temporary `.tmp_*` files of `atomic.atomic_file` are left
  out.
  """
  out = []
  for parent, dirs, files in os.walk(directory):
    dirs.sort()
    for f in files:
      if f in _NOT_COVERED or f.startswith('.tmp_'):
        continue
      path = os.path.join(parent, f)
      if os.path.isfile(path) and not os.path.islink(path):
        out.append(os.path.relpath(path, directory).replace(os.sep, '/'))
  return sorted(out)


def write_sums(directory: str, names: Iterable[str] | None = None,
               known: dict[str, str] | None = None) -> dict[str, str]:
  """Hashes files of `directory` and writes `directory/SHA256SUMS` atomically.

  Args:
    directory: the directory whose files are covered.
    names: relative paths to cover; None = every file (`files_under`).
    known: `{relative path: sha256}` already computed (e.g. by a worker that wrote the file);
      these files are not read again.

  Returns:
    `{relative path: sha256}` as written.

  Raises:
    OSError: a file cannot be read, or `SHA256SUMS` cannot be written (e.g. ENOSPC).
  """
  names = files_under(directory) if names is None else sorted(names)
  known = known or {}
  sums = {n: known.get(n) or sha256_file(os.path.join(directory, n)) for n in names}
  with atomic.atomic_file(os.path.join(directory, SUMS_FILE), 'w') as f:
    f.writelines(f'{h}  {n}\n' for n, h in sums.items())
  return sums


def read_sums(directory: str) -> dict[str, str] | None:
  """`{relative path: sha256}` of `directory/SHA256SUMS`, or None when there is none.

  Raises:
    CorruptFileError: the file is not in `sha256sum` format (damaged).
  """
  path = os.path.join(directory, SUMS_FILE)
  if not os.path.exists(path):
    return None
  sums = {}
  with open(path, 'rb') as f:
    for i, raw in enumerate(f, 1):
      line = raw.decode('utf-8', 'replace').rstrip('\n')
      digest, sep, name = line.partition('  ')
      if not sep or len(digest) != 64 or any(c not in '0123456789abcdef' for c in digest) or (
          not name):
        raise CorruptFileError(os.path.abspath(path), f'is damaged (line {i} is not '
                               '"<sha256>  <file>")', 'Delete the directory it belongs to and '
                               'write it again.')
      sums[name.removeprefix('*')] = digest  # '*' marks binary mode in sha256sum's format
  return sums


@dataclasses.dataclass
class VerifyReport:
  """What `verify` did: files checked, bytes hashed, bytes skipped by stamps, seconds."""
  files: int = 0
  hashed_bytes: int = 0
  stamped_bytes: int = 0
  seconds: float = 0.0

  @property
  def mb_per_s(self) -> float | None:
    """Hashing throughput, MB/s (1e6 bytes), None when nothing was hashed."""
    return self.hashed_bytes / 1e6 / self.seconds if self.hashed_bytes and self.seconds else None


def _stat_key(st: os.stat_result) -> list[int]:
  return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _read_stamps(directory: str) -> dict:
  try:
    with open(os.path.join(directory, STAMPS_FILE)) as f:
      stamps = json.load(f)
    return stamps if isinstance(stamps, dict) else {}
  except (OSError, ValueError):  # none yet, or damaged: then everything is hashed again
    return {}


def verify(directory: str, fix: str | Callable[[str], str], *, names: Iterable[str] | None = None,
           stamps: bool = False, required: bool = True,
           what: str = 'file') -> VerifyReport | None:
  """Checks files of `directory` against its `SHA256SUMS` before they are used.

  Args:
    directory: a directory with a `SHA256SUMS` (`write_sums`).
    fix: the sentence that tells the user what to do about a bad file (in the error), or a
      function of the file's relative path that returns it.
    names: only these relative paths (each must be listed); None = every listed file.
    stamps: skip files whose size, inode, mtime and ctime equal those recorded when they were
      last verified (`.sha256-verified`; written best-effort, e.g. not on a read-only cache).
    required: raise when there is no `SHA256SUMS`; False returns None then (a directory
      written before checksums existed).
    what: how the error calls the file, e.g. 'token cache shard'.

  Returns:
    A `VerifyReport`, or None when `SHA256SUMS` is missing and not `required`.

  Raises:
    CorruptFileError: `SHA256SUMS` is missing (if `required`) or damaged, or a file is missing,
      or its sha256 differs (truncated, extended or altered). The message names the file, its
      size and the fix.
  """
  t0 = time.perf_counter()
  fix_of = fix if callable(fix) else lambda _: fix
  sums = read_sums(directory)
  if sums is None:
    if not required:
      return None
    raise CorruptFileError(os.path.abspath(os.path.join(directory, SUMS_FILE)),
                           'is missing (the checksums written with the files)', fix_of(SUMS_FILE))
  todo = sorted(sums) if names is None else sorted(names)
  old = _read_stamps(directory) if stamps else {}
  new, report = {}, VerifyReport()
  for name in todo:
    path = os.path.abspath(os.path.join(directory, name))
    if name not in sums:
      raise CorruptFileError(path, f'is not listed in {SUMS_FILE}', fix_of(name))
    try:
      st = os.stat(path)
    except FileNotFoundError:
      raise CorruptFileError(path, f'is missing ({SUMS_FILE} lists it)', fix_of(name)) from None
    key = _stat_key(st) + [sums[name]]
    report.files += 1
    if stamps and old.get(name) == key:
      report.stamped_bytes += st.st_size
      new[name] = key
      continue
    digest = sha256_file(path)
    report.hashed_bytes += st.st_size
    if digest != sums[name]:
      raise CorruptFileError(
          path, f'is corrupt: this {what} ({st.st_size} bytes now) has sha256 {digest[:12]}..., '
          f'not the {sums[name][:12]}... recorded in {SUMS_FILE} when it was written (it was '
          'truncated or changed since)', fix_of(name))
    new[name] = key
  if stamps and new != {k: v for k, v in old.items() if k in new}:
    try:
      atomic.write_json(os.path.join(directory, STAMPS_FILE), {**old, **new}, indent=None)
    except OSError:  # read-only or full: verified again next time, nothing else changes
      pass
  report.seconds = time.perf_counter() - t0
  return report
