"""8 host CPU devices for sharding tests (set before jax is imported); shared fixtures."""

import os
import tempfile

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Runs' token cache (default ~/.cache/flaxdistil) goes to a per-session temp dir; subprocesses inherit it.
os.environ.setdefault('FLAXDISTIL_CACHE', tempfile.mkdtemp(prefix='flaxdistil_cache_'))

# The word-level vocabulary of `tok` (test_corpus, test_input_pipeline): ids 0-4 are SPECIALS,
# then WORDS in order ('##s' is a WordPiece suffix, 'café' checks unicode handling).
WORDS = ['the', 'a', 'cat', 'dog', 'sat', 'on', 'mat', 'ran', 'and', 'big', 'small', 'red', 'blue',
         'house', 'tree', 'bird', 'flew', 'over', 'green', 'hill', '.', ',', '##s', 'café']
SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
PAD, UNK, CLS, SEP, MASK = range(5)


@pytest.fixture(scope='session')
def tok(tmp_path_factory):
  """A fast BERT WordPiece tokenizer over SPECIALS + WORDS, from a bare vocab.txt directory."""
  from flaxdistil import tokenization  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('tok')
  (d / 'vocab.txt').write_text('\n'.join(SPECIALS + WORDS) + '\n')
  return tokenization.load_tokenizer(str(d))
