"""TinyBERT / MiniLM intermediate-layer terms: zeros at identity, padding,
gradient flow, layer maps, relation heads, projections, optional model outputs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.model.bert import MaskedLM
from flaxdistil.model.bert import ModelConfig
from flaxdistil.objectives import intermediate as im

ALL = im.IntermediateWeights(alpha_emb=1.0, alpha_hidden=1.0, alpha_attn_score=1.0,
                             alpha_attn_kl=1.0, alpha_value_kl=1.0)
FLAGS = im.model_kwargs(ALL)


def _cfg(hidden=32, layers=2, heads=2, **kw):
  return ModelConfig(model_type='distilbert', vocab_size=50, hidden_size=hidden,
                     num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=16,
                     type_vocab_size=0, **kw)


# Eager (no jit): tiny models run in ~50 ms per call, while each jit compile
# would cost seconds on a busy 2-core CI machine.
@functools.lru_cache(maxsize=None)
def _params(cfg, seed):
  ids = jnp.zeros((1, 8), jnp.int32)
  return bert.unbox(MaskedLM(cfg).init(jax.random.PRNGKey(seed), ids, ids + 1)['params'])


def _batch(pad_id=0):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 50, size=(3, 8)).astype(np.int32)
  mask = np.ones((3, 8), np.int32)
  mask[1, 5:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = pad_id
  return {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask)}


def _run(cfg, params, batch):
  return MaskedLM(cfg).apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                             **FLAGS)


TEACHER = _cfg(layers=4)
STUDENT = _cfg(layers=2)
NARROW = _cfg(hidden=16, layers=2)
N_TOK, N_PAIRS = 8 + 5 + 3, 64 + 25 + 9


# ----------------------------------------------------------------------------- layer maps

def test_uniform_layer_map_values_and_errors():
  assert im.uniform_layer_map(4, 12) == [2, 5, 8, 11]
  assert im.uniform_layer_map(2, 4) == [1, 3]
  assert im.uniform_layer_map(6, 12) == [1, 3, 5, 7, 9, 11]
  assert im.uniform_layer_map(3, 3) == [0, 1, 2]
  with pytest.raises(ValueError, match=r'divisible.*explicit list of 5'):
    im.uniform_layer_map(5, 12)
  with pytest.raises(ValueError, match='more layers'):
    im.uniform_layer_map(6, 4)


def test_resolve_layer_map_validates_explicit_lists():
  assert im.resolve_layer_map(4, 12) == [2, 5, 8, 11]
  assert im.resolve_layer_map(5, 12, [1, 4, 6, 9, 11]) == [1, 4, 6, 9, 11]
  with pytest.raises(ValueError, match='has 3 entries but the student has 5'):
    im.resolve_layer_map(5, 12, [1, 2, 3])
  with pytest.raises(ValueError, match=r'indices \[12\] outside \[0, 12\)'):
    im.resolve_layer_map(2, 12, [5, 12])
  with pytest.raises(ValueError, match='strictly increasing'):
    im.resolve_layer_map(2, 12, [5, 5])
  with pytest.raises(ValueError, match='integer'):
    im.resolve_layer_map(2, 12, [1.5, 3])
  with pytest.raises(ValueError, match='integer'):
    im.resolve_layer_map(2, 12, ['a', 3])


# ----------------------------------------------------------------------------- bert.py outputs

@pytest.mark.slow
def test_optional_model_outputs_default_off_and_consistent():
  p = _params(STUDENT, 0)
  b = _batch()
  plain = MaskedLM(STUDENT).apply({'params': p}, b['input_ids'], b['attention_mask'])
  assert plain.attentions is None and plain.attention_scores is None and plain.values is None
  out = MaskedLM(STUDENT).apply({'params': p}, b['input_ids'], b['attention_mask'], **FLAGS)
  # Without the flags the attention core is jax.nn.dot_product_attention, with them the explicit
  # softmax: the same function up to float32 rounding.
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(plain.logits), rtol=1e-5, atol=1e-6)
  for x, y in zip(out.hidden_states, plain.hidden_states):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  assert len(out.attention_scores) == 2 and out.attention_scores[0].shape == (3, 2, 8, 8)
  assert out.attention_scores[0].dtype == jnp.float32
  assert len(out.values) == 2 and out.values[1].shape == (3, 2, 8, 16)
  for s, pr in zip(out.attention_scores, out.attentions):
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(s, -1)), np.asarray(pr), atol=1e-6)
  assert np.all(np.asarray(out.attention_scores[0])[1, :, :, 5:] == np.finfo(np.float32).min)
  # values[0] is the first layer's value projection of the embedding output.
  v = out.hidden_states[0] @ p['encoder']['layer_0']['attention']['value']['kernel']
  v = v + p['encoder']['layer_0']['attention']['value']['bias']
  np.testing.assert_allclose(np.asarray(out.values[0].transpose(0, 2, 1, 3).reshape(3, 8, 32)),
                             np.asarray(v), atol=1e-5)
  # remat keeps the extra outputs.
  rem = MaskedLM(_cfg(layers=2, remat=True)).apply(
      {'params': p}, b['input_ids'], b['attention_mask'], output_attention_scores=True,
      output_values=True)
  np.testing.assert_allclose(np.asarray(rem.attention_scores[1]),
                             np.asarray(out.attention_scores[1]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(rem.values[1]), np.asarray(out.values[1]), atol=1e-6)


# ----------------------------------------------------------------------------- identity / difference

@pytest.mark.slow
def test_every_term_is_exactly_zero_for_identical_models_and_positive_otherwise():
  b = _batch()
  t_out = _run(TEACHER, _params(TEACHER, 0), b)
  same = im.intermediate_terms(t_out, t_out, b, ALL, [0, 1, 2, 3])
  assert set(same) == set(im.TERM_NAMES)
  for name, (s, c) in same.items():
    assert float(s) == 0.0, name
  counts = im.intermediate_counts(b, ALL)
  assert {k: float(c) for k, (_, c) in same.items()} == {k: float(v) for k, v in counts.items()}
  assert float(counts['hidden']) == N_TOK and float(counts['attn_score']) == N_PAIRS

  s_out = _run(STUDENT, _params(STUDENT, 1), b)
  diff = im.intermediate_terms(s_out, t_out, b, ALL, im.uniform_layer_map(2, 4))
  for name, (s, _) in diff.items():
    assert np.isfinite(float(s)) and float(s) > 0, name
  total = im.combine(diff, counts, ALL)
  manual = sum(float(s) / float(counts[k]) for k, (s, _) in diff.items())
  np.testing.assert_allclose(float(total), manual, rtol=1e-6)
  # alpha 0 skips the term; the flags follow the alphas.
  only = im.IntermediateWeights(alpha_hidden=1.0)
  assert set(im.intermediate_terms(s_out, t_out, b, only, [1, 3])) == {'hidden'}
  assert im.model_kwargs(only) == {'output_attentions': False,
                                   'output_attention_scores': False, 'output_values': False}


@pytest.mark.slow
def test_values_match_numpy_reference_formulas():
  """Normalisation: MSE = mean over real elements; KL rows averaged over heads."""
  b = _batch()
  s_out = _run(STUDENT, _params(STUDENT, 1), b)
  t_out = _run(TEACHER, _params(TEACHER, 0), b)
  m = np.asarray(b['attention_mask']).astype(bool)
  sh, th = np.asarray(s_out.hidden_states[2]), np.asarray(t_out.hidden_states[4])
  ref = ((sh - th) ** 2)[m].mean()
  got = im.hidden_mse(s_out.hidden_states[2:], t_out.hidden_states[4:], b['attention_mask'], [0])
  np.testing.assert_allclose(float(got[0] / got[1]), ref, rtol=1e-5)

  ss, ts = np.asarray(s_out.attention_scores[0]), np.asarray(t_out.attention_scores[1])
  errs = [((ss[i] - ts[i])[:, :n, :n] ** 2).mean(0).ravel() for i, n in enumerate(m.sum(1))]
  got = im.attention_score_mse(s_out.attention_scores[:1], t_out.attention_scores, b['attention_mask'], [1])
  np.testing.assert_allclose(float(got[0] / got[1]), np.concatenate(errs).mean(), rtol=1e-5)

  def vr_ref(v, n):  # one sequence: [h, T, d] -> [h, n, n] relation probs over real tokens
    v = v[:, :n].astype(np.float64)  # float64: the KL of two close distributions cancels
    z = np.einsum('hqd,hkd->hqk', v, v) / np.sqrt(v.shape[-1])
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
  sv, tv = np.asarray(s_out.values[-1]), np.asarray(t_out.values[-1])
  rows = []
  for i, n in enumerate(m.sum(1)):
    ps, pt = vr_ref(sv[i], n), vr_ref(tv[i], n)
    rows.append((pt * (np.log(pt) - np.log(ps))).sum(-1).mean(0))
  got = im.value_relation_kl(s_out.values[-1], t_out.values[-1], b['attention_mask'])
  # The KL is ~2e-4: float32 rounding of the model's values leaves ~2e-8 absolute error.
  np.testing.assert_allclose(float(got[0] / got[1]), np.concatenate(rows).mean(), rtol=1e-4,
                             atol=5e-8)


# ----------------------------------------------------------------------------- padding

@pytest.mark.slow
def test_padding_is_excluded():
  b, b_junk = _batch(pad_id=0), _batch(pad_id=17)
  sp, tp = _params(STUDENT, 1), _params(TEACHER, 0)
  ref = im.intermediate_terms(_run(STUDENT, sp, b), _run(TEACHER, tp, b), b, ALL, [1, 3])
  s_j, t_j = _run(STUDENT, sp, b_junk), _run(TEACHER, tp, b_junk)
  pad = ~np.asarray(b['attention_mask']).astype(bool)
  assert not np.allclose(np.asarray(s_j.hidden_states[0])[pad],
                         np.asarray(_run(STUDENT, sp, b).hidden_states[0])[pad])  # junk reached pads
  junk = im.intermediate_terms(s_j, t_j, b_junk, ALL, [1, 3])
  for k in ref:
    np.testing.assert_allclose(float(junk[k][0]), float(ref[k][0]), rtol=1e-6, err_msg=k)
    assert float(junk[k][1]) == float(ref[k][1])

  # Arbitrary garbage (incl. inf-free huge values) at padded positions of every input.
  mask = b['attention_mask']
  qpad = (mask == 0)[:, None, :, None]
  kpad = (mask == 0)[:, None, None, :]
  rng = np.random.default_rng(3)
  def spoil(x, where):
    return jnp.where(where, jnp.asarray(rng.normal(size=x.shape) * 1e3, x.dtype), x)
  s_out = _run(STUDENT, sp, b)
  spoilt = s_out.replace(
      hidden_states=tuple(spoil(h, (mask == 0)[..., None]) for h in s_out.hidden_states),
      attention_scores=tuple(spoil(a, qpad | kpad) for a in s_out.attention_scores),
      attentions=tuple(spoil(a, qpad | kpad) for a in s_out.attentions),
      values=tuple(spoil(v, qpad) for v in s_out.values))
  again = im.intermediate_terms(spoilt, _run(TEACHER, tp, b), b, ALL, [1, 3])
  for k in ref:
    assert float(again[k][0]) == float(ref[k][0]), k


# ----------------------------------------------------------------------------- gradients / projection

@pytest.mark.slow
def test_gradients_reach_student_and_projection_never_teacher():
  b = _batch()
  sp, tp = _params(NARROW, 1), _params(TEACHER, 0)
  pp = im.init_projection_params(jax.random.PRNGKey(5), 16, 32)
  layer_map = im.uniform_layer_map(2, 4)
  counts = im.intermediate_counts(b, ALL)

  def loss(student_params, proj_params, teacher_params):
    s = MaskedLM(NARROW).apply({'params': student_params}, b['input_ids'], b['attention_mask'],
                               **FLAGS)
    t = MaskedLM(TEACHER).apply({'params': teacher_params}, b['input_ids'], b['attention_mask'],
                                **FLAGS)
    t = jax.lax.stop_gradient(t)
    terms = im.intermediate_terms(s, t, b, ALL, layer_map, proj_params)
    return im.combine(terms, counts, ALL)

  value, (gs, gp, gt) = jax.value_and_grad(loss, argnums=(0, 1, 2))(sp, pp, tp)
  assert np.isfinite(float(value)) and float(value) > 0
  norm = lambda t: float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(t))))
  assert norm(gs['embeddings']['word_embeddings']) > 0
  assert norm(gs['encoder']['layer_0']['attention']['query']) > 0  # via attention scores
  assert norm(gs['encoder']['layer_1']['attention']['value']) > 0  # via value relation
  assert norm(gp['embedding']) > 0 and norm(gp['hidden']) > 0
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(gt))
  assert len(jax.tree_util.tree_leaves(gt)) == len(jax.tree_util.tree_leaves(tp))
  # The terms also treat teacher tensors as constants without the caller's stop_gradient.
  s_out, t_out = _run(NARROW, sp, b), _run(TEACHER, tp, b)
  g_s, g_t = jax.grad(lambda s, t: im.combine(
      im.intermediate_terms(s, t, b, ALL, layer_map, pp), counts, ALL), argnums=(0, 1))(s_out, t_out)
  assert norm(g_s.hidden_states) > 0 and norm(g_s.values) > 0
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(g_t))


def test_narrow_student_projection():
  assert im.init_projection_params(jax.random.PRNGKey(0), 32, 32) is None
  pp = im.init_projection_params(jax.random.PRNGKey(0), 16, 32)
  assert pp['hidden']['dense']['kernel'].shape == (16, 32)
  assert pp['embedding']['dense']['bias'].shape == (32,)
  assert not np.allclose(pp['hidden']['dense']['kernel'], pp['embedding']['dense']['kernel'])
  boxed = im.abstract_projection_params(16, 32)
  assert nn.get_partition_spec(boxed)['hidden']['dense']['kernel'] == jax.sharding.PartitionSpec('embed', None)

  # A teacher representation that *is* the projected student one gives 0.
  rng = np.random.default_rng(0)
  s = jnp.asarray(rng.normal(size=(3, 8, 16)), jnp.float32)
  t = im.HiddenProjection(32).apply({'params': pp['hidden']}, s)
  w = _batch()['attention_mask']
  assert float(im.hidden_mse([s], [t], w, [0], pp['hidden'])[0]) == 0.0
  assert float(im.embedding_mse(s, t, w, pp['hidden'])[0]) == 0.0
  assert float(im.embedding_mse(s, t, w, pp['embedding'])[0]) > 0

  b = _batch()
  s_out, t_out = _run(NARROW, _params(NARROW, 1), b), _run(TEACHER, _params(TEACHER, 0), b)
  with pytest.raises(ValueError, match='student hidden size 16 != teacher hidden size 32.*init_projection_params'):
    im.intermediate_terms(s_out, t_out, b, ALL, [1, 3])
  terms = im.intermediate_terms(s_out, t_out, b, ALL, [1, 3], pp)
  assert all(np.isfinite(float(v[0])) and float(v[0]) > 0 for v in terms.values())


# ----------------------------------------------------------------------------- heads

@pytest.mark.slow
def test_relation_heads_let_4_head_student_match_2_head_teacher():
  rng = np.random.default_rng(1)
  mask = _batch()['attention_mask']
  t_v = jnp.asarray(rng.normal(size=(3, 2, 8, 16)), jnp.float32)
  # The same hidden vectors split into 4 heads of 8 instead of 2 heads of 16.
  s_v = t_v.transpose(0, 2, 1, 3).reshape(3, 8, 4, 8).transpose(0, 2, 1, 3)
  with pytest.raises(ValueError, match='equal attention head counts.*num_relation_heads'):
    im.value_relation_kl(s_v, t_v, mask)
  for r in (1, 2, 4):
    assert float(im.value_relation_kl(s_v, t_v, mask, num_relation_heads=r)[0]) == 0.0
  other = jnp.asarray(rng.normal(size=s_v.shape), jnp.float32)
  assert float(im.value_relation_kl(other, t_v, mask, num_relation_heads=2)[0]) > 0
  with pytest.raises(ValueError, match='not divisible by num_relation_heads=3'):
    im.value_relation_kl(s_v, t_v, mask, num_relation_heads=3)

  # Real models: a 1-layer 4-head student sharing a 2-head teacher's params has the
  # same (concatenated) values, so the relation loss is 0 with R=2.
  s_cfg, t_cfg = _cfg(layers=1, heads=4), _cfg(layers=1, heads=2)
  b = _batch()
  p = _params(t_cfg, 0)
  s_out, t_out = _run(s_cfg, p, b), _run(t_cfg, p, b)
  w = im.IntermediateWeights(alpha_value_kl=1.0, num_relation_heads=2)
  assert float(im.intermediate_terms(s_out, t_out, b, w, [0])['value_kl'][0]) < 1e-6
  s2 = _run(s_cfg, _params(s_cfg, 1), b)
  assert float(im.intermediate_terms(s2, t_out, b, w, [0])['value_kl'][0]) > 1e-3


def test_head_count_mismatch_errors_are_clear():
  b = _batch()
  s_out = _run(_cfg(layers=2, heads=4), _params(_cfg(layers=2, heads=4), 1), b)
  t_out = _run(TEACHER, _params(TEACHER, 0), b)
  with pytest.raises(ValueError, match=r'attention_score_mse \(TinyBERT\) needs equal attention '
                     r'head counts, got student 4 vs teacher 2.*MiniLM value relation'):
    im.attention_score_mse(s_out.attention_scores, t_out.attention_scores,
                           b['attention_mask'], [1, 3])
  with pytest.raises(ValueError, match='attention_kl.*student 4 vs teacher 2.*relation heads'):
    im.attention_kl(s_out.attentions[-1], t_out.attentions[-1], b['attention_mask'])
  with pytest.raises(ValueError, match='layer_map has 1 entries for 2 student layers'):
    im.hidden_mse(s_out.hidden_states[1:], t_out.hidden_states[1:], b['attention_mask'], [3])
  plain = MaskedLM(STUDENT).apply({'params': _params(STUDENT, 1)}, b['input_ids'],
                                  b['attention_mask'])
  with pytest.raises(ValueError, match='student output has no attention_scores.*'
                     'output_attention_scores=True'):
    im.intermediate_terms(plain, t_out, b, ALL, [1, 3])
