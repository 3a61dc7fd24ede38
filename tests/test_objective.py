"""Objective: the one decision whether the train step runs the teacher, and its config mapping."""

import dataclasses
import importlib

import pytest

from flaxdistil import intermediate
from flaxdistil import losses
from flaxdistil import objective
from flaxdistil.objective import Objective

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


def test_from_config_reads_every_field():
  tiny = importlib.import_module('configs.tiny').get_config()
  tiny.update_from_flattened_dict({'distill.alpha_hidden': 2.0, 'distill.teacher_input': 'original',
                                   'distill.vocab_chunk_size': 16, 'teacher.cache': '/c',
                                   'teacher.cache_tail_bucket': True})
  obj = Objective.from_config(tiny, layer_map=[1, 3])
  assert obj.weights == objective.distill_weights(tiny) and obj.weights.tail_bucket
  assert obj.weights.alpha_ce == tiny.distill.alpha_ce
  assert obj.inter == objective.LayerTerms(intermediate.IntermediateWeights(alpha_hidden=2.0),
                                           (1, 3))
  assert (obj.offline, obj.teacher_input, obj.vocab_chunk_size, obj.task) == (
      True, 'original', 16, False)
  assert not obj.needs_teacher_forward  # the cache stands in for the teacher
  glue_cfg = importlib.import_module('configs.glue').get_config('sst2,finetune')
  task_obj = Objective.from_config(glue_cfg)
  assert task_obj.task and not task_obj.uses_teacher
  assert Objective.from_config(importlib.import_module('configs.glue').get_config(
      'sst2,distill')).needs_teacher_forward
