"""Export CLI: sharded-run checkpoint -> verified HF DistilBertForMaskedLM; fill-mask parity."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from configs import tiny
from flaxdistil import export
from flaxdistil import models
from flaxdistil import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  wd = tmp_path_factory.mktemp('run')
  c = tiny.get_config()
  c.num_train_steps = 6
  c.eval_every_steps = 0
  c.mesh.shape = (2, 2, 2)  # a sharded run: data x fsdp x tensor over 8 host devices
  train.train_and_evaluate(c, str(wd))
  return wd


def test_export_cli_loads_in_transformers_and_fill_mask_matches_flax(trained, tmp_path):
  out = tmp_path / 'hf'
  r = subprocess.run([sys.executable, '-m', 'flaxdistil.export', '--workdir', str(trained),
                      '--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1'))
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report['step'] == 6 and report['max_abs_diff'] <= 1e-4
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

  scfg, params, _, _ = export.load_student(str(trained))
  enc = tok(text, return_tensors='np')
  logits = models.MaskedLM(scfg).apply({'params': params}, jnp.asarray(enc['input_ids']),
                                       jnp.asarray(enc['attention_mask'])).logits
  pos = int(np.where(enc['input_ids'][0] == tok.mask_token_id)[0][0])
  flax_top5 = list(np.argsort(-np.asarray(logits[0, pos]))[:5])
  assert torch_top5 == flax_top5


def test_export_of_a_specific_and_a_missing_step(trained, tmp_path):
  rep = export.export(str(trained), str(tmp_path / 'hf'), step=6)
  assert rep['step'] == 6
  with pytest.raises(FileNotFoundError, match='available steps'):
    export.export(str(trained), str(tmp_path / 'hf2'), step=3)
  assert not os.path.exists(tmp_path / 'hf2')


def test_export_with_a_bare_bert_tokenizer_dir_keeps_special_tokens(tmp_path):
  """A vocab.txt-only folder (like the official bert-base-uncased files) loads in transformers
  v5 without [MASK]; the exported tokenizer must still define it for fill-mask."""
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'cat', 'sat', 'on', 'mat', '.']
  bare = tmp_path / 'bare'
  bare.mkdir()
  (bare / 'vocab.txt').write_text('\n'.join(words) + '\n')
  (bare / 'tokenizer_config.json').write_text('{"do_lower_case": true}')
  cfg = models.ModelConfig(model_type='distilbert', vocab_size=len(words), hidden_size=16,
                           num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=32)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  export.export_hf(params, cfg, str(tmp_path / 'hf'), tokenizer_path=str(bare))
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
  assert (tok.mask_token_id, tok.pad_token_id, tok.cls_token_id) == (4, 0, 2)
  assert tok.model_max_length == 32
  fill = transformers.pipeline('fill-mask', model=str(tmp_path / 'hf'), top_k=3, device='cpu')
  assert len(fill('the cat [MASK] on the mat .')) == 3
