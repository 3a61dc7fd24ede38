"""benchmarks/inference.py statistics and ratios; scripts/quantization_quality.py metrics."""

import os
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import inference  # pylint: disable=g-import-not-at-top,wrong-import-position
import quantization_quality as qq  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_percentiles_and_throughput():
  seconds = np.random.default_rng(0).permutation(np.arange(1, 101)) / 1e3  # 1..100 ms, shuffled
  s = inference.summarize(seconds)
  assert s['p50_ms'] == pytest.approx(50.5) and s['p95_ms'] == pytest.approx(95.05)
  assert s['mean_ms'] == pytest.approx(50.5)
  assert inference.throughput(32, [0.5, 1.5]) == pytest.approx(32.0)  # 64 sequences in 2 s


def _row(name, params, p50, seq_s):
  r = {'model': name, 'params': params, 'fp32_mb': 1.0, 'onnx_mb': 1.0, 'int8_mb': 0.25}
  for k, f in zip(inference.BACKENDS, (1.0, 2.0, 4.0)):  # ORT 2x, int8 4x faster than torch
    r[k] = {'p50_ms': p50 / f, 'p95_ms': p50 / f, 'seq_per_s': seq_s * f}
  return r


def test_model_names_tell_equal_basenames_apart():
  names = inference.model_names(['runs/p/a_p0.5/recovered_hf', 'runs/p/a_p0.75/recovered_hf',
                                 'runs/a_hf', '/x/teacher_hf'])
  assert names == ['a_p0.5/recovered_hf', 'a_p0.75/recovered_hf', 'a_hf', 'teacher_hf']
  assert len(set(inference.model_names(['a/m', 'b/m', 'b/m']))) == 2  # the same dir twice


def test_ratio_table_against_reference():
  args = type('A', (), {'batch_size': 32, 'seq_len': 128, 'latency_runs': 5,
                        'throughput_batches': 2})()
  rows = [_row('bert-base', 110e6, 100.0, 10.0), _row('distilbert-6', 66e6, 50.0, 16.0)]
  lines = inference.markdown(rows, 'bert-base', args).splitlines()
  distil = [l for l in lines if l.startswith('| distilbert-6 | 0.60')]
  # half the latency = 2.00x at b=1, 1.6x throughput at b=32, int8 2x over ORT fp32
  assert distil == ['| distilbert-6 | 0.60 | 2.00x / 2.00x / 2.00x | 1.60x / 1.60x / 1.60x '
                    '| 2.00x / 2.00x |']


def test_glue_metrics_ignore_fill_rows():
  labels = np.array([1, 0, 1, 1, -100, -100])
  logits = np.array([[0, 1], [0, 1], [1, 0], [0, 1], [0, 1], [0, 1]], np.float32)
  reference = [np.array([1, 0, 0, 1, 0, 0])]
  r = qq.glue_metrics(qq.glue_sums(logits, {'labels': labels}, reference[0]))
  # predictions 1,1,0,1 on the 4 real rows: tp 2, fp 1, fn 1
  assert r == {'accuracy': 0.5, 'f1': pytest.approx(2 / 3), 'agreement': 0.75, 'num_examples': 4}


def test_mlm_metrics_only_masked_positions():
  labels = np.array([[-100, 2, -100, 0]])
  logits = np.zeros((1, 4, 3), np.float32)
  logits[0, 1, 2] = logits[0, 3, 1] = 5.0  # right at position 1, wrong at 3
  r = qq.mlm_metrics(qq.mlm_sums(logits, {'labels': labels}, np.array([[0, 2, 0, 0]])))
  assert r['num_tokens'] == 2 and r['accuracy'] == 0.5 and r['agreement'] == 0.5
  nll_right, nll_wrong = np.log(2 + np.exp(5)) - 5, np.log(2 + np.exp(5))
  assert r['loss'] == pytest.approx((nll_right + nll_wrong) / 2, rel=1e-5)


def test_pruned_random_shapes_are_smaller_in_torch(tmp_path, monkeypatch):
  from flaxdistil.export import torch_models  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(inference.RANDOM_SHAPES, 'tiny', ('BertConfig', dict(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)))
  full, _ = torch_models.load_torch_model(inference.make_random_model('tiny', str(tmp_path)))
  path = inference.make_pruned_random_model('tiny', 0.5, str(tmp_path))
  small, _ = torch_models.load_torch_model(path)
  assert os.path.basename(path) == 'random-tiny-pruned50'
  count = lambda m: sum(p.numel() for p in m.parameters())
  # per layer: 2 of 4 heads (q, k, v rows + bias, output columns) and 32 of 64 FFN neurons
  per_layer = 2 * (3 * (8 * 32 + 8) + 8 * 32) + 32 * (32 + 1) + 32 * 32
  assert count(full) - count(small) == 2 * per_layer
  assert small.bert.encoder.layer[1].attention.self.query.out_features == 16
