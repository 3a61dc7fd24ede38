"""flaxdistil.training.run_models: the student's shape follows the teacher (0 = the teacher's
value), a pretrained checkpoint of the same type keeps its shape, bad dtypes and attention
implementations are refused."""

import jax.numpy as jnp
import pytest

from flaxdistil.model import bert
from flaxdistil.training import run_models
from flaxdistil.training.errors import ConfigError

from conftest import tiny_config

TEACHER = bert.ModelConfig(model_type='bert', vocab_size=120, hidden_size=64, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=64, with_mlm_head=False)


def test_zero_fields_take_the_teachers_values_and_given_fields_win():
  c = tiny_config(**{'student.num_hidden_layers': 2, 'student.hidden_size': 0,
                     'student.intermediate_size': 96, 'dtype': 'bfloat16'})
  s = run_models.student_config(c, TEACHER, vocab_size=999)
  assert (s.model_type, s.vocab_size, s.hidden_size, s.num_hidden_layers, s.intermediate_size,
          s.num_attention_heads, s.max_position_embeddings) == ('distilbert', 120, 64, 2, 96, 4, 64)
  assert s.dtype == jnp.bfloat16 and not s.with_mlm_head  # a head-less teacher: head-less student
  task = run_models.student_config(c, TEACHER, vocab_size=999, num_labels=2)
  assert task.num_labels == 2 and not task.with_mlm_head
  alone = run_models.student_config(tiny_config(**{'student.num_hidden_layers': 0}), None, 77)
  assert (alone.vocab_size, alone.num_hidden_layers, alone.hidden_size) == (77, 6, 768)


def test_a_same_type_pretrained_student_keeps_its_depth():
  pretrained = bert.ModelConfig(model_type='distilbert', vocab_size=120, hidden_size=64,
                                num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                max_position_embeddings=64)
  c = tiny_config(**{'student.init': 'pretrained', 'student.num_hidden_layers': 1})
  assert run_models.student_config(c, TEACHER, 120, pretrained=pretrained).num_hidden_layers == 3
  bert_ckpt = bert.ModelConfig(**{**pretrained.__dict__, 'model_type': 'bert'})
  # BERT -> DistilBERT picks student.num_hidden_layers of its layers
  assert run_models.student_config(c, TEACHER, 120, pretrained=bert_ckpt).num_hidden_layers == 1


def test_compute_dtype_names_the_choices():
  assert run_models.compute_dtype('float32') == jnp.float32
  with pytest.raises(ConfigError, match='use "float32" or "bfloat16"'):
    run_models.compute_dtype('fp8')


def test_attention_implementation_reaches_the_student_config():
  assert run_models.student_config(tiny_config(), TEACHER, 120).attention_implementation is None
  c = tiny_config(attention_implementation='xla')
  assert run_models.student_config(c, TEACHER, 120).attention_implementation == 'xla'
  with pytest.raises(ConfigError, match='attention_implementation=\'sdpa\': use "" '):
    run_models.attention_implementation(tiny_config(attention_implementation='sdpa'))


def test_a_same_type_pretrained_student_keeps_its_pruned_heads_and_ffn_width():
  pruned = bert.ModelConfig(model_type='distilbert', vocab_size=120, hidden_size=64,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                            max_position_embeddings=64, pruned_heads=((0, 1), (3,)))
  c = tiny_config(**{'student.init': 'pretrained', 'student.intermediate_size': 0})
  s = run_models.student_config(c, TEACHER, 120, pretrained=pruned)
  assert s.pruned_heads == ((0, 1), (3,)) and s.intermediate_size == 40
  as_bert = bert.ModelConfig(**{**pruned.__dict__, 'model_type': 'bert'})  # BERT -> DistilBERT
  assert run_models.student_config(c, TEACHER, 120, pretrained=as_bert).pruned_heads == ()
