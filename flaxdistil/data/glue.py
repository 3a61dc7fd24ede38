"""GLUE sequence-classification data from local TSV files, batching and metrics.

Task distillation (TinyBERT, Jiao et al., 2020, Sec. 3.2 "task-specific
distillation"; DistilBERT's GLUE fine-tuning) trains on labelled sentence
(pairs). The files are the original GLUE distribution
(`download_glue_data.py` layout: `train.tsv`, `dev.tsv` with a header row),
read with `csv.QUOTE_NONE` because sentences contain quote characters and
with `utf-8-sig` because MRPC's files start with a byte-order mark.

Examples are tokenised once with the model's fast tokenizer as
`[CLS] a [SEP] (b [SEP])`, truncated `longest_first` and padded to
`max_seq_length` (HF `glue_convert_examples_to_features`). Batches are a
pure function of (seed, step) like the MLM pipeline, so a resumed run sees
exactly the batches an uninterrupted one would.
"""

import csv
import os
from typing import NamedTuple, Sequence

import numpy as np

from flaxdistil.data import input_pipeline
from flaxdistil.objectives import IGNORE_INDEX  # label of padding rows in eval batches
from flaxdistil.storage import atomic


class GlueTask(NamedTuple):
  """Column layout and label names of one GLUE task's TSV files."""
  name: str
  text_a: str
  text_b: str | None
  label: str
  label_names: tuple[str, ...]
  metrics: tuple[str, ...]


TASKS = {
    'sst2': GlueTask('sst2', 'sentence', None, 'label', ('negative', 'positive'), ('accuracy',)),
    'mrpc': GlueTask('mrpc', '#1 String', '#2 String', 'Quality',
                     ('not_equivalent', 'equivalent'), ('accuracy', 'f1')),
}


def get_task(name: str) -> GlueTask:
  """The `GlueTask` of `name` (case-insensitive: 'sst2', 'mrpc').

  Raises:
    ValueError: an unknown name (names the supported tasks).
  """
  try:
    return TASKS[name.lower()]
  except KeyError:
    raise ValueError(f'Unknown GLUE task {name!r}; supported: {sorted(TASKS)}.') from None


def read_table(path: str) -> tuple[list[str], list[list[str]]]:
  """The header and rows of a GLUE TSV file, fields as written (no quoting, BOM dropped).

  Args:
    path: a GLUE TSV file.

  Returns:
    `(header, rows)`: the column names and the data rows, each a list of strings.

  Raises:
    FileNotFoundError: `path` missing.
    ValueError: the file is empty (not even a header).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GLUE file {path!r} does not exist; pass the task directory\'s '
                            'train.tsv / dev.tsv (GLUE layout).')
  with open(path, encoding='utf-8-sig', newline='') as f:
    rows = list(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE))
  if not rows:
    raise ValueError(f'{path} is empty; expected a header row and labelled examples.')
  return rows[0], rows[1:]


def write_tsv(path: str, header: Sequence[str], rows) -> int:
  """Writes a GLUE TSV file atomically (`storage.atomic.atomic_file`), readable by `read_tsv`.

  Fields are written as they are (GLUE's `QUOTE_NONE` layout), so none may hold a tab or a
  line break.

  Args:
    path: the file to write (its directory must exist).
    header: the column names.
    rows: an iterable of rows, each as many strings as `header`.

  Returns:
    The number of data rows written.

  Raises:
    ValueError: a row of another length, or a field with a tab / line break (nothing written).
  """
  n = 0
  with atomic.atomic_file(path, 'w') as f:
    f.write('\t'.join(header) + '\n')
    for row in rows:
      if len(row) != len(header):
        raise ValueError(f'{path}: row {n + 1} has {len(row)} fields, the header {len(header)}.')
      bad = [x for x in row if '\t' in x or '\n' in x or '\r' in x]
      if bad:
        raise ValueError(f'{path}: row {n + 1} has a tab or line break in {bad[0]!r}; GLUE TSV '
                         'fields cannot hold them.')
      f.write('\t'.join(row) + '\n')
      n += 1
  return n


def read_tsv(path: str, task: GlueTask):
  """Reads a labelled GLUE TSV file.

  Args:
    path: `train.tsv` or `dev.tsv` of the task.
    task: its column layout (`get_task`).

  Returns:
    `(texts_a, texts_b or None, labels)`; labels int32 `[num_examples]` in
    `[0, len(task.label_names))`.

  Raises:
    FileNotFoundError: `path` missing.
    ValueError: header without the task's columns (names the columns found),
      a row with too few fields or a bad label (names the line), no rows.
  """
  header, rows = read_table(path)
  wanted = [task.text_a, task.label] + ([task.text_b] if task.text_b else [])
  missing = [c for c in wanted if c not in header]
  if missing:
    raise ValueError(f'{path} has columns {header}, not {missing} of GLUE task {task.name!r}; '
                     'is it the right task, and a labelled split (train/dev, not test)?')
  col = {c: header.index(c) for c in wanted}
  a, b, labels = [], [], []
  for line_no, row in enumerate(rows, start=2):
    if len(row) < len(header):
      raise ValueError(f'{path}:{line_no} has {len(row)} fields, expected {len(header)}.')
    try:
      label = int(row[col[task.label]])
    except ValueError:
      label = -1
    if not 0 <= label < len(task.label_names):
      raise ValueError(f'{path}:{line_no}: label {row[col[task.label]]!r} is not in '
                       f'0..{len(task.label_names) - 1}.')
    a.append(row[col[task.text_a]])
    if task.text_b:
      b.append(row[col[task.text_b]])
    labels.append(label)
  if not labels:
    raise ValueError(f'{path} has a header but no examples.')
  return a, (b if task.text_b else None), np.asarray(labels, np.int32)


def encode(tokenizer, texts_a: Sequence[str], texts_b: Sequence[str] | None,
           max_seq_length: int) -> dict[str, np.ndarray]:
  """`[CLS] a [SEP] (b [SEP])`, truncated and padded to `max_seq_length`.

  Args:
    tokenizer: a fast HF tokenizer (called on the whole split at once).
    texts_a / texts_b: first sentences, and second ones for pair tasks (None for single).
    max_seq_length: T; pairs are truncated `longest_first`.

  Returns:
    dict of int32 `[num_examples, max_seq_length]` arrays `input_ids`,
    `attention_mask`, `token_type_ids` (0 for a, 1 for b).
  """
  enc = tokenizer(list(texts_a), list(texts_b) if texts_b is not None else None,
                  max_length=max_seq_length, truncation='longest_first', padding='max_length',
                  return_token_type_ids=True, return_attention_mask=True)
  return {k: np.asarray(enc[k], np.int32)
          for k in ('input_ids', 'attention_mask', 'token_type_ids')}


def batch_spec(batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of a classification batch (`ClassificationBatches`, `eval_batches`).

  Args:
    batch_size: rows.
    seq_len: `data.max_seq_length`.

  Returns:
    `input_ids`, `attention_mask`, `token_type_ids` -> `((batch_size, seq_len), int32)` and
    `labels` -> `((batch_size,), int32)`.
  """
  spec = {k: ((batch_size, seq_len), np.dtype(np.int32))
          for k in ('input_ids', 'attention_mask', 'token_type_ids')}
  return dict(spec, labels=((batch_size,), np.dtype(np.int32)))


def load_split(path: str, task: GlueTask, tokenizer, max_seq_length: int) -> dict[str, np.ndarray]:
  """A labelled split as arrays (`read_tsv` then `encode`).

  Args:
    path: the split's TSV file.
    task: its column layout.
    tokenizer: a fast HF tokenizer.
    max_seq_length: T.

  Returns:
    `encode(...)`'s `input_ids`, `attention_mask`, `token_type_ids` `[num_examples, T]` plus
    `labels [num_examples]`, all int32.

  Raises:
    FileNotFoundError / ValueError: as `read_tsv`.
  """
  a, b, labels = read_tsv(path, task)
  return dict(encode(tokenizer, a, b, max_seq_length), labels=labels)


class ClassificationBatches:
  """Shuffled, endless global batches; batch `step` is a pure function of (seed, step).

  Example order is `input_pipeline.EpochOrder(N, (seed,))`, the concatenation of
  per-epoch permutations `default_rng([seed, epoch]).permutation(N)`; step s takes positions
  `[s*B, (s+1)*B)` of that stream. Each host keeps its contiguous rows
  `[p*B/P, (p+1)*B/P)` of every global batch. Same interface as
  `input_pipeline.BatchIterator` (`next()`, `close()`).

  Args:
    arrays: the split (`load_split`): equal-length `[N, ...]` arrays, `labels` among them.
    global_batch_size: B, rows per step over all hosts.
    seed: the run's seed.
    start_step: first step `next()` returns (resume).
    process_index / process_count: p and P, this host and the number of hosts.

  Raises:
    ValueError: global batch not divisible by the number of hosts, or an empty split.
  """

  def __init__(self, arrays: dict[str, np.ndarray], *, global_batch_size: int, seed: int,
               start_step: int = 0, process_index: int = 0, process_count: int = 1):
    if global_batch_size % process_count:
      raise ValueError(f'global_batch_size {global_batch_size} is not divisible by '
                       f'{process_count} hosts.')
    self.arrays, self.seed, self.step = arrays, seed, start_step
    self.global_batch_size = global_batch_size
    self.num_examples = len(arrays['labels'])
    per_host = global_batch_size // process_count
    self._rows = slice(process_index * per_host, (process_index + 1) * per_host)
    self._order = input_pipeline.EpochOrder(self.num_examples, (seed,))

  def global_batch(self, step: int) -> dict[str, np.ndarray]:
    """All hosts' rows of batch `step`: every array of `arrays` indexed to `[B, ...]`."""
    idx = self._order.rows(step, self.global_batch_size)
    return {k: v[idx] for k, v in self.arrays.items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.global_batch(self.step)
    self.step += 1
    return {k: v[self._rows] for k, v in batch.items()}

  def close(self) -> None:
    """No-op (there is no prefetch thread); for `BatchIterator`'s interface."""
    pass


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
  """The whole split in order as fixed-size global batches.

  The last batch is filled with padding rows (attention_mask 0, label -100),
  which every metric ignores, so all batches share one compiled shape.

  Args:
    arrays: the split (`load_split`).
    batch_size: rows per batch.

  Returns:
    `ceil(N / batch_size)` dicts of the same keys, each `[batch_size, ...]`.

  Raises:
    ValueError: `batch_size <= 0`.
  """
  return input_pipeline.padded_batches(arrays, batch_size, {'labels': IGNORE_INDEX})


def positive_class_outcomes(pred, labels) -> dict:
  """Boolean `tp`, `fp`, `fn` arrays of label 1 (the positive class of MRPC's F1).

  Works on numpy and jax arrays alike; `pred` and `labels` have the same shape.
  Sum each (over real rows) and pass the sums to `f1_from_counts`.

  Args:
    pred: predicted class ids.
    labels: gold class ids (padding rows must be excluded by the caller).

  Returns:
    `{'tp', 'fp', 'fn'}` -> boolean arrays of `pred`'s shape.
  """
  return {'tp': (pred == 1) & (labels == 1), 'fp': (pred == 1) & (labels != 1),
          'fn': (pred != 1) & (labels == 1)}


def f1_from_counts(tp: float, fp: float, fn: float) -> float:
  """Binary F1 of the positive class (label 1) from summed counts, as GLUE's MRPC F1.

  Args:
    tp / fp / fn: summed `positive_class_outcomes`.

  Returns:
    `2 tp / (2 tp + fp + fn)` in [0, 1]; 0 when all three are 0.
  """
  return 2 * tp / max(2 * tp + fp + fn, 1e-9)
