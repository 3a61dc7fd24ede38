"""setup: config-only errors come before any loading; the built Run is typed and immutable."""

import dataclasses

import pytest

from configs import tiny
from flaxdistil import hf_conversion
from flaxdistil import input_pipeline
from flaxdistil import objective
from flaxdistil import setup
from flaxdistil import synthetic
from flaxdistil import tokenization


def _cfg(**overrides):
  c = tiny.get_config()
  c.update_from_flattened_dict(overrides)
  return c


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
  cfg = _cfg(**MISSING_TEACHER, **overrides)
  with pytest.raises(setup.ConfigError, match=message):
    setup.validate(cfg)
  with pytest.raises(setup.ConfigError, match=message):  # build_run validates first
    setup.build_run(cfg, str(tmp_path))


def test_validate_does_not_read_paths(no_loading):
  setup.validate(_cfg(**MISSING_TEACHER))  # the missing path is build_run's to find
  with pytest.raises(setup.ConfigError, match='needs a teacher'):
    setup.validate(_cfg(**{'teacher.random_init': False}))
  with pytest.raises(setup.ConfigError, match='No tokenizer'):
    setup.validate(_cfg(**{'data.synthetic': False, 'data.train_files': ('a.txt',),
                           'teacher.random_init': True}))
  with pytest.raises(setup.ConfigError, match='teacher.cache needs the teacher'):
    setup.validate(_cfg(**{'teacher.random_init': False, 'teacher.cache': '/c',
                           'distill.alpha_ce': 0.0, 'distill.alpha_cos': 0.0,
                           'student.init': 'random'}))


def test_missing_teacher_is_found_by_build_run(tmp_path):
  with pytest.raises(setup.ConfigError, match='does not exist'):
    setup.build_run(_cfg(**MISSING_TEACHER, **{'data.tokenizer': ''}), str(tmp_path))


def test_run_is_typed_and_immutable(tmp_path):
  run = setup.build_run(_cfg(**{'distill.alpha_hidden': 1.0, 'student.hidden_size': 16,
                                'student.num_attention_heads': 2, 'student.intermediate_size': 32,
                                'student.init': 'random', 'distill.alpha_cos': 0.0}),
                        str(tmp_path))
  obj = run.objective
  assert isinstance(obj, objective.Objective) and not obj.task and not obj.offline
  assert obj.needs_teacher_forward
  assert run.weights is obj.weights and run.inter is obj.inter and run.offline is False
  assert obj.inter.layer_map == (1, 3)  # uniform TinyBERT map, 2 of 4 teacher layers
  assert run.projection == objective.Projection(student_hidden=16, teacher_hidden=32)
  assert run.fingerprint['projection'] == (16, 32)
  with pytest.raises(dataclasses.FrozenInstanceError, match='mesh'):
    run.mesh = None
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.student_params = None
  released = dataclasses.replace(run, student_params=None, teacher_params=None, proj_params=None)
  assert released.student_params is None and released.objective is run.objective
