"""Held-out metrics: token-weighted across batches (== one big batch), agreement with a reference,
F1 from summed tp/fp/fn, masked-position logits == full logits, and which models get a step."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.objectives import losses
from flaxdistil.objectives import positions
from flaxdistil.objectives.objective import Objective
from flaxdistil.training import evaluation

MLM = bert.ModelConfig(model_type='distilbert', vocab_size=40, hidden_size=16,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       max_position_embeddings=16)


def _mlm_batch(rng, rows, masked_per_row):
  ids = rng.integers(5, MLM.vocab_size, (rows, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 7:] = 0
  ids[mask == 0] = 0
  labels = np.full_like(ids, -100)
  for r, n in enumerate(masked_per_row):
    labels[r, 1:1 + n] = ids[r, 1:1 + n]
  return {'input_ids': ids, 'attention_mask': mask, 'labels': labels}


def _cat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope='module')
def mlm():
  """(student params, teacher params, two batches with 3 and 18 masked tokens)."""
  rng = np.random.default_rng(0)
  batches = [_mlm_batch(rng, 4, [1, 0, 2, 0]), _mlm_batch(rng, 4, [5, 4, 6, 3])]
  return (bert.init_params(MLM, jax.random.PRNGKey(0)), bert.init_params(MLM, jax.random.PRNGKey(1)),
          batches)


def _reference(params, batch):
  """numpy: per masked token NLL, correctness and top-1, from the full logits."""
  logits = np.asarray(bert.MaskedLM(MLM).apply({'params': params}, batch['input_ids'],
                                               batch['attention_mask']).logits, np.float64)
  sel = batch['labels'] != -100
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.maximum(batch['labels'], 0)[..., None], -1)[..., 0]
  top1 = logits.argmax(-1)
  return nll[sel], (top1 == batch['labels'])[sel], top1[sel]


@pytest.mark.parametrize('max_predictions', [0, 8])
def test_token_weighted_over_batches_equals_one_big_batch(mlm, max_predictions):
  params, _, batches = mlm
  fn = jax.jit(evaluation.make_eval_step(bert.MaskedLM(MLM), max_predictions))
  split = evaluation.evaluate(fn, params, batches)
  whole = evaluation.evaluate(fn, params, [_cat(batches)])
  nll, correct, _ = _reference(params, _cat(batches))
  assert split['num_tokens'] == whole['num_tokens'] == len(nll) == 21
  for k in ('loss', 'accuracy', 'perplexity'):
    np.testing.assert_allclose(split[k], whole[k], rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(split['loss'], nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(split['accuracy'], correct.mean(), rtol=1e-6)
  np.testing.assert_allclose(split['perplexity'], np.exp(nll.mean()), rtol=1e-5)
  # Not the mean of the two batches' means (3 vs 18 tokens would weigh them equally).
  per_batch = [evaluation.evaluate(fn, params, [b])['loss'] for b in batches]
  assert abs(np.mean(per_batch) - split['loss']) > 1e-4
  assert 'agreement' not in split and len(split['_top1']) == 2


def test_agreement_with_a_reference_counts_masked_tokens_only(mlm):
  student, teacher, batches = mlm
  fn = jax.jit(evaluation.make_eval_step(bert.MaskedLM(MLM)))
  t = evaluation.evaluate(fn, teacher, batches)
  s = evaluation.evaluate(fn, student, batches, reference_top1=t['_top1'])
  _, _, t_top1 = _reference(teacher, _cat(batches))
  _, _, s_top1 = _reference(student, _cat(batches))
  np.testing.assert_allclose(s['agreement'], np.mean(s_top1 == t_top1), rtol=1e-6)
  assert evaluation.evaluate(fn, teacher, batches, reference_top1=t['_top1'])['agreement'] == 1.0
  # A reference equal to the student's top-1 on batch 0 and on row 0 of batch 1 only (3 + 5 of
  # the 21 masked tokens), and different at every position that is not masked.
  own = [np.asarray(x) for x in evaluation.evaluate(fn, student, batches)['_top1']]
  ref = [own[0].copy(), (own[1] + 1) % MLM.vocab_size]
  ref[1][0] = own[1][0]
  for r, b in zip(ref, batches):
    r[b['labels'] == -100] = -1
  agree = evaluation.evaluate(fn, student, batches, reference_top1=ref)['agreement']
  assert agree == pytest.approx(8 / 21)
  # Masked-position logits (as training with max_predictions_per_seq): the same agreement, with
  # the reference gathered at the same positions.
  fn8 = jax.jit(evaluation.make_eval_step(bert.MaskedLM(MLM), 8))
  ref8 = []
  for r, b in zip(ref, batches):
    pos, _ = positions.masked_positions(jnp.asarray(b['labels']), 8)
    ref8.append(np.take_along_axis(r, np.asarray(pos), 1))
  s8 = evaluation.evaluate(fn8, student, batches, reference_top1=ref8)
  assert s8['_top1'][1].shape == (4, 8)
  assert s8['agreement'] == pytest.approx(8 / 21)
  t8 = evaluation.evaluate(fn8, teacher, batches)
  np.testing.assert_allclose(
      evaluation.evaluate(fn8, student, batches, reference_top1=t8['_top1'])['agreement'],
      s['agreement'], rtol=1e-6)


CLS = bert.ModelConfig(model_type='distilbert', vocab_size=40, hidden_size=16,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       max_position_embeddings=16, num_labels=2, with_mlm_head=False)


@pytest.mark.slow
def test_task_metrics_f1_from_summed_counts_and_padding_rows_count_nowhere():
  rng = np.random.default_rng(1)
  model = bert.MaskedLM(CLS)
  params = jax.tree.map(np.array, bert.init_params(CLS, jax.random.PRNGKey(3)))  # writable
  ids = rng.integers(5, 40, (12, 8)).astype(np.int32)
  mask = np.ones_like(ids)
  class_logits = lambda: np.asarray(model.apply({'params': params}, ids, mask).class_logits)
  # Shift the label-1 bias so that the random head predicts 1 for half of the rows.
  logits = class_logits()
  params['classifier_head']['classifier']['bias'][1] -= np.median(logits[:, 1] - logits[:, 0])
  pred = class_logits().argmax(-1)
  assert pred.sum() == 6
  # Batch 0 right but for its last row, batch 1 all wrong (fp and fn), then 2 padding rows.
  labels = pred.astype(np.int32)
  labels[5:10] = 1 - labels[5:10]
  labels[10:] = -100
  batches = [{'input_ids': ids[i:i + 6], 'attention_mask': mask[i:i + 6],
              'labels': labels[i:i + 6]} for i in (0, 6)]
  fn = jax.jit(evaluation.make_task_eval_step(model))
  res = evaluation.evaluate(fn, params, batches)
  real = labels != -100
  p, y = pred[real], labels[real]
  tp, fp, fn_ = (np.sum((p == 1) & (y == 1)), np.sum((p == 1) & (y == 0)),
                 np.sum((p == 0) & (y == 1)))
  assert tp > 0 and fp > 0 and fn_ > 0
  assert res['num_tokens'] == 10  # examples, padding rows excluded
  np.testing.assert_allclose(res['accuracy'], np.mean(p == y), rtol=1e-6)
  np.testing.assert_allclose(res['f1'], 2 * tp / (2 * tp + fp + fn_), rtol=1e-6)
  # Summed counts, not the mean of per-batch F1s.
  per_batch = [evaluation.evaluate(fn, params, [b])['f1'] for b in batches]
  assert not np.isclose(np.mean(per_batch), res['f1'])
  # Agreement with a reference, over real rows: flip two real predictions of the reference.
  ref = [np.array(r) for r in res['_top1']]
  ref[0][:2] = 1 - ref[0][:2]
  agree = evaluation.evaluate(fn, params, batches, reference_top1=ref)['agreement']
  np.testing.assert_allclose(agree, 8 / 10, rtol=1e-6)


def test_make_eval_steps_scores_only_models_with_the_matching_head():
  def run(student, teacher):
    return types.SimpleNamespace(
        student_config=student, teacher_config=teacher, student_model=bert.MaskedLM(student),
        teacher_model=None if teacher is None else bert.MaskedLM(teacher),
        objective=Objective(losses.DistillWeights()))
  s, t = evaluation.make_eval_steps(run(MLM, MLM))
  assert s is not None and t is not None
  assert evaluation.make_eval_steps(run(MLM, MLM), with_teacher=False)[1] is None
  assert evaluation.make_eval_steps(run(MLM, None))[1] is None
  headless = dataclasses.replace(MLM, with_mlm_head=False)  # MiniLM-style: nothing to score
  assert evaluation.make_eval_steps(run(headless, MLM))[0] is None
  three = dataclasses.replace(CLS, num_labels=3)
  s, t = evaluation.make_eval_steps(run(CLS, three))
  assert s is not None and t is None  # another label count: no teacher metrics


ENC = dataclasses.replace(MLM, with_mlm_head=False)


def _masked(batch, mask_id=4):
  """The batch with its labelled positions replaced by [MASK], as the eval stream has them."""
  out = dict(batch)
  out['input_ids'] = np.where(batch['labels'] != -100, mask_id, batch['input_ids'])
  return out


def test_encoder_eval_compares_mean_pooled_embeddings_and_hidden_states_of_the_unmasked_text(mlm):
  _, _, batches = mlm
  t_params = bert.init_params(ENC, jax.random.PRNGKey(1))
  s_params = bert.init_params(ENC, jax.random.PRNGKey(2))
  model = bert.MaskedLM(ENC)
  step = jax.jit(evaluation.make_encoder_eval_step(model, model))
  masked = [_masked(b) for b in batches]
  # The student equal to the teacher: cosine 1, MSE 0.
  same = evaluation.evaluate_encoder(step, t_params, masked, t_params)
  assert same['embedding_cosine'] == pytest.approx(1.0, abs=1e-6)
  assert same['token_cosine'] == pytest.approx(1.0, abs=1e-6)
  assert same['hidden_mse'] == pytest.approx(0.0, abs=1e-10) and same['num_sequences'] == 8
  # Another student: numpy reference on the original (unmasked) tokens, padding excluded.
  got = evaluation.evaluate_encoder(step, s_params, masked, t_params)
  cos, token_cos, err, n = [], [], 0.0, 0
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  for b in batches:
    h = lambda p: np.asarray(model.apply({'params': p}, b['input_ids'],
                                         b['attention_mask']).hidden_states[-1], np.float64)
    hs, ht, m = h(s_params), h(t_params), b['attention_mask'].astype(bool)
    for r in range(len(m)):
      es, et = hs[r][m[r]].mean(0), ht[r][m[r]].mean(0)
      cos.append(es @ et / np.linalg.norm(es) / np.linalg.norm(et))
    token_cos += list(np.sum(unit(hs[m]) * unit(ht[m]), -1))
    err, n = err + ((hs - ht) ** 2)[m].sum(), n + m.sum() * ENC.hidden_size
  assert got['embedding_cosine'] == pytest.approx(np.mean(cos), rel=1e-5)
  assert got['token_cosine'] == pytest.approx(np.mean(token_cos), rel=1e-5)
  assert got['hidden_mse'] == pytest.approx(err / n, rel=1e-5)
  assert got['embedding_cosine'] < 0.99


def test_encoder_eval_maps_a_narrower_student_through_its_projection(mlm):
  from flaxdistil.objectives import intermediate  # pylint: disable=g-import-not-at-top
  _, _, batches = mlm
  narrow = dataclasses.replace(ENC, hidden_size=8, intermediate_size=16)
  t_params = bert.init_params(ENC, jax.random.PRNGKey(1))
  s_params = bert.init_params(narrow, jax.random.PRNGKey(2))
  proj = intermediate.init_projection_params(jax.random.PRNGKey(3), 8, 16)['hidden']
  step = jax.jit(evaluation.make_encoder_eval_step(bert.MaskedLM(narrow), bert.MaskedLM(ENC)))
  got = evaluation.evaluate_encoder(step, s_params, batches, t_params, proj)
  err, n = 0.0, 0
  for b in batches:
    hs = bert.MaskedLM(narrow).apply({'params': s_params}, b['input_ids'],
                                     b['attention_mask']).hidden_states[-1]      # [B, T, 8]
    hs = np.asarray(intermediate.HiddenProjection(16).apply({'params': proj}, hs))  # [B, T, 16]
    ht = np.asarray(bert.MaskedLM(ENC).apply({'params': t_params}, b['input_ids'],
                                             b['attention_mask']).hidden_states[-1])
    m = b['attention_mask'].astype(bool)
    err, n = err + ((hs - ht) ** 2)[m].sum(), n + m.sum() * 16
  assert got['hidden_mse'] == pytest.approx(err / n, rel=1e-5)
