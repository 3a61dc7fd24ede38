"""8 host CPU devices for sharding tests (set before jax is imported); shared helpers and fixtures.

Helpers are plain names, imported as `from conftest import ROOT` (pytest puts tests/ on sys.path):
`ROOT` (the repository), `subprocess_env(devices)` (the environment of a command-line test),
`tiny_config(**overrides)` (configs/tiny.py with flattened overrides), `cache_config(**overrides)`
(its teacher-cache variant), `assert_trees_close`, `fake_batch` (packed-looking rows), `MASK_KW`,
`small_filesystem(path, size)` (a real size-limited file system, for disk-full tests) and
`flip_byte(path, offset)`. Fixtures: `tok` (a tiny WordPiece tokenizer) and `built_cache` (a
teacher cache of the tiny run, built once per session).
"""

import contextlib
import os
import subprocess
import tempfile

import numpy as np
import pytest

# LLVM at optimisation level 0 for the CPU programs of tests and their subprocesses: the tests'
# models are tiny, so XLA's compile is most of their time (a tiny train step: 9.9 s at the
# default level, 5.5 s at 0; a cold tiny run 29 -> 21 s, measured once with a training job
# beside it: a rough ratio) and the generated code's speed is not what they test. The level changes how fast the code runs, not what it computes (no fast-math:
# torch parity, sharded == single-device and bit-exact resumes hold as before); runs outside the
# tests keep XLA's default.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Runs' token cache (default ~/.cache/flaxdistil) goes to a per-session temp dir; subprocesses inherit it.
os.environ.setdefault('FLAXDISTIL_CACHE', tempfile.mkdtemp(prefix='flaxdistil_cache_'))
# One compilation of each program per session: JAX's persistent compilation cache in a per-session
# temp dir, every entry kept (the tiny runs' steps compile in ~1 s, under JAX's default 1 s
# threshold). Tests and their subprocesses run the same tiny programs many times (each
# train_and_evaluate jits fresh closures), so compilation is most of a tiny run: a warm cache
# halved the wall time of `configs/tiny.py` here. Values are unchanged (the same executable).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='flaxdistil_jax_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  """Registers the `slow` marker: `pytest -m "not slow"` is the fast tier."""
  config.addinivalue_line('markers', 'slow: real runs, builds or exports in subprocesses '
                          '(minutes); left out of the fast tier `pytest -m "not slow"`')

# The word-level vocabulary of `tok` (test_corpus, test_input_pipeline): ids 0-4 are SPECIALS,
# then WORDS in order ('##s' is a WordPiece suffix, 'café' checks unicode handling).
WORDS = ['the', 'a', 'cat', 'dog', 'sat', 'on', 'mat', 'ran', 'and', 'big', 'small', 'red', 'blue',
         'house', 'tree', 'bird', 'flew', 'over', 'green', 'hill', '.', ',', '##s', 'café']
SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
PAD, UNK, CLS, SEP, MASK = range(5)


def subprocess_env(devices: int, **extra: str) -> dict:
  """This process's environment for a child process with `devices` host CPU devices.

  The tests' own 8 devices (above) are too many for a command line on a 2-core machine; each
  caller says how many it needs (1 for a command that only starts, 2 for a sharded run).
  """
  return dict(os.environ, **{
      'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}', **extra})


def tiny_config(**overrides):
  """configs/tiny.py with `{'group.key': value}` overrides (`update_from_flattened_dict`)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS above)
  c = tiny.get_config()
  c.update_from_flattened_dict(overrides)
  return c


# A 3-step tiny run that logs every step and caches in float32 (exact offline == online checks).
CACHE_RUN = {'log_every_steps': 1, 'num_train_steps': 3, 'eval_every_steps': 0,
             'data.eval_num_sequences': 16, 'teacher.cache_values_dtype': 'float32',
             'teacher.cache_hidden_dtype': 'float32'}


def cache_config(**overrides):
  """`tiny_config` of the teacher-cache tests: `CACHE_RUN`, then `overrides`."""
  return tiny_config(**{**CACHE_RUN, **overrides})


def build_cache(out, workdir, **kw):
  """`(manifest, config)` of `cache_teacher.build` at k = V over the `cache_config` run."""
  from flaxdistil import cache_teacher  # pylint: disable=g-import-not-at-top
  c = cache_config(**{'teacher.cache_top_k': 0})  # k = V
  return cache_teacher.build(c, out, workdir, rows_per_shard=16, batch_size=8, **kw), c


@pytest.fixture(scope='session')
def built_cache(tmp_path_factory):
  """`(root, manifest, config)`: a complete k = V cache in `root/cache`, its run's `root/work`."""
  root = tmp_path_factory.mktemp('cache')
  m, c = build_cache(str(root / 'cache'), str(root / 'work'))
  return root, m, c


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  """Leaf by leaf (the failing one named by its path); rtol=atol=0 for bit-exact."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b), (len(leaves_a), len(leaves_b))
  for (path, x), y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='session')
def tok(tmp_path_factory):
  """A fast BERT WordPiece tokenizer over SPECIALS + WORDS, from a bare vocab.txt directory."""
  from flaxdistil.data import tokenization  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('tok')
  (d / 'vocab.txt').write_text('\n'.join(SPECIALS + WORDS) + '\n')
  return tokenization.load_tokenizer(str(d))


def fake_batch(n, t, vocab, rng):
  """Rows like packed data: [CLS] ... [SEP] with a padded tail on some rows."""
  x = rng.integers(5, vocab, size=(n, t)).astype(np.int32)
  x[:, 0], x[:, -1] = CLS, SEP
  lengths = rng.integers(t // 2, t + 1, size=n)
  for i, l in enumerate(lengths):
    if l < t:
      x[i, l - 1], x[i, l:] = SEP, PAD
  return x


# BERT masking arguments for the `tok` vocabulary (flaxdistil.data.masking.mask_tokens).
MASK_KW = dict(mask_token_id=MASK, special_token_ids=[PAD, UNK, CLS, SEP, MASK])


class SmallFilesystem:
  """A mounted tmpfs of limited size (`small_filesystem`); `resize(bytes)` frees space."""

  def __init__(self, path):
    self.path = str(path)

  def resize(self, size: int) -> None:
    """Remounts with `size` bytes (a larger size is "space freed"); the files stay."""
    subprocess.run(['mount', '-o', f'remount,size={size}', self.path], check=True)

  def used(self) -> int:
    """Bytes in use (whole pages, as the file system counts them)."""
    st = os.statvfs(self.path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextlib.contextmanager
def small_filesystem(path, size: int):
  """A tmpfs of `size` bytes mounted at `path` (created): writes past it fail with ENOSPC.

  A real file system filling up (every library sees the kernel's ENOSPC), not a mock. Mounting
  needs root (CAP_SYS_ADMIN); elsewhere the test is skipped with that reason.
  """
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                     capture_output=True, text=True) if os.geteuid() == 0 else None
  if r is None or r.returncode:
    pytest.skip('a size-limited file system needs root to mount a tmpfs: '
                + (r.stderr.strip() if r is not None else 'not root'))
  try:
    yield SmallFilesystem(path)
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


def flip_byte(path, offset: int = -10) -> None:
  """Flips one bit of the byte at `offset` (negative: from the end) of the file `path`."""
  with open(path, 'r+b') as f:
    f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
    b = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([b[0] ^ 0x01]))
