"""The directory lock: a second holder is refused at once with the holder named; a killed holder
leaves nothing stuck; processes of one job (different indices) do not exclude each other."""

import subprocess
import sys
import time

import pytest

from flaxdistil.storage import lock

from conftest import ROOT

HOLD = ('import sys, time\nfrom flaxdistil.storage import lock\n'
        'held = lock.hold(sys.argv[1], "dir", "fix")\nprint("held", flush=True)\ntime.sleep(600)\n')


def _holder(directory):
  p = subprocess.Popen([sys.executable, '-c', HOLD, str(directory)], cwd=ROOT,
                       stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == 'held'
  return p


def test_second_holder_is_refused_naming_the_first_and_a_kill_frees_it(tmp_path):
  p = _holder(tmp_path)
  try:
    t0 = time.monotonic()
    with pytest.raises(lock.DirectoryLockedError) as e:
      lock.hold(str(tmp_path), '--workdir W', 'Pass another --workdir.')
    assert time.monotonic() - t0 < 1  # at once, not after a wait
    msg = str(e.value)
    assert msg.startswith(f'--workdir W is in use by pid {p.pid} on host ')
    assert msg.endswith(f'Pass another --workdir. (lock: {tmp_path}/.flaxdistil-lock.0)')
    assert e.value.exit_code == 6
    held = lock.hold(str(tmp_path), 'dir', 'fix', process_index=1)  # another process of a job
    held.release()
  finally:
    p.kill()  # SIGKILL: no cleanup runs
    p.wait()
  with lock.hold(str(tmp_path), 'dir', 'fix') as held:  # the kernel dropped the dead holder's lock
    assert (tmp_path / '.flaxdistil-lock.0').read_text().startswith('{"pid": ')
  with lock.hold(str(tmp_path), 'dir', 'fix'):  # released, so free again
    pass
