"""Tokenizer loading: a fast BERT-style tokenizer with [CLS]/[SEP]/[PAD]/[MASK] defined.

Its own module so that export, scripts and data code share one loader without
importing the input pipeline.
"""
from __future__ import annotations

import json
import os

from flaxdistil.storage import hub


def load_tokenizer(path_or_name: str):
  """Loads a fast (Rust `tokenizers`-backed) tokenizer with [CLS]/[SEP]/[PAD]/[MASK] defined.

  A local directory whose `tokenizer_config.json` names `BertTokenizer(Fast)` or no class (a
  bare BERT tokenizer dir, which transformers v5's AutoTokenizer loads without special tokens)
  gets `transformers.BertTokenizerFast` directly: what AutoTokenizer returns for it, without the
  ~3 s import of torch that AutoTokenizer's config machinery costs every training run. Anything
  else goes through `transformers.AutoTokenizer`; where that fails or leaves a special token
  undefined, a directory with tokenizer.json or vocab.txt is loaded as BERT WordPiece.

  Args:
    path_or_name: a local directory (`~` expanded) or a hub name.

  Returns:
    A `transformers.PreTrainedTokenizerFast` with [CLS], [SEP], [PAD] and [MASK] ids.

  Raises:
    FileNotFoundError: a local path (`hub.looks_like_local_path`) that is missing or a file.
    ValueError: no tokenizer could be loaded, it is not a fast one, or it lacks one of the
      special tokens.
  """
  import transformers  # pylint: disable=g-import-not-at-top  (the cache-hit path never needs it)
  path = os.path.expanduser(path_or_name)
  if hub.looks_like_local_path(path_or_name) and not os.path.isdir(path):
    what = 'is a file, not a directory' if os.path.exists(path) else 'does not exist'
    raise FileNotFoundError(f'Tokenizer path {path_or_name!r} {what}; pass the directory that holds '
                            'tokenizer.json or vocab.txt (e.g. the teacher model directory).')
  required = ('cls_token', 'sep_token', 'pad_token', 'mask_token')
  missing = lambda t: [n for n in required if getattr(t, n + '_id', None) is None]
  tok, error = None, None
  try:
    if _bert_class(path):
      tok = transformers.BertTokenizerFast.from_pretrained(path)
    else:
      tok = transformers.AutoTokenizer.from_pretrained(path)
  except Exception as e:  # noqa: BLE001 - re-raised below with a fix if no fallback works
    error = e
  if (tok is None or missing(tok)) and _has_tokenizer_files(path):
    try:
      tok = transformers.BertTokenizerFast.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
      error = e
  if tok is None:
    raise ValueError(f'Could not load a tokenizer from {path_or_name!r} ({error}); pass a local '
                     'directory with tokenizer.json or vocab.txt, or a hub name when online.')
  if not getattr(tok, 'is_fast', False):
    raise ValueError(f'Tokenizer {path_or_name!r} is a slow (pure Python) tokenizer; packing needs a '
                     'fast one: provide tokenizer.json (save it with a fast tokenizer).')
  if missing(tok):
    raise ValueError(f'Tokenizer {path_or_name!r} lacks {missing(tok)}; MLM packing needs [CLS], '
                     '[SEP], [PAD] and [MASK]: add them to tokenizer_config.json.')
  return tok


def _bert_class(path: str) -> bool:
  """True for a local tokenizer dir that AutoTokenizer would load as (or fall back to) BERT's:
  `tokenizer_config.json` names BertTokenizer(Fast), or no class and `config.json` (if any) is
  a BERT's (AutoTokenizer picks the tokenizer of the model type then)."""
  if not _has_tokenizer_files(path):
    return False
  try:
    name = _read_json(os.path.join(path, 'tokenizer_config.json')).get('tokenizer_class')
    model_type = _read_json(os.path.join(path, 'config.json')).get('model_type')
  except (OSError, ValueError, AttributeError):
    return False  # AutoTokenizer's own error (or fallback) names the problem
  return name in ('BertTokenizer', 'BertTokenizerFast') or (
      name is None and model_type in (None, 'bert'))


def _has_tokenizer_files(path: str) -> bool:
  """A local directory holding a BERT WordPiece vocab.txt or a `tokenizers` tokenizer.json."""
  return os.path.isdir(path) and any(
      os.path.exists(os.path.join(path, f)) for f in ('vocab.txt', 'tokenizer.json'))


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)
