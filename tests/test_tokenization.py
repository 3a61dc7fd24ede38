"""flaxdistil.data.tokenization: a fast BERT tokenizer with its special tokens, from any layout."""
import pytest

from flaxdistil.data import tokenization

from conftest import CLS
from conftest import MASK
from conftest import PAD
from conftest import SEP
from conftest import SPECIALS
from conftest import UNK
from conftest import WORDS


def ids(tok, text):
  return tok(text, add_special_tokens=False)['input_ids']


def test_load_tokenizer(tok, tmp_path):
  assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
          tok.mask_token_id) == (PAD, UNK, CLS, SEP, MASK)
  assert tok.is_fast and len(tok) == len(SPECIALS) + len(WORDS)
  assert ids(tok, 'The Cats sat') == [5, 7, 27, 9]  # lowercased, '##s' split off
  with pytest.raises(FileNotFoundError, match='does not exist'):
    tokenization.load_tokenizer(str(tmp_path / 'nope'))
  # Layout of shared/models/tokenizer-bert-base-uncased: tokenizer.json without tokenizer_class, which
  # transformers v5's AutoTokenizer loads without special tokens.
  bare = tmp_path / 'bare'
  bare.mkdir()
  tok.backend_tokenizer.save(str(bare / 'tokenizer.json'))
  (bare / 'tokenizer_config.json').write_text('{"do_lower_case": true}')
  tok2 = tokenization.load_tokenizer(str(bare))
  assert (tok2.mask_token_id, tok2.pad_token_id, tok2.cls_token_id) == (MASK, PAD, CLS)
  assert ids(tok2, 'The Cats sat') == [5, 7, 27, 9]
