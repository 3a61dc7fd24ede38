"""Atomic writes: the old file or directory or the new one, never a part; nothing temporary left
behind on failure; published readable (0644 / 0755) whatever the umask."""

import json
import os
import pathlib
import stat

import pytest

from flaxdistil.storage import atomic


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def private_umask():
  """A umask that makes new files 0600 and directories 0700 (what mkstemp/mkdtemp give anyway)."""
  old = os.umask(0o077)
  yield
  os.umask(old)


@pytest.mark.parametrize('error', [ValueError, KeyboardInterrupt])
def test_atomic_file_keeps_the_old_file_and_no_temporary_when_the_block_raises(tmp_path, error):
  path = tmp_path / 'shard.arrow'
  path.write_bytes(b'old')
  with pytest.raises(error):
    with atomic.atomic_file(str(path)) as f:
      f.write(b'new, half written')
      assert sorted(os.listdir(tmp_path)) != ['shard.arrow']  # the temporary is beside it
      raise error()
  assert path.read_bytes() == b'old'
  assert os.listdir(tmp_path) == ['shard.arrow']
  # A file that did not exist yet does not appear.
  with pytest.raises(ValueError):
    with atomic.atomic_file(str(tmp_path / 'new.json'), 'w') as f:
      f.write('{')
      raise ValueError
  assert os.listdir(tmp_path) == ['shard.arrow']


def test_atomic_file_replaces_and_publishes_0644_whatever_the_umask(tmp_path, private_umask):
  path = tmp_path / 'manifest.json'
  path.write_text('old')
  with atomic.atomic_file(str(path), 'w') as f:
    f.write('new')
    assert path.read_text() == 'old'  # readers see the old file until the block ends
  assert path.read_text() == 'new' and _mode(path) == 0o644
  atomic.write_json(str(tmp_path / 'm.json'), {'complete': True})
  assert json.loads((tmp_path / 'm.json').read_text()) == {'complete': True}
  assert _mode(tmp_path / 'm.json') == 0o644
  assert sorted(os.listdir(tmp_path)) == ['m.json', 'manifest.json']


def test_atomic_directory_deletes_the_temporary_on_failure(tmp_path):
  out = tmp_path / 'export'
  with pytest.raises(RuntimeError, match='verification failed'):
    with atomic.atomic_directory(str(out)) as tmp:
      assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(out)
      (pathlib.Path(tmp) / 'model.safetensors').write_bytes(b'x')
      raise RuntimeError('verification failed')
  assert os.listdir(tmp_path) == []
  # Over an existing directory (overwrite=True): the old one stays as it was.
  out.mkdir()
  (out / 'old.txt').write_text('old')
  with pytest.raises(RuntimeError):
    with atomic.atomic_directory(str(out), overwrite=True) as tmp:
      (pathlib.Path(tmp) / 'new.txt').write_text('new')
      raise RuntimeError
  assert os.listdir(tmp_path) == ['export'] and os.listdir(out) == ['old.txt']


def test_atomic_directory_swaps_an_existing_directory_only_with_overwrite(tmp_path, private_umask):
  out = tmp_path / 'export'
  out.mkdir()
  (out / 'old.txt').write_text('old')
  entered = []
  with pytest.raises(FileExistsError, match='already exists; pass overwrite=True'):
    with atomic.atomic_directory(str(out)):
      entered.append(1)
  assert not entered and os.listdir(out) == ['old.txt']  # refused before anything was written
  with atomic.atomic_directory(str(out), overwrite=True) as tmp:
    os.makedirs(os.path.join(tmp, 'onnx'))
    with open(os.path.join(tmp, 'onnx', 'model.onnx'), 'w') as f:
      f.write('new')
    assert os.listdir(out) == ['old.txt']  # readers see the old directory until the block ends
  # Swapped, not merged; no temporary or backup left; readable by everyone.
  assert os.listdir(out) == ['onnx'] and os.listdir(tmp_path) == ['export']
  assert (out / 'onnx' / 'model.onnx').read_text() == 'new'
  assert (_mode(out), _mode(out / 'onnx'), _mode(out / 'onnx' / 'model.onnx')) == (
      0o755, 0o755, 0o644)
  # A file where the directory should go is refused even with overwrite.
  (tmp_path / 'file').write_text('x')
  with pytest.raises(FileExistsError, match='already exists'):
    with atomic.atomic_directory(str(tmp_path / 'file'), overwrite=True):
      pass


def test_a_directory_that_appears_while_writing_is_not_replaced(tmp_path):
  out = tmp_path / 'export'
  with pytest.raises(FileExistsError, match='appeared while it was being written'):
    with atomic.atomic_directory(str(out)) as tmp:
      (pathlib.Path(tmp) / 'mine.txt').write_text('mine')
      out.mkdir()  # another writer won the race
      (out / 'theirs.txt').write_text('theirs')
  assert os.listdir(out) == ['theirs.txt'] and os.listdir(tmp_path) == ['export']
