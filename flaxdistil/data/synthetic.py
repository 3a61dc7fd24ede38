"""A small synthetic corpus + WordPiece tokenizer, so smoke runs need no files.

`configs/tiny.py` uses it: the text comes from a fixed random Markov chain over
a few hundred made-up words, so masked tokens are partly predictable from
context (an MLM loss can fall) while everything is generated from a seed.
"""

import os
import tempfile

import numpy as np

SPECIAL_TOKENS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']


def vocab_size(vocab_words: int = 300) -> int:
  """Tokens in the tokenizer `write_corpus(..., vocab_words=vocab_words)` writes."""
  return len(SPECIAL_TOKENS) + 2 + vocab_words  # '.' and ','


def _words(rng: np.random.Generator, n: int) -> list[str]:
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  out = set()
  while len(out) < n:
    out.add(''.join(rng.choice(letters, size=int(rng.integers(2, 7)))))
  return sorted(out)


def write_corpus(directory: str, *, seed: int = 0, vocab_words: int = 300,
                 train_documents: int = 400, eval_documents: int = 40) -> dict:
  """Writes `vocab.txt`, tokenizer files, `train.txt` and `valid.txt`.

  Documents are paragraphs separated by a blank line (the layout of the real
  Wikipedia files). Idempotent: if `train.txt` and `valid.txt` exist nothing is
  written. The text files are renamed into place last, so concurrent writers
  never expose a half-written corpus.

  Args:
    directory: output directory (created if missing).
    seed: seeds the vocabulary, the Markov chain and both splits.
    vocab_words: number of made-up words (the vocabulary adds 5 special tokens, '.' and ',').
    train_documents / eval_documents: documents in `train.txt` / `valid.txt`.

  Returns:
    dict with `tokenizer` (directory), `train_files`, `eval_files` (lists).
  """
  os.makedirs(directory, exist_ok=True)
  paths = {'tokenizer': directory,
           'train_files': [os.path.join(directory, 'train.txt')],
           'eval_files': [os.path.join(directory, 'valid.txt')]}
  if all(os.path.exists(p) for p in paths['train_files'] + paths['eval_files']):
    return paths
  # Several processes of one run may write at once: build privately, then rename.
  staging = tempfile.mkdtemp(prefix='.synthetic', dir=directory)
  rng = np.random.default_rng(seed)
  words = _words(rng, vocab_words)
  vocab = SPECIAL_TOKENS + ['.', ','] + words
  from transformers import BertTokenizerFast  # pylint: disable=g-import-not-at-top
  # transformers v5 takes the vocab itself (`vocab_file=` is silently ignored there).
  BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(staging)
  # Sparse transition matrix: each word is followed by one of 4 likely words.
  nxt = rng.integers(0, len(words), size=(len(words), 4))

  def document(r):
    """One document: 2-5 sentences of 5-19 words each, drawn with generator `r`."""
    sents = []
    for _ in range(int(r.integers(2, 6))):
      w = int(r.integers(len(words)))
      toks = []
      for _ in range(int(r.integers(5, 20))):
        toks.append(words[w])
        w = int(nxt[w, r.integers(4)]) if r.random() < 0.9 else int(r.integers(len(words)))
      sents.append(' '.join(toks) + ' .')
    return ' '.join(sents)

  for name, n, s in (('train.txt', train_documents, seed + 1),
                     ('valid.txt', eval_documents, seed + 2)):
    r = np.random.default_rng(s)
    with open(os.path.join(staging, name), 'w') as f:
      f.write('\n\n'.join(document(r) for _ in range(n)) + '\n')
  for name in sorted(os.listdir(staging), key=lambda n: n.endswith('.txt')):  # text files last
    os.replace(os.path.join(staging, name), os.path.join(directory, name))
  os.rmdir(staging)
  return paths
