"""python -m flaxdistil.augment: a GLUE TSV in, its augmented GLUE TSV out (JSON report); bad
input exits 2 with `error: ...`."""

import json
import subprocess
import sys

import jax

from flaxdistil.data import glue
from flaxdistil.export import hf_export
from flaxdistil.model import bert

from conftest import ROOT
from conftest import subprocess_env


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'flaxdistil.augment', *args], cwd=ROOT,
                        env=subprocess_env(1, PYTHONPATH=ROOT), capture_output=True, text=True,
                        timeout=900)


def test_cli_writes_an_augmented_glue_file(tmp_path, tok):
  cfg = bert.ModelConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
  teacher = str(tmp_path / 'mlm')
  hf_export.export_hf(jax.device_get(bert.init_params(cfg, jax.random.PRNGKey(0))), cfg, teacher,
                      tokenizer_path=tok.name_or_path)
  train = tmp_path / 'train.tsv'
  train.write_text('sentence\tlabel\nthe big dog sat\t1\na red bird flew over the hill\t0\n')
  out = tmp_path / 'aug.tsv'
  r = _cli('--task=sst2', f'--train={train}', f'--teacher={teacher}', f'--out={out}', '--n_a=3',
           '--top_k=4', '--max_seq_length=32')
  assert r.returncode == 0, r.stderr
  report = json.loads(r.stdout.strip().splitlines()[-1])
  a, _, labels = glue.read_tsv(str(out), glue.TASKS['sst2'])
  assert report['rows'] == len(a) and report['examples'] == 2 and 2 < len(a) <= 8
  second = a.index('a red bird flew over the hill')  # each original, then its copies
  assert a[0] == 'the big dog sat' and labels.tolist() == [1] * second + [0] * (len(a) - second)
  r = _cli('--task=cola', f'--train={train}', f'--teacher={teacher}', f'--out={tmp_path / "x"}')
  assert r.returncode == 2 and 'error: Unknown GLUE task' in r.stderr, r.stderr
  r = _cli('--task=sst2', f'--train={train}', f'--teacher={teacher}', f'--out={out}',
           '--max_seq_length=32')
  assert r.returncode == 2 and 'already exists' in r.stderr, r.stderr
