"""Chunked vocabulary terms (mlm, ce, mse) without `[B, T, V]` logits: the dense terms' values,
counts and gradients for any chunk size; plain MLM needs no teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.objectives import chunked_vocab
from flaxdistil.objectives import losses


def _logits_only(logits):
  """A `ModelOutput` with logits only (the vocabulary terms read nothing else)."""
  return bert.ModelOutput(logits=logits, hidden_states=())


def _chunk_problem(seed=0, b=3, m=7, h=8, v=50):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = np.ones((b, m), np.int32)
  mask[1, 5:] = 0
  labels = np.where(rng.random((b, m)) < 0.4, rng.integers(0, v, (b, m)), losses.IGNORE_INDEX)
  labels[mask == 0] = losses.IGNORE_INDEX
  batch = {'labels': jnp.asarray(labels, jnp.int32), 'attention_mask': jnp.asarray(mask)}
  return f(b, m, h), (f(v, h), f(v)), f(b, m, h), (f(v, h), f(v)), batch


@pytest.mark.slow
@pytest.mark.parametrize('restrict', [False, True])
@pytest.mark.parametrize('chunk', [1, 3, 7, 16])
def test_chunked_vocab_terms_equal_dense_values_and_gradients(restrict, chunk):
  s_h, s_proj, t_h, t_proj, batch = _chunk_problem()
  w = losses.DistillWeights(temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=0.0,
                            alpha_mse=0.3, restrict_ce_to_mask=restrict)
  counts = losses.term_counts(batch, w)

  def dense(h, emb, bias):
    logits = lambda x, p: x @ p[0].T + p[1]
    terms = losses.distillation_terms(_logits_only(logits(h, (emb, bias))),
                                      _logits_only(logits(t_h, t_proj)), batch, w)
    return losses.combine(terms, counts, w), terms

  def chunked(h, emb, bias):
    return chunked_vocab.chunked_vocab_terms(h, (emb, bias), t_h, t_proj, batch, w, counts, chunk)

  (l_d, t_d), g_d = jax.value_and_grad(dense, argnums=(0, 1, 2), has_aux=True)(s_h, *s_proj)
  (l_c, t_c), g_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2), has_aux=True))(
      s_h, *s_proj)
  assert set(t_c) == {'ce', 'mlm', 'mse'}
  np.testing.assert_allclose(l_c, l_d, rtol=1e-6)
  for k in t_c:
    np.testing.assert_allclose(t_c[k][0], t_d[k][0], rtol=1e-6)
    assert float(t_c[k][1]) == float(t_d[k][1])
  for a, b in zip(g_c, g_d):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_vocab_terms_mlm_only_needs_no_teacher_and_kl_of_self_is_zero():
  s_h, s_proj, _, _, batch = _chunk_problem(1)
  w = losses.DistillWeights(alpha_ce=0.0, alpha_cos=0.0)
  loss, terms = chunked_vocab.chunked_vocab_terms(s_h, s_proj, None, None, batch, w,
                                                  losses.term_counts(batch, w), 4)
  logits = s_h @ s_proj[0].T + s_proj[1]
  ref = losses.mlm_cross_entropy(logits, batch['labels'])
  np.testing.assert_allclose(terms['mlm'][0], ref[0], rtol=1e-6)
  np.testing.assert_allclose(loss, 2.0 * ref[0] / ref[1], rtol=1e-6)
  w_kl = losses.DistillWeights(alpha_mlm=0.0, alpha_cos=0.0, temperature=3.0)
  _, kl = chunked_vocab.chunked_vocab_terms(s_h, s_proj, s_h, s_proj, batch, w_kl,
                                            losses.term_counts(batch, w_kl), 4)
  assert abs(float(kl['ce'][0])) < 1e-4
  with pytest.raises(ValueError, match='teacher'):
    chunked_vocab.chunked_vocab_terms(s_h, s_proj, None, None, batch, w_kl,
                                      losses.term_counts(batch, w_kl), 4)
