"""python -m flaxdistil.prune: importance -> pruned checkpoint + verified export -> recovery run ->
verified export; a rerun continues, other fractions are refused, errors name the fix."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

from flaxdistil import prune
from flaxdistil.model import hf_conversion
from flaxdistil.training import checkpointing
from flaxdistil.training import importance
from flaxdistil.training import train

from conftest import ROOT
from conftest import subprocess_env
from conftest import tiny_config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(tiny_config(num_train_steps=6, eval_every_steps=0), wd)
  return wd


@pytest.fixture(scope='module')
def pruned(trained, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('pruned'))
  report = prune.prune_run(trained, out, heads=0.5, ffn=0.25, importance_batches=2,
                           recovery_steps=2)
  return out, report


@pytest.mark.slow
def test_prune_writes_a_smaller_verified_model_and_recovers_it(trained, pruned):
  out, report = pruned
  assert report['source']['step'] == 6 and report['fractions'] == {'heads': 0.5, 'ffn': 0.25}
  assert sum(report['heads_per_layer']) == 4 and min(report['heads_per_layer']) >= 1  # 8 -> 4
  assert report['intermediate_size'] == {'before': 64, 'after': 48}
  assert report['params']['after'] < report['params']['before']
  assert report['pruned_hf']['max_abs_diff'] <= 1e-4
  # the pruned checkpoint is the exported model, and loads in plain transformers
  scfg, params, _, step = checkpointing.load_student(os.path.join(out, 'pruned'))
  assert step == 6 and [list(h) for h in scfg.pruned_heads] == report['pruned_heads']
  hf_cfg, hf_params = hf_conversion.load_hf_model(os.path.join(out, 'pruned_hf'))
  assert hf_cfg.pruned_heads == scfg.pruned_heads and hf_cfg.intermediate_size == 48
  np.testing.assert_array_equal(
      hf_params['encoder']['layer_1']['attention']['value']['kernel'],
      params['encoder']['layer_1']['attention']['value']['kernel'])
  _, info = transformers.AutoModelForMaskedLM.from_pretrained(os.path.join(out, 'pruned_hf'),
                                                              output_loading_info=True)
  assert not any(info.values())
  # recovery: a normal run from the pruned export, same shape, then its own verified export
  assert report['recovery']['summary']['done'] and report['recovery']['summary']['step'] == 2
  rec_cfg, _, _, _ = checkpointing.load_student(os.path.join(out, 'recovery'))
  assert rec_cfg.pruned_heads == scfg.pruned_heads and rec_cfg.intermediate_size == 48
  assert report['recovered_hf']['max_abs_diff'] <= 1e-4
  assert set(report['eval']) == {'teacher', 'source', 'pruned', 'recovered'}
  assert json.load(open(os.path.join(out, prune.REPORT)))['eval'] == report['eval']


@pytest.mark.slow
def test_a_rerun_skips_finished_steps_and_other_fractions_are_refused(trained, pruned,
                                                                      monkeypatch):
  out, report = pruned
  monkeypatch.setattr(importance, 'importance', lambda *a, **kw: pytest.fail('recomputed'))
  again = prune.prune_run(trained, out, heads=0.5, ffn=0.25, recovery_steps=2)
  assert again['pruned_heads'] == report['pruned_heads']
  assert again['recovery']['summary']['step'] == 2
  with pytest.raises(ValueError, match='fractions .* choose another --out'):
    prune.prune_run(trained, out, heads=0.25, ffn=0.25)


@pytest.mark.slow
def test_pruning_nothing_keeps_the_function(trained, tmp_path):
  report = prune.prune_step(trained, str(tmp_path), heads=0.0, ffn=0.0, importance_batches=1)
  assert report['params']['after'] == report['params']['before']
  assert report['eval']['pruned'] == report['eval']['source']


@pytest.mark.slow
def test_recovery_config_continues_from_the_export(trained):
  c = prune.recovery_config(prune.load_run_config(trained), '/x/pruned_hf', 40, 1e-4)
  assert (c.student.init, c.student.path, c.student.intermediate_size) == (
      'pretrained', '/x/pruned_hf', 0)
  assert (c.num_train_steps, c.optim.warmup_steps, c.optim.learning_rate) == (40, 4, 1e-4)
  assert c.teacher.cache == '' and c.eval_every_steps == 0


def test_bad_input_names_the_problem(trained, tmp_path):
  with pytest.raises(ValueError, match=r'--heads=1.0: the fraction to prune must be in \[0, 1\)'):
    prune.prune_step(trained, str(tmp_path), heads=1.0, ffn=0.0)
  with pytest.raises(ValueError, match="use one of \\('eval', 'train'\\)"):
    prune.prune_step(trained, str(tmp_path), heads=0.5, ffn=0.0, importance_data='dev')
  with pytest.raises(FileNotFoundError, match='config.json'):
    prune.prune_step(str(tmp_path), str(tmp_path / 'o'), heads=0.5, ffn=0.0)
  r = subprocess.run([sys.executable, '-m', 'flaxdistil.prune', f'--workdir={tmp_path}',
                      f'--out={tmp_path / "o"}', '--heads=0.5'], cwd=ROOT,
                     env=subprocess_env(1, PYTHONPATH=ROOT), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 2 and 'error: ' in r.stderr and 'config.json' in r.stderr, r.stderr
