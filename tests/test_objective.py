"""Objective: the one decision whether the train step runs the teacher, and its config mapping."""

import dataclasses

import pytest

from flaxdistil.objectives import intermediate
from flaxdistil.objectives import losses
from flaxdistil.objectives import objective
from flaxdistil.objectives.objective import Objective

ONLINE = losses.DistillWeights(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0)
MLM_ONLY = losses.DistillWeights(alpha_ce=0.0, alpha_mlm=1.0, alpha_cos=0.0)
NO_LOGIT_TERMS = losses.DistillWeights(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0)
HIDDEN = intermediate.IntermediateWeights(alpha_hidden=1.0)


@pytest.mark.parametrize('obj, uses, forward', [
    (Objective(ONLINE), True, True),                                     # DistilBERT, online
    (Objective(ONLINE, offline=True), True, False),                      # teacher.cache
    (Objective(MLM_ONLY), False, False),                                 # plain MLM baseline
    (Objective(NO_LOGIT_TERMS, inter=(HIDDEN, [1, 3])), True, True),     # intermediate only
    (Objective(losses.DistillWeights(alpha_cos=1.0, alpha_ce=0.0, alpha_mlm=0.0)), True, True),
    (Objective(losses.DistillWeights(alpha_mse=1.0, alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0)),
     True, True),
    (Objective(MLM_ONLY, inter=(intermediate.IntermediateWeights(), [0])), False, False),
    (Objective(losses.DistillWeights(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_task=1.0),
               task=True), False, False),                                # fine-tuning on labels
])
def test_needs_teacher_forward(obj, uses, forward):
  assert obj.uses_teacher is uses
  assert obj.needs_teacher_forward is forward


def test_inter_tuple_becomes_named_and_zero_alphas_drop_it():
  obj = Objective(MLM_ONLY, inter=(HIDDEN, [1, 3]))
  assert isinstance(obj.inter, objective.LayerTerms)
  assert obj.inter.weights == HIDDEN and obj.inter.layer_map == (1, 3)
  iw, layer_map = obj.inter  # train.make_train_step unpacks it
  assert (iw, layer_map) == (HIDDEN, (1, 3))
  assert Objective(MLM_ONLY, inter=(intermediate.IntermediateWeights(), [0])).inter is None
  with pytest.raises(dataclasses.FrozenInstanceError):
    obj.offline = True


def test_term_table_description_and_model_flags():
  """One table of every term's alpha: the console line, the counts and the model flags follow it."""
  assert Objective(losses.DistillWeights()).describe() == 'loss = 5*ce(T=2) + 2*mlm + 1*cos'
  inter = Objective(losses.DistillWeights(temperature=1.0, alpha_ce=0.0, alpha_mlm=0.0,
                                          alpha_cos=0.0),
                    inter=(intermediate.IntermediateWeights(alpha_hidden=1.0, alpha_value_kl=0.5),
                           [1, 3]))
  assert inter.describe() == 'loss = 1*hidden + 0.5*value_kl'
  assert inter.model_kwargs() == {'output_attentions': False, 'output_attention_scores': False,
                                  'output_values': True}
  task = Objective(losses.DistillWeights(alpha_mlm=0.0, alpha_cos=0.0, alpha_task=1.0,
                                         restrict_ce_to_mask=True), task=True)
  assert task.describe() == 'loss = 5*ce(T=2, masked only) + 1*task'
  assert {k for k, a in inter.term_alphas().items() if a} == {'hidden', 'value_kl'}
  assert Objective(losses.DistillWeights(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0)).describe() == (
      'loss = 0 (every alpha is 0)')


def test_invalid_combinations_are_refused():
  with pytest.raises(ValueError, match='restrict_ce_to_mask'):
    Objective(losses.DistillWeights(), max_predictions_per_seq=8)
  with pytest.raises(ValueError, match='teacher_input'):
    Objective(losses.DistillWeights(), teacher_input='clean')


def test_chunked_only_for_mlm_vocabulary_terms_online():
  w = losses.DistillWeights()
  assert Objective(w, vocab_chunk_size=16).chunked(student_has_mlm_head=True)
  assert not Objective(w, vocab_chunk_size=16).chunked(student_has_mlm_head=False)
  assert not Objective(w, vocab_chunk_size=16, offline=True).chunked(True)
  assert not Objective(w, vocab_chunk_size=0).chunked(True)
  assert not Objective(losses.DistillWeights(alpha_ce=0.0, alpha_mlm=0.0), vocab_chunk_size=16
                       ).chunked(True)  # cos only: no vocabulary term


def test_prepare_batch_original_teacher_input_and_masked_positions():
  import numpy as np  # pylint: disable=g-import-not-at-top
  ids = np.array([[2, 4, 7, 4, 3]], np.int32)       # [CLS] [MASK] w [MASK] [SEP]
  labels = np.array([[-100, 9, -100, 8, -100]], np.int32)
  batch = {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'labels': labels}
  out = Objective(losses.DistillWeights(), teacher_input='original').prepare_batch(batch)
  np.testing.assert_array_equal(out['teacher_input_ids'], [[2, 9, 7, 8, 3]])
  assert 'teacher_input_ids' not in Objective(losses.DistillWeights()).prepare_batch(batch)
  w = losses.DistillWeights(restrict_ce_to_mask=True)
  topk = np.arange(5 * 2, dtype=np.float32).reshape(1, 5, 2)
  out = Objective(w, offline=True, max_predictions_per_seq=2).prepare_batch(
      dict(batch, teacher_topk_values=topk))
  np.testing.assert_array_equal(out['logits_positions'], [[1, 3]])
  np.testing.assert_array_equal(out['labels'], [[9, 8]])
  np.testing.assert_array_equal(out['teacher_topk_values'], topk[:, [1, 3]])
