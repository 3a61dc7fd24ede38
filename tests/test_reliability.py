"""Preemption (SIGTERM), SIGKILL at any moment, hostile input, and the faults of a pod (a full
disk, corrupt or truncated files, two runs on one workdir), with real processes and files."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
import transformers

from flaxdistil.export import hf_export
from flaxdistil.storage import integrity
from flaxdistil.training import checkpointing
from flaxdistil.training import setup
from flaxdistil.training import train

from conftest import ROOT
from conftest import flip_byte
from conftest import small_filesystem
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
def test_a_second_run_is_refused_and_sigkill_loses_at_most_steps_since_checkpoint(tmp_path,
                                                                                 uninterrupted):
  """One live run serves both: a second run on its workdir is refused before any work while the
  first trains on unharmed; then SIGKILL, and the restart ends identical to the uninterrupted run."""
  full_wd, full_params = uninterrupted
  p = _main(tmp_path)
  _wait_for_step(tmp_path, 5, p)
  t0 = time.time()
  second = _main(tmp_path)
  out = second.communicate(timeout=300)[0]
  assert second.returncode == 6, out[-3000:]
  err = _error_line(out)
  assert err.startswith(f'error: --workdir {tmp_path} is in use by pid {p.pid} on host ')
  assert 'Wait for that run to end or stop it, or pass another --workdir.' in err
  assert 'Training steps' not in out and time.time() - t0 < 120  # refused before any work
  _wait_for_step(tmp_path, 19, p)  # the first run goes on
  p.kill()  # SIGKILL: no handler runs, possibly in the middle of a save
  p.communicate()
  # Its workdir lock is left behind, naming the dead run, but the kernel dropped the flock.
  assert json.loads((tmp_path / '.flaxdistil-lock.0').read_text())['pid'] == p.pid
  # Restart: not refused; resumes from the newest complete checkpoint and ends identical.
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_export_target_that_exists(tmp_path, uninterrupted):
  full_wd, _ = uninterrupted
  (tmp_path / 'out').mkdir()
  with pytest.raises(FileExistsError, match='already exists'):
    hf_export.export(str(full_wd), str(tmp_path / 'out'))


# ----------------------------------------------------------------------------- faults of a pod

def _pages(path):
  """Bytes the files under `path` take on a tmpfs (whole 4 KiB pages)."""
  total = 0
  for parent, _, files in os.walk(path):
    total += sum(-(-os.path.getsize(os.path.join(parent, f)) // 4096) * 4096 for f in files)
  return total


def _error_line(out):
  lines = [l for l in out.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, out[-3000:]
  assert 'Traceback' not in out, out[-3000:]
  return lines[0]


@pytest.mark.slow
def test_disk_full_while_saving_a_checkpoint_then_resume_is_bit_exact(tmp_path, uninterrupted):
  full_wd, full_params = uninterrupted
  wd = tmp_path / 'w'
  # Room for one checkpoint and a half: step 8 is saved, step 16 finds the disk full.
  size = int(1.5 * _pages(full_wd / 'checkpoints' / '40'))
  with small_filesystem(wd / 'checkpoints', size) as fs:
    async_save = '--config.checkpoint.async_save=True'  # the default of real configs
    p = _main(wd, async_save)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 4, out[-3000:]
    err = _error_line(out)
    assert err.startswith(f'error: No space left on device writing checkpoint step 16 in '
                          f'{wd}/checkpoints: it needs about '), err
    assert err.endswith('then rerun the same command: it resumes from step 8 (the newest '
                        'complete checkpoint, intact), and repeats the steps since.'), err
    assert checkpointing.complete_steps(str(wd)) == [8]
    integrity.verify(str(wd / 'checkpoints' / '8'), 'intact')  # same bytes as when written
    fs.resize(64 << 20)  # space freed
    p = _main(wd, async_save)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    assert 'at step 8.' in out.split('Resumed from')[1].splitlines()[0]
    assert _losses(wd) == _losses(full_wd)
    _same_params(checkpointing.load_student(str(wd))[1], full_params)


@pytest.mark.slow
def test_disk_full_while_building_the_token_cache(tmp_path, uninterrupted):
  full_wd, _ = uninterrupted
  wd, cache = tmp_path / 'w', tmp_path / 'cache'
  args = ['--config.steps_per_run=2', f'--config.data.cache_dir={cache}']
  with small_filesystem(cache, 16 << 10) as fs:  # the 38 KiB shard does not fit
    p = _main(wd, *args)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 4, out[-3000:]
    err = _error_line(out)
    assert err.startswith('error: No space left on device writing the token cache tokens-')
    assert f' in {cache}: it needs about ' in err and err.endswith(
        'the shards already built are kept and the build goes on from the first missing one.')
    assert not list(cache.glob('tokens-*/manifest.json'))  # nothing reported done
    assert not list(cache.glob('tokens-*/.tmp_*'))  # nothing half-written left
    fs.resize(64 << 20)
    p = _main(wd, *args)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    full = _losses(full_wd)
    assert _losses(wd) == {s: full[s] for s in (1, 2)}


@pytest.mark.slow
def test_corrupt_token_shard_is_refused_and_the_fix_rebuilds_it(tmp_path, uninterrupted):
  full_wd, _ = uninterrupted
  wd, cache = tmp_path / 'w', tmp_path / 'cache'
  args = ['--config.steps_per_run=2', f'--config.data.cache_dir={cache}']
  p = _main(wd, *args)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out[-3000:]
  train_cache = next(d for d in cache.glob('tokens-*')  # not the tokens-<key>.lock files
                     if d.is_dir() and 'train.txt' in (d / 'plan.json').read_text())
  shard = train_cache / 'shard-00000.npy'
  flip_byte(shard, -10)  # one token near the end: the case that used to train silently
  p = _main(wd, *args)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 5, out[-3000:]
  err = _error_line(out)
  assert err.startswith(f'error: {shard} is corrupt: this token cache file ('), err
  fix = err.split('(rm ')[1].split(')')[0]
  assert fix == (f'{train_cache}/shard-00000.npy {train_cache}/shard-00000.json '
                 f'{train_cache}/shard-00000.counts.npy {train_cache}/manifest.json')
  for f in fix.split():  # the fix, as the message gives it
    os.remove(f)
  p = _main(wd, *args)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out[-3000:]
  full = _losses(full_wd)
  assert _losses(wd) == {s: full[s] for s in (1, 2, 3, 4)}  # the rebuilt tokens are the same
  with open(shard, 'r+b') as f:  # truncated
    f.truncate(os.path.getsize(shard) - 1000)
  p = _main(wd, *args)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 5, out[-3000:]
  assert _error_line(out).startswith(f'error: {shard} is corrupt')


def _export(workdir, out, *extra):
  return subprocess.run([sys.executable, '-m', 'flaxdistil.export', '--workdir', str(workdir),
                         '--out', str(out), *extra], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=900)


@pytest.mark.slow
def test_corrupt_checkpoint_is_refused_and_deleting_the_step_resumes_exactly(tmp_path,
                                                                             uninterrupted):
  full_wd, full_params = uninterrupted
  import shutil
  wd = tmp_path / 'w'
  shutil.copytree(full_wd, wd)
  ckpt = wd / 'checkpoints'
  data40 = sorted((ckpt / '40').glob('state/ocdbt.process_0/d/*'))[0]
  flip_byte(data40, -10)
  r = _export(wd, tmp_path / 'out')  # export reads the newest step
  assert r.returncode == 5, r.stderr[-3000:]
  err = _error_line(r.stderr)
  assert err.startswith(f'error: {data40} is corrupt: this checkpoint file ('), err
  assert err.endswith(f'Checkpoint step 40 is damaged: delete that step (rm -r {ckpt}/40); the '
                      'newest older checkpoint is step 32 (a rerun of the training command '
                      'resumes from it; export it with --step 32).'), err
  assert not (tmp_path / 'out').exists()
  shutil.rmtree(ckpt / '40')  # the fix
  meta32 = ckpt / '32' / '_CHECKPOINT_METADATA'
  with open(meta32, 'r+b') as f:  # and a truncated file in the next one
    f.truncate(os.path.getsize(meta32) // 2)
  p = _main(wd)  # resuming reads step 32 first: refused
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 5, out[-3000:]
  assert _error_line(out).startswith(f'error: {meta32} is corrupt'), out[-3000:]
  assert 'delete that step (rm -r' in out and 'the newest older checkpoint is step 24' in out
  shutil.rmtree(ckpt / '32')
  p = _main(wd)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out[-3000:]
  assert 'at step 24.' in out.split('Resumed from')[1].splitlines()[0]
  _same_params(checkpointing.load_student(str(wd))[1], full_params)


@pytest.fixture(scope='module')
def exported(tmp_path_factory, uninterrupted):
  """The uninterrupted run exported by the CLI (HF only): one export for the tests below."""
  out = tmp_path_factory.mktemp('export') / 'hf'
  r = _export(uninterrupted[0], out)
  assert r.returncode == 0, r.stderr[-3000:]
  return out


@pytest.mark.slow
def test_corrupt_export_is_refused_before_use(tmp_path, exported):
  import shutil

  from flaxdistil.export.torch_models import load_torch_model
  from flaxdistil.model import hf_conversion
  for damage in ('flip', 'truncate'):
    d = tmp_path / damage
    shutil.copytree(exported, d)
    weights = d / 'model.safetensors'
    if damage == 'flip':
      flip_byte(weights, -10)  # the last weight's lowest bits: loads fine, silently different
    else:
      with open(weights, 'r+b') as f:
        f.truncate(os.path.getsize(weights) - 100)
    for load in (load_torch_model, hf_conversion.load_hf_model):
      with pytest.raises(integrity.CorruptFileError, match='Export the model again'):
        load(str(d))
    r = subprocess.run([sys.executable, '-m', 'flaxdistil.export.onnx_export', '--hf', str(d)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 5, r.stderr[-3000:]
    err = _error_line(r.stderr)
    assert err.startswith(f'error: {weights} is corrupt: this exported file ('), err
    assert 'Export the model again (python -m flaxdistil.export --workdir RUN --out' in err
    assert not (d / 'onnx').exists()
    if shutil.which('sha256sum'):  # the standard tool sees it too
      assert subprocess.run(['sha256sum', '--quiet', '-c', 'SHA256SUMS'], cwd=d,
                            capture_output=True).returncode == 1


@pytest.mark.slow
def test_disk_full_during_the_hf_and_onnx_export(tmp_path, uninterrupted, exported):
  full_wd, _ = uninterrupted
  ref = exported
  hf_pages = _pages(ref)
  with small_filesystem(tmp_path / 'fs', hf_pages // 2) as fs:
    out = tmp_path / 'fs' / 'model'
    r = _export(full_wd, out, '--onnx')
    assert r.returncode == 4, r.stderr[-3000:]
    err = _error_line(r.stderr)
    assert err.startswith(f'error: No space left on device writing the export {out} in '
                          f'{tmp_path / "fs"}: it needs about '), err
    assert err.endswith('run the export again: nothing was left in the output directory.'), err
    assert os.listdir(tmp_path / 'fs') == []  # nothing half-written
    fs.resize(hf_pages + (64 << 10))  # room for the HF files, not for ONNX
    r = _export(full_wd, out, '--onnx')
    assert r.returncode == 4, r.stderr[-3000:]
    err = _error_line(r.stderr)
    assert err.startswith(f'error: No space left on device writing the ONNX export {out}/onnx'), err
    assert f'the verified HF export is in place at {out}; retry the ONNX step alone with' in err
    assert not (out / 'onnx').exists() and sorted(os.listdir(out)) == sorted(os.listdir(ref))
    assert (out / 'model.safetensors').read_bytes() == (ref / 'model.safetensors').read_bytes()
    assert integrity.verify(str(out), 'x').files == len(integrity.read_sums(str(ref)))
    fs.resize(64 << 20)
    r = subprocess.run([sys.executable, '-m', 'flaxdistil.export.onnx_export', '--hf', str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    integrity.verify(str(out / 'onnx'), 'x')
    assert json.loads(r.stdout)['max_abs_diff'] < 1e-4


# ----------------------------------------------------------------------------- non-finite values

def _teacher_copy(tmp_path, hf_teacher, name, edit):
  """A copy of the HF teacher with `edit(state_dict)` applied to its weights."""
  import shutil

  from safetensors.torch import load_file
  from safetensors.torch import save_file
  d, _ = hf_teacher
  out = tmp_path / name
  shutil.copytree(d / 'bert', out)
  tensors = load_file(out / 'model.safetensors')
  edit(tensors)
  save_file(tensors, out / 'model.safetensors', metadata={'format': 'pt'})
  return out


def _overflow_embedding(tensors, token):
  """Makes every sequence holding `token` non-finite in the teacher, and no other.

  Two entries of its embedding row set to 3e38 overflow the embedding LayerNorm's mean (inf, then
  NaN through attention) of exactly the sequences with `token`. The MLM decoder is tied to these
  embeddings, so the head's last LayerNorm is zeroed in those two features: the decoder's logit
  for `token` is then exactly 0 * 3e38 = 0 at every position instead of overflowing at random ones.
  """
  tensors['bert.embeddings.word_embeddings.weight'][token, :2] = 3e38
  tensors['cls.predictions.transform.LayerNorm.weight'][:2] = 0.0
  tensors['cls.predictions.transform.LayerNorm.bias'][:2] = 0.0


def _teacher_args(teacher, syn, *extra):
  train, valid = syn['train_files'][0], syn['eval_files'][0]
  return ['--config.teacher.random_init=False', f'--config.teacher.path={teacher}',
          '--config.data.synthetic=False', f'--config.data.train_files=("{train}",)',
          f'--config.data.eval_files=("{valid}",)', '--config.student.init=random',
          '--config.num_train_steps=6', '--config.log_every_steps=1', '--config.eval_every_steps=0',
          '--config.checkpoint_every_steps=3', *extra]


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if r['kind'] == 'train'}


def test_a_teacher_with_a_nan_weight_is_refused_before_training(tmp_path, hf_teacher):
  def nan(t):
    t['bert.encoder.layer.0.attention.output.dense.weight'][0, 0] = float('nan')
  teacher = _teacher_copy(tmp_path, hf_teacher, 'nan', nan)
  r = subprocess.run([sys.executable, '-m', 'flaxdistil.main', '--config', 'configs/tiny.py',
                      '--workdir', str(tmp_path / 'w'), *_teacher_args(teacher, hf_teacher[1])],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 2, r.stderr[-3000:]
  err = _error_line(r.stderr)
  assert err == (f"error: teacher.path='{teacher}' has non-finite weights (encoder/layer_0/"
                 'attention/output/kernel: 1 of 1024 values inf/NaN): every step would be skipped. '
                 'Use an intact teacher (re-export or re-download it).'), err


@pytest.mark.slow
def test_steps_a_teacher_makes_non_finite_are_skipped_counted_or_stop_the_run(tmp_path,
                                                                            hf_teacher):
  d, syn = hf_teacher
  # The teacher's input batches of the run (masked as the run masks them).
  cfg = tiny_config(**{'teacher.random_init': False, 'teacher.path': str(d / 'bert'),
                       'data.synthetic': False, 'data.train_files': tuple(syn['train_files']),
                       'student.init': 'random'})
  it = setup.build_run(cfg, str(tmp_path / 'probe')).train_batches(0)
  batches = [next(it)['input_ids'] for _ in range(6)]
  it.close()
  steps_of = {}
  for step, ids in enumerate(batches, 1):
    for token in np.unique(ids):
      steps_of.setdefault(int(token), set()).add(step)
  token = next(t for t, s in sorted(steps_of.items()) if t > 4 and 2 <= len(s) <= 4)
  bad_steps = sorted(steps_of[token])

  def huge(t):  # finite weights whose sum overflows: rows with `token` turn to NaN in the teacher
    _overflow_embedding(t, token)
  teacher = _teacher_copy(tmp_path, hf_teacher, 'huge', huge)
  r = subprocess.run([sys.executable, '-m', 'flaxdistil.main', '--config', 'configs/tiny.py',
                      '--workdir', str(tmp_path / 'skip'), *_teacher_args(teacher, syn)],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  recs = _records(tmp_path / 'skip')
  assert [s for s in sorted(recs) if recs[s]['nonfinite_steps']] == bad_steps  # exactly those
  assert recs[6]['num_skipped'] == len(bad_steps)
  assert json.load(open(tmp_path / 'skip' / 'summary.json'))['num_skipped'] == len(bad_steps)
  assert r.stderr.count('non-finite loss/gradient step(s) up to step') == len(bad_steps)
  for step in checkpointing.complete_steps(str(tmp_path / 'skip')):  # nothing non-finite saved
    params = checkpointing.load_student(str(tmp_path / 'skip'), step)[1]
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))

  r = subprocess.run([sys.executable, '-m', 'flaxdistil.main', '--config', 'configs/tiny.py',
                      '--workdir', str(tmp_path / 'stop'),
                      *_teacher_args(teacher, syn, '--config.optim.on_nonfinite=stop')],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 3, r.stderr[-3000:]
  assert _error_line(r.stderr).startswith(
      f'error: Non-finite loss or gradient up to step {bad_steps[0]}; stopped with the last good '
      'checkpoint in ')
  assert max(_records(tmp_path / 'stop')) == bad_steps[0]


@pytest.mark.slow
def test_a_run_whose_steps_are_all_non_finite_stops(tmp_path, hf_teacher):
  d, syn = hf_teacher
  cls = transformers.AutoTokenizer.from_pretrained(d / 'bert').cls_token_id

  def huge(t):  # every row starts with [CLS]: every step is non-finite
    _overflow_embedding(t, cls)
  teacher = _teacher_copy(tmp_path, hf_teacher, 'all', huge)
  wd = tmp_path / 'w'
  r = subprocess.run([sys.executable, '-m', 'flaxdistil.main', '--config', 'configs/tiny.py',
                      '--workdir', str(wd),
                      *_teacher_args(teacher, syn, '--config.optim.max_consecutive_nonfinite=4')],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 3, r.stderr[-3000:]
  err = _error_line(r.stderr)
  assert err.startswith('error: The last 4 steps (up to step 4) all had a non-finite loss, '
                        'gradient or update, so all were skipped (optim.on_nonfinite="skip") and '
                        'the student has not changed since step 0: stopped instead of training on '
                        '(optim.max_consecutive_nonfinite=4).'), err
  assert max(_records(wd)) == 4
  _, saved, _, step = checkpointing.load_student(str(wd))  # step 3: the initial student, finite
  assert step == 3 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(saved))
