"""BERT's dynamic masking of packed rows, and DistilBERT's frequency-smoothed variant.

Behaviour matched:
- Google BERT `create_pretraining_data.py` / HF `DataCollatorForLanguageModeling`: 15% of real
  tokens, of those 80% [MASK], 10% a random token, 10% unchanged; labels -100 elsewhere.
- `token_probs` / `mlm_smoothing`: HF `examples/research_projects/distillation/distiller.py`
  `prepare_batch_mlm` (sample a fixed number of positions without replacement, weight
  count**-smoothing, as computed in its `train.py`).
Pure numpy: a masking is a function of the rng state and the input, so `(seed, step)` decides it.
"""
from __future__ import annotations

import numpy as np

from flaxdistil.data import corpus
from flaxdistil.objectives import IGNORE_INDEX


def token_probabilities(packed: np.ndarray, vocab_size: int, smoothing: float,
                        special_token_ids) -> np.ndarray:
  """`[vocab_size] float32` masking weights `max(count, 1) ** -smoothing`, 0 for special tokens.

  As HF distillation `train.py` (`--mlm_smoothing`, 0.7 in DistilBERT): frequent tokens are masked
  less often. Counts come from `packed` (the training set: an `[N, T]` array, or a
  `corpus.PackedDataset`, whose counts were taken at preprocessing; they differ from row counts
  only in special tokens, which get weight 0 anyway).

  Args:
    packed: `[N, T]` int token ids, or a `corpus.PackedDataset`.
    vocab_size: V, the length of the result.
    smoothing: the exponent (`distill.mlm_smoothing`).
    special_token_ids: ids that get weight 0 (e.g. `tokenizer.all_special_ids`).

  Returns:
    `[V] float32` unnormalised weights for `mask_tokens(token_probs=...)`.

  Raises:
    ValueError: token ids outside [0, V) (the vocabulary size does not match the data).
  """
  if isinstance(packed, corpus.PackedDataset):
    counts = packed.token_counts()
    seen = np.flatnonzero(counts)
    lo, hi = (seen.min(), seen.max()) if seen.size else (0, 0)
  else:
    ids = np.asarray(packed).ravel()
    counts = np.bincount(ids[ids >= 0]) if ids.size else np.zeros(0, np.int64)
    lo, hi = (ids.min(), ids.max()) if ids.size else (0, 0)
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f'Token ids span [{lo}, {hi}] but vocab_size={vocab_size}; pass '
                     'the tokenizer/model vocabulary size.')
  counts = np.pad(counts, (0, vocab_size - len(counts))).astype(np.float64)
  probs = np.maximum(counts, 1.0) ** -float(smoothing)
  probs[np.asarray(list(special_token_ids), dtype=np.int64)] = 0.0
  return probs.astype(np.float32)


def mask_tokens(input_ids: np.ndarray, rng: np.random.Generator, *, mask_token_id: int,
                vocab_size: int, special_token_ids, mlm_probability: float = 0.15,
                token_probs: np.ndarray | None = None, global_batch_size: int | None = None,
                row_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """BERT masking of a batch of token rows.

  Without `token_probs`: every non-special token is selected independently with `mlm_probability`
  (HF DataCollatorForLanguageModeling). With `token_probs [V]`: exactly
  `floor(mlm_probability * num_non_special_tokens + 0.5)` positions of the batch (at most the
  number with non-zero weight) are drawn without replacement with weight `token_probs[id]` (HF
  distiller.prepare_batch_mlm, which uses ceil and counts [CLS]/[SEP]; weighted sampling done via
  exponential keys = Efraimidis-Spirakis, same law as torch.multinomial). Selected positions: 80%
  -> `mask_token_id`, 10% -> uniform random id in [0, vocab_size), 10% kept. Random draws have
  fixed shapes, so the result is a pure function of the rng state and input.

  Args:
    input_ids: `[B, T]` int token ids.
    rng: numpy generator; advanced by the draws.
    mask_token_id: the [MASK] id.
    vocab_size: V; random replacements are drawn from [0, V).
    special_token_ids: ids never selected; must include the pad id
      (`tokenizer.all_special_ids` does).
    mlm_probability: selection probability (or fraction, with `token_probs`), in [0, 1].
    token_probs: optional `[V]` selection weights (`token_probabilities`).
    global_batch_size: G; `input_ids` are then rows `[row_offset, row_offset + B)` of a G-row
      batch and the result equals those rows of masking the whole batch (draws are made for G
      rows and sliced).
    row_offset: first row of `input_ids` within the G-row batch.

  Returns:
    `(masked_input_ids [B, T] int32, labels [B, T] int32)`; `labels` holds the original id at
    selected positions and -100 elsewhere.

  Raises:
    ValueError: `input_ids` not rank 2, `mlm_probability` outside [0, 1], `token_probs` together
      with `global_batch_size` (its k-of-batch selection couples rows), or `token_probs` not
      `[V]` covering every id.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f'input_ids must be [batch, seq_len], got shape {ids.shape}.')
  if not 0.0 <= mlm_probability <= 1.0:
    raise ValueError(f'mlm_probability={mlm_probability} must be in [0, 1].')
  if global_batch_size is not None and token_probs is not None:
    raise ValueError('mask_tokens: token_probs selects k positions over the whole batch; pass the '
                     'whole batch (no global_batch_size) with token_probs.')
  special = np.isin(ids, np.asarray(list(special_token_ids), dtype=np.int64))
  shape = ids.shape if global_batch_size is None else (global_batch_size, ids.shape[1])
  rows = slice(row_offset, row_offset + len(ids))
  select_u = rng.random(shape)[rows]
  action_u = rng.random(shape)[rows]
  random_ids = rng.integers(0, vocab_size, shape, dtype=np.int64)[rows]
  if token_probs is None:
    selected = (select_u < mlm_probability) & ~special
  else:
    token_probs = np.asarray(token_probs, np.float64)
    if token_probs.ndim != 1 or ids.max(initial=0) >= len(token_probs):
      raise ValueError(f'token_probs must be [vocab_size] covering every id (shape '
                       f'{token_probs.shape}, max id {ids.max(initial=0)}).')
    weights = np.where(special, 0.0, token_probs[ids])
    k = int(np.floor(mlm_probability * np.count_nonzero(~special) + 0.5))
    k = min(k, np.count_nonzero(weights > 0))
    selected = np.zeros(ids.size, bool)
    if k > 0:
      with np.errstate(divide='ignore'):
        keys = np.where(weights > 0, -np.log1p(-select_u) / weights, np.inf).ravel()
      selected[np.argpartition(keys, k - 1)[:k]] = True
    selected = selected.reshape(ids.shape)
  labels = np.where(selected, ids, IGNORE_INDEX).astype(np.int32)
  masked = np.where(selected & (action_u < 0.8), mask_token_id, ids)
  masked = np.where(selected & (action_u >= 0.8) & (action_u < 0.9), random_ids, masked)
  return masked.astype(np.int32), labels
