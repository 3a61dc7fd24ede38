"""The result-table scripts: paired differences, Table 4 labels and orderings, GLUE retention/speed."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from configs import minilm_mlm_wiki

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts')


def _script(name):
  """scripts/NAME.py as a module (by path: `evaluate` is also a PyPI package's name)."""
  spec = importlib.util.spec_from_file_location(f'scripts_{name}', os.path.join(SCRIPTS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ablation_table, evaluate, glue_results = map(_script, ('ablation_table', 'evaluate', 'glue_results'))


def test_paired_difference_is_the_mean_and_se_of_per_token_differences():
  rng = np.random.default_rng(0)
  ref = rng.random(2000) < 0.4
  other = np.where(rng.random(2000) < 0.9, ref, ~ref)  # 10% of tokens flipped
  diff, se = evaluate.paired_difference(other, ref)
  d = other.astype(float) - ref.astype(float)
  assert diff == pytest.approx(other.mean() - ref.mean())
  assert se == pytest.approx(d.std(ddof=1) / math.sqrt(2000))
  # Pairing removes the shared noise: far below two independent binomial s.e.s.
  unpaired = math.sqrt(ref.mean() * (1 - ref.mean()) / 2000 + other.mean() * (1 - other.mean()) / 2000)
  assert se < unpaired / 2
  assert evaluate.paired_difference(ref, ref) == (0.0, 0.0)


def _config(variant):
  return json.loads(minilm_mlm_wiki.get_config(variant).to_json())


def test_change_label_names_each_table4_row_from_the_configs():
  ref = _config('')
  labels = {v: ablation_table.change_label(_config(v), ref) for v in minilm_mlm_wiki.VARIANTS}
  assert labels == {'': 'triple loss + teacher init', 'no_ce': 'without L_ce',
                    'no_cos': 'without L_cos', 'no_mlm': 'without L_mlm', 'random': 'random init'}
  assert set(labels.values()) - {ablation_table.REFERENCE} == set(ablation_table.PAPER_TABLE4)
  # Logging and cache fields do not make rows incomparable.
  other = _config('no_ce')
  other['data']['cache_dir'], other['log_every_steps'] = '/elsewhere', 7
  assert ablation_table.change_label(other, ref) == 'without L_ce'


def test_change_label_refuses_rows_that_differ_in_more_than_table4():
  ref, other = _config(''), _config('no_ce')
  other['seed'], other['optim']['learning_rate'] = 1, 1e-3
  with pytest.raises(ValueError, match=r'differ in more than Table 4 varies: optim.learning_rate, '
                     r'seed; give runs'):
    ablation_table.change_label(other, ref)


def test_orderings_verdicts_use_the_paired_se():
  a, ce, mlm, rnd = 'triple loss + teacher init', 'without L_ce', 'without L_mlm', 'random init'
  paired = {}

  def put(x, y, diff, se):  # accuracy of x minus y
    paired[(x, y)], paired[(y, x)] = (diff, se), (-diff, se)

  put(a, rnd, 0.10, 0.01)     # paper: random worst -> replicates
  put(a, ce, -0.005, 0.01)    # a tie
  put(a, mlm, -0.05, 0.01)    # reversed: without L_mlm better than (a)
  put(ce, rnd, 0.09, 0.01)
  put(mlm, rnd, 0.15, 0.01)
  put(mlm, ce, 0.045, 0.01)
  got = {(p['worse'], p['better']): (p['verdict'], round(p['z'], 6), p['paper_gap'])
         for p in ablation_table.orderings(paired)}
  assert got == {(rnd, ce): ('yes', 9.0, pytest.approx(0.73)),
                 (rnd, mlm): ('yes', 15.0, pytest.approx(3.38)),
                 (rnd, a): ('yes', 10.0, pytest.approx(3.69)),
                 (ce, mlm): ('yes', 4.5, pytest.approx(2.65)),
                 (ce, a): ('tie', -0.5, pytest.approx(2.96)),
                 (mlm, a): ('no', -5.0, pytest.approx(0.31))}


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)


def _glue_dir(root, task, scores):
  d = os.path.join(root, task)
  for role, (acc, f1) in scores.items():
    _write(os.path.join(d, role, 'summary.json'),
           {'step': 400, 'student': {'accuracy': acc, 'f1': f1, 'agreement': 0.9}})
    _write(os.path.join(d, f'{role}_hf', 'config.json'),
           {'num_hidden_layers': 6, 'hidden_size': 384} if role == 'teacher' else
           {'n_layers': 3, 'dim': 384})
    _write(os.path.join(d, f'{role}_check.json'), {'labels_equal': 408, 'num_examples': 408})
  return d


def test_glue_retention_is_the_students_score_over_the_teachers(tmp_path):
  d = _glue_dir(str(tmp_path), 'mrpc', {'teacher': (0.80, 0.86), 'general_distill': (0.78, 0.86),
                                        'finetune': (0.70, 0.80)})
  rows = {r['role']: r for r in glue_results.task_rows(d)}
  assert rows['teacher']['ret_acc'] is None and rows['teacher']['shape'] == '6 × 384'
  assert rows['general_distill']['ret_acc'] == pytest.approx(97.5)
  assert rows['general_distill']['ret_f1'] == pytest.approx(100.0)
  assert rows['finetune']['ret_acc'] == pytest.approx(87.5) and rows['finetune']['shape'] == '3 × 384'
  table = glue_results.quality_table([d])
  assert '| mrpc | student from teacher layers, fine-tuned without teacher | 3 × 384 | 0.7000 | ' \
         '0.8000 | 87.5% | 93.0% | 0.900 | 400 | 408/408 |' in table


def test_speed_table_matches_benchmark_rows_to_exports_and_needs_the_teacher(tmp_path):
  d = _glue_dir(str(tmp_path), 'mrpc', {'teacher': (0.80, 0.86), 'general_distill': (0.78, 0.86)})
  bench = lambda p, ms: {'path': p, 'params': 22.7e6, 'onnxruntime': {'p50_ms': ms, 'seq_per_s': 10.0},
                         'onnxruntime_int8': {'p50_ms': ms / 2, 'seq_per_s': 20.0}}
  inference = {'args': {'batch_size': 32, 'seq_len': 128, 'threads': 2},
               'loadavg_before': [0.1], 'loadavg_after': [0.2],
               'rows': [bench(os.path.join(d, 'teacher_hf'), 20.0),
                        bench(os.path.join(d, 'general_distill_hf'), 10.0)]}
  table = glue_results.speed_table([d], inference)
  assert '| 2.00x / 4.00x | 97.5% (100.0%) |' in table
  assert '| 1.00x / 2.00x | 100% (0.800) |' in table
  inference['rows'] = inference['rows'][1:]
  with pytest.raises(ValueError, match='no row for any task\'s teacher_hf'):
    glue_results.speed_table([d], inference)
