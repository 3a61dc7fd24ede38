"""flaxdistil.data.masking: BERT's 15% / 80-10-10 masking and DistilBERT's smoothed sampling."""
import numpy as np

from flaxdistil.data import masking

from conftest import CLS
from conftest import MASK
from conftest import MASK_KW
from conftest import PAD
from conftest import SEP
from conftest import UNK
from conftest import fake_batch


def test_mask_tokens_statistics():
  vocab = 1000
  x = fake_batch(512, 128, vocab, np.random.default_rng(0))
  masked, labels = masking.mask_tokens(x, np.random.default_rng(1), vocab_size=vocab, **MASK_KW)
  assert masked.dtype == np.int32 and labels.dtype == np.int32 and masked.shape == x.shape
  special = np.isin(x, [PAD, UNK, CLS, SEP, MASK])
  sel = labels != -100
  assert not np.any(sel & special)  # specials and padding never selected
  np.testing.assert_array_equal(labels[sel], x[sel])
  np.testing.assert_array_equal(masked[~sel], x[~sel])  # unselected tokens untouched
  rate = sel.sum() / (~special).sum()
  assert abs(rate - 0.15) < 0.005
  n = sel.sum()
  frac_mask = np.sum(masked[sel] == MASK) / n
  frac_keep = np.sum(masked[sel] == x[sel]) / n
  frac_rand = np.sum((masked[sel] != MASK) & (masked[sel] != x[sel])) / n
  assert abs(frac_mask - 0.8) < 0.015 and abs(frac_keep - 0.1) < 0.01 and abs(frac_rand - 0.1) < 0.01
  assert masked.min() >= 0 and masked.max() < vocab
  again = masking.mask_tokens(x, np.random.default_rng(1), vocab_size=vocab, **MASK_KW)
  np.testing.assert_array_equal(again[0], masked)


def test_token_probabilities_and_smoothed_masking():
  vocab = 50
  packed = np.array([[CLS, 5, 5, 5, 5, 6, SEP, PAD]], np.int32)
  probs = masking.token_probabilities(packed, vocab, 0.5, [PAD, UNK, CLS, SEP, MASK])
  assert probs.dtype == np.float32 and probs.shape == (vocab,)
  np.testing.assert_allclose(probs[[5, 6, 7]], [4 ** -0.5, 1.0, 1.0])  # unseen: count clipped to 1
  assert np.all(probs[:5] == 0)
  x = fake_batch(64, 32, vocab, np.random.default_rng(2))
  special = np.isin(x, [PAD, UNK, CLS, SEP, MASK])
  weights = np.ones(vocab, np.float32)
  weights[7] = 0.0  # never predicted
  weights[8] = 50.0  # strongly preferred
  for seed in range(5):
    _, labels = masking.mask_tokens(x, np.random.default_rng(seed), vocab_size=vocab, token_probs=weights,
                               **MASK_KW)
    sel = labels != -100
    assert sel.sum() == int(np.floor(0.15 * (~special).sum() + 0.5))  # exact count
    assert not np.any(sel & special) and not np.any(sel & (x == 7))
    assert sel[x == 8].mean() > 5 * sel[(x > 8)].mean()
