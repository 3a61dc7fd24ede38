"""GLUE task distillation: TSV reading, batching, and the whole recipe (fine-tune teacher -> export
-> distil -> export -> pipeline labels == Flax labels). The classification train step itself
(sharded == single device, accumulation == big batch) is tested in test_train_step.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import glue as glue_config
from flaxdistil.data import glue
from flaxdistil.training import sharding
from flaxdistil.training import train

from conftest import ROOT
from conftest import tiny_config

RULES = sharding.rules_tuple(tiny_config().mesh.logical_axis_rules)


def test_read_tsv_keeps_quotes_strips_bom_and_reads_pairs(tmp_path):
  sst = tmp_path / 'sst.tsv'
  sst.write_text('sentence\tlabel\nit \'s a "charming" film \t1\n" bleak\t0\n', encoding='utf-8')
  a, b, labels = glue.read_tsv(str(sst), glue.TASKS['sst2'])
  assert a == ['it \'s a "charming" film ', '" bleak'] and b is None
  assert labels.tolist() == [1, 0] and labels.dtype == np.int32
  mrpc = tmp_path / 'mrpc.tsv'
  mrpc.write_text('\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n'
                  '1\t1\t2\tHe said "yes".\tHe agreed.\n', encoding='utf-8')
  a, b, labels = glue.read_tsv(str(mrpc), glue.TASKS['mrpc'])
  assert a == ['He said "yes".'] and b == ['He agreed.'] and labels.tolist() == [1]


@pytest.mark.parametrize('text, match', [
    ('index\tsentence\n0\thello\n', r"not \['label'\] .*labelled split"),
    ('sentence\tlabel\nhello\t7\n', r':2: label .7. is not in 0..1'),
    ('sentence\tlabel\n', 'no examples'),
    ('', 'empty'),
])
def test_read_tsv_errors_name_the_problem(tmp_path, text, match):
  p = tmp_path / 'x.tsv'
  p.write_text(text)
  with pytest.raises(ValueError, match=match):
    glue.read_tsv(str(p), glue.TASKS['sst2'])
  with pytest.raises(FileNotFoundError, match='does not exist'):
    glue.read_tsv(str(tmp_path / 'missing.tsv'), glue.TASKS['sst2'])
  with pytest.raises(ValueError, match="supported: \\['mrpc', 'sst2'\\]"):
    glue.get_task('cola')


def test_write_tsv_round_trips_through_read_tsv_and_refuses_tabs(tmp_path):
  header = ['Quality', '#1 ID', '#2 ID', '#1 String', '#2 String']
  rows = [['1', '7', '8', 'He said "yes".', 'He agreed .'], ['0', '9', '10', "it 's", 'no']]
  path = str(tmp_path / 'aug.tsv')
  assert glue.write_tsv(path, header, rows) == 2
  assert glue.read_table(path) == (header, rows)
  a, b, labels = glue.read_tsv(path, glue.TASKS['mrpc'])
  assert a == ['He said "yes".', "it 's"] and b == ['He agreed .', 'no'] and labels.tolist() == [1, 0]
  with pytest.raises(ValueError, match='tab or line break'):
    glue.write_tsv(path, header, [['1', '7', '8', 'a\tb', 'c']])
  with pytest.raises(ValueError, match='has 2 fields, the header 5'):
    glue.write_tsv(path, header, [['1', '2']])
  assert glue.read_table(path) == (header, rows)  # a failed write leaves the old file


def test_classification_batches_cover_epochs_resume_and_split_over_hosts():
  n, b = 10, 4
  arrays = {'input_ids': np.arange(n)[:, None].repeat(3, 1).astype(np.int32),
            'labels': np.arange(n, dtype=np.int32)}
  it = glue.ClassificationBatches(arrays, global_batch_size=b, seed=7)
  stream = np.concatenate([next(it)['labels'] for _ in range(5)])  # 20 = two epochs
  assert sorted(stream[:10]) == list(range(n)) and sorted(stream[10:]) == list(range(n))
  assert not np.array_equal(stream[:10], stream[10:])  # reshuffled each epoch
  resumed = glue.ClassificationBatches(arrays, global_batch_size=b, seed=7, start_step=3)
  np.testing.assert_array_equal(next(resumed)['labels'], stream[12:16])
  hosts = [glue.ClassificationBatches(arrays, global_batch_size=b, seed=7, start_step=2,
                                      process_index=i, process_count=2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([next(h)['labels'] for h in hosts]), stream[8:12])
  with pytest.raises(ValueError, match='not divisible by 3 hosts'):
    glue.ClassificationBatches(arrays, global_batch_size=4, seed=0, process_count=3)


def test_eval_batches_pad_with_ignored_rows_and_f1():
  arrays = {'input_ids': np.ones((5, 3), np.int32), 'attention_mask': np.ones((5, 3), np.int32),
            'labels': np.asarray([0, 1, 1, 0, 1], np.int32)}
  batches = glue.eval_batches(arrays, 4)
  assert [len(x['labels']) for x in batches] == [4, 4]
  assert batches[1]['labels'].tolist() == [1, -100, -100, -100]
  assert batches[1]['attention_mask'][1:].sum() == 0
  assert glue.f1_from_counts(tp=2, fp=1, fn=1) == pytest.approx(2 / 3)


def _synthetic_task(tmp_path):
  """SST-2-shaped TSVs whose label says whether a marker word occurs, plus a BERT 'pretrained'
  checkpoint and tokenizer, so the whole recipe runs offline in seconds."""
  import transformers

  from flaxdistil.data import synthetic
  syn = synthetic.write_corpus(str(tmp_path / 'syn'))
  tok = transformers.AutoTokenizer.from_pretrained(syn['tokenizer'])
  # sorted: get_vocab()'s order differs between processes (a Rust hash map).
  words = [w for w in sorted(tok.get_vocab()) if w.isalpha() and len(w) > 2][:60]
  rng = np.random.default_rng(0)
  for split, n in (('train', 400), ('dev', 64)):
    rows = []
    for _ in range(n):
      sent = list(rng.choice(words[1:], size=int(rng.integers(3, 9))))
      label = int(rng.random() < 0.5)
      if label:
        sent.insert(int(rng.integers(len(sent))), words[0])
      rows.append(f'{" ".join(sent)}\t{label}')
    (tmp_path / f'{split}.tsv').write_text('sentence\tlabel\n' + '\n'.join(rows) + '\n')
  transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=32)).save_pretrained(tmp_path / 'pretrained')
  return syn['tokenizer']


def _glue_cfg(role, tmp_path, tokenizer):
  cfg = glue_config.get_config(f'sst2,{role}')
  cfg.update_from_flattened_dict({
      'data.train_files': (str(tmp_path / 'train.tsv'),),
      'data.eval_files': (str(tmp_path / 'dev.tsv'),), 'data.tokenizer': tokenizer,
      'data.max_seq_length': 16, 'data.global_batch_size': 16, 'data.eval_batch_size': 16,
      'student.path': str(tmp_path / 'pretrained'), 'student.layers': (0, 1),
      'num_train_steps': 150, 'eval_every_steps': 0, 'log_every_steps': 50,
      'optim.learning_rate': 2e-3, 'optim.warmup_steps': 5, 'checkpoint.async_save': False})
  if role != 'teacher':
    cfg.teacher.path = str(tmp_path / 'teacher_hf')
  return cfg


@pytest.mark.slow
def test_finetune_teacher_distil_export_and_pipeline_labels_equal_flax(tmp_path):
  from flaxdistil.export import hf_export
  tokenizer = _synthetic_task(tmp_path)
  teacher = train.train_and_evaluate(_glue_cfg('teacher', tmp_path, tokenizer),
                                     str(tmp_path / 'teacher'))
  assert teacher['student']['accuracy'] >= 0.9, teacher  # the marker rule is learnable
  rep = hf_export.export(str(tmp_path / 'teacher'), str(tmp_path / 'teacher_hf'))
  assert rep['max_abs_diff'] <= 1e-4
  with open(tmp_path / 'teacher_hf' / 'config.json') as f:
    assert json.load(f)['architectures'] == ['BertForSequenceClassification']
  student = train.train_and_evaluate(_glue_cfg('distill', tmp_path, tokenizer),
                                     str(tmp_path / 'distill'))
  assert student['teacher']['accuracy'] == teacher['student']['accuracy']
  assert student['student']['agreement'] >= 0.8, student
  hf_export.export(str(tmp_path / 'distill'), str(tmp_path / 'distill_hf'))
  with open(tmp_path / 'distill_hf' / 'config.json') as f:
    hf_cfg = json.load(f)
  assert hf_cfg['architectures'] == ['DistilBertForSequenceClassification']
  assert hf_cfg['id2label'] == {'0': 'negative', '1': 'positive'}
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'glue_pipeline_check.py'), '--task', 'sst2',
       '--tsv', str(tmp_path / 'dev.tsv'), '--workdir', str(tmp_path / 'distill'),
       '--hf', str(tmp_path / 'distill_hf'), '--json_out', str(tmp_path / 'check.json')],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  with open(tmp_path / 'check.json') as f:
    check = json.load(f)
  assert check['labels_equal'] == check['num_examples'] == 64
  assert check['flax'] == check['pipeline']
  assert check['flax']['accuracy'] == pytest.approx(student['student']['accuracy'])


def test_task_config_errors_name_the_fix(tmp_path):
  from flaxdistil.training import setup
  tokenizer = _synthetic_task(tmp_path)
  cfg = _glue_cfg('distill', tmp_path, tokenizer)
  cfg.teacher.path = str(tmp_path / 'pretrained')  # an MLM checkpoint, not fine-tuned
  with pytest.raises(setup.ConfigError, match='no 2-label classification head.*fine-tune it'):
    setup.build_run(cfg, str(tmp_path / 'w'))
  cfg = _glue_cfg('teacher', tmp_path, tokenizer)
  cfg.distill.alpha_mlm = 1.0
  with pytest.raises(setup.ConfigError, match='alpha_mlm=0'):
    setup.build_run(cfg, str(tmp_path / 'w'))
  cfg = _glue_cfg('teacher', tmp_path, tokenizer)
  cfg.data.train_files = (str(tmp_path / 'train.tsv'), str(tmp_path / 'dev.tsv'))
  with pytest.raises(setup.ConfigError, match='one train TSV'):
    setup.build_run(cfg, str(tmp_path / 'w'))


def test_batch_spec_is_what_the_batches_hold():
  arrays = {k: np.zeros((10, 6), np.int32) for k in ('input_ids', 'attention_mask',
                                                      'token_type_ids')}
  arrays['labels'] = np.zeros((10,), np.int32)
  batch = next(glue.ClassificationBatches(arrays, global_batch_size=4, seed=0))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == glue.batch_spec(4, 6)
