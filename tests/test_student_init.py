"""Student initialisation: layer selection, source choice, classification heads."""

import dataclasses

import jax
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.model import student_init

TEACHER = bert.ModelConfig(model_type='bert', vocab_size=50, hidden_size=16, num_hidden_layers=4,
                             num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=32)
STUDENT = dataclasses.replace(TEACHER, model_type='distilbert', num_hidden_layers=2)


def test_select_teacher_layers():
  assert student_init.select_teacher_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # HF extract_distilbert
  assert student_init.select_teacher_layers(12, 12) == list(range(12))
  assert student_init.select_teacher_layers(4, 2) == [0, 3]
  assert student_init.select_teacher_layers(6, 3) == [0, 2, 5]
  assert student_init.select_teacher_layers(5, 1) == [0]
  for lt in range(1, 25):
    for ls in range(1, lt + 1):
      sel = student_init.select_teacher_layers(lt, ls)
      assert sel == sorted(set(sel)) and len(sel) == ls
      assert sel[0] == 0 and (ls == 1 or sel[-1] == lt - 1)
  with pytest.raises(ValueError, match='1 <= student <= teacher'):
    student_init.select_teacher_layers(4, 5)
  with pytest.raises(ValueError, match='1 <= student <= teacher'):
    student_init.select_teacher_layers(4, 0)


@pytest.fixture(scope='module')
def teacher_params():
  return jax.device_get(bert.init_params(TEACHER, jax.random.PRNGKey(0)))


@pytest.mark.slow
def test_init_student_sources(teacher_params):
  from_teacher = student_init.init_student('teacher', STUDENT, 0, teacher=(TEACHER, teacher_params))
  same_layer = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert same_layer(from_teacher['encoder']['layer_1'], teacher_params['encoder']['layer_3'])
  assert not same_layer(from_teacher['encoder']['layer_1'], teacher_params['encoder']['layer_2'])
  custom = student_init.init_student('teacher', STUDENT, 0, teacher=(TEACHER, teacher_params),
                                     layers=[1, 2])
  assert same_layer(custom['encoder']['layer_0'], teacher_params['encoder']['layer_1'])
  r1 = student_init.init_student('random', STUDENT, 7)
  r2 = student_init.init_student('random', STUDENT, 7)
  assert same_layer(r1, r2)  # a pure function of the seed
  # A same-type pretrained checkpoint is taken as is; a BERT one initialises a DistilBERT the
  # teacher way.
  same = student_init.init_student('pretrained', STUDENT, 0, pretrained=(STUDENT, from_teacher))
  assert same is not from_teacher and same.keys() == from_teacher.keys()
  bert = student_init.init_student('pretrained', STUDENT, 0, pretrained=(TEACHER, teacher_params))
  assert same_layer(bert, from_teacher)
  with pytest.raises(ValueError, match='student.init=.bogus.'):
    student_init.init_student('bogus', STUDENT, 0)
  with pytest.raises(ValueError, match='needs teacher.path'):
    student_init.init_student('teacher', STUDENT, 0)
  with pytest.raises(ValueError, match='student.init="teacher": .*hidden_size differs'):
    student_init.init_student('teacher', dataclasses.replace(STUDENT, hidden_size=8), 0,
                              teacher=(TEACHER, teacher_params))


def test_classification_student_gets_a_fresh_head_only_when_missing(teacher_params):
  cls_student = dataclasses.replace(STUDENT, num_labels=3, with_mlm_head=False)
  params = student_init.init_student('teacher', cls_student, 0, teacher=(TEACHER, teacher_params))
  want = bert.unbox(bert.abstract_params(cls_student))
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
  assert shapes(params) == shapes(want)
  kept = student_init.with_head(params, cls_student, seed=1)
  assert kept['classifier_head'] is params['classifier_head']  # matching head: untouched
  assert student_init.with_head({'x': 1}, STUDENT, 0) == {'x': 1}  # no labels: unchanged


def test_pruned_models_are_not_initialised_from_teacher_layers(teacher_params):
  pruned = dataclasses.replace(TEACHER, pruned_heads=((1,), (), (), ()))
  with pytest.raises(ValueError, match="student.init='pretrained'"):
    student_init.init_student_from_teacher(teacher_params, pruned, STUDENT)
  with pytest.raises(ValueError, match='heads are pruned'):
    student_init.init_student_from_teacher(
        teacher_params, TEACHER, dataclasses.replace(STUDENT, pruned_heads=((0,), ())))
