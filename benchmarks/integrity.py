r"""What checking files before use costs: sha256 MB/s, and a re-open with verified stamps.

  python benchmarks/integrity.py                       # 256 MiB of fresh random files
  python benchmarks/integrity.py --mib 2048 --files 8  # bigger
  python benchmarks/integrity.py --dir ~/.cache/flaxdistil/tokens-<key>  # an existing cache

Prints, for the directory's files: the first `integrity.verify` (every byte hashed, as a run that
opens a new or changed cache, a checkpoint or an export does), the second one with stamps (what a
run re-opening an unchanged token or teacher cache pays), `write_sums` (what a checkpoint save or a
cache build adds), and their ratios. Files just written are in the page cache, so the first verify
measures hashing, not the disk: on a cold cache the read speed of the storage bounds it. Time it on
an otherwise idle machine; the numbers of a loaded one say nothing.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from flaxdistil.storage import integrity


def _write_files(directory: str, mib: int, files: int) -> None:
  """Writes `files` files of random bytes, `mib` MiB in all, as `shard-NNNNN.bin`."""
  rng = np.random.default_rng(0)
  per = (mib << 20) // files
  for i in range(files):
    with open(os.path.join(directory, f'shard-{i:05d}.bin'), 'wb') as f:
      for _ in range(0, per, 1 << 24):
        f.write(rng.integers(0, 256, min(1 << 24, per), np.uint8).tobytes())


def main():
  """Parses the flags, times `write_sums` and two `verify` passes, prints MB/s and ratios."""
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--dir', default=None, help='an existing directory to time (a copy is timed; it is not changed)')
  ap.add_argument('--mib', type=int, default=256, help='MiB of random files when no --dir')
  ap.add_argument('--files', type=int, default=4, help='number of random files when no --dir')
  ap.add_argument('--json_out', default=None)
  a = ap.parse_args()
  load_before = os.getloadavg()[0]
  tmp = None
  if a.dir is None:
    tmp = tempfile.mkdtemp(prefix='integrity_bench_')
    _write_files(tmp, a.mib, a.files)
    directory = tmp
  else:
    directory = tempfile.mkdtemp(prefix='integrity_bench_')  # a copy: stamps of its own
    shutil.rmtree(directory)
    shutil.copytree(a.dir, directory)
  try:
    t0 = time.perf_counter()
    integrity.write_sums(directory)
    t_sums = time.perf_counter() - t0
    first = integrity.verify(directory, 'benchmark', stamps=True)
    second = integrity.verify(directory, 'benchmark', stamps=True)
    total = first.hashed_bytes
    res = {'files': first.files, 'bytes': total, 'write_sums_s': t_sums,
           'write_sums_mb_per_s': total / 1e6 / t_sums,
           'verify_s': first.seconds, 'verify_mb_per_s': first.mb_per_s,
           'reopen_with_stamps_s': second.seconds, 'reopen_hashed_bytes': second.hashed_bytes,
           'verify_over_reopen': first.seconds / max(second.seconds, 1e-9)}
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  res['load_average'] = [load_before, os.getloadavg()[0]]
  print(f'{res["files"]} files, {total / 2**20:.0f} MiB; load average {load_before:.2f} before, '
        f'{res["load_average"][1]:.2f} after (above {os.cpu_count()} cores: not a result)')
  print(f'write_sums          {t_sums:8.3f} s  {res["write_sums_mb_per_s"]:8.0f} MB/s')
  print(f'verify (hash all)   {first.seconds:8.3f} s  {first.mb_per_s:8.0f} MB/s')
  print(f're-open (stamps)    {second.seconds:8.4f} s  {second.hashed_bytes} bytes hashed')
  print(f'verify / re-open    {res["verify_over_reopen"]:8.0f}x')
  if a.json_out:
    with open(a.json_out, 'w') as f:
      json.dump(res, f, indent=1)


if __name__ == '__main__':
  main()
