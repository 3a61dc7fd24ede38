"""The train loop: exact resume, interval-mean logging, the command line, non-finite steps,
streaming, intermediate terms and head-less teachers (the step itself: test_train_step.py)."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxdistil.training import checkpointing
from flaxdistil.training import train

from conftest import ROOT
from conftest import assert_trees_close
from conftest import subprocess_env
from conftest import tiny_config


def _run(workdir, **overrides):
  return train.train_and_evaluate(tiny_config(**overrides), str(workdir))


def _train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    recs = [json.loads(l) for l in f]
  return {r['step']: r['loss'] for r in recs if r['kind'] == 'train'}


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
  full = _run(tmp_path / 'full')
  first = _run(tmp_path / 'split', steps_per_run=7)  # stops between checkpoints
  assert first['step'] == 7 and not first['done']
  resumed = _run(tmp_path / 'split')
  assert full['step'] == resumed['step'] == 20
  assert _train_losses(tmp_path / 'full') == _train_losses(tmp_path / 'split')
  _, p_full, _, _ = checkpointing.load_student(str(tmp_path / 'full'))
  _, p_split, _, _ = checkpointing.load_student(str(tmp_path / 'split'))
  assert_trees_close(p_full, p_split, rtol=0, atol=0)
  # Distillation learns: loss falls and the eval records exist for student and teacher.
  losses_full = _train_losses(tmp_path / 'full')
  assert losses_full[20] < losses_full[5]
  assert 0.0 <= full['student']['accuracy'] <= 1.0 and 'agreement' in full['student']
  assert full['teacher']['num_tokens'] == full['student']['num_tokens'] > 0


def _train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if r['kind'] == 'train'}


@pytest.mark.slow
def test_logged_train_metrics_are_interval_means_and_a_finished_run_is_left_alone(tmp_path,
                                                                                   caplog):
  kw = {'num_train_steps': 6, 'eval_every_steps': 0, 'checkpoint_every_steps': 4}
  caplog.set_level('INFO')
  _run(tmp_path / 'every', log_every_steps=1, **kw)  # the per-step values
  caplog.clear()
  first = _run(tmp_path / 'interval', log_every_steps=3, **kw)
  # The console: the objective once, the compiling interval labelled, where everything is.
  assert caplog.text.count('loss = 5*ce(T=2) + 2*mlm + 1*cos') == 1
  assert caplog.text.count('first interval: includes compilation') == 1
  assert 'Done at step 6/6' in caplog.text and 'python -m flaxdistil.export --workdir' in caplog.text
  caplog.clear()
  per_step, logged = _train_records(tmp_path / 'every'), _train_records(tmp_path / 'interval')
  assert sorted(logged) == [3, 6] and sorted(per_step) == list(range(1, 7))
  for end in (3, 6):
    steps = [per_step[i] for i in range(end - 2, end + 1)]
    tokens = np.array([r['tokens'] for r in steps])
    assert logged[end]['tokens'] == tokens.sum() and logged[end]['num_steps'] == 3
    # Token-weighted: the total loss and the terms counted over tokens (ce and cos here).
    for k in ('loss', 'loss_ce', 'loss_cos'):
      want = np.dot([r[k] for r in steps], tokens) / tokens.sum()
      np.testing.assert_allclose(logged[end][k], want, rtol=1e-6, err_msg=f'{end} {k}')
      assert logged[end][k] != per_step[end][k], 'a mean, not the last step'
    np.testing.assert_allclose(logged[end]['grad_norm'], np.mean([r['grad_norm'] for r in steps]),
                               rtol=1e-6)
    # loss_mlm is over masked tokens (their count varies by step): within the steps' range.
    mlm = [r['loss_mlm'] for r in steps]
    assert min(mlm) <= logged[end]['loss_mlm'] <= max(mlm)
  # Running the finished run again trains nothing, appends nothing and keeps its summary.
  files = {n: (tmp_path / 'interval' / n).read_bytes() for n in ('metrics.jsonl', 'summary.json')}
  assert first['train_tokens_per_sec'] > 0
  again = _run(tmp_path / 'interval', log_every_steps=3, **kw)
  assert again == first
  for name, content in files.items():
    assert (tmp_path / 'interval' / name).read_bytes() == content, name
  assert 'is complete' in caplog.text and 'python -m flaxdistil.export --workdir' in caplog.text


def test_resume_with_incompatible_config_is_refused(tmp_path):
  first = _run(tmp_path, num_train_steps=2, eval_every_steps=0)
  from flaxdistil.model import bert  # pylint: disable=g-import-not-at-top
  _, params, _, _ = checkpointing.load_student(str(tmp_path))
  assert first['models']['student'] == {'layers': 2, 'hidden_size': 32,
                                        'params': bert.count_params(params)}
  assert first['models']['teacher'] == {'layers': 4, 'hidden_size': 32, 'params': 47_603}
  assert (tmp_path / 'curves.png').stat().st_size > 1000  # plots.py: every run draws its curves
  with pytest.raises(ValueError, match='global_batch_size'):
    _run(tmp_path, num_train_steps=4, **{'data.global_batch_size': 32})
  # Harmless changes are accepted.
  summary = _run(tmp_path, num_train_steps=3, eval_every_steps=0, log_every_steps=1)
  assert summary['step'] == 3


@pytest.mark.slow
def test_main_cli_two_steps_then_resume_and_bad_input(tmp_path):
  env = subprocess_env(2)
  cmd = [sys.executable, '-m', 'flaxdistil.main', '--config', 'configs/tiny.py',
         '--workdir', str(tmp_path / 'w')]
  r = subprocess.run(cmd + ['--config.num_train_steps=2'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  # The console: clean lines (no absl `I1201 19:05:15.585633 140123 file.py:180]` prefix), the
  # summary table last; the full log, prefixes and library chatter included, in log.txt.
  absl_prefix = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+:\d+\]', re.M)
  assert not absl_prefix.search(r.stderr), r.stderr[:2000]
  assert 'step 2/2 loss=' in r.stderr and 'Summary of ' in r.stderr
  assert r.stderr.rstrip().splitlines()[-1].startswith('curves: ')
  log = (tmp_path / 'w' / 'log.txt').read_text()
  assert len(absl_prefix.findall(log)) > len(absl_prefix.findall(r.stderr)) + 5
  assert 'step 2/2 loss=' in log and '/orbax/' not in r.stderr
  assert (tmp_path / 'w' / 'curves.png').exists()
  r = subprocess.run(cmd + ['--config.num_train_steps=3'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Resumed from' in r.stderr
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'w' / 'checkpoints') if d.isdigit())
  assert steps[-1] == 3
  with open(tmp_path / 'w' / 'metrics.jsonl') as f:
    recs = [json.loads(l) for l in f]
  assert [r['step'] for r in recs if r['kind'] == 'train'] == [2, 3]
  r = subprocess.run(cmd + ['--config.data.max_seq_length=128'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert 'max_position_embeddings=64' in r.stderr
  r = subprocess.run(cmd + ['--config.num_train_steps=4', '--config.data.global_batch_size=32'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert 'error: Refusing to resume: the config changed' in r.stderr


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_or_stop_the_run(tmp_path):
  # An absurd learning rate blows the parameters up; the loss turns non-finite.
  skip = _run(tmp_path / 'skip', num_train_steps=6, log_every_steps=1, eval_every_steps=0,
              **{'optim.learning_rate': 1e30, 'optim.warmup_steps': 0})
  assert skip['num_skipped'] > 0
  _, params, _, _ = checkpointing.load_student(str(tmp_path / 'skip'))
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
  with pytest.raises(FloatingPointError, match='last good checkpoint'):
    _run(tmp_path / 'stop', num_train_steps=6, log_every_steps=1, eval_every_steps=0,
         **{'optim.learning_rate': 1e30, 'optim.warmup_steps': 0, 'optim.on_nonfinite': 'stop'})


@pytest.mark.slow
def test_streaming_run_resumes_exactly(tmp_path):
  """data.streaming: a run split in two (resume skips consumed batches) equals one run."""
  full = _run(tmp_path / 'stream', num_train_steps=4, eval_every_steps=0, log_every_steps=1,
              **{'data.streaming': True})
  assert full['step'] == 4
  _run(tmp_path / 'stream2', num_train_steps=4, eval_every_steps=0, log_every_steps=1,
       steps_per_run=2, **{'data.streaming': True})
  _run(tmp_path / 'stream2', num_train_steps=4, eval_every_steps=0, log_every_steps=1,
       **{'data.streaming': True})
  assert _train_losses(tmp_path / 'stream') == _train_losses(tmp_path / 'stream2')


@pytest.mark.slow
def test_intermediate_terms_train_a_narrower_student_with_projections(tmp_path):
  """TinyBERT/MiniLM terms in the same loop: 4x32 teacher -> 2x16 student, projections trained,
  checkpointed, resumed exactly, and left out of the hf_export."""
  kw = {'student.init': 'random', 'student.hidden_size': 16, 'student.intermediate_size': 32,
        'distill.alpha_cos': 0.0, 'distill.alpha_emb': 1.0, 'distill.alpha_hidden': 1.0,
        'distill.alpha_attn_kl': 1.0, 'distill.alpha_value_kl': 1.0,
        'distill.num_relation_heads': 2, 'eval_every_steps': 0, 'log_every_steps': 1,
        'num_train_steps': 6}
  full = _run(tmp_path / 'full', **kw)
  assert full['step'] == 6
  with open(tmp_path / 'full' / 'metrics.jsonl') as f:
    rec = [r for r in map(json.loads, f) if r['kind'] == 'train'][-1]
  for k in ('loss_emb', 'loss_hidden', 'loss_attn_kl', 'loss_value_kl', 'loss_ce', 'loss_mlm'):
    assert rec[k] > 0, k
  _run(tmp_path / 'split', steps_per_run=3, **kw)
  _run(tmp_path / 'split', **kw)
  assert _train_losses(tmp_path / 'full') == _train_losses(tmp_path / 'split')
  from flaxdistil.export import hf_export
  scfg, params, meta, _ = checkpointing.load_student(str(tmp_path / 'full'))
  assert meta['fingerprint']['projection'] == [16, 32] and scfg.hidden_size == 16
  report = hf_export.export(str(tmp_path / 'full'), str(tmp_path / 'hf'))
  assert report['max_abs_diff'] <= 1e-4


@pytest.mark.slow
def test_mlm_only_baseline_has_the_distilled_students_shape(tmp_path):
  """Regression: with no loss term using the teacher, the student's default shape must still
  come from teacher.path (the DistilBERT ablation compares equal architectures)."""
  import transformers

  from flaxdistil.data import synthetic
  from flaxdistil.training import setup
  syn = synthetic.write_corpus(str(tmp_path / 'syn'))
  tok = transformers.AutoTokenizer.from_pretrained(syn['tokenizer'])
  transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=len(tok), hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
      intermediate_size=40, max_position_embeddings=64)).save_pretrained(tmp_path / 'bert')
  cfg = tiny_config(**{
      'teacher.random_init': False, 'teacher.path': str(tmp_path / 'bert'),
      'data.synthetic': False, 'data.tokenizer': syn['tokenizer'],
      'data.train_files': tuple(syn['train_files']), 'student.init': 'random',
      'distill.alpha_ce': 0.0, 'distill.alpha_cos': 0.0})
  run = setup.build_run(cfg, str(tmp_path / 'w'))
  s = run.student_config
  assert (s.hidden_size, s.num_attention_heads, s.intermediate_size) == (24, 3, 40)
  assert run.teacher_params is not None  # evaluated as the reference


@pytest.mark.slow
def test_headless_teacher_gives_headless_student_trained_on_intermediate_terms(tmp_path):
  """A BertModel teacher (no MLM head, like MiniLM) distils through hidden states/attentions
  only; its student has no head, and asking for MLM or logit terms is refused."""
  import transformers

  from flaxdistil.data import synthetic
  from flaxdistil.export import hf_export
  from flaxdistil.training import setup
  syn = synthetic.write_corpus(str(tmp_path / 'syn'))
  tok = transformers.AutoTokenizer.from_pretrained(syn['tokenizer'])
  transformers.BertModel(transformers.BertConfig(
      vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / 'enc')
  kw = {'teacher.random_init': False, 'teacher.path': str(tmp_path / 'enc'),
        'data.synthetic': False, 'data.tokenizer': syn['tokenizer'],
        'data.train_files': tuple(syn['train_files']), 'data.eval_files': tuple(syn['eval_files']),
        'distill.alpha_ce': 0.0, 'distill.alpha_mlm': 0.0, 'distill.alpha_cos': 0.0,
        'distill.alpha_hidden': 1.0, 'distill.alpha_attn_kl': 1.0, 'distill.alpha_value_kl': 1.0,
        'eval_every_steps': 0, 'eval_at_start': True, 'log_every_steps': 1,
        'num_train_steps': 3, 'optim.warmup_steps': 0}
  summary = _run(tmp_path / 'w', **kw)
  assert summary['done'] and summary['num_skipped'] == 0
  # Scored as an encoder against the teacher (configs/demo.py's metrics), at step 0 and the end.
  before, after = summary['student_initial'], summary['student']
  assert before['num_sequences'] == after['num_sequences'] > 0
  assert after['hidden_mse'] < before['hidden_mse']  # what the hidden-state terms minimise
  assert -1.0 <= after['embedding_cosine'] <= 1.0
  with open(tmp_path / 'w' / 'metrics.jsonl') as f:
    rec = [r for r in map(json.loads, f) if r['kind'] == 'train'][-1]
  assert rec['loss_hidden'] > 0 and rec['loss_attn_kl'] > 0 and rec['loss_value_kl'] > 0
  scfg, _, _, _ = checkpointing.load_student(str(tmp_path / 'w'))
  assert not scfg.with_mlm_head and scfg.num_hidden_layers == 2
  assert hf_export.export(str(tmp_path / 'w'), str(tmp_path / 'hf'))['max_abs_diff'] <= 1e-4
  for key in ('distill.alpha_mlm', 'distill.alpha_ce'):
    cfg = tiny_config(**dict(kw, **{key: 1.0}))
    with pytest.raises(setup.ConfigError, match='no MLM head'):
      setup.build_run(cfg, str(tmp_path / 'x'))
