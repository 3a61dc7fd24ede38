"""TinyBERT's data augmentation for task distillation (Jiao et al., 2020, Sec. 3.2, Algorithm 1).

Each word of a sentence is, with probability `p_t`, replaced by one of `K` candidates:

- a single-piece word (one WordPiece): the K most probable tokens of the teacher's MLM at its
  position, the word masked (`[CLS] sentence [SEP]`, the word -> `[MASK]`);
- a multi-piece word: its K nearest single-piece vocabulary words by cosine similarity in an
  embedding space. TinyBERT used GloVe; no GloVe is available here, so the space is the MLM
  teacher's own input embeddings, a word being the mean of its word-piece embeddings.

Every example gets `N_a` augmented copies; the paper's defaults are p_t = 0.4, N_a = 20, K = 15.
Where Algorithm 1 is silent we follow TinyBERT's reference code (`data_augmentation.py`):

- words are BERT's basic tokens (lower-cased, punctuation split off); only alphabetic words that
  are not stop words are replaced (scikit-learn's `ENGLISH_STOP_WORDS` stands in for its list);
- a word's candidates come from the original sentence, once per word, not from the copy being
  built (as the algorithm's loop reads literally): one MLM forward per word instead of N_a;
- a copy equal to the original or to an earlier copy is dropped, so an example has <= N_a copies;
- copies are written as their words joined by spaces (the uncased tokenizer reads them back as
  the same pieces), after the original row, which is kept verbatim.

Two choices of ours: candidates are whole-word alphabetic vocabulary entries only (no `##` pieces,
special or `[unused]` tokens; the reference filters `##` pieces after its top-K, leaving fewer
than K), and for sentence pairs (MRPC) a copy augments both sentences, each word independently
(the reference writes copies of sentence a, then of sentence b).

All randomness of example i comes from `np.random.default_rng([seed, i])`, so the output depends
on the seed alone, not on batch size or chunking. The MLM and the neighbour search run under
`jax.jit` with fixed shapes (`batch_size` rows, lengths padded to multiples of 16) on JAX's default
device (the accelerator, if there is one).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from flaxdistil.data import glue
from flaxdistil.model import bert
from flaxdistil.model.bert import ModelConfig
from flaxdistil.storage import atomic

LENGTH_MULTIPLE = 16  # MLM rows are padded to a multiple of this: a few compiled shapes


def stop_words() -> frozenset[str]:
  """English stop words never replaced: scikit-learn's `ENGLISH_STOP_WORDS` (318 words)."""
  from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS  # pylint: disable=g-import-not-at-top
  return frozenset(ENGLISH_STOP_WORDS)


@dataclasses.dataclass
class SentenceSlots:
  """The replaceable words of one sentence and their candidates.

  Attributes:
    words: the sentence's basic tokens (lower-cased words and punctuation).
    slots: indices into `words` of the replaceable words, increasing.
    candidates: `[len(slots), K]` int32 token ids of each slot's candidates (filled by
      `Augmenter.candidates`).
  """
  words: list[str]
  slots: list[int]
  candidates: np.ndarray | None = None


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Augmenter:
  """Computes TinyBERT's replacement candidates with an MLM teacher.

  Args:
    config: the MLM teacher's `ModelConfig` (`hf_conversion.load_hf_model`); needs its MLM head.
    params: its params (host or device).
    tokenizer: its fast WordPiece tokenizer (`tokenization.load_tokenizer`).
    top_k: K, candidates per word.
    batch_size: rows per jitted MLM / neighbour call.
    max_seq_length: MLM rows are `[CLS] pieces [SEP]` cut to this many tokens; words past the
      cut get no MLM candidates and are not replaced.

  Raises:
    ValueError: the model has no MLM head, `top_k` is not in [1, vocabulary], the tokenizer is
      larger than the model's vocabulary, or `max_seq_length` exceeds its positions.
  """

  def __init__(self, config: ModelConfig, params, tokenizer, *, top_k: int = 15,
               batch_size: int = 128, max_seq_length: int = 128):
    if not config.with_mlm_head:
      raise ValueError('Augmentation needs an MLM teacher (a *ForMaskedLM checkpoint); this model '
                       'has no MLM head.')
    if len(tokenizer) > config.vocab_size:
      raise ValueError(f'The tokenizer has {len(tokenizer)} tokens, the model {config.vocab_size}: '
                       "use the model's own tokenizer.")
    if max_seq_length > config.max_position_embeddings:
      raise ValueError(f'max_seq_length {max_seq_length} > the model\'s max_position_embeddings '
                       f'{config.max_position_embeddings}.')
    self.tokenizer, self.top_k, self.batch_size = tokenizer, top_k, batch_size
    self.max_seq_length = max_seq_length
    self.stop_words = stop_words()
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    allowed = np.zeros(config.vocab_size, bool)
    allowed[:len(vocab)] = [t.isalpha() and i not in special for i, t in enumerate(vocab)]
    if not 1 <= top_k <= int(allowed.sum()):
      raise ValueError(f'top_k={top_k} must be in [1, {int(allowed.sum())}] (the whole-word '
                       'vocabulary entries).')
    self.vocab = vocab
    # 0 for candidate tokens, most negative float32 for the rest: top_k never picks them
    bias = jnp.asarray(np.where(allowed, 0.0, np.finfo(np.float32).min), jnp.float32)
    cfg = dataclasses.replace(config, dtype=jnp.float32, remat=False)
    self.params = jax.device_put(bert.unbox(params))
    emb = self.params['embeddings']['word_embeddings']['embedding']  # [V, H]
    self._unit_emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    self._mlm = jax.jit(functools.partial(_mlm_top_k, bert.MaskedLM(cfg), top_k, bias))
    self._neighbours = jax.jit(functools.partial(_neighbour_top_k, top_k, bias))

  def split(self, text: str) -> SentenceSlots:
    """The basic tokens of `text` and which of them may be replaced (alphabetic, no stop word).

    Returns:
      `SentenceSlots` without candidates.
    """
    backend = self.tokenizer.backend_tokenizer
    normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
    words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
    slots = [i for i, w in enumerate(words) if w.isalpha() and w not in self.stop_words]
    return SentenceSlots(words, slots)

  def candidates(self, sentences: Sequence[SentenceSlots],
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Fills `candidates` of every sentence (MLM top-K or embedding neighbours per slot).

    Args:
      sentences: from `split`; their `candidates` are set in place.
      progress: called as `progress(rows_done, rows_total)` after each MLM batch.
    """
    tok, limit = self.tokenizer, self.max_seq_length - 2
    nonempty = [s for s in sentences if s.words]
    enc = tok([s.words for s in nonempty], is_split_into_words=True, add_special_tokens=False)
    mlm_rows, multi = [], {}  # (sentence, slot index, piece ids, position); word -> piece ids
    for s in sentences:
      s.candidates = np.zeros((len(s.slots), self.top_k), np.int32)
    for n, s in enumerate(nonempty):
      ids, word_ids = enc['input_ids'][n], enc.word_ids(n)
      pieces = {}
      for p, w in enumerate(word_ids):
        pieces.setdefault(w, []).append(p)
      for j, w in enumerate(s.slots):
        pos = pieces.get(w, [])
        if len(pos) == 1 and pos[0] < limit:
          mlm_rows.append((s, j, ids, pos[0] + 1))  # +1: [CLS]
        elif len(pos) > 1:
          multi.setdefault(s.words[w], [ids[p] for p in pos])
        else:  # past the cut: no context to predict from; the word stays
          s.slots[j] = -1
    self._fill_mlm(mlm_rows, progress)
    if multi:
      words = sorted(multi)
      found = dict(zip(words, self._embedding_neighbours([multi[w] for w in words])))
      for s in nonempty:
        for j, w in enumerate(s.slots):
          if w >= 0 and s.words[w] in found:
            s.candidates[j] = found[s.words[w]]
    for s in sentences:  # drop the slots past the cut
      keep = [j for j, w in enumerate(s.slots) if w >= 0]
      s.slots, s.candidates = [s.slots[j] for j in keep], s.candidates[keep]

  def _fill_mlm(self, rows, progress) -> None:
    """Runs the masked rows through the MLM, bucketed by padded length, `batch_size` at a time."""
    tok, b = self.tokenizer, self.batch_size
    buckets = {}
    for r in rows:
      length = min(len(r[2]), self.max_seq_length - 2) + 2
      buckets.setdefault(_round_up(length, LENGTH_MULTIPLE), []).append(r)
    done = 0
    for t in sorted(buckets):
      group = buckets[t]
      for start in range(0, len(group), b):
        chunk = group[start:start + b]
        ids = np.full((b, t), tok.pad_token_id, np.int32)
        mask = np.zeros((b, t), np.int32)
        pos = np.zeros((b,), np.int32)
        for i, (_, _, piece_ids, p) in enumerate(chunk):
          row = [tok.cls_token_id] + list(piece_ids[:self.max_seq_length - 2]) + [tok.sep_token_id]
          row[p] = tok.mask_token_id
          ids[i, :len(row)], mask[i, :len(row)], pos[i] = row, 1, p
        top = np.asarray(self._mlm(self.params, ids, mask, pos))  # [b, K]
        for i, (s, j, _, _) in enumerate(chunk):
          s.candidates[j] = top[i]
        done += len(chunk)
        if progress is not None:
          progress(done, len(rows))

  def _embedding_neighbours(self, piece_lists: list[list[int]]) -> np.ndarray:
    """`[len(piece_lists), K]` ids: nearest whole words of each mean word-piece embedding."""
    emb = np.asarray(self.params['embeddings']['word_embeddings']['embedding'])
    vecs = np.stack([emb[p].mean(0) for p in piece_lists]).astype(np.float32)  # [W, H]
    out, b = [], self.batch_size
    for start in range(0, len(vecs), b):
      chunk = vecs[start:start + b]
      padded = np.zeros((b, vecs.shape[1]), np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._neighbours(self._unit_emb, padded))[:len(chunk)])
    return np.concatenate(out)


def _mlm_top_k(model, k, bias, params, ids, mask, pos):
  """`[B, K]` int32: the K best candidate tokens of the MLM at position `pos [B]` of each row."""
  out = model.apply({'params': params}, ids, mask, deterministic=True,
                    logits_positions=pos[:, None])
  return jax.lax.top_k(out.logits[:, 0].astype(jnp.float32) + bias, k)[1]


def _neighbour_top_k(k, bias, unit_emb, vecs):
  """`[B, K]` int32: the K candidate tokens of highest cosine similarity to `vecs [B, H]`."""
  unit = vecs / jnp.maximum(jnp.linalg.norm(vecs, axis=-1, keepdims=True), 1e-12)
  return jax.lax.top_k(unit @ unit_emb.T + bias, k)[1]


def sample_copies(sentences: Sequence[SentenceSlots], vocab: Sequence[str], *, n_a: int,
                  p_t: float, rng: np.random.Generator) -> list[tuple[str, ...]]:
  """The augmented copies of one example (its 1 or 2 sentences, candidates filled).

  For each of `n_a` draws every slot is replaced with probability `p_t` by one of its K
  candidates, uniformly; draws equal to the original or to an earlier draw are dropped.

  Args:
    sentences: the example's sentences (`Augmenter.split` + `Augmenter.candidates`).
    vocab: token id -> token string.
    n_a: N_a, the draws.
    p_t: p_t, the replacement probability of each slot.
    rng: the example's generator (`default_rng([seed, example index])`).

  Returns:
    Up to `n_a` distinct copies, each a tuple of the sentences' texts (words joined by spaces).
  """
  sizes = [len(s.slots) for s in sentences]
  total, k = sum(sizes), sentences[0].candidates.shape[1] if sentences else 0
  replace = rng.random((n_a, total)) < p_t  # drawn even when total == 0: same stream
  choice = rng.integers(0, max(k, 1), (n_a, total))
  original = tuple(' '.join(s.words) for s in sentences)
  seen, out = {original}, []
  for n in range(n_a):
    texts, offset = [], 0
    for s, size in zip(sentences, sizes):
      words = list(s.words)
      for j in range(size):
        if replace[n, offset + j]:
          words[s.slots[j]] = vocab[s.candidates[j, choice[n, offset + j]]]
      texts.append(' '.join(words))
      offset += size
    copy = tuple(texts)
    if copy not in seen:
      seen.add(copy)
      out.append(copy)
  return out


def augment_rows(header: Sequence[str], rows: Sequence[Sequence[str]], task: glue.GlueTask,
                 augmenter: Augmenter, *, n_a: int, p_t: float, seed: int, first_index: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> list[list[str]]:
  """Every row followed by its augmented copies (text columns replaced, the rest kept).

  Args:
    header: the TSV's column names (`glue.read_table`).
    rows: the rows to augment.
    task: the task (which columns hold text).
    augmenter: the candidate source.
    n_a / p_t: N_a and p_t.
    seed: the augmentation seed.
    first_index: the index of `rows[0]` in the file (example i draws from `[seed, i]`).
    progress: passed to `Augmenter.candidates`.

  Returns:
    The output rows: each input row, then its copies.
  """
  cols = [header.index(task.text_a)] + ([header.index(task.text_b)] if task.text_b else [])
  per_row = [[augmenter.split(r[c]) for c in cols] for r in rows]
  augmenter.candidates([s for ss in per_row for s in ss], progress)
  out = []
  for i, (row, sentences) in enumerate(zip(rows, per_row)):
    out.append(list(row))
    rng = np.random.default_rng([seed, first_index + i])
    for copy in sample_copies(sentences, augmenter.vocab, n_a=n_a, p_t=p_t, rng=rng):
      new = list(row)
      for c, text in zip(cols, copy):
        new[c] = text
      out.append(new)
  return out


def augment_file(train_path: str, out_path: str, task: glue.GlueTask, augmenter: Augmenter, *,
                 n_a: int = 20, p_t: float = 0.4, seed: int = 0, num_examples: int = 0,
                 chunk_size: int = 256, settings: dict | None = None) -> dict:
  """Writes the augmented GLUE TSV of `train_path`, resumably, chunk by chunk.

  Chunks of `chunk_size` examples are written to `<out_path>.parts/` as they finish (atomically);
  a rerun with the same settings skips the finished ones. The last step concatenates them into
  `out_path` (atomically) and deletes the parts.

  Args:
    train_path: the task's labelled train.tsv.
    out_path: the augmented TSV to write (same header; each row, then its copies).
    task: its GLUE task.
    augmenter: the candidate source.
    n_a / p_t: N_a, p_t.
    seed: the augmentation seed.
    num_examples: augment only the first N examples (the rest are copied unchanged); 0 = all.
    chunk_size: examples per resumable part.
    settings: what the parts were made with (recorded in `settings.json`; a rerun with other
      settings refuses to mix parts); the caller's description of teacher and flags.

  Returns:
    `{'examples', 'augmented_examples', 'rows', 'copies_per_augmented_example', 'seconds'}`.

  Raises:
    FileNotFoundError / ValueError: as `glue.read_tsv` (the file is validated first).
    FileExistsError: `out_path` exists.
    ValueError: leftover parts of other settings, or `n_a < 1`, `p_t` outside [0, 1],
      `chunk_size < 1`.
  """
  if n_a < 1 or not 0.0 <= p_t <= 1.0 or chunk_size < 1:
    raise ValueError(f'n_a={n_a} must be >= 1, p_t={p_t} in [0, 1], chunk_size={chunk_size} >= 1.')
  if os.path.exists(out_path):
    raise FileExistsError(f'{out_path} already exists; remove it or choose another --out.')
  glue.read_tsv(train_path, task)  # the labels and columns are checked before any work
  header, rows = glue.read_table(train_path)
  num = min(num_examples or len(rows), len(rows))
  parts = out_path + '.parts'
  os.makedirs(parts, exist_ok=True)
  record = dict(settings or {}, train=os.path.abspath(train_path), n_a=n_a, p_t=p_t, seed=seed,
                top_k=augmenter.top_k, max_seq_length=augmenter.max_seq_length,
                num_examples=num, chunk_size=chunk_size)
  settings_path = os.path.join(parts, 'settings.json')
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      old = json.load(f)
    if old != record:
      raise ValueError(f'{parts} holds parts made with other settings ({old}); delete it, or rerun '
                       f'with those settings.')
  else:
    atomic.write_json(settings_path, record)
  t0 = time.time()
  names = []
  for start in range(0, num, chunk_size):
    name = os.path.join(parts, f'{start:08d}.tsv')
    names.append(name)
    if os.path.exists(name):
      continue
    chunk = rows[start:min(start + chunk_size, num)]
    t_chunk = time.time()

    def progress(done, total, start=start, t_chunk=t_chunk):
      if done == total or done % (20 * augmenter.batch_size) == 0:
        logging.info('examples %d-%d of %d: %d/%d MLM rows (%.1f rows/s)', start,
                     start + len(chunk), num, done, total, done / max(time.time() - t_chunk, 1e-9))

    glue.write_tsv(name, header, augment_rows(header, chunk, task, augmenter, n_a=n_a, p_t=p_t,
                                              seed=seed, first_index=start, progress=progress))
  written = 0
  with atomic.atomic_file(out_path, 'w') as f:
    f.write('\t'.join(header) + '\n')
    for name in names:
      _, part = glue.read_table(name)
      written += len(part)
      f.write(''.join('\t'.join(r) + '\n' for r in part))
    f.write(''.join('\t'.join(r) + '\n' for r in rows[num:]))
  for name in names + [settings_path]:
    os.remove(name)
  os.rmdir(parts)
  copies = written - num
  return {'examples': len(rows), 'augmented_examples': num, 'rows': written + len(rows) - num,
          'copies_per_augmented_example': copies / max(num, 1), 'seconds': time.time() - t0}
