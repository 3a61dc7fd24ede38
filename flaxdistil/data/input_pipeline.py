"""Input pipeline for MLM distillation: packed rows -> shuffled, masked, host-local batches (numpy).

Flow: `tokenization.load_tokenizer` -> `load_packed` (documents -> token shards on disk,
tokenised in parallel once and cached by `corpus`; packed `[N, T]` int32 windows read on demand)
-> `BatchIterator` (shuffled global batches, masking by `masking.py`, host slicing, prefetch
thread) and `eval_batches` (fixed masked batches). `streaming_batches` packs on the fly without
any cache (corpus order). Nothing here imports jax: the train loop puts the numpy batches on
devices.

Packing matches HF examples/pytorch/language-modeling/run_mlm.py `group_texts` (concatenate, cut
blocks), but each block is `[CLS] w [SEP]`, documents are separated by `[SEP]`, and the last block
is padded instead of dropped.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import tempfile
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from flaxdistil.data import corpus
from flaxdistil.data import documents
from flaxdistil.data import masking

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- packing
def load_packed(files: Sequence[str] = (), tokenizer=None, max_seq_length: int = 128, *,
                cache_dir: str | None = None, dataset: str = '', dataset_split: str = 'train',
                text_column: str = 'text', num_proc: int = 0,
                max_documents: int | None = None) -> corpus.PackedDataset:
  """Tokenises (once, cached, in parallel) and returns the packed, memory-mapped corpus.

  Source: `files` (.txt: a document = a blank-line separated block; .json/.jsonl/.parquet: one row
  per document, column `text_column`) or `dataset` (a hub name or a local directory laid out like a
  hub dataset repo, read as `datasets.load_dataset(dataset, split=dataset_split)[text_column]`).
  Documents are tokenized without special tokens, concatenated with one [SEP] after each document
  except the last, and cut into windows of `max_seq_length - 2` tokens, each stored as
  `[CLS] w [SEP]`; the last partial window is `[CLS] w [SEP]` followed by `pad_token_id`. So long
  lines are split across rows, no token is dropped, and only the last row has padding (same block
  scheme as HF run_mlm.py `group_texts`, which however drops the remainder). The rows do not
  depend on `num_proc` (see `corpus`). The token cache is
  `<cache_dir or corpus.default_cache_dir()>/tokens-<key>/`, keyed by (absolute file paths, sizes,
  mtimes, reader, serialized tokenizer, max_documents), independent of max_seq_length.

  Args:
    files: local data files (used when `dataset` is empty).
    tokenizer: a fast HF tokenizer with [CLS], [SEP] and [PAD] (`tokenization.load_tokenizer`).
    max_seq_length: T, the row length (>= 8).
    cache_dir: token cache parent directory; None = `corpus.default_cache_dir()`.
    dataset / dataset_split: a hub-style dataset and its split, instead of `files`.
    text_column: the document column of json/parquet/dataset files.
    num_proc: tokenising processes (0 = all CPUs).
    max_documents: keep only the first documents; None = all.

  Returns:
    A `corpus.PackedDataset` (`[N, max_seq_length]` int32 rows read from disk on demand).

  Raises:
    FileNotFoundError: missing files (listed).
    ValueError: max_seq_length < 8, unsupported extension, non-UTF-8 file, missing text column,
      unknown dataset/split, no tokens at all.
  """
  if max_seq_length < 8:
    raise ValueError(f'max_seq_length={max_seq_length} is too small; use >= 8 (typically 128 or 512).')
  if dataset:
    units = documents.dataset_units(dataset, dataset_split, text_column)
  else:
    units = documents.file_units(files, text_column=text_column)
  return corpus.open_packed(units, tokenizer, max_seq_length,
                            cache_dir=cache_dir or corpus.default_cache_dir(), num_proc=num_proc,
                            max_documents=max_documents)


def load_packed_dataset(files: list[str], tokenizer, max_seq_length: int, *,
                        cache_dir: str | None, max_documents: int | None = None,
                        **kwargs) -> np.ndarray:
  """`load_packed(...)` materialised in memory: `packed: [N, max_seq_length] int32`.

  For small sets (evaluation, tests).

  Args:
    files / tokenizer / max_seq_length / max_documents: as `load_packed`.
    cache_dir: token cache parent directory; None = a temporary directory, deleted afterwards.
    **kwargs: more `load_packed` arguments (`text_column`, `num_proc`, `dataset`, ...).

  Returns:
    `[N, max_seq_length] int32` numpy array of all rows.

  Raises:
    FileNotFoundError / ValueError: as `load_packed`.
  """
  with contextlib.ExitStack() as stack:
    if cache_dir is None:
      cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix='flaxdistil_tok_'))
    return np.asarray(load_packed(files, tokenizer, max_seq_length, cache_dir=cache_dir,
                                  max_documents=max_documents, **kwargs))


# ----------------------------------------------------------------------------------------- batching
class EpochOrder:
  """Endless shuffled order of `num_rows` rows, one permutation per epoch, pure in `(key, epoch)`.

  Position g of the stream (global batch s holds positions `[s*B, (s+1)*B)`) is row
  `perm_e[g % N]` with `e = g // N` and `perm_e = np.random.default_rng([*key, e]).permutation(N)`;
  batches straddle epochs and nothing is dropped, so any step is reached in O(N) (one
  permutation) whatever its epoch. The permutations are cached (at most 2: a batch of B <= N
  rows spans at most 2 epochs) behind a lock, so a prefetch thread may share the object.

  Raises:
    ValueError: `num_rows < 1`.
  """

  def __init__(self, num_rows: int, key: Sequence[int]):
    if num_rows < 1:
      raise ValueError(f'num_rows={num_rows}: there is nothing to shuffle; check the data.')
    self.num_rows, self.key = int(num_rows), tuple(int(k) for k in key)
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    """The row order of `epoch`: `default_rng([*key, epoch]).permutation(num_rows)`.

    Returns:
      `[num_rows]` row indices, int32 below 2**31 rows (same values, half the RAM), else int64.
      The cached array itself: do not modify it.
    """
    with self._lock:
      if epoch not in self._perms:
        if len(self._perms) >= 2:
          self._perms.pop(min(self._perms))
        n = self.num_rows
        perm = np.random.default_rng([*self.key, epoch]).permutation(n)
        self._perms[epoch] = perm.astype(np.int32) if n < 2 ** 31 else perm
      return self._perms[epoch]

  def rows(self, step: int, batch_size: int) -> np.ndarray:
    """Row indices of global batch `step`: stream positions `[step*B, (step+1)*B)`.

    Args:
      step: the global batch's index (>= 0).
      batch_size: B.

    Returns:
      `[batch_size] int64` row indices in [0, num_rows).
    """
    n = self.num_rows
    g = step * batch_size + np.arange(batch_size, dtype=np.int64)
    rows = np.empty_like(g)
    for epoch in np.unique(g // n):
      sel = g // n == epoch
      rows[sel] = self.permutation(int(epoch))[g[sel] % n]
    return rows


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int,
                   fill: dict[str, int] | None = None) -> list[dict[str, np.ndarray]]:
  """`arrays` (equal first dimension N) in order as `ceil(N / batch_size)` batches of `batch_size`.

  The last batch is filled up with rows of `fill[key]` (0 for keys not in `fill`), e.g. pad
  token ids or `IGNORE_INDEX` labels, which every metric ignores, so that all evaluation batches
  share one compiled shape. Dtypes and trailing shapes are kept.

  Args:
    arrays: name -> `[N, ...]` numpy array.
    batch_size: rows per batch.
    fill: name -> fill value of padding rows.

  Returns:
    The batches, each `{name: [batch_size, ...]}`; an empty list when N = 0.

  Raises:
    ValueError: `batch_size <= 0`.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size} must be positive.')
  fill = fill or {}
  n = len(next(iter(arrays.values()))) if arrays else 0
  out = []
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
    short = batch_size - min(batch_size, n - start)
    if short:
      batch = {k: np.concatenate([v, np.full((short,) + v.shape[1:], fill.get(k, 0), v.dtype)])
               for k, v in batch.items()}
    out.append(batch)
  return out


# The MLM batch of every iterator here (`_batch`): name -> (shape after the batch axis, dtype).
MLM_BATCH_KEYS = ('input_ids', 'attention_mask', 'labels')


def batch_spec(batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of an MLM batch (`BatchIterator`, `streaming_batches`, `eval_batches`).

  Args:
    batch_size: rows.
    seq_len: `data.max_seq_length`.

  Returns:
    `{'input_ids', 'attention_mask', 'labels'}` -> `((batch_size, seq_len), int32)`.
  """
  return {k: ((batch_size, seq_len), np.dtype(np.int32)) for k in MLM_BATCH_KEYS}


def _batch(ids: np.ndarray, rng, pad_token_id: int, mask_kwargs: dict,
           **slice_kwargs) -> dict[str, np.ndarray]:
  kwargs = dict(mask_kwargs, **slice_kwargs)
  kwargs['special_token_ids'] = sorted(set(kwargs['special_token_ids']) | {pad_token_id})
  masked, labels = masking.mask_tokens(ids, rng, **kwargs)
  return {'input_ids': masked, 'attention_mask': (ids != pad_token_id).astype(np.int32),
          'labels': labels}


class _Failure(tuple):
  exc = property(lambda self: self[0])  # an exception raised in the prefetch thread


class _BatchSource:
  """Stateless-in-effect batch maker (the permutation cache is only a speed-up).

  Kept apart from BatchIterator so the prefetch thread does not reference the iterator, which can
  then be garbage collected (its __del__ stops the thread) when a caller forgets close().
  """

  def __init__(self, packed, seed, global_batch_size, pad_token_id, mask_kwargs, row_features=None):
    self.packed, self.seed, self.global_batch_size = packed, seed, global_batch_size
    self.pad_token_id, self.mask_kwargs = pad_token_id, mask_kwargs
    self.row_features = row_features
    # The 0 tag keeps the permutation stream apart from masking's [seed, 1, step] (BatchIterator).
    self.order = EpochOrder(len(packed), (seed, 0))

  def rows(self, step: int) -> np.ndarray:
    """Returns the `[global_batch_size] int64` row indices of `packed` in batch `step`."""
    return self.order.rows(step, self.global_batch_size)

  def global_batch(self, step: int, lo: int = 0, hi: int | None = None) -> dict[str, np.ndarray]:
    """Rows `[lo, hi)` of the global batch of `step`; only those rows are read from `packed`.

    Without smoothing the masking draws are made for the whole batch and sliced, so any split equals
    the whole; with `token_probs` the whole batch is read and masked, then sliced.

    Args:
      step: the global batch's index.
      lo / hi: the rows wanted; `hi` None = global_batch_size.

    Returns:
      `input_ids`, `attention_mask`, `labels` `[hi - lo, T]` int32, plus the `row_features`
      arrays of those rows.
    """
    rows = self.rows(step)
    hi = self.global_batch_size if hi is None else hi
    rng = np.random.default_rng([self.seed, 1, step])
    if self.mask_kwargs.get('token_probs') is not None:
      batch = _batch(self.packed[rows], rng, self.pad_token_id, self.mask_kwargs)
      batch = {k: v[lo:hi] for k, v in batch.items()}
    else:
      batch = _batch(self.packed[rows[lo:hi]], rng, self.pad_token_id, self.mask_kwargs,
                     global_batch_size=self.global_batch_size, row_offset=lo)
    if self.row_features is not None:  # e.g. cached teacher targets of these rows
      samples = step * self.global_batch_size + np.arange(lo, hi, dtype=np.int64)
      batch.update(self.row_features(rows[lo:hi], samples))
    return batch


def _produce(make_batch, step: int, out: queue.Queue, stop: threading.Event) -> None:
  """Prefetch thread body: puts batches step, step+1, ... (or one _Failure) until `stop`."""
  while not stop.is_set():
    try:
      item: Any = make_batch(step)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
      item = _Failure((e,))
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        break
      except queue.Full:
        continue
    if isinstance(item, _Failure):
      return
    step += 1


class BatchIterator:
  """Infinite iterator of host-local MLM batches from `packed [N, T]` (array or PackedDataset).

  Each item: `{'input_ids', 'attention_mask', 'labels'}`, int32 `[B/P, T]` (B = global_batch_size,
  P = process_count), plus any `row_features` arrays.
  The global batch of step s is a pure function of (seed, s): row g in [s*B, (s+1)*B) is
  `perm_e[g % N]` with e = g // N and `perm_e = default_rng([seed, 0, e]).permutation(N)` (batches
  may straddle epochs; nothing is dropped), masked with `default_rng([seed, 1, s])` over the whole
  global batch, of which this host reads and keeps rows `[p*B/P, (p+1)*B/P)` (with `token_probs`
  it reads all B, see `masking.mask_tokens`). Hence `start_step=k` resumes exactly (in O(N) for
  the epoch's permutation, whatever k) and P hosts together see the single-host batch. The
  permutation seed carries the 0 tag because numpy's SeedSequence pads short entropy with zeros:
  `[seed, e]` would equal `[seed, e, 0]`, and epoch 1's permutation would share the masking
  stream `[seed, 1, 0]` of step 0. `step` = the next step `__next__` returns.

  With `prefetch > 0` a daemon thread fills a bounded queue of `prefetch` batches; an exception
  there is re-raised by `__next__`; `close()` (or `with`, or garbage collection) stops it.

  Args:
    packed: `[N, T]` int rows, an array or a `corpus.PackedDataset`.
    global_batch_size: B, rows per step over all hosts.
    seed: the run's seed (>= 0).
    start_step: the first step returned (>= 0; resume).
    process_index / process_count: p and P, this host and the number of hosts.
    mask_token_id / vocab_size / special_token_ids / mlm_probability / token_probs: as
      `masking.mask_tokens` (the pad id is added to `special_token_ids`).
    prefetch: batches made ahead in a background thread; 0 = made in `__next__`.
    pad_token_id: sets `attention_mask` and is never masked (default 0, BERT).
    row_features: optional `(rows [b] int64, samples [b] int64) -> {name: [b, ...] array}` that
      adds per-row arrays to this host's rows of every batch inside the prefetch thread (the
      cached teacher targets of offline distillation); `rows` index `packed`, `samples` are the
      positions `step * global_batch_size + i` in the run's stream of (masked) sequences.

  Raises:
    ValueError: empty or non-2-D `packed`, global_batch_size not positive or not divisible by
      process_count, bad process_index, negative seed/start_step.
    RuntimeError: (from `__next__`) the iterator is closed, or the prefetch thread died without
      handing over a batch.
  """

  def __init__(self, packed, *, global_batch_size: int, seed: int, start_step: int = 0,
               process_index: int = 0, process_count: int = 1, mask_token_id: int, vocab_size: int,
               special_token_ids, mlm_probability: float = 0.15,
               token_probs: np.ndarray | None = None, prefetch: int = 2, pad_token_id: int = 0,
               row_features=None):
    if not isinstance(packed, corpus.PackedDataset):
      packed = np.asarray(packed)
    if packed.ndim != 2 or len(packed) == 0:
      raise ValueError(f'packed must be a non-empty [N, seq_len] array, got shape {packed.shape}.')
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(f'global_batch_size={global_batch_size} is not divisible by process_count='
                       f'{process_count}; use a multiple of the number of processes.')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in [0, process_count={process_count}).')
    if seed < 0 or start_step < 0:
      raise ValueError(f'seed={seed} and start_step={start_step} must be >= 0.')
    self.step = int(start_step)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    mask_kwargs = dict(mask_token_id=mask_token_id, vocab_size=vocab_size,
                       special_token_ids=list(special_token_ids),
                       mlm_probability=mlm_probability, token_probs=token_probs)
    self._source = _BatchSource(packed, int(seed), global_batch_size, pad_token_id, mask_kwargs,
                                row_features)
    self._stop = threading.Event()
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    if prefetch > 0:
      self._queue = queue.Queue(maxsize=prefetch)
      self._thread = threading.Thread(
          target=_produce, args=(self._local_maker(), self.step, self._queue, self._stop),
          daemon=True, name='flaxdistil-prefetch')
      self._thread.start()

  def _local_maker(self):
    source, lo, size = self._source, self.process_index * self.local_batch_size, self.local_batch_size
    return lambda step: source.global_batch(step, lo, lo + size)

  def global_batch(self, step: int) -> dict[str, np.ndarray]:
    """Returns the full (all hosts) batch of `step`: `[global_batch_size, T]` int32 arrays.

    Also the `row_features` arrays of every row, when given.
    """
    return self._source.global_batch(step)

  def rows(self, step: int) -> np.ndarray:
    """Returns the indices into `packed` of global batch `step`, `[global_batch_size]` int64."""
    return self._source.rows(step)

  def batch_for_step(self, step: int) -> dict[str, np.ndarray]:
    """Returns this host's rows of `global_batch(step)`, `[B/P, T]` int32; `self.step` unchanged."""
    return self._local_maker()(step)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._stop.is_set():
      raise RuntimeError('BatchIterator is closed; create a new one with start_step=it.step.')
    if self._queue is None:
      item = self.batch_for_step(self.step)
    else:
      while True:
        try:
          item = self._queue.get(timeout=1.0)
          break
        except queue.Empty:
          if not self._thread.is_alive() and self._queue.empty():
            raise RuntimeError('Prefetch thread stopped without a batch.') from None
      if isinstance(item, _Failure):
        self.close()
        raise item.exc
    self.step += 1
    return item

  def close(self) -> None:
    """Stops the prefetch thread (idempotent)."""
    self._stop.set()
    if self._thread is not None:
      with contextlib.suppress(queue.Empty):
        while True:  # unblock a producer waiting on a full queue
          self._queue.get_nowait()
      self._thread.join(timeout=5.0)

  def __enter__(self):  # `with BatchIterator(...) as it:` closes the thread on exit
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    with contextlib.suppress(Exception):
      self.close()


def eval_batches(packed_eval, batch_size: int, seed: int, num_sequences: int | None,
                 **mask_kwargs) -> list[dict[str, np.ndarray]]:
  """Fixed evaluation batches over the first `num_sequences` rows (None = all; capped at N).

  Batch i is masked with `default_rng([seed, 2, i])`, so every call gives identical batches. The
  last batch is filled up with all-pad rows (attention_mask 0, labels -100) to keep shapes static.

  Args:
    packed_eval: `[N, T]` int rows, an array or a `corpus.PackedDataset` (only the rows used are
      read).
    batch_size: rows per batch.
    seed: the run's seed.
    num_sequences: rows to use from the start; None = all.
    **mask_kwargs: `masking.mask_tokens` arguments (`mask_token_id`, `vocab_size`,
      `special_token_ids`, ...), plus optional `pad_token_id` (default 0).

  Returns:
    A list of `{'input_ids', 'attention_mask', 'labels'}` int32 `[batch_size, T]` dicts.

  Raises:
    ValueError: `batch_size <= 0`, or what `masking.mask_tokens` raises.
  """
  pad_token_id = mask_kwargs.pop('pad_token_id', 0)
  rows = np.asarray(packed_eval[:num_sequences])  # a PackedDataset reads only these rows
  chunks = padded_batches({'ids': rows}, batch_size, {'ids': pad_token_id})
  return [_batch(c['ids'], np.random.default_rng([seed, 2, i]), pad_token_id, mask_kwargs)
          for i, c in enumerate(chunks)]


def streaming_batches(files: Sequence[str], tokenizer, max_seq_length: int, *,
                      global_batch_size: int, seed: int, start_position: int = 0,
                      process_index: int = 0, process_count: int = 1,
                      mlm_probability: float = 0.15, token_probs: np.ndarray | None = None,
                      num_epochs: int | None = None, cache_dir: str | None = None,
                      dataset: str = '', dataset_split: str = 'train',
                      text_column: str = 'text') -> Iterator[dict[str, np.ndarray]]:
  """Packs on the fly, nothing cached; yields batches like `BatchIterator`.

  Reads `files` or the hub-style `dataset` (as `load_packed`; json/parquet/dataset files through
  `datasets` streaming=True). Same window layout as `load_packed` and the same masking
  (`default_rng([seed, 1, step])` on the global batch, host slice `[p*B/P, (p+1)*B/P)`), so
  `position` (= number of global batches consumed = step) is all a checkpoint needs: resume with
  `start_position=step`. Limits: no shuffling (corpus order), resuming re-tokenizes and skips
  `start_position * B` windows (linear cost; `load_packed` has neither limit), each epoch ends with
  one padded window, and epochs repeat forever unless `num_epochs` is set (then the incomplete last
  global batch is dropped).

  Args:
    files / tokenizer / max_seq_length / dataset / dataset_split / text_column: as `load_packed`.
    global_batch_size: B, rows per step over all hosts.
    seed: the run's seed (masking only: there is no shuffling).
    start_position: first step yielded; earlier windows are tokenized and skipped.
    process_index / process_count: p and P, this host and the number of hosts.
    mlm_probability / token_probs: as `masking.mask_tokens`.
    num_epochs: passes over the corpus; None = endless.
    cache_dir: `datasets` cache for json/parquet/dataset files; None = a temporary directory.

  Yields:
    This host's `{'input_ids', 'attention_mask', 'labels'}` int32 `[B/P, T]` per step.

  Raises:
    ValueError: at the first `next()`: max_seq_length < 8, B not divisible by P, or bad files /
      dataset (as `documents.file_units` / `dataset_units`); later, when reached: a decode error,
      a missing text column, or a corpus without tokens.
    FileNotFoundError: missing files (at the first `next()`).
  """
  if max_seq_length < 8:
    raise ValueError(f'max_seq_length={max_seq_length} is too small; use >= 8.')
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by process_count='
                     f'{process_count}; use a multiple of the number of processes.')
  if dataset:
    units = documents.dataset_units(dataset, dataset_split, text_column)
  else:
    units = documents.file_units(files, text_column=text_column)
  backend = corpus.backend(tokenizer)
  cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
  mask_kwargs = dict(mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                     special_token_ids=list(tokenizer.all_special_ids),
                     mlm_probability=mlm_probability, token_probs=token_probs)
  width, local = max_seq_length - 2, global_batch_size // process_count

  def windows() -> Iterator[np.ndarray]:
    """The packed `[T]` int32 rows of every epoch, in corpus order.

    Raises:
      ValueError: an epoch without any token (empty corpus), or as `documents.unit_documents`.
    """
    epoch = 0  # an own temp dir keeps datasets' lock files out of ~/.cache; removed with the stream
    own_tmp = None if cache_dir else tempfile.TemporaryDirectory(prefix='flaxdistil_hf_')
    hf_cache = cache_dir or own_tmp.name
    while num_epochs is None or epoch < num_epochs:
      buf, produced = np.zeros((0,), np.int32), False
      for unit in units:
        for texts in documents.unit_documents(unit, hf_cache):
          docs = corpus.tokenize_documents(texts, backend)
          buf = np.concatenate([buf, corpus.concat_documents(docs, sep_id)])
          full = (len(buf) - 1) // width  # keep >= 1 token so the final [SEP] can be dropped
          if full > 0:
            yield from corpus.wrap_windows(buf[:full * width], max_seq_length, cls_id, sep_id,
                                           pad_id)
            buf, produced = buf[full * width:], True
      if len(buf) > 1 or (len(buf) == 1 and buf[0] != sep_id):
        yield from corpus.wrap_windows(buf[:-1] if buf[-1] == sep_id else buf, max_seq_length,
                                       cls_id, sep_id, pad_id)
      elif not produced:
        raise ValueError(f'Empty dataset: no tokens after tokenizing {files or dataset}; check the '
                         'files.')
      epoch += 1

  stream, step = windows(), 0
  while True:
    rows = [row for _, row in zip(range(global_batch_size), stream)]
    if len(rows) < global_batch_size:
      return  # num_epochs reached: the incomplete last global batch is dropped
    if step >= start_position:
      rng = np.random.default_rng([seed, 1, step])
      batch = _batch(np.stack(rows), rng, pad_id, mask_kwargs)
      lo = process_index * local
      yield {k: v[lo:lo + local] for k, v in batch.items()}
    step += 1
