"""Preemption (SIGTERM), SIGKILL at any moment, and hostile input, with real processes and files."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers

from flaxdistil.export import hf_export
from flaxdistil.training import checkpointing
from flaxdistil.training import setup
from flaxdistil.training import train

from conftest import ROOT
from conftest import subprocess_env
from conftest import tiny_config

ENV = subprocess_env(2)  # the main.py runs here: a 2-device data-parallel mesh
LONG = ['--config', 'configs/tiny.py', '--config.num_train_steps=40', '--config.log_every_steps=1',
        '--config.eval_every_steps=0', '--config.checkpoint_every_steps=8']


def _main(workdir, *extra, **kw):
  return subprocess.Popen([sys.executable, '-m', 'flaxdistil.main', *LONG, *extra,
                           '--workdir', str(workdir)], cwd=ROOT, env=ENV, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    recs = [json.loads(l) for l in f if l.strip()]
  return {r['step']: r['loss'] for r in recs if r['kind'] == 'train'}


def _wait_for_step(workdir, step, proc, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) and max(
        _losses(workdir) or {0: 0}) >= step:
      return
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.05)
  raise TimeoutError(step)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  wd = tmp_path_factory.mktemp('full')
  p = _main(wd)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out[-3000:]
  return wd, checkpointing.load_student(str(wd))[1]


def _same_params(a, b):
  import jax
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_bit_exact(tmp_path, uninterrupted):
  full_wd, full_params = uninterrupted
  p = _main(tmp_path)
  _wait_for_step(tmp_path, 11, p)
  p.send_signal(signal.SIGTERM)
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 0, out[-3000:]
  assert 'SIGTERM received: checkpoint for step' in out and 'Resume with the same command' in out
  stopped = max(_losses(tmp_path))
  assert 11 <= stopped < 40
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert steps[-1] == stopped  # the step in flight was finished and saved
  p = _main(tmp_path)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out[-3000:]
  assert _losses(tmp_path) == _losses(full_wd)
  _same_params(checkpointing.load_student(str(tmp_path))[1], full_params)


@pytest.mark.slow
def test_sigkill_loses_at_most_steps_since_checkpoint(tmp_path, uninterrupted):
  full_wd, full_params = uninterrupted
  p = _main(tmp_path)
  _wait_for_step(tmp_path, 19, p)
  p.kill()  # SIGKILL: no handler runs, possibly in the middle of a save
  p.communicate()
  # Restart: resumes from the newest complete checkpoint and ends identical.
  p = _main(tmp_path)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out[-3000:]
  assert 'Resumed from' in out
  resumed_at = int(out.split('at step ')[1].split('.')[0])
  assert resumed_at >= 16 and resumed_at % 8 == 0
  _same_params(checkpointing.load_student(str(tmp_path))[1], full_params)
  full = _losses(full_wd)
  got = _losses(tmp_path)  # steps after the checkpoint were logged twice; the last value wins
  assert got == full


def test_half_written_checkpoint_is_ignored(tmp_path, uninterrupted):
  full_wd, _ = uninterrupted
  import shutil
  shutil.copytree(full_wd, tmp_path / 'w')
  ckpt = tmp_path / 'w' / 'checkpoints'
  # A save torn by SIGKILL: Orbax's temporary directory, never finalised.
  shutil.copytree(ckpt / '40', ckpt / '48.orbax-checkpoint-tmp-123')
  cfg, params, meta, step = checkpointing.load_student(str(tmp_path / 'w'))
  assert step == 40


# ----------------------------------------------------------------------------- hostile input

@pytest.fixture(scope='module')
def hf_teacher(tmp_path_factory):
  d = tmp_path_factory.mktemp('teacher')
  from flaxdistil.data import synthetic
  syn = synthetic.write_corpus(str(d / 'syn'))
  tok = transformers.AutoTokenizer.from_pretrained(syn['tokenizer'])
  cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64)
  torch.manual_seed(0)
  transformers.BertForMaskedLM(cfg).save_pretrained(d / 'bert')
  tok.save_pretrained(d / 'bert')
  return d, syn


def _build(cfg, workdir):
  return setup.build_run(cfg, str(workdir))


def test_teacher_errors(tmp_path, hf_teacher):
  d, syn = hf_teacher
  base = {'teacher.random_init': False, 'data.synthetic': False,
          'data.train_files': tuple(syn['train_files']), 'data.eval_files': tuple(syn['eval_files'])}
  with pytest.raises(setup.ConfigError, match='does not exist'):
    _build(tiny_config(**base, **{'teacher.path': str(tmp_path / 'nope')}), tmp_path / 'w')
  # Without weights.
  (tmp_path / 'noweights').mkdir()
  (tmp_path / 'noweights' / 'config.json').write_text((d / 'bert' / 'config.json').read_text())
  with pytest.raises(setup.ConfigError, match='(?i)weights|safetensors|pytorch_model'):
    _build(tiny_config(**base, **{'teacher.path': str(tmp_path / 'noweights')}), tmp_path / 'w')
  # Corrupt weights.
  import shutil
  shutil.copytree(d / 'bert', tmp_path / 'corrupt')
  (tmp_path / 'corrupt' / 'model.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(setup.ConfigError, match='(?i)corrupt|cannot|invalid|read'):
    _build(tiny_config(**base, **{'teacher.path': str(tmp_path / 'corrupt')}), tmp_path / 'w')
  # Not a BERT.
  shutil.copytree(d / 'bert', tmp_path / 'gpt')
  c = json.loads((tmp_path / 'gpt' / 'config.json').read_text())
  c['model_type'] = 'gpt2'
  (tmp_path / 'gpt' / 'config.json').write_text(json.dumps(c))
  with pytest.raises(setup.ConfigError, match='gpt2'):
    _build(tiny_config(**base, **{'teacher.path': str(tmp_path / 'gpt')}), tmp_path / 'w')
  # A real teacher directory works and the student takes its layers.
  run = _build(tiny_config(**base, **{'teacher.path': str(d / 'bert')}), tmp_path / 'ok')
  assert run.teacher_config.num_hidden_layers == 2 and run.student_config.hidden_size == 32


def test_tokenizer_vocab_mismatch(tmp_path, hf_teacher):
  d, syn = hf_teacher
  big = tmp_path / 'bigtok'
  vocab = [l.strip() for l in open(os.path.join(syn['tokenizer'], 'vocab.txt'))] if os.path.exists(
      os.path.join(syn['tokenizer'], 'vocab.txt')) else list(
          transformers.AutoTokenizer.from_pretrained(syn['tokenizer']).get_vocab())
  vocab = sorted(set(vocab) | {f'extra{i}' for i in range(50)})
  transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(
      ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [v for v in vocab if not v.startswith('[')])
  }).save_pretrained(big)
  cfg = tiny_config(**{'teacher.random_init': False, 'teacher.path': str(d / 'bert'),
                'data.synthetic': False, 'data.tokenizer': str(big),
                'data.train_files': tuple(syn['train_files'])})
  with pytest.raises(setup.ConfigError, match="teacher's vocab_size"):
    _build(cfg, tmp_path / 'w')


def test_data_errors(tmp_path, hf_teacher):
  d, syn = hf_teacher
  base = {'teacher.random_init': False, 'teacher.path': str(d / 'bert'), 'data.synthetic': False}
  with pytest.raises(setup.ConfigError, match='missing.txt'):
    _build(tiny_config(**base, **{'data.train_files': (str(tmp_path / 'missing.txt'),)}), tmp_path / 'w')
  (tmp_path / 'empty.txt').write_text('\n\n')
  with pytest.raises(setup.ConfigError, match='(?i)empty|no tokens'):
    _build(tiny_config(**base, **{'data.train_files': (str(tmp_path / 'empty.txt'),)}), tmp_path / 'w')
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9 na\xefve words here\n'.encode('latin-1'))
  with pytest.raises(setup.ConfigError, match='(?i)utf-8'):
    _build(tiny_config(**base, **{'data.train_files': (str(tmp_path / 'latin1.txt'),)}), tmp_path / 'w')


@pytest.mark.slow
def test_shape_and_batch_errors(tmp_path):
  with pytest.raises(setup.ConfigError, match='max_position_embeddings=64'):
    _build(tiny_config(**{'data.max_seq_length': 128}), tmp_path / 'w')
  with pytest.raises(setup.ConfigError, match='not divisible'):
    _build(tiny_config(**{'data.global_batch_size': 12}), tmp_path / 'w')  # 12/2 microbatches = 6, 8 devices
  with pytest.raises(setup.ConfigError, match='needs a teacher'):
    _build(tiny_config(**{'teacher.random_init': False}), tmp_path / 'w')


def test_read_only_workdir():
  # /proc refuses new directories even to root: a genuinely read-only path.
  with pytest.raises(setup.ConfigError, match='not writable'):
    train.train_and_evaluate(tiny_config(), '/proc/flaxdistil_run')


def test_workdir_that_is_a_file(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  with pytest.raises(setup.ConfigError, match='not writable'):
    train.train_and_evaluate(tiny_config(), str(f / 'run'))


def test_unknown_config_key_is_rejected_by_cli(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'flaxdistil.main', '--config', 'configs/tiny.py',
                      '--workdir', str(tmp_path), '--config.distill.alpha_foo=1'],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and 'alpha_foo' in r.stderr


def test_export_target_that_exists(tmp_path, uninterrupted):
  full_wd, _ = uninterrupted
  (tmp_path / 'out').mkdir()
  with pytest.raises(FileExistsError, match='already exists'):
    hf_export.export(str(full_wd), str(tmp_path / 'out'))
