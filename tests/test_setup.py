"""setup: config-only errors come before any loading; the built Run is typed and immutable."""

import dataclasses
import importlib

import pytest

from flaxdistil.data import input_pipeline
from flaxdistil.data import synthetic
from flaxdistil.data import tokenization
from flaxdistil.model import hf_conversion
from flaxdistil.objectives import intermediate
from flaxdistil.objectives import objective
from flaxdistil.training import setup

from conftest import tiny_config


@pytest.fixture
def no_loading(monkeypatch):
  """Makes every loader fail loudly: a test using it proves nothing was read."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'loaded {args} before the config was validated')
  for module, name in ((hf_conversion, 'load_hf_model'), (tokenization, 'load_tokenizer'),
                       (input_pipeline, 'load_packed'), (synthetic, 'write_corpus')):
    monkeypatch.setattr(module, name, refuse)


MISSING_TEACHER = {'teacher.path': '/nonexistent/teacher', 'teacher.random_init': False}

BAD = [  # (overrides on top of MISSING_TEACHER, expected message)
    ({'data.global_batch_size': 12}, r'not divisible.*multiple of 16'),
    ({'optim.num_microbatches': 3}, 'not divisible by optim.num_microbatches=3'),
    ({'distill.max_predictions_per_seq': 5}, 'restrict_ce_to_mask=True'),
    ({'distill.teacher_input': 'clean'}, "teacher_input='clean'"),
    ({'distill.alpha_task': 1.0}, 'alpha_task needs a classification task'),
    ({'data.task': 'sst2'}, 'set distill.alpha_mlm=0'),
    ({'data.task': 'cola'}, r"data.task: Unknown GLUE task 'cola'"),
    ({'student.init': 'copy'}, "student.init='copy'"),
    ({'student.init': 'pretrained'}, 'needs student.path'),
    ({'student.model_type': 'roberta'}, "model_type='roberta'"),
    ({'dtype': 'float8'}, "dtype='float8'"),
    ({'attention_implementation': 'flash'}, "attention_implementation='flash': use"),
    ({'attention_implementation': 'cudnn'}, r'needs dtype="bfloat16" \(cuDNN'),
    ({'attention_implementation': 'cudnn', 'dtype': 'bfloat16'},
     'needs NVIDIA GPUs, but this run\'s devices are cpu'),
    ({'data.streaming': True, 'distill.mlm_smoothing': 0.7}, 'mlm_smoothing'),
    ({'teacher.cache': '/c', 'data.streaming': True}, 'teacher.cache needs packed MLM data'),
    ({'teacher.cache': '/c', 'distill.alpha_mse': 1.0}, 'not the full logits distill.alpha_mse'),
    ({'teacher.cache': '/c', 'teacher.cache_teacher_input': 'noisy'},
     "cache_teacher_input='noisy'"),
    ({'data.dataset': 'wikitext'}, 'Both data.train_files and data.dataset'),
    ({'mesh.shape': (3, 1, 1)}, 'needs 3 devices'),
]


@pytest.mark.parametrize('overrides, message', BAD)
def test_config_errors_come_before_any_loading(no_loading, tmp_path, overrides, message):
  cfg = tiny_config(**MISSING_TEACHER, **overrides)
  with pytest.raises(setup.ConfigError, match=message):
    setup.validate(cfg)
  with pytest.raises(setup.ConfigError, match=message):  # build_run validates first
    setup.build_run(cfg, str(tmp_path))


def test_validate_does_not_read_paths(no_loading):
  setup.validate(tiny_config(**MISSING_TEACHER))  # the missing path is build_run's to find
  with pytest.raises(setup.ConfigError, match='needs a teacher'):
    setup.validate(tiny_config(**{'teacher.random_init': False}))
  with pytest.raises(setup.ConfigError, match='No tokenizer'):
    setup.validate(tiny_config(**{'data.synthetic': False, 'data.train_files': ('a.txt',),
                           'teacher.random_init': True}))
  with pytest.raises(setup.ConfigError, match='teacher.cache needs the teacher'):
    setup.validate(tiny_config(**{'teacher.random_init': False, 'teacher.cache': '/c',
                           'distill.alpha_ce': 0.0, 'distill.alpha_cos': 0.0,
                           'student.init': 'random'}))


def test_missing_teacher_is_found_by_build_run(tmp_path):
  with pytest.raises(setup.ConfigError, match='does not exist'):
    setup.build_run(tiny_config(**MISSING_TEACHER, **{'data.tokenizer': ''}), str(tmp_path))


@pytest.mark.slow
def test_run_is_typed_and_immutable(tmp_path):
  run = setup.build_run(tiny_config(**{'distill.alpha_hidden': 1.0, 'student.hidden_size': 16,
                                'student.num_attention_heads': 2, 'student.intermediate_size': 32,
                                'student.init': 'random', 'distill.alpha_cos': 0.0,
                                'attention_implementation': 'xla'}),
                        str(tmp_path))
  # the attention implementation reaches both models but not the fingerprint (a run may resume
  # with another one)
  assert run.student_config.attention_implementation == 'xla'
  assert run.teacher_config.attention_implementation == 'xla'
  assert 'attention_implementation' not in run.fingerprint['student_config']
  obj = run.objective
  assert isinstance(obj, objective.Objective) and not obj.task and not obj.offline
  assert obj.needs_teacher_forward
  assert obj.inter.layer_map == (1, 3)  # uniform TinyBERT map, 2 of 4 teacher layers
  assert run.projection == objective.Projection(student_hidden=16, teacher_hidden=32)
  assert run.fingerprint['projection'] == (16, 32)
  with pytest.raises(dataclasses.FrozenInstanceError, match='mesh'):
    run.mesh = None
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.student_params = None
  released = dataclasses.replace(run, student_params=None, teacher_params=None, proj_params=None)
  assert released.student_params is None and released.objective is run.objective


def test_objective_from_config_reads_every_field():
  tiny = importlib.import_module('configs.tiny').get_config()
  tiny.update_from_flattened_dict({'distill.alpha_hidden': 2.0, 'distill.teacher_input': 'original',
                                   'distill.vocab_chunk_size': 16, 'teacher.cache': '/c',
                                   'teacher.cache_tail_bucket': True})
  obj = setup.objective_from_config(tiny).with_layer_map([1, 3])
  assert obj.weights == setup.distill_weights(tiny) and obj.weights.tail_bucket
  assert obj.weights.alpha_ce == tiny.distill.alpha_ce
  assert obj.inter == objective.LayerTerms(intermediate.IntermediateWeights(alpha_hidden=2.0),
                                           (1, 3))
  assert (obj.offline, obj.teacher_input, obj.vocab_chunk_size, obj.task) == (
      True, 'original', 16, False)
  assert not obj.needs_teacher_forward  # the cache stands in for the teacher
  glue = importlib.import_module('configs.glue')
  task_obj = setup.objective_from_config(glue.get_config('sst2,finetune'))
  assert task_obj.task and not task_obj.uses_teacher
  assert setup.objective_from_config(glue.get_config('sst2,distill')).needs_teacher_forward
  tiny.distill.teacher_input = 'clean'
  with pytest.raises(setup.ConfigError, match='teacher_input'):
    setup.objective_from_config(tiny)


def _configs(run_or_shapes):
  return run_or_shapes.teacher_config, run_or_shapes.student_config


@pytest.mark.parametrize('overrides', [
    {},                                                        # random-init teacher, synthetic
    {'distill.alpha_hidden': 1.0, 'student.hidden_size': 16,  # TinyBERT projection
     'distill.alpha_cos': 0.0, 'student.init': 'random'},
])
def test_run_shapes_equal_build_runs_models_without_loading(tmp_path, overrides, monkeypatch):
  cfg = tiny_config(**overrides)
  run = setup.build_run(cfg, str(tmp_path))
  for module, name in ((hf_conversion, 'load_hf_model'), (input_pipeline, 'load_packed'),
                       (synthetic, 'write_corpus')):
    monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f'loaded {a}'))
  shapes = setup.run_shapes(cfg)
  assert _configs(shapes) == _configs(run) and shapes.objective == run.objective
  assert shapes.projection == run.projection and shapes.vocab_size == 307
  assert shapes.rules == run.rules and shapes.teacher_rules == run.teacher_rules


def test_run_shapes_of_a_teacher_checkpoint_read_its_config_json_only(tmp_path, monkeypatch):
  import transformers  # pylint: disable=g-import-not-at-top
  tok = synthetic.write_corpus(str(tmp_path / 'syn'))['tokenizer']
  hf = transformers.BertConfig(vocab_size=307, hidden_size=32, num_hidden_layers=3,
                               num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=64)
  transformers.BertForMaskedLM(hf).save_pretrained(tmp_path / 'teacher')
  cfg = tiny_config(**{'teacher.random_init': False, 'teacher.path': str(tmp_path / 'teacher'),
                       'data.tokenizer': tok})
  run = setup.build_run(cfg, str(tmp_path / 'w'))
  monkeypatch.setattr(hf_conversion, '_read_state_dict', lambda d: pytest.fail('read weights'))
  shapes = setup.run_shapes(cfg)
  assert _configs(shapes) == _configs(run) and shapes.objective == run.objective


def test_validate_takes_the_targets_device_count():
  cfg = tiny_config(**{'data.global_batch_size': 48, 'optim.num_microbatches': 1})
  setup.validate(cfg, num_devices=16)  # 48 rows over 16 chips: 3 each
  with pytest.raises(setup.ConfigError, match='not divisible by the 32 batch shards'):
    setup.validate(cfg, num_devices=32)
  with pytest.raises(setup.ConfigError, match='not divisible by 5 hosts'):
    setup.validate(cfg, num_devices=16, num_processes=5)


def test_run_shapes_refuses_a_student_init_cannot_make(no_loading):
  cfg = tiny_config(**{'student.hidden_size': 16, 'distill.alpha_cos': 0.0})
  with pytest.raises(setup.ConfigError, match='student.init="teacher".*hidden_size differs'):
    setup.run_shapes(cfg)
