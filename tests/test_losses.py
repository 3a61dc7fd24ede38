"""Loss properties: KL(p||p)=0, T^2 scaling, padding excluded, alpha=0, torch parity, and the
sparse top-k KL of offline distillation (k = V is the dense KL; the student normalised over V)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxdistil.model import bert
from flaxdistil.objectives import losses


def _rand(shape, seed, scale=3.0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * scale


class _Out:
  def __init__(self, logits, hidden):
    self.logits, self.hidden_states = logits, (hidden,)


@pytest.mark.parametrize('temperature', [0.5, 1.0, 2.0, 7.0])
def test_kl_of_identical_distributions_is_zero(temperature):
  logits = _rand((2, 5, 11), 0)
  s, c = losses.kl_div_loss(logits, logits, jnp.ones((2, 5)), temperature)
  assert abs(float(s)) < 1e-5 and float(c) == 10.0


def test_kl_matches_torch_kldiv_batchmean_times_t2():
  t = 2.0
  s_logits, t_logits = _rand((3, 4, 9), 1), _rand((3, 4, 9), 2)
  s, c = losses.kl_div_loss(s_logits, t_logits, jnp.ones((3, 4)), t)
  ref = torch.nn.KLDivLoss(reduction='batchmean')(
      torch.log_softmax(torch.tensor(np.asarray(s_logits)).view(-1, 9) / t, -1),
      torch.softmax(torch.tensor(np.asarray(t_logits)).view(-1, 9) / t, -1)) * t * t
  np.testing.assert_allclose(float(s / c), float(ref), rtol=1e-5)


def test_kl_t_squared_scaling():
  # For large T, KL(softmax(t/T)||softmax(s/T)) ~ var-diff / (2 T^2): T^2 keeps the loss O(1).
  s_logits, t_logits = _rand((2, 3, 7), 3), _rand((2, 3, 7), 4)
  w = jnp.ones((2, 3))
  big = [float(losses.kl_div_loss(s_logits, t_logits, w, t)[0]) for t in (50.0, 100.0)]
  np.testing.assert_allclose(big[0], big[1], rtol=2e-2)
  raw = float(losses.kl_div_loss(s_logits, t_logits, w, 100.0)[0]) / 100.0**2
  assert raw < big[1] * 1e-3  # without the T^2 factor the term would vanish


def test_padding_is_excluded():
  s_logits, t_logits = _rand((2, 6, 8), 5), _rand((2, 6, 8), 6)
  h_s, h_t = _rand((2, 6, 4), 7), _rand((2, 6, 4), 8)
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  # Garbage in padded positions must not change any term.
  s2 = s_logits.at[0, 4:].set(1e4)
  h2 = h_s.at[0, 4:].set(-1e3)
  for fn, a, b, a2 in ((losses.kl_div_loss, s_logits, t_logits, s2),
                       (losses.mse_logits_loss, s_logits, t_logits, s2),
                       (losses.cosine_embedding_loss, h_s, h_t, h2)):
    args = (2.0,) if fn is losses.kl_div_loss else ()
    r1 = fn(a, b, mask, *args)
    r2 = fn(a2, b, mask, *args)
    np.testing.assert_allclose(np.asarray(r1), np.asarray(r2), rtol=1e-6)
    assert float(r1[1]) == 10.0


def test_mlm_cross_entropy_matches_torch_and_ignores_minus_100():
  logits = _rand((2, 5, 13), 9)
  labels = jnp.array([[3, -100, 7, -100, 0], [-100, -100, 12, 1, -100]])
  s, c = losses.mlm_cross_entropy(logits, labels)
  ref = torch.nn.functional.cross_entropy(torch.tensor(np.asarray(logits)).view(-1, 13),
                                          torch.tensor(np.asarray(labels)).long().view(-1),
                                          ignore_index=-100)
  assert float(c) == 5.0
  np.testing.assert_allclose(float(s / c), float(ref), rtol=1e-5)


def test_cosine_matches_torch():
  h_s, h_t = _rand((2, 3, 6), 10), _rand((2, 3, 6), 11)
  s, c = losses.cosine_embedding_loss(h_s, h_t, jnp.ones((2, 3)))
  ref = torch.nn.CosineEmbeddingLoss()(torch.tensor(np.asarray(h_s)).view(-1, 6),
                                       torch.tensor(np.asarray(h_t)).view(-1, 6), torch.ones(6))
  np.testing.assert_allclose(float(s / c), float(ref), rtol=1e-5)
  assert abs(float(losses.cosine_embedding_loss(h_s, h_s, jnp.ones((2, 3)))[0])) < 1e-5


def test_cosine_width_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match='alpha_cos=0'):
    losses.cosine_embedding_loss(jnp.ones((1, 2, 4)), jnp.ones((1, 2, 8)), jnp.ones((1, 2)))


def _batch():
  labels = jnp.array([[-100, 4, -100, 2], [1, -100, -100, -100]])
  return {'attention_mask': jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]]), 'labels': labels}


@pytest.mark.slow
def test_alpha_zero_removes_term_and_combine_weights():
  s_out, t_out = _Out(_rand((2, 4, 6), 12), _rand((2, 4, 5), 13)), _Out(_rand((2, 4, 6), 14),
                                                                       _rand((2, 4, 5), 15))
  full = losses.DistillWeights(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_mse=0.5)
  batch = _batch()
  terms = losses.distillation_terms(s_out, t_out, batch, full)
  counts = losses.term_counts(batch, full)
  assert set(terms) == {'ce', 'mlm', 'cos', 'mse'}
  assert float(counts['mlm']) == 3.0 and float(counts['ce']) == 7.0
  total = float(losses.combine(terms, counts, full))
  expect = sum(a * float(terms[k][0]) / float(counts[k])
               for k, a in (('ce', 5.0), ('mlm', 2.0), ('cos', 1.0), ('mse', 0.5)))
  np.testing.assert_allclose(total, expect, rtol=1e-6)
  no_ce = full._replace(alpha_ce=0.0)
  t2 = losses.distillation_terms(s_out, t_out, batch, no_ce)
  assert 'ce' not in t2
  np.testing.assert_allclose(float(losses.combine(t2, losses.term_counts(batch, no_ce), no_ce)),
                             expect - 5.0 * float(terms['ce'][0]) / 7.0, rtol=1e-6)
  # Plain MLM needs no teacher at all.
  mlm_only = losses.DistillWeights(alpha_ce=0, alpha_cos=0, alpha_mse=0, alpha_mlm=1.0)
  assert set(losses.distillation_terms(s_out, None, batch, mlm_only)) == {'mlm'}


def test_restrict_ce_to_mask_counts_only_masked_tokens():
  w = losses.DistillWeights(restrict_ce_to_mask=True)
  s_out, t_out = _Out(_rand((2, 4, 6), 16), _rand((2, 4, 5), 17)), _Out(_rand((2, 4, 6), 18),
                                                                       _rand((2, 4, 5), 19))
  terms = losses.distillation_terms(s_out, t_out, _batch(), w)
  assert float(terms['ce'][1]) == 3.0


@pytest.mark.slow
def test_pairs_are_additive_over_microbatches():
  s_logits, t_logits = _rand((4, 5, 7), 20), _rand((4, 5, 7), 21)
  mask = jnp.array(np.random.default_rng(0).integers(0, 2, (4, 5)))
  full = losses.kl_div_loss(s_logits, t_logits, mask, 2.0)
  halves = [losses.kl_div_loss(s_logits[i:i + 2], t_logits[i:i + 2], mask[i:i + 2], 2.0)
            for i in (0, 2)]
  np.testing.assert_allclose(float(full[0]), float(halves[0][0] + halves[1][0]), rtol=1e-6)
  np.testing.assert_allclose(float(full[1]), float(halves[0][1] + halves[1][1]))


def test_bf16_logits_are_upcast():
  s_logits, t_logits = _rand((1, 2, 50), 22), _rand((1, 2, 50), 23)
  s32, _ = losses.kl_div_loss(s_logits, t_logits, jnp.ones((1, 2)), 1.0)
  s16, _ = losses.kl_div_loss(s_logits.astype(jnp.bfloat16), t_logits.astype(jnp.bfloat16),
                              jnp.ones((1, 2)), 1.0)
  assert s16.dtype == jnp.float32
  np.testing.assert_allclose(float(s16), float(s32), rtol=0.05)


@pytest.mark.slow
def test_soft_cross_entropy_is_kl_plus_teacher_entropy_scaled_by_t2_and_masks_padding():
  rng = np.random.default_rng(3)
  s = jnp.asarray(rng.normal(size=(5, 3)) * 2, jnp.float32)
  t = jnp.asarray(rng.normal(size=(5, 3)) * 2, jnp.float32)
  w = jnp.asarray([1, 1, 1, 1, 0], jnp.float32)  # last row is padding
  for temp in (1.0, 2.5):
    total, count = losses.soft_cross_entropy(s, t, w, temp)
    kl, _ = losses.kl_div_loss(s[:, None], t[:, None], w[:, None], temp)
    p = jax.nn.softmax(t / temp)
    entropy = -jnp.sum(jnp.sum(p * jax.nn.log_softmax(t / temp), -1) * w) * temp ** 2
    assert float(count) == 4.0
    np.testing.assert_allclose(total, kl + entropy, rtol=1e-5)
  # Padding rows contribute nothing, whatever their logits.
  s2 = s.at[4].set(100.0)
  np.testing.assert_allclose(losses.soft_cross_entropy(s2, t, w, 2.0)[0],
                             losses.soft_cross_entropy(s, t, w, 2.0)[0], rtol=1e-6)
  # Gradient wrt student logits: T * (softmax(s/T) - softmax(t/T)) per real row (T^2 / T).
  g = jax.grad(lambda x: losses.soft_cross_entropy(x, t, w, 2.0)[0])(s)
  want = 2.0 * (jax.nn.softmax(s / 2.0) - jax.nn.softmax(t / 2.0)) * w[:, None]
  np.testing.assert_allclose(g, want, atol=1e-5)


@pytest.mark.slow
def test_task_terms_and_counts_use_examples_not_tokens():
  rng = np.random.default_rng(0)
  s_logits = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
  hidden = jnp.asarray(rng.normal(size=(4, 6, 8)), jnp.float32)
  batch = {'labels': jnp.asarray([0, 1, 1, -100]), 'attention_mask': jnp.ones((4, 6), jnp.int32)}
  w = losses.DistillWeights(temperature=1.0, alpha_ce=1.0, alpha_mlm=0.0, alpha_cos=0.0,
                            alpha_task=1.0)
  terms = losses.task_terms(_output(s_logits, hidden), _output(s_logits, hidden), batch, w)
  counts = losses.term_counts(batch, w)
  assert set(terms) == {'ce', 'task'} and float(counts['ce']) == float(counts['task']) == 3.0
  # Student == teacher: soft CE equals the teacher entropy, so the KL part is 0.
  p = jax.nn.softmax(s_logits[:3])
  np.testing.assert_allclose(terms['ce'][0], -jnp.sum(p * jnp.log(p)), rtol=1e-5)
  nll = -jax.nn.log_softmax(s_logits[:3])[jnp.arange(3), jnp.asarray([0, 1, 1])]
  np.testing.assert_allclose(terms['task'][0], jnp.sum(nll), rtol=1e-5)


def _output(class_logits, hidden):
  return bert.ModelOutput(logits=None, hidden_states=(hidden,), class_logits=class_logits)


# ----------------------------------------------------------------------------- sparse top-k KL
# (the offline objective: the teacher cache stores the top-k logits)

def _logits(seed, v=40, scale=3.0):
  r = np.random.default_rng(seed)
  return (r.normal(size=(2, 5, v)) * scale).astype(np.float32)


@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0])
@pytest.mark.parametrize('tail_bucket', [False, True])
def test_sparse_kl_with_k_equal_vocab_is_the_dense_kl(temperature, tail_bucket):
  s, t = _logits(0), _logits(1)
  w = np.ones((2, 5), np.float32)
  w[1, 3:] = 0  # padding
  logz = jax.nn.logsumexp(t / temperature, -1)
  dense = losses.kl_div_loss(s, t, w, temperature)
  for k in (t.shape[-1],) + ((t.shape[-1] - 1,) if tail_bucket else ()):
    # k = V - 1 with the tail bucket: the bucket is the one remaining token, again the dense KL.
    values, ids = jax.lax.top_k(t, k)
    sparse = losses.sparse_kl_div_loss(s, values, ids, w, temperature, tail_bucket, logz)
    np.testing.assert_allclose(sparse[0], dense[0], rtol=1e-5, err_msg=f'k={k}')
    assert sparse[1] == dense[1] == 8


@pytest.mark.parametrize('k', [1, 3, 10])
def test_sparse_kl_is_nonnegative_normalises_student_over_full_vocab_and_scales_by_t2(k):
  temperature = 2.0
  for seed in range(5):
    s, t = _logits(2 * seed), _logits(2 * seed + 1)
    w = np.ones((2, 5), np.float32)
    values, ids = jax.lax.top_k(t, k)
    logz = jax.nn.logsumexp(t / temperature, -1)
    plain = losses.sparse_kl_div_loss(s, values, ids, w, temperature)[0]
    tail = losses.sparse_kl_div_loss(s, values, ids, w, temperature, True, logz)[0]
    assert plain >= 0 and tail >= 0
    # Reference, written out: p = teacher softmax over its top-k, log q = student log-softmax
    # over all V gathered at the top-k ids (NOT renormalised over the top-k: the peer bug).
    p = jax.nn.softmax(values / temperature, -1)
    logq = jnp.take_along_axis(jax.nn.log_softmax(s / temperature, -1), ids, -1)
    ref = float(jnp.sum(p * (jnp.log(p) - logq))) * temperature ** 2
    np.testing.assert_allclose(plain, ref, rtol=1e-5)
    renormalised_student = float(jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(logq, -1))))
    if k < 10:  # the buggy variant misses -log(sum_j q_j) > 0
      assert plain / temperature ** 2 > renormalised_student + 1e-3
  # A student equal to the teacher: tail-bucket KL is 0; T^2 factor on the plain KL.
  t = _logits(7)
  values, ids = jax.lax.top_k(t, 5)
  w = np.ones((2, 5), np.float32)
  logz = jax.nn.logsumexp(t / 3.0, -1)
  assert abs(float(losses.sparse_kl_div_loss(t, values, ids, w, 3.0, True, logz)[0])) < 1e-4
  at1 = losses.sparse_kl_div_loss(s, values, ids, w, 1.0)[0]
  p = jax.nn.softmax(values, -1)
  logq = jnp.take_along_axis(jax.nn.log_softmax(s, -1), ids, -1)
  np.testing.assert_allclose(at1, float(jnp.sum(p * (jnp.log(p) - logq))), rtol=1e-5)
