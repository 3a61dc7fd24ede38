"""SHA256SUMS of a directory: written in sha256sum's format, every kind of damage refused by name,
unchanged files not hashed twice (stamps), a changed one hashed again whatever its mtime."""

import os
import shutil
import subprocess

import pytest

from flaxdistil.storage import integrity


def _tree(root):
  os.makedirs(root / 'sub')
  (root / 'a.bin').write_bytes(bytes(range(256)) * 64)  # 16 KiB
  (root / 'sub' / 'b.txt').write_text('hello\n')
  return root


def test_sums_are_sha256sum_format_and_cover_every_file(tmp_path):
  d = _tree(tmp_path / 'd')
  sums = integrity.write_sums(str(d))
  assert sorted(sums) == ['a.bin', 'sub/b.txt']
  if shutil.which('sha256sum'):  # the coreutils tool reads (and checks) the same file
    r = subprocess.run(['sha256sum', '-c', integrity.SUMS_FILE], cwd=d, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.count(': OK') == 2, r.stdout + r.stderr
  assert integrity.read_sums(str(d)) == sums
  report = integrity.verify(str(d), 'fix it')
  assert report.files == 2 and report.hashed_bytes == 16384 + 6


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'append', 'delete'])
def test_each_kind_of_damage_is_refused_naming_the_file_and_the_fix(tmp_path, damage):
  d = _tree(tmp_path / 'd')
  integrity.write_sums(str(d))
  f = d / 'a.bin'
  data = bytearray(f.read_bytes())
  if damage == 'flip':
    data[-10] ^= 0x01  # one bit near the end
    f.write_bytes(bytes(data))
  elif damage == 'truncate':
    f.write_bytes(bytes(data[:-100]))
  elif damage == 'append':
    f.write_bytes(bytes(data) + b'\0')
  else:
    f.unlink()
  with pytest.raises(integrity.CorruptFileError) as e:
    integrity.verify(str(d), 'Rebuild it.', what='test file')
  msg = str(e.value)
  assert e.value.path == str(f) and msg.startswith(str(f)) and msg.endswith('Rebuild it.')
  assert ('is missing' if damage == 'delete' else 'is corrupt') in msg
  assert e.value.exit_code == 5


def test_a_missing_or_damaged_sums_file(tmp_path):
  d = _tree(tmp_path / 'd')
  assert integrity.verify(str(d), 'x', required=False) is None  # written before checksums
  with pytest.raises(integrity.CorruptFileError, match='SHA256SUMS is missing'):
    integrity.verify(str(d), 'x')
  (d / integrity.SUMS_FILE).write_text('not a checksum line\n')
  with pytest.raises(integrity.CorruptFileError, match='line 1 is not'):
    integrity.verify(str(d), 'x')


def test_stamps_skip_unchanged_files_and_catch_a_change_that_keeps_mtime(tmp_path):
  d = _tree(tmp_path / 'd')
  integrity.write_sums(str(d))
  first = integrity.verify(str(d), 'x', stamps=True)
  assert first.hashed_bytes == 16390 and first.stamped_bytes == 0
  again = integrity.verify(str(d), 'x', stamps=True)
  assert again.hashed_bytes == 0 and again.stamped_bytes == 16390
  # One flipped byte, with size and mtime put back as they were: the ctime still moves.
  f = d / 'a.bin'
  st = os.stat(f)
  data = bytearray(f.read_bytes())
  data[5] ^= 0xff
  f.write_bytes(bytes(data))
  os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
  with pytest.raises(integrity.CorruptFileError, match='a.bin is corrupt'):
    integrity.verify(str(d), 'x', stamps=True)


def test_per_file_fix_and_names(tmp_path):
  d = _tree(tmp_path / 'd')
  integrity.write_sums(str(d))
  (d / 'sub' / 'b.txt').write_text('HELLO\n')
  integrity.verify(str(d), 'x', names=['a.bin'])  # only what is asked for is read
  with pytest.raises(integrity.CorruptFileError, match=r'b\.txt is corrupt.*delete sub/b\.txt$'):
    integrity.verify(str(d), lambda name: f'delete {name}')
  with pytest.raises(integrity.CorruptFileError, match='not listed'):
    integrity.verify(str(d), 'x', names=['c.bin'])
