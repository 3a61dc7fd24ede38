"""flaxdistil.data.synthetic: the smoke-run corpus is a pure function of its seed, written once."""

import os

from flaxdistil.data import synthetic
from flaxdistil.data import tokenization


def test_corpus_is_deterministic_idempotent_and_tokenizable(tmp_path):
  a = synthetic.write_corpus(str(tmp_path / 'a'), seed=3)
  b = synthetic.write_corpus(str(tmp_path / 'b'), seed=3)
  c = synthetic.write_corpus(str(tmp_path / 'c'), seed=4)
  read = lambda p: open(p['train_files'][0]).read()
  assert read(a) == read(b) != read(c)
  docs = read(a).strip().split('\n\n')
  assert len(docs) == 400 and all(d.endswith('.') for d in docs)
  mtime = os.path.getmtime(a['train_files'][0])
  assert synthetic.write_corpus(str(tmp_path / 'a'), seed=99) == a  # existing files are reused
  assert os.path.getmtime(a['train_files'][0]) == mtime
  assert not [n for n in os.listdir(tmp_path / 'a') if n.startswith('.synthetic')]  # no staging
  tok = tokenization.load_tokenizer(a['tokenizer'])
  ids = tok(docs[0], add_special_tokens=False)['input_ids']
  assert tok.unk_token_id not in ids  # every generated word is in the vocabulary
