"""Corpus preprocessing at scale: parallel tokenisation into on-disk token shards, and packed reads.

A corpus (local files or a hub-style dataset) is cut into contiguous *units* (`documents.py`: a byte
range of at most 32 MiB of a .txt file at a paragraph boundary, or one json/parquet file), each
tokenised by one worker process into one shard: `shard-00000.npy`, the 1-D token stream of its
documents, each non-empty document followed by one [SEP] (uint16 when the vocabulary fits, else
int32), plus its token counts. A
`manifest.json` lists the shards (documents, tokens, sha256) and is the "done" marker; `SHA256SUMS`
(`storage/integrity.py`), written right after it, covers every file a reader opens (the shards,
`counts.npy`, the manifest), and `PackedDataset` checks them before it serves a row: a truncated or
altered shard is refused (`CorruptFileError`, naming the file and the `rm` that rebuilds it), not
trained on. A verified file is remembered by size, inode, mtime and ctime (`.sha256-verified`), so
a run re-opening an unchanged cache does not read it all again. A build that runs out of space
raises `DiskFullError` (directory, space needed) and keeps its finished shards.
`PackedDataset` memory-maps the shards and cuts windows on read: row i is
`[CLS] s[i*W:(i+1)*W] [SEP]` (W = T-2) over the concatenated stream s without its final [SEP], the
last row padded. These are
exactly the rows of a single-process packing (units are split where a whole-corpus split would split
anyway, and a window may straddle shards), and the cache is independent of `max_seq_length`.

Scale: peak RSS is one unit per worker (not the corpus); all cores tokenise (`num_proc`); a killed
build resumes at the first unfinished shard; the cache lives outside the workdir
(`$FLAXDISTIL_CACHE` or `~/.cache/flaxdistil`), keyed by the inputs and the tokenizer, so runs share
it. Writes are atomic (tmp + os.replace) and an flock serialises concurrent builders of one key
(shards are deterministic, so builders on file systems without flock still write identical bytes).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from typing import Sequence

import numpy as np

from flaxdistil.data import documents
from flaxdistil.data import progress
from flaxdistil.data.documents import Unit
from flaxdistil.storage import atomic
from flaxdistil.storage import integrity
from flaxdistil.storage import space

_CACHE_VERSION = 2    # bump when the shard layout or document splitting changes
log = logging.getLogger(__name__)


def default_cache_dir() -> str:
  """`$FLAXDISTIL_CACHE`, else `~/.cache/flaxdistil`: shared by every workdir of this user."""
  return os.environ.get('FLAXDISTIL_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                            'flaxdistil')


def tokenizer_hash(tokenizer) -> str:
  """sha256 hex digest of the serialized Rust tokenizer (vocab, normalizer, special tokens)."""
  return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


# ----------------------------------------------------------------------------------------- tokenise
def backend(tokenizer):
  """A copy of the Rust tokenizer with truncation/padding off so no document is cut.

  Returns:
    A `tokenizers.Tokenizer` built from `tokenizer.backend_tokenizer` (a fast HF tokenizer).
  """
  from tokenizers import Tokenizer
  out = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
  out.no_truncation()
  out.no_padding()
  return out


def tokenize_documents(texts: list[str], tok_backend) -> list[np.ndarray]:
  """Batched Rust tokenization (parallel over documents), no special tokens.

  Args:
    texts: the documents.
    tok_backend: a `tokenizers.Tokenizer` from `backend` (no truncation or padding).

  Returns:
    One `[num_tokens] int32` id array per document (empty for an empty document).
  """
  encodings = tok_backend.encode_batch_fast(texts, add_special_tokens=False)
  return [np.asarray(e.ids, dtype=np.int32) for e in encodings]


def concat_documents(docs, sep_id: int) -> np.ndarray:
  """Documents joined with one [SEP] after each non-empty document.

  Args:
    docs: 1-D id arrays (`tokenize_documents`).
    sep_id: the tokenizer's [SEP] id.

  Returns:
    `[n] int32`: the stream, empty when every document is empty.
  """
  sep = np.array([sep_id], np.int32)
  parts = []
  for d in docs:
    if len(d):
      parts += [d, sep]
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def wrap_windows(flat: np.ndarray, max_seq_length: int, cls_id: int, sep_id: int,
                 pad_id: int) -> np.ndarray:
  """Cuts a token stream into rows `[CLS] w [SEP]` of T = `max_seq_length` tokens.

  Args:
    flat: `[n]` token ids (the stream without its final [SEP]).
    max_seq_length: T; each row holds T - 2 stream tokens.
    cls_id / sep_id / pad_id: the tokenizer's special ids.

  Returns:
    `[ceil(n / (T - 2)), T] int32`; a partial last row is `[CLS] w [SEP] PAD ...`.
  """
  width = max_seq_length - 2
  n = len(flat)
  rows = -(-n // width)
  body = np.full((rows * width,), pad_id, np.int32)
  body[:n] = flat
  out = np.empty((rows, max_seq_length), np.int32)
  out[:, 0] = cls_id
  out[:, 1:-1] = body.reshape(rows, width)
  out[:, -1] = sep_id
  rest = n - (rows - 1) * width
  if rows and rest < width:  # last partial window: [SEP] right after its tokens, then padding
    out[-1, 1 + rest] = sep_id
    out[-1, 2 + rest:] = pad_id
  return out


class _PlainWrites:
  """A file seen through `write` alone, so that `np.save` writes chunks with `write` (a full disk
  raises OSError(ENOSPC)) instead of `ndarray.tofile` (an errno-less "N requested and M
  written")."""

  def __init__(self, f):
    self.write = f.write


def _atomic_save(path: str, array: np.ndarray) -> None:
  with atomic.atomic_file(path) as fh:
    np.save(_PlainWrites(fh), array)


_WORKER: dict = {}


def _peak_rss_mb() -> float | None:
  """This process's peak resident memory (VmHWM: per address space, so not the pre-exec fork's)."""
  with contextlib.suppress(OSError, ValueError, StopIteration):
    with open('/proc/self/status') as f:
      return int(next(l for l in f if l.startswith('VmHWM:')).split()[1]) / 1024
  return None


def _init_worker(tokenizer_json: str) -> None:
  # One Rust thread per worker process: the pool, not rayon, spreads the work over the cores.
  os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  from tokenizers import Tokenizer
  tok = Tokenizer.from_str(tokenizer_json)
  tok.no_truncation()
  tok.no_padding()
  _WORKER['backend'] = tok


@contextlib.contextmanager
def _spawn_without_main():
  """Spawned workers need only this module: hide the caller's script from multiprocessing so they
  do not re-run it (an unguarded script would recurse, one read from stdin cannot be re-read)."""
  main = sys.modules.get('__main__')
  saved = {k: main.__dict__[k] for k in ('__file__', '__spec__') if main and k in main.__dict__}
  if '__file__' in saved:
    del main.__file__
  if '__spec__' in saved:
    main.__spec__ = None
  try:
    yield
  finally:
    if main is not None:
      main.__dict__.update(saved)


def _build_shard(out_dir: str, index: int, unit: Unit, sep_id: int, vocab_size: int,
                 max_documents: int | None = None, tok_backend=None) -> dict:
  """Tokenises `unit` into `shard-{index}.npy`, its counts, (last) its .json; returns the json."""
  tok_backend = tok_backend or _WORKER['backend']
  dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  parts, num_docs = [], 0
  for texts in documents.unit_documents(unit):
    if max_documents is not None:
      texts = texts[:max_documents - num_docs]
    num_docs += len(texts)
    parts.append(concat_documents(tokenize_documents(texts, tok_backend), sep_id).astype(dtype))
    if max_documents is not None and num_docs >= max_documents:
      break
  tokens = np.concatenate(parts) if parts else np.zeros((0,), dtype)
  del parts
  name = f'shard-{index:05d}'
  _atomic_save(os.path.join(out_dir, name + '.npy'), tokens)
  counts = np.bincount(tokens, minlength=vocab_size).astype(np.int64)
  _atomic_save(os.path.join(out_dir, name + '.counts.npy'), counts)
  meta = {'file': name + '.npy', 'unit': dataclasses.asdict(unit), 'num_documents': num_docs,
          'num_tokens': int(len(tokens)), 'sha256': hashlib.sha256(tokens.tobytes()).hexdigest(),
          # of the whole .npy file (header too), for SHA256SUMS; hashed here, in parallel
          'file_sha256': integrity.sha256_file(os.path.join(out_dir, name + '.npy')),
          'peak_rss_mb': _peak_rss_mb()}
  atomic.write_json(os.path.join(out_dir, name + '.json'), meta)
  return meta


# ----------------------------------------------------------------------------------------- cache
def _source_key(units: Sequence[Unit]) -> list:
  files = list(dict.fromkeys(u.path for u in units))  # in corpus order: the order is content
  stat = lambda f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] if os.path.exists(f) else None
  return [[os.path.abspath(f) if os.path.exists(f) else f, stat(f)] for f in files] + [
      [u.builder, u.column] for u in units[:1]]


def cache_key(source_units: Sequence[Unit], tokenizer, max_documents: int | None = None) -> str:
  """The token cache's key: what the shards depend on, not how the corpus is cut into units.

  Args:
    source_units: the corpus's units (only their files, in order, and the first unit's builder
      and column are used).
    tokenizer: a fast HF tokenizer (`tokenizer_hash`).
    max_documents: the document limit, part of the key.

  Returns:
    20 hex chars of the sha256 over (layout version, absolute file paths / sizes / mtimes,
    reader, tokenizer hash, max_documents).
  """
  key = json.dumps([_CACHE_VERSION, _source_key(source_units), tokenizer_hash(tokenizer),
                    max_documents])
  return hashlib.sha256(key.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: str):
  with open(path, 'a+') as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)  # waits while another process builds this key
    try:
      yield
    finally:
      fcntl.flock(fh, fcntl.LOCK_UN)


def build_token_shards(units: Sequence[Unit], tokenizer, cache_dir: str, *, num_proc: int = 0,
                       max_documents: int | None = None) -> str:
  """Tokenises `units` into `<cache_dir>/tokens-<key>/` (once); returns that directory.

  `num_proc` worker processes (0 = all CPUs; 1 = in this process) each tokenise whole units, so peak
  RSS is about one unit's text and tokens per worker. Shards already finished by an interrupted
  build are kept (resume); `manifest.json` is written last. `max_documents` keeps the first
  documents in corpus order (built serially).

  Args:
    units: the corpus in order (`documents.file_units` / `documents.dataset_units`).
    tokenizer: a fast HF tokenizer with a [SEP] token.
    cache_dir: parent directory of the cache (`default_cache_dir()`).
    num_proc: worker processes; 0 = the CPUs this process may run on. A single process is used
      anyway with `max_documents` or when at most one shard is left to build.
    max_documents: keep only the first documents; None = all.

  Returns:
    The cache directory `<cache_dir>/tokens-<cache_key>` (it holds `manifest.json`).

  Raises:
    ValueError: no units, an empty corpus (no tokens at all), bad UTF-8 (checked before any
      work for text/json files) or a missing text column (from the worker that hit it).
  """
  units = list(units)
  if not units:
    raise ValueError('No data files given; pass at least one .txt/.json/.jsonl/.parquet file.')
  out_dir = os.path.join(cache_dir, f'tokens-{cache_key(units, tokenizer, max_documents)}')
  if _complete(out_dir):
    return out_dir
  needed = lambda: _space_needed(out_dir, units, len(tokenizer))
  with space.reporting_disk_full(
      cache_dir, f'the token cache {os.path.basename(out_dir)}', needed,
      'rerun the same command: the shards already built are kept and the build goes on from the '
      'first missing one.'):
    os.makedirs(out_dir, exist_ok=True)
    with _locked(out_dir + '.lock'):
      if _complete(out_dir):  # another process built it while we waited
        return out_dir
      _build_locked(units, tokenizer, out_dir, num_proc, max_documents)
  return out_dir


def _complete(out_dir: str) -> bool:
  """A finished cache: its manifest, and the `SHA256SUMS` written after it (if it names one)."""
  path = os.path.join(out_dir, 'manifest.json')
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      checksums = json.load(f).get('checksums')
  except ValueError:  # damaged: PackedDataset reports it with the fix
    return True
  return not checksums or os.path.exists(os.path.join(out_dir, checksums))


def _space_needed(out_dir: str, units: Sequence[Unit], vocab_size: int) -> int:
  """About how many bytes the unbuilt shards of `out_dir` still need.

  Token bytes per text byte from the shards built so far, else 0.5 (2-byte ids, ~4 characters
  per WordPiece token); plus the per-shard token counts (8 bytes per vocabulary entry).
  """
  size = lambda u: (u.end if u.end >= 0 else os.path.getsize(u.path)) - u.start if (
      os.path.isfile(u.path)) else 0
  built, text_built, text_left, left = 0, 0, 0, 0
  for i, u in enumerate(units):
    shard = os.path.join(out_dir, f'shard-{i:05d}.npy')
    if os.path.exists(os.path.join(out_dir, f'shard-{i:05d}.json')):
      built += os.path.getsize(shard) if os.path.exists(shard) else 0
      text_built += size(u)
    else:
      text_left += size(u)
      left += 1
  ratio = built / text_built if built and text_built else 0.5
  return int(text_left * ratio) + (left + 1) * vocab_size * 8


def _build_locked(units: list[Unit], tokenizer, out_dir: str, num_proc: int,
                  max_documents: int | None) -> None:
  """The build of `build_token_shards`, holding the key's lock."""
  manifest_path = os.path.join(out_dir, 'manifest.json')
  start = time.time()
  plan_path = os.path.join(out_dir, 'plan.json')
  plan = [dataclasses.asdict(u) for u in units]
  if not os.path.exists(plan_path) or json.load(open(plan_path)) != plan:
    for f in os.listdir(out_dir):  # another unit split: earlier shards do not line up
      if f.startswith('shard-'):
        os.remove(os.path.join(out_dir, f))
    atomic.write_json(plan_path, plan)
  done = {}
  for i in range(len(units)):
    meta_path = os.path.join(out_dir, f'shard-{i:05d}.json')
    if os.path.exists(meta_path):
      done[i] = json.load(open(meta_path))
  todo = [i for i in range(len(units)) if i not in done]
  # A bad file fails before any work (~1 s/GB), not when a worker reaches it.
  for path in dict.fromkeys(units[i].path for i in todo if units[i].builder in ('text', 'json')):
    if os.path.isfile(path):
      documents.check_utf8(path)
  if done:
    log.info('Resuming token cache %s: %d/%d shards already built', out_dir, len(done), len(units))
  sep_id, vocab_size = tokenizer.sep_token_id, len(tokenizer)
  num_proc = num_proc or len(os.sched_getaffinity(0))
  bar = progress.progress_bar(len(units), 'tokenise', 'unit', initial=len(done))
  try:
    if max_documents is not None or num_proc == 1 or len(todo) <= 1:
      tok_backend, left = backend(tokenizer), max_documents
      for i in range(len(units)):
        if left is not None and left <= 0:
          break
        if i in todo:
          done[i] = _build_shard(out_dir, i, units[i], sep_id, vocab_size, left, tok_backend)
          bar.update(1)
        left = None if left is None else left - done[i]['num_documents']
    else:
      ctx = multiprocessing.get_context('spawn')  # no fork: the parent may hold jax/XLA threads
      with concurrent.futures.ProcessPoolExecutor(
          min(num_proc, len(todo)), mp_context=ctx, initializer=_init_worker,
          initargs=(tokenizer.backend_tokenizer.to_str(),)) as pool:
        with _spawn_without_main():  # workers start at the first submit
          futures = {pool.submit(_build_shard, out_dir, i, units[i], sep_id, vocab_size): i
                     for i in todo}
        try:
          for fut in concurrent.futures.as_completed(futures):
            done[futures[fut]] = fut.result()
            bar.update(1)
        except BaseException:
          pool.shutdown(cancel_futures=True)  # report a bad file now, not after the whole corpus
          raise
  finally:
    bar.close()
  shards = [done[i] for i in sorted(done)]
  total = sum(s['num_tokens'] for s in shards)
  if total == 0:
    raise ValueError(f'Empty dataset: no tokens after tokenizing {sorted({u.path for u in units})} '
                     f'({sum(s["num_documents"] for s in shards)} documents); check that the files '
                     'contain text (and max_documents > 0).')
  counts = sum(np.load(os.path.join(out_dir, s['file'][:-4] + '.counts.npy')) for s in shards)
  _atomic_save(os.path.join(out_dir, 'counts.npy'), counts)
  data_hash = hashlib.sha256()  # of the whole stream as int32, so independent of the unit split
  for s in shards:
    tokens = np.load(os.path.join(out_dir, s['file']), mmap_mode='r')
    if hashlib.sha256(np.ascontiguousarray(tokens)).hexdigest() != s['sha256']:
      # a shard of an interrupted build changed before this resumed build got to it
      for f in (s['file'], s['file'][:-4] + '.json', s['file'][:-4] + '.counts.npy'):
        with contextlib.suppress(FileNotFoundError):
          os.remove(os.path.join(out_dir, f))
      raise integrity.CorruptFileError(
          os.path.join(out_dir, s['file']), 'was damaged after it was built (its tokens do not '
          'match the sha256 of its .json)', 'It was removed: rerun the same command to build '
          'it again.')
    for i in range(0, len(tokens), 1 << 24):
      data_hash.update(np.ascontiguousarray(tokens[i:i + (1 << 24)], np.int32).tobytes())
  data_hash = data_hash.hexdigest()
  manifest = {'version': _CACHE_VERSION, 'tokenizer_sha256': tokenizer_hash(tokenizer),
              'vocab_size': vocab_size, 'sep_token_id': sep_id, 'shards': shards,
              'num_documents': sum(s['num_documents'] for s in shards), 'num_tokens': total,
              'tokens_sha256': data_hash, 'build_seconds': round(time.time() - start, 2),
              'num_proc': num_proc, 'checksums': integrity.SUMS_FILE}
  atomic.write_json(manifest_path, manifest)
  integrity.write_sums(out_dir, [s['file'] for s in shards] + ['counts.npy', 'manifest.json'],
                       known={s['file']: s.get('file_sha256') for s in shards})
  log.info('Tokenised %d documents (%d tokens) into %d shards with %d processes in %.1fs: %s',
           manifest['num_documents'], total, len(shards), num_proc, time.time() - start, out_dir)


# ----------------------------------------------------------------------------------------- reading
class PackedDataset:
  """Read-only `[N, max_seq_length] int32` view of a token cache, rows cut on read (memory-mapped).

  Row i = `[CLS] s[i*W:(i+1)*W] [SEP]` with W = max_seq_length - 2 and s the concatenated shard
  streams minus the final [SEP]; the last row is `[CLS] rest [SEP] PAD...` (identical to
  `wrap_windows(s)`). Supports `len`, `.shape`, `.dtype`, `.ndim`, `x[i]`, `x[a:b]`, `x[int_array]`
  (returns numpy int32) and `np.asarray(x)` (materialises all rows: small sets only). Only the rows
  asked for are read from disk. `fingerprint` is a stable content id (tokenizer, max_seq_length,
  token data hash); `token_counts()` the `[vocab_size] int64` counts of the stream.

  Args:
    directory: a token cache written by `build_token_shards`.
    max_seq_length: T, the row length (>= 8).
    cls_id / sep_id / pad_id: the tokenizer's special ids.

  Raises:
    ValueError: `max_seq_length < 8`.
    FileNotFoundError: `directory` has no `manifest.json`.
    CorruptFileError: a shard, `counts.npy` or the manifest fails `SHA256SUMS` (`verify_cache`).
  """

  def __init__(self, directory: str, max_seq_length: int, *, cls_id: int, sep_id: int, pad_id: int):
    if max_seq_length < 8:
      raise ValueError(f'max_seq_length={max_seq_length} is too small; use >= 8 (typically 128 or 512).')
    self.manifest = verify_cache(directory)
    self.directory, self.max_seq_length = directory, max_seq_length
    self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
    shards = [s for s in self.manifest['shards'] if s['num_tokens']]
    self._arrays = [np.load(os.path.join(directory, s['file']), mmap_mode='r') for s in shards]
    self._starts = np.cumsum([0] + [s['num_tokens'] for s in shards]).astype(np.int64)
    self.num_tokens = int(self._starts[-1]) - 1  # the last document's [SEP] comes from the window
    self._width = max_seq_length - 2
    self._rows = -(-self.num_tokens // self._width)
    self.fingerprint = hashlib.sha256(json.dumps(
        [self.manifest['version'], self.manifest['tokenizer_sha256'], max_seq_length,
         self.manifest['tokens_sha256'], self.num_tokens, cls_id, sep_id, pad_id]).encode()
    ).hexdigest()[:32]

  shape = property(lambda self: (self._rows, self.max_seq_length))
  dtype = np.dtype(np.int32)
  ndim = 2

  def __len__(self) -> int:
    return self._rows

  def token_counts(self) -> np.ndarray:
    """`[vocab_size] int64` occurrences of each id in the stream (with the documents' [SEP]s)."""
    return np.load(os.path.join(self.directory, 'counts.npy'))

  def _gather(self, pos: np.ndarray) -> np.ndarray:
    """Token ids at global stream positions `pos` ([P] int64, all < num_tokens) as int32."""
    out = np.empty(pos.shape, np.int32)
    shard = np.searchsorted(self._starts, pos, side='right') - 1
    order = np.argsort(shard, kind='stable')  # group by shard: one fancy read per shard touched
    bounds = np.searchsorted(shard[order], np.arange(len(self._arrays) + 1))
    for s in np.flatnonzero(np.diff(bounds)):
      sel = order[bounds[s]:bounds[s + 1]]
      out[sel] = self._arrays[s][pos[sel] - self._starts[s]]
    return out

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, slice):
      return self[np.arange(*index.indices(self._rows))]
    idx = np.asarray(index, np.int64)
    if idx.ndim == 0:
      return self[idx[None]][0]
    if idx.size and (idx.min() < -self._rows or idx.max() >= self._rows):
      raise IndexError(f'row index out of range [0, {self._rows})')
    idx = np.where(idx < 0, idx + self._rows, idx)
    pos = idx[..., None] * self._width + np.arange(self._width)   # [..., W]
    valid = pos < self.num_tokens
    body = np.full(pos.shape, self.pad_id, np.int32)
    body[valid] = self._gather(pos[valid])
    out = np.empty(idx.shape + (self.max_seq_length,), np.int32)
    out[..., 0], out[..., 1:-1], out[..., -1] = self.cls_id, body, self.sep_id
    n_valid = valid.sum(-1)
    partial = np.nonzero(n_valid < self._width)  # the last row: [SEP] after its tokens, then pad
    out[partial + (-1,)] = self.pad_id
    out[partial + (1 + n_valid[partial],)] = self.sep_id
    return out

  def __array__(self, dtype=None, copy=None):
    out = self[np.arange(self._rows)]
    return out if dtype is None else out.astype(dtype)


def _cache_fix(directory: str):
  """`name -> fix` of a damaged token cache file: what to delete so that a rerun rebuilds it."""
  directory = os.path.abspath(directory)

  def fix(name: str) -> str:
    if name.startswith('shard-') and name.endswith('.npy'):
      base = os.path.join(directory, name[:-4])
      return (f'Delete it and the manifest, then rerun the same command: that shard alone is '
              f'tokenised again (rm {base}.npy {base}.json {base}.counts.npy '
              f'{os.path.join(directory, "manifest.json")}), or rm -r {directory} to rebuild all.')
    manifest, counts = (os.path.join(directory, f) for f in ('manifest.json', 'counts.npy'))
    return (f'Delete the manifest and rerun the same command: it is written again from the shards '
            f'(rm {manifest} {counts}), or rm -r {directory} to rebuild all.')
  return fix


def verify_cache(directory: str) -> dict:
  """Checks a token cache before it is read; returns its manifest.

  A cache with `SHA256SUMS` is checked against it (`integrity.verify`, remembering verified
  files: an unchanged cache is not read again). One built before checksums existed is checked
  against the per-shard sha256 of its manifest (tokens, dtype, length), every time.

  Args:
    directory: a token cache (`build_token_shards`).

  Returns:
    The parsed `manifest.json`.

  Raises:
    FileNotFoundError: no `manifest.json`.
    CorruptFileError: a file is missing, truncated or altered, or the manifest is not JSON; the
      message names the file and the `rm` after which a rerun rebuilds it.
  """
  fix = _cache_fix(directory)
  path = os.path.join(directory, 'manifest.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{directory} is not a token cache: it has no manifest.json.')
  summed = integrity.read_sums(directory) is not None
  if summed:
    integrity.verify(directory, fix, stamps=True, what='token cache file')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except ValueError:
    raise integrity.CorruptFileError(os.path.abspath(path), 'is not valid JSON',
                                     fix('manifest.json')) from None
  if manifest.get('checksums'):
    if not summed:
      integrity.verify(directory, fix)  # raises: SHA256SUMS missing
    return manifest
  for shard in manifest['shards']:  # built before SHA256SUMS: the tokens' own sha256
    file = os.path.abspath(os.path.join(directory, shard['file']))
    try:
      tokens = np.load(file, mmap_mode='r')
      ok = (tokens.dtype in (np.dtype(np.uint16), np.dtype(np.int32)) and tokens.ndim == 1
            and len(tokens) == shard['num_tokens']
            and hashlib.sha256(np.ascontiguousarray(tokens)).hexdigest() == shard['sha256'])
    except (OSError, ValueError) as e:
      if isinstance(e, FileNotFoundError):
        raise integrity.CorruptFileError(file, 'is missing', fix(shard['file'])) from None
      ok = False
    if not ok:
      raise integrity.CorruptFileError(
          file, 'is corrupt: its tokens do not match the sha256 (or length) recorded in '
          'manifest.json when it was built (it was truncated or changed since)', fix(shard['file']))
  return manifest


def open_packed(units: Sequence[Unit], tokenizer, max_seq_length: int, *, cache_dir: str,
                num_proc: int = 0, max_documents: int | None = None) -> PackedDataset:
  """Builds the token cache if missing (`build_token_shards`) and opens it.

  Args:
    units: the corpus in order.
    tokenizer: a fast HF tokenizer with [CLS], [SEP] and [PAD].
    max_seq_length: T, the row length.
    cache_dir / num_proc / max_documents: as `build_token_shards`.

  Returns:
    The `PackedDataset` of `[N, max_seq_length]` int32 rows.

  Raises:
    ValueError: `max_seq_length < 8`, or what `build_token_shards` raises.
  """
  if max_seq_length < 8:
    raise ValueError(f'max_seq_length={max_seq_length} is too small; use >= 8 (typically 128 or 512).')
  directory = build_token_shards(units, tokenizer, cache_dir, num_proc=num_proc,
                                 max_documents=max_documents)
  return PackedDataset(directory, max_seq_length, cls_id=tokenizer.cls_token_id,
                       sep_id=tokenizer.sep_token_id, pad_id=tokenizer.pad_token_id)
