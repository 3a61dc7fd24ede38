"""The corpus's documents: which files, cut into which units, read as which document strings.

Local `.txt` files (a document = a blank-line separated block, as datasets' paragraph text
reader), `.json`/`.jsonl`/`.parquet` files (a document = a row of `text_column`) or a hub-style
dataset (`datasets.load_dataset_builder` resolves its data files). A large text file is cut into
*units* of at most 32 MiB, only where its paragraphs already split, so units tokenised in parallel
give exactly the documents of the whole file (`corpus.py` tokenises one unit per worker).
"""
from __future__ import annotations

import codecs
import dataclasses
import os
import tempfile
from typing import Iterator, Sequence

_BUILDERS = {'.txt': 'text', '.text': 'text', '.json': 'json', '.jsonl': 'json', '.parquet': 'parquet'}
_TOKENIZE_BATCH = 1000  # documents per batch yielded (= per encode_batch call of the tokenizer)
MAX_UNIT_BYTES = 32 << 20  # text bytes per unit (= shard) at most: bounds each worker's memory
MIN_UNIT_BYTES = 1 << 20   # small corpora are still cut into ~8 units per CPU for load balance


def builder_for(path: str) -> str:
  """The `datasets` builder that reads `path`, by extension.

  Returns:
    'text' (.txt/.text), 'json' (.json/.jsonl) or 'parquet'.

  Raises:
    ValueError: any other extension (names the supported ones).
  """
  ext = os.path.splitext(path)[1].lower()
  if ext not in _BUILDERS:
    raise ValueError(f'Unsupported data file extension {ext!r} for {path}; use one of '
                     f'{sorted(_BUILDERS)} (text: one paragraph per line, blank line between documents; '
                     'json/parquet: a "text" column).')
  return _BUILDERS[ext]


def check_files(files: Sequence[str]) -> list[str]:
  """Checks the data files exist and have a supported extension.

  Args:
    files: paths (relative ones against the working directory), or a single path.

  Returns:
    The paths as given, as a list of str.

  Raises:
    ValueError: no files, or an unsupported extension (`builder_for`).
    FileNotFoundError: some files are missing (lists every one).
  """
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
  """A contiguous piece of the corpus: documents of `path` (bytes [start, end) for 'text').

  `end = -1` means the whole file.
  """
  path: str
  builder: str        # 'text' = blank-line paragraphs; else a datasets builder ('json', ...)
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

  Args:
    files: the data files (`check_files`).
    text_column: the document column of json/parquet files.
    unit_bytes: target unit size in bytes; None = total size / (8 * CPUs), clipped to
      [1 MiB, 32 MiB]. Rows never depend on it.

  Returns:
    The units in corpus order; a .txt file's units cover it byte range by byte range.

  Raises:
    ValueError / FileNotFoundError: as `check_files`.
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

  Files and their order are those `datasets.load_dataset(name_or_dir, split=split)` reads (data
  files resolved by `datasets.load_dataset_builder`; one document = one row, also for .txt = one
  line, as there).

  Args:
    name_or_dir: hub dataset name or local directory (`data.dataset`).
    split: the split to read (`data.dataset_split`).
    text_column: the document column.

  Returns:
    One unit per data file of `split`, in the order `datasets` reads them.

  Raises:
    ValueError: the dataset cannot be resolved (not found, offline, ...), or it has no split
      `split` (also the case for a dataset without data files, e.g. a loading script).
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
  """Checks that `path` is valid UTF-8, reading it in chunks (~1 s per GB).

  Args:
    path: the file to check.
    chunk: bytes read at a time.

  Raises:
    ValueError: not valid UTF-8 (names `path`, the byte and its offset, and an `iconv` fix).
  """
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

  A 'text' unit with a byte range is read directly (documents = blank-line separated blocks,
  as datasets' paragraph reader); other units go through `datasets.load_dataset(...,
  streaming=True)`, except that a whitespace-only file yields nothing (datasets would raise).

  Args:
    unit: the unit to read.
    hf_cache: `datasets` cache directory; None = a temporary one, removed afterwards.

  Yields:
    Lists of up to 1000 document strings (`_TOKENIZE_BATCH`); a null row is ''.

  Raises:
    ValueError: non-UTF-8 text (file, and for text units the byte offset, named) or a missing
      text column.
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
    del text  # universal newlines + '\n\n' split + no empty pieces: datasets' paragraphs
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
