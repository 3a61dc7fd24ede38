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


def test_bert_dirs_load_as_autotokenizer_would_and_a_run_start_imports_no_torch(tok, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  import transformers  # pylint: disable=g-import-not-at-top

  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  from conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  saved = tmp_path / 'saved'
  tok.save_pretrained(str(saved))  # tokenizer_class BertTokenizer: the direct path
  auto = transformers.AutoTokenizer.from_pretrained(str(saved))
  ours = tokenization.load_tokenizer(str(saved))
  assert type(ours) is type(auto) and ours.all_special_ids == auto.all_special_ids
  assert ours('the cat sat', 'a dog ran') == auto('the cat sat', 'a dog ran')
  # Another model type's tokenizer_class goes through AutoTokenizer (which fails on this dir).
  other = tmp_path / 'other'
  other.mkdir()
  tok.backend_tokenizer.save(str(other / 'tokenizer.json'))
  (other / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'NoSuchTokenizer'}))
  assert not tokenization._bert_class(str(other))  # pylint: disable=protected-access
  (other / 'tokenizer_config.json').write_text('{}')
  (other / 'config.json').write_text(json.dumps({'model_type': 'roberta'}))
  assert not tokenization._bert_class(str(other))  # pylint: disable=protected-access
  # What a training command loads before its first step: tokenizer and metric writer, no torch.
  code = ('import sys; from flaxdistil.data import tokenization; '
          'from flaxdistil.training import metric_writers; '
          f'tokenization.load_tokenizer({str(saved)!r}); '
          f'w = metric_writers.MetricWriter({str(tmp_path)!r}); w.write(1, {{"loss": 1.0}}); '
          'print("torch" in sys.modules)')
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=subprocess_env(1),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and r.stdout.strip() == 'False', r.stderr[-2000:]
  assert (tmp_path / 'metrics.jsonl').exists() and any((tmp_path / 'tensorboard').iterdir())
