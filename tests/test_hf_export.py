"""Export CLI: sharded-run checkpoint -> verified HF DistilBertForMaskedLM (+ ONNX); fill-mask parity."""

import json
import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from flaxdistil.export import hf_export
from flaxdistil.model import bert
from flaxdistil.training import checkpointing
from flaxdistil.training import train

from conftest import ROOT
from conftest import subprocess_env
from conftest import tiny_config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  wd = tmp_path_factory.mktemp('run')
  # a sharded run: data x fsdp x tensor over 8 host devices
  c = tiny_config(num_train_steps=6, eval_every_steps=0, **{'mesh.shape': (2, 2, 2)})
  train.train_and_evaluate(c, str(wd))
  return wd


def _modes(root):
  """{relative path: permission bits} of `root` and everything under it."""
  out = {'.': stat.S_IMODE(os.stat(root).st_mode)}
  for parent, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(parent, name)
      out[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
  return out


def _assert_readable(root):
  for rel, mode in _modes(root).items():
    want = 0o755 if os.path.isdir(os.path.join(root, rel)) else 0o644
    assert mode == want, f'{rel}: {oct(mode)} != {oct(want)}'


@pytest.mark.slow
def test_export_cli_with_onnx_loads_in_transformers_and_fill_mask_matches_flax(trained, tmp_path):
  out = tmp_path / 'hf'
  r = subprocess.run([sys.executable, '-m', 'flaxdistil.export', '--workdir', str(trained),
                      '--out', str(out), '--onnx'], cwd=ROOT, capture_output=True, text=True,
                     timeout=600,
                     env=subprocess_env(1))
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report['step'] == 6 and report['max_abs_diff'] <= 1e-4
  # --onnx: fp32 verified against torch and Flax, int8 next to it, in <out>/onnx.
  onnx = report['onnx']
  assert onnx['path'] == str(out / 'onnx') and onnx['max_abs_diff'] <= 1e-4
  assert onnx['max_abs_diff_flax'] <= 1e-4 and onnx['int8_top1_agreement'] > 0
  assert sorted(os.listdir(out / 'onnx')) == ['SHA256SUMS', 'model.onnx', 'model_quantized.onnx']
  _assert_readable(out)  # model.safetensors included (safetensors writes it 0600)
  # The console: the JSON report on stdout, and no library chatter (orbax restore, ONNX
  # optimiser passes, quantizer) or progress bars on stderr.
  for noise in ('orbax', 'checkpoint_manager', 'constant_folding', 'torchvision', 'onnx_quantizer',
                'Loading weights', 'Unable to initialize backend'):
    assert noise not in r.stderr, (noise, r.stderr[-2000:])
  assert json.load(open(out / 'config.json'))['model_type'] == 'distilbert'
  assert 'Steps: 6' in (out / 'README.md').read_text()

  model, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert type(model).__name__ == 'DistilBertForMaskedLM'
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))

  fill = transformers.pipeline('fill-mask', model=str(out), top_k=5, device='cpu')
  tok = fill.tokenizer
  words = [w for w in sorted(tok.get_vocab()) if w.isalpha() and len(w) > 2][:12]
  text = ' '.join(words[:5]) + f' {tok.mask_token} ' + ' '.join(words[5:9]) + ' .'
  torch_top5 = [p['token'] for p in fill(text)]

  scfg, params, _, _ = checkpointing.load_student(str(trained))
  enc = tok(text, return_tensors='np')
  logits = bert.MaskedLM(scfg).apply({'params': params}, jnp.asarray(enc['input_ids']),
                                       jnp.asarray(enc['attention_mask'])).logits
  pos = int(np.where(enc['input_ids'][0] == tok.mask_token_id)[0][0])
  flax_top5 = list(np.argsort(-np.asarray(logits[0, pos]))[:5])
  assert torch_top5 == flax_top5


@pytest.mark.slow
def test_export_is_readable_whatever_the_umask(tmp_path):
  cfg = bert.ModelConfig(model_type='distilbert', vocab_size=40, hidden_size=16,
                           num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=32)
  params = bert.init_params(cfg, jax.random.PRNGKey(0))
  old = os.umask(0o077)  # a private umask would make every new file 0600 and directory 0700
  try:
    hf_export.export_hf(params, cfg, str(tmp_path / 'hf'), model_card='card\n')
  finally:
    os.umask(old)
  assert {'config.json', 'model.safetensors', 'README.md'} <= set(os.listdir(tmp_path / 'hf'))
  _assert_readable(tmp_path / 'hf')


@pytest.mark.slow
def test_onnx_failure_keeps_the_verified_hf_export_and_says_how_to_retry(trained, tmp_path,
                                                                         monkeypatch):
  from flaxdistil.export import onnx_export  # pylint: disable=g-import-not-at-top

  def broken(hf_dir, *a, **kw):
    raise ValueError('ONNX verification failed: max |logits(onnxruntime) - logits(torch)| = 1')
  monkeypatch.setattr(onnx_export, 'export_onnx', broken)
  out = tmp_path / 'hf'
  with pytest.raises(ValueError, match=r'verified HF export is in place.*onnx_export --hf'):
    hf_export.export(str(trained), str(out), onnx=True)
  assert (out / 'model.safetensors').is_file() and not (out / 'onnx').exists()


@pytest.mark.slow
def test_export_of_a_specific_and_a_missing_step(trained, tmp_path):
  rep = hf_export.export(str(trained), str(tmp_path / 'hf'), step=6)
  assert rep['step'] == 6
  with pytest.raises(FileNotFoundError, match='available steps'):
    hf_export.export(str(trained), str(tmp_path / 'hf2'), step=3)
  assert not os.path.exists(tmp_path / 'hf2')


def test_export_with_a_bare_bert_tokenizer_dir_keeps_special_tokens(tmp_path):
  """A vocab.txt-only folder (like the official bert-base-uncased files) loads in transformers
  v5 without [MASK]; the exported tokenizer must still define it for fill-mask."""
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'cat', 'sat', 'on', 'mat', '.']
  bare = tmp_path / 'bare'
  bare.mkdir()
  (bare / 'vocab.txt').write_text('\n'.join(words) + '\n')
  (bare / 'tokenizer_config.json').write_text('{"do_lower_case": true}')
  cfg = bert.ModelConfig(model_type='distilbert', vocab_size=len(words), hidden_size=16,
                           num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=32)
  params = bert.init_params(cfg, jax.random.PRNGKey(0))
  hf_export.export_hf(params, cfg, str(tmp_path / 'hf'), tokenizer_path=str(bare))
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
  assert (tok.mask_token_id, tok.pad_token_id, tok.cls_token_id) == (4, 0, 2)
  assert tok.model_max_length == 32
  fill = transformers.pipeline('fill-mask', model=str(tmp_path / 'hf'), top_k=3, device='cpu')
  assert len(fill('the cat [MASK] on the mat .')) == 3
