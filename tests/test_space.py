"""A full disk: recognised in every library's spelling, reported with directory, need and fix."""

import errno
import os

import pytest

from flaxdistil.storage import space

from conftest import small_filesystem


def test_is_disk_full_in_each_spelling():
  assert space.is_disk_full(OSError(errno.ENOSPC, 'No space left on device'))
  assert space.is_disk_full(OSError(errno.EDQUOT, 'Disk quota exceeded'))
  # Orbax / tensorstore: a ValueError with the C library's text and the errno.
  assert space.is_disk_full(ValueError(
      'RESOURCE_EXHAUSTED: Error writing "w/0.0" ... Failed to write 103461 bytes to file 8: No '
      "space left on device [os_error_code='28']"))
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = OSError(errno.ENOSPC, 'x')
  assert space.is_disk_full(wrapped)
  # numpy's tofile reports a short write without errno: not taken for a full disk by itself
  assert not space.is_disk_full(OSError('262144 requested and 16352 written'))
  assert not space.is_disk_full(OSError(errno.EACCES, 'Permission denied'))
  assert not space.is_disk_full(ValueError('bad value'))


def test_reporting_disk_full_on_a_real_full_file_system(tmp_path):
  with small_filesystem(tmp_path / 'fs', 64 << 10):
    target = tmp_path / 'fs' / 'x.bin'
    with pytest.raises(space.DiskFullError) as e:
      with space.reporting_disk_full(str(tmp_path / 'fs'), 'x.npy', 1 << 20,
                                     'rerun the same command.'):
        with open(target, 'wb') as f:
          f.write(bytes(1 << 20))  # 1 MiB into 64 KiB
    msg = str(e.value)
    assert msg.startswith(f'No space left on device writing x.npy in {tmp_path / "fs"}: it needs '
                          'about 1.0 MiB, ') and msg.endswith('then rerun the same command.')
    assert ' free there' in msg and e.value.needed == 1 << 20 and e.value.exit_code == 4
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    # Other errors pass unchanged.
    with pytest.raises(ZeroDivisionError):
      with space.reporting_disk_full(str(tmp_path), 'x', None, 'y'):
        1 / 0  # pylint: disable=pointless-statement


def test_fmt_and_sizes(tmp_path):
  assert [space.fmt_bytes(n) for n in (None, 12, 2048, 3 << 20, 5 << 30)] == [
      'an unknown amount', '12 B', '2.0 KiB', '3.0 MiB', '5.0 GiB']
  (tmp_path / 'd').mkdir()
  (tmp_path / 'd' / 'a').write_bytes(b'x' * 10)
  (tmp_path / 'd' / 'b').write_bytes(b'x' * 5)
  assert space.tree_bytes(str(tmp_path / 'd')) == 15 and space.tree_bytes('/nonexistent') == 0
  assert space.free_bytes(str(tmp_path / 'not' / 'yet')) == space.free_bytes(str(tmp_path))
  assert os.path.exists(tmp_path)
