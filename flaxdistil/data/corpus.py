"""Corpus preprocessing at scale: parallel tokenisation into on-disk token shards, and packed reads.

A corpus (local files or a hub-style dataset) is cut into contiguous *units* (a byte range of at most
32 MB of a .txt file at a paragraph boundary, or one json/parquet file), each tokenised by one worker
process into one shard: `shard-00000.npy`, the 1-D token stream of its documents, each non-empty document
followed by one [SEP] (uint16 when the vocabulary fits, else int32), plus its token counts. A
`manifest.json` written last lists the shards (documents, tokens, sha256) and is the "done" marker.
`PackedDataset` memory-maps the shards and cuts windows on read: row i is `[CLS] s[i*W:(i+1)*W] [SEP]`
(W = T-2) over the concatenated stream s without its final [SEP], the last row padded. These are
exactly the rows of a single-process packing (units are split where a whole-corpus split would split
anyway, and a window may straddle shards), and the cache is independent of `max_seq_length`.

Scale: peak RSS is one unit per worker (not the corpus); all cores tokenise (`num_proc`); a killed
build resumes at the first unfinished shard; the cache lives outside the workdir
(`$FLAXDISTIL_CACHE` or `~/.cache/flaxdistil`), keyed by the inputs and the tokenizer, so runs share
it. Writes are atomic (tmp + os.replace) and an flock serialises concurrent builders of one key
(shards are deterministic, so builders on file systems without flock still write identical bytes).
"""
from __future__ import annotations

import codecs
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
import tempfile
import time
from typing import Iterator, Sequence

import numpy as np

from flaxdistil.storage import atomic

_CACHE_VERSION = 2    # bump when the shard layout or document splitting changes
_BUILDERS = {'.txt': 'text', '.text': 'text', '.json': 'json', '.jsonl': 'json', '.parquet': 'parquet'}
_TOKENIZE_BATCH = 1000  # documents per encode_batch call
MAX_UNIT_BYTES = 32 << 20  # text bytes per unit (= shard) at most: bounds each worker's memory
MIN_UNIT_BYTES = 1 << 20   # small corpora are still cut into ~8 units per CPU for load balance
log = logging.getLogger(__name__)


def default_cache_dir() -> str:
  """`$FLAXDISTIL_CACHE`, else `~/.cache/flaxdistil`: shared by every workdir of this user."""
  return os.environ.get('FLAXDISTIL_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                            'flaxdistil')


def tokenizer_hash(tokenizer) -> str:
  """sha256 of the serialized Rust tokenizer (vocab, normalizer/lowercasing, special tokens)."""
  return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


# ----------------------------------------------------------------------------------------- inputs
def builder_for(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in _BUILDERS:
    raise ValueError(f'Unsupported data file extension {ext!r} for {path}; use one of '
                     f'{sorted(_BUILDERS)} (text: one paragraph per line, blank line between documents; '
                     'json/parquet: a "text" column).')
  return _BUILDERS[ext]


def check_files(files: Sequence[str]) -> list[str]:
  """Absolute-or-relative paths as given; raises FileNotFoundError listing every missing file."""
  if isinstance(files, (str, os.PathLike)):
    files = [files]
  files = [os.fspath(f) for f in files]
  if not files:
    raise ValueError('No data files given; pass at least one .txt/.json/.jsonl/.parquet file.')
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise FileNotFoundError(f'Data file(s) not found: {missing}; fix the paths (relative paths are '
                            f'resolved against {os.getcwd()}).')
  list(map(builder_for, files))  # unsupported extensions fail before any work
  return files


@dataclasses.dataclass(frozen=True)
class Unit:
  """A contiguous piece of the corpus: documents of `path` (bytes [start, end) for builder 'text')."""
  path: str
  builder: str        # 'text' = blank-line paragraphs; else a datasets builder ('json', 'parquet', ...)
  column: str = 'text'
  start: int = 0
  end: int = -1


def _next_cut(f, pos: int, size: int) -> int | None:
  """First byte offset >= pos where the file can be split without changing its paragraphs."""
  while pos < size:
    f.seek(pos)
    window = f.read(1 << 20)
    i = window.find(b'\n\n', 1)
    while i > 0:
      j = i
      while j < len(window) and window[j] == 10:
        j += 1
      if j == len(window):  # the run may go on past the window: look again from its start
        break
      if window[i - 1] not in (10, 13):  # whole run seen, not part of a CRLF blank line
        return pos + j - (j - i) % 2
      i = window.find(b'\n\n', j)
    if pos + len(window) >= size:
      return None
    pos += i - 1 if i > 1 else len(window) - 2  # 2 bytes overlap: a run across windows is seen
  return None


def _paragraph_cuts(path: str, unit_bytes: int) -> list[int]:
  """Byte offsets near multiples of `unit_bytes` where splitting the file splits no paragraph.

  The old (datasets `sample_by='paragraph'`) reader splits the whole text on '\\n\\n' left to right,
  so in a run of k newlines it cuts after each pair; a cut is placed at the end of a run (k even) or
  one newline before (k odd), never after a '\\r' (CRLF blank lines are never cut), so both halves
  split into exactly the paragraphs of the whole file.
  """
  size = os.path.getsize(path)
  cuts = [0]
  with open(path, 'rb') as f:
    cut = _next_cut(f, unit_bytes, size)
    while cut is not None and cut < size:
      cuts.append(cut)
      cut = _next_cut(f, cut + unit_bytes, size)
  return cuts + [size]


def file_units(files: Sequence[str], *, text_column: str = 'text',
               unit_bytes: int | None = None) -> list[Unit]:
  """Units for local files in order (.txt split at paragraph boundaries, others one per file).

  `unit_bytes` None: total size / (8 * CPUs), clipped to [1 MiB, 32 MiB]. Rows never depend on it.
  """
  files = check_files(files)
  if unit_bytes is None:
    total = sum(os.path.getsize(f) for f in files)
    unit_bytes = min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, total // (8 * (os.cpu_count() or 1))))
  units = []
  for f in files:
    b = builder_for(f)
    if b == 'text':
      cuts = _paragraph_cuts(f, unit_bytes)
      units += [Unit(f, b, text_column, s, e) for s, e in zip(cuts[:-1], cuts[1:])]
    else:
      units.append(Unit(f, b, text_column))
  return units


def dataset_units(name_or_dir: str, split: str = 'train', text_column: str = 'text') -> list[Unit]:
  """Units for a hub-style dataset (hub name or a local repo directory with data files).

  Files and their order are those `datasets.load_dataset(name_or_dir, split=split)` reads (data files
  resolved by `datasets.load_dataset_builder`; one document = one row, also for .txt = one line, as
  there). Raises ValueError for an unknown split or a dataset without data files (loading scripts).
  """
  import datasets
  try:
    builder = datasets.load_dataset_builder(name_or_dir)
  except Exception as e:  # noqa: BLE001 - FileNotFoundError / DatasetNotFoundError / offline errors
    raise ValueError(f'Cannot resolve dataset {name_or_dir!r} ({e}); pass a hub name (online) or a '
                     'local directory laid out like a hub dataset repo (data/train-*.parquet ...).'
                     ) from e
  data_files = builder.config.data_files or {}
  if split not in data_files:
    raise ValueError(f'Dataset {name_or_dir!r} has no split {split!r} (splits: {sorted(data_files)}); '
                     'set data.dataset_split.')
  return [Unit(str(f), builder.name, text_column) for f in data_files[split]]


def check_utf8(path: str, chunk: int = 16 << 20) -> None:
  """Raises ValueError naming `path` and the byte offset if it is not valid UTF-8 (~1 s per GB)."""
  decoder, offset = codecs.getincrementaldecoder('utf-8')(), 0
  with open(path, 'rb') as f:
    while True:
      data = f.read(chunk)
      try:
        decoder.decode(data, final=not data)
      except UnicodeDecodeError as e:
        raise ValueError(f'{path} is not valid UTF-8 (byte {e.object[e.start]:#04x} near offset '
                         f'{offset + e.start}); re-encode it as UTF-8, e.g. '
                         f'`iconv -f latin1 -t utf-8 {path} > fixed.txt`.') from None
      if not data:
        return
      offset += len(data)


def _has_text(path: str) -> bool:
  """False for empty / whitespace-only files (checked in O(first non-blank byte))."""
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      if chunk.strip():
        return True
  return False


def unit_documents(unit: Unit, hf_cache: str | None = None) -> Iterator[list[str]]:
  """Batches of document strings of one unit, in corpus order.

  Raises ValueError for non-UTF-8 text (file and byte offset named) or a missing text column.
  """
  if unit.builder == 'text' and unit.end >= 0:
    with open(unit.path, 'rb') as f:
      f.seek(unit.start)
      data = f.read(unit.end - unit.start)
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError as e:
      raise ValueError(f'{unit.path} is not valid UTF-8 (byte {data[e.start]:#04x} near offset '
                       f'{unit.start + e.start}); re-encode it as UTF-8, e.g. '
                       f'`iconv -f latin1 -t utf-8 {unit.path} > fixed.txt`.') from None
    del data
    docs = [d for d in text.replace('\r\n', '\n').replace('\r', '\n').split('\n\n') if d]
    del text  # universal newlines + '\n\n' split + empty pieces dropped = datasets' paragraph reader
    for i in range(0, len(docs), _TOKENIZE_BATCH):
      yield docs[i:i + _TOKENIZE_BATCH]
    return
  if os.path.isfile(unit.path) and not _has_text(unit.path):
    return  # datasets' readers raise on files without any text
  import datasets
  datasets.disable_progress_bars()
  own = None if hf_cache else tempfile.TemporaryDirectory(prefix='flaxdistil_hf_')
  try:
    ds = datasets.load_dataset(unit.builder, data_files=[unit.path], split='train', streaming=True,
                               cache_dir=hf_cache or own.name)
    names = ds.column_names
    if names is not None and unit.column not in names:
      raise ValueError(f'{unit.path} has no "{unit.column}" column (columns: {names}); rename the '
                       'document column or set data.text_column.')
    for batch in ds.iter(batch_size=_TOKENIZE_BATCH):
      yield [t or '' for t in batch[unit.column]]
  except Exception as e:  # datasets wraps reader errors in DatasetGenerationError
    cause = e
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
      cause = cause.__cause__ or cause.__context__
    if cause is not None:
      raise ValueError(f'{unit.path} is not valid UTF-8 ({cause}); re-encode it as UTF-8.') from e
    raise
  finally:
    if own is not None:
      own.cleanup()


# ----------------------------------------------------------------------------------------- tokenise
def backend(tokenizer):
  """A copy of the Rust tokenizer with truncation/padding off so no document is cut."""
  from tokenizers import Tokenizer
  out = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
  out.no_truncation()
  out.no_padding()
  return out


def tokenize_documents(texts: list[str], tok_backend) -> list[np.ndarray]:
  """Batched Rust tokenization (parallel over documents), no special tokens; int32 id arrays."""
  encodings = tok_backend.encode_batch_fast(texts, add_special_tokens=False)
  return [np.asarray(e.ids, dtype=np.int32) for e in encodings]


def concat_documents(docs, sep_id: int) -> np.ndarray:
  """Documents joined with one [SEP] after each non-empty document: `[n] int32`."""
  sep = np.array([sep_id], np.int32)
  parts = []
  for d in docs:
    if len(d):
      parts += [d, sep]
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def wrap_windows(flat: np.ndarray, max_seq_length: int, cls_id: int, sep_id: int,
                 pad_id: int) -> np.ndarray:
  """flat [n] ids -> [ceil(n/(T-2)), T] int32 rows `[CLS] w [SEP]`; last `[CLS] w [SEP] PAD..`."""
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


def _atomic_save(path: str, array: np.ndarray) -> None:
  with atomic.atomic_file(path) as fh:
    np.save(fh, array)


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
  """Tokenises one unit into `shard-{index}.npy` (+ counts, + .json written last); returns the json."""
  tok_backend = tok_backend or _WORKER['backend']
  dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  parts, num_docs = [], 0
  for texts in unit_documents(unit):
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
  """Hex digest over (layout version, file paths/sizes/mtimes, reader, tokenizer, max_documents)."""
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
  build are kept (resume); `manifest.json` is written last. `max_documents` keeps the first documents
  in corpus order (built serially). Raises ValueError for an empty corpus (no tokens at all), bad
  UTF-8 or a missing text column (from the worker that hit it).
  """
  units = list(units)
  if not units:
    raise ValueError('No data files given; pass at least one .txt/.json/.jsonl/.parquet file.')
  out_dir = os.path.join(cache_dir, f'tokens-{cache_key(units, tokenizer, max_documents)}')
  manifest_path = os.path.join(out_dir, 'manifest.json')
  if os.path.exists(manifest_path):
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  with _locked(out_dir + '.lock'):
    if os.path.exists(manifest_path):  # another process built it while we waited
      return out_dir
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
        check_utf8(path)
    if done:
      log.info('Resuming token cache %s: %d/%d shards already built', out_dir, len(done), len(units))
    sep_id, vocab_size = tokenizer.sep_token_id, len(tokenizer)
    num_proc = num_proc or len(os.sched_getaffinity(0))
    if max_documents is not None or num_proc == 1 or len(todo) <= 1:
      tok_backend, left = backend(tokenizer), max_documents
      for i in range(len(units)):
        if left is not None and left <= 0:
          break
        if i in todo:
          done[i] = _build_shard(out_dir, i, units[i], sep_id, vocab_size, left, tok_backend)
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
        except BaseException:
          pool.shutdown(cancel_futures=True)  # report a bad file now, not after the whole corpus
          raise
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
      for i in range(0, len(tokens), 1 << 24):
        data_hash.update(np.ascontiguousarray(tokens[i:i + (1 << 24)], np.int32).tobytes())
    data_hash = data_hash.hexdigest()
    manifest = {'version': _CACHE_VERSION, 'tokenizer_sha256': tokenizer_hash(tokenizer),
                'vocab_size': vocab_size, 'sep_token_id': sep_id, 'shards': shards,
                'num_documents': sum(s['num_documents'] for s in shards), 'num_tokens': total,
                'tokens_sha256': data_hash, 'build_seconds': round(time.time() - start, 2),
                'num_proc': num_proc}
    atomic.write_json(manifest_path, manifest)
    log.info('Tokenised %d documents (%d tokens) into %d shards with %d processes in %.1fs: %s',
             manifest['num_documents'], total, len(shards), num_proc, time.time() - start, out_dir)
  return out_dir


# ----------------------------------------------------------------------------------------- reading
class PackedDataset:
  """Read-only `[N, max_seq_length] int32` view of a token cache, rows cut on read (memory-mapped).

  Row i = `[CLS] s[i*W:(i+1)*W] [SEP]` with W = max_seq_length - 2 and s the concatenated shard
  streams minus the final [SEP]; the last row is `[CLS] rest [SEP] PAD...` (identical to
  `wrap_windows(s)`). Supports `len`, `.shape`, `.dtype`, `.ndim`, `x[i]`, `x[a:b]`, `x[int_array]`
  (returns numpy int32) and `np.asarray(x)` (materialises all rows: small sets only). Only the rows
  asked for are read from disk. `fingerprint` is a stable content id (tokenizer, max_seq_length,
  token data hash); `token_counts()` the `[vocab_size] int64` counts of the stream.
  """

  def __init__(self, directory: str, max_seq_length: int, *, cls_id: int, sep_id: int, pad_id: int):
    if max_seq_length < 8:
      raise ValueError(f'max_seq_length={max_seq_length} is too small; use >= 8 (typically 128 or 512).')
    with open(os.path.join(directory, 'manifest.json')) as f:
      self.manifest = json.load(f)
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
    partial = np.nonzero(n_valid < self._width)  # only the last row: [SEP] after its tokens, then pad
    out[partial + (-1,)] = self.pad_id
    out[partial + (1 + n_valid[partial],)] = self.sep_id
    return out

  def __array__(self, dtype=None, copy=None):
    out = self[np.arange(self._rows)]
    return out if dtype is None else out.astype(dtype)


def open_packed(units: Sequence[Unit], tokenizer, max_seq_length: int, *, cache_dir: str,
                num_proc: int = 0, max_documents: int | None = None) -> PackedDataset:
  """Builds the token cache if missing (`build_token_shards`) and returns its `PackedDataset`."""
  if max_seq_length < 8:
    raise ValueError(f'max_seq_length={max_seq_length} is too small; use >= 8 (typically 128 or 512).')
  directory = build_token_shards(units, tokenizer, cache_dir, num_proc=num_proc,
                                 max_documents=max_documents)
  return PackedDataset(directory, max_seq_length, cls_id=tokenizer.cls_token_id,
                       sep_id=tokenizer.sep_token_id, pad_id=tokenizer.pad_token_id)
