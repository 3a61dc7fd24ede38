"""ONNX export: onnxruntime == transformers torch, int8 is smaller and close, errors, atomicity."""

import os
import stat

import numpy as np
import pytest
import torch
import transformers

from flaxdistil.export import onnx_export


def _save(model, path):
  model.save_pretrained(path)
  return str(path)


@pytest.fixture(scope='module')
def mlm_export(tmp_path_factory):
  """A tiny random DistilBertForMaskedLM directory, exported once (fp32 + int8)."""
  torch.manual_seed(0)
  cfg = transformers.DistilBertConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4,
                                      hidden_dim=256, max_position_embeddings=64)
  hf = _save(transformers.DistilBertForMaskedLM(cfg).eval(), tmp_path_factory.mktemp('m') / 'hf')
  return hf, onnx_export.export_onnx(hf)


def _feeds(config, batch, seq_len, seed):
  """Random int64 feeds with the last row padded after 3 tokens."""
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, seq_len), np.int64)
  mask[-1, 3:] = 0
  feeds = {'input_ids': rng.integers(1, config.vocab_size, (batch, seq_len)) * mask,
           'attention_mask': mask}
  if config.model_type == 'bert':
    feeds['token_type_ids'] = (np.arange(seq_len) >= seq_len // 2).astype(np.int64)[None] * mask
  return feeds


@pytest.mark.slow
def test_mlm_onnx_equals_torch_on_other_shapes(mlm_export):
  hf, report = mlm_export
  assert report['path'] == os.path.join(hf, 'onnx') and report['max_abs_diff'] <= 1e-4
  assert report['max_abs_diff_flax'] <= 1e-4  # our Flax model read from the same directory
  model, output = onnx_export.load_torch_model(hf)
  session = onnx_export.ort_session(report['onnx'])
  # Shapes other than the export's 2 x 13: batch and sequence axes are dynamic.
  for batch, seq_len in [(1, 64), (3, 7)]:
    feeds = _feeds(model.config, batch, seq_len, seed=seq_len)
    ref = onnx_export.torch_outputs(model, output, feeds)
    got = session.run([output], feeds)[0]
    assert got.shape == (batch, seq_len, 512)
    keep = feeds['attention_mask'].astype(bool)
    np.testing.assert_allclose(got[keep], ref[keep], atol=1e-4)


def test_onnx_files_are_readable(mlm_export):
  _, report = mlm_export
  assert stat.S_IMODE(os.stat(report['path']).st_mode) == 0o755  # mkdtemp made it 0700
  for name in os.listdir(report['path']):
    assert stat.S_IMODE(os.stat(os.path.join(report['path'], name)).st_mode) == 0o644, name


def test_int8_is_smaller_and_close(mlm_export):
  hf, report = mlm_export
  # int8 MatMul weights: 1/4 of fp32 (the real 4 x 256 teacher: 45.4 MB -> 11.9 MB); at this toy
  # size fp32 biases, LayerNorms and graph overhead weigh more.
  assert report['int8_bytes'] < 0.6 * report['onnx_bytes']
  model, output = onnx_export.load_torch_model(hf)
  feeds = _feeds(model.config, 4, 32, seed=1)
  ref = onnx_export.torch_outputs(model, output, feeds)
  got = onnx_export.ort_session(report['int8']).run([output], feeds)[0]
  keep = feeds['attention_mask'].astype(bool)
  # Close-ish: mean error a small fraction of the logits' spread, top-1 mostly kept.
  assert np.abs(got - ref)[keep].mean() < 0.1 * ref[keep].std()
  assert np.mean(got.argmax(-1)[keep] == ref.argmax(-1)[keep]) >= 0.8


@pytest.mark.slow
def test_bert_classifier_with_token_types(tmp_path):
  torch.manual_seed(1)
  cfg = transformers.BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64, num_labels=3)
  hf = _save(transformers.BertForSequenceClassification(cfg).eval(), tmp_path / 'hf')
  out = str(tmp_path / 'elsewhere')
  report = onnx_export.export_onnx(hf, out)
  assert os.path.isfile(report['int8'])
  assert os.path.isfile(os.path.join(out, 'config.json'))  # self-contained outside the HF dir
  model, output = onnx_export.load_torch_model(hf)
  assert output == 'logits' and onnx_export.input_names(model.config)[-1] == 'token_type_ids'
  feeds = _feeds(model.config, 3, 20, seed=2)
  got = onnx_export.ort_session(report['onnx']).run([output], feeds)[0]
  assert got.shape == (3, 3)
  np.testing.assert_allclose(got, onnx_export.torch_outputs(model, output, feeds), atol=1e-4)
  # Token types reach the graph: flipping them changes the class logits.
  flipped = dict(feeds, token_type_ids=(1 - feeds['token_type_ids']) * feeds['attention_mask'])
  assert np.abs(onnx_export.ort_session(report['onnx']).run([output], flipped)[0] - got).max() > 1e-4
  # int8 of a classifier (the quantizer's shape inference must accept the dynamo graph)
  got8 = onnx_export.ort_session(report['int8']).run([output], feeds)[0]
  assert np.abs(got8 - got).max() < 0.1 * np.abs(got).max()


def test_without_int8(tmp_path, mlm_export, monkeypatch):
  hf, fixture_report = mlm_export
  monkeypatch.setattr(onnx_export, '_export_fp32',  # reuse the fixture's graph: no second export
                      lambda model, output, path, opset: os.link(fixture_report['onnx'], path))
  report = onnx_export.export_onnx(hf, str(tmp_path / 'fp32_only'), quantize=False)
  assert 'int8' not in report
  assert sorted(os.listdir(tmp_path / 'fp32_only')) == ['SHA256SUMS', 'config.json',
                                                          onnx_export.ONNX_FILE]


def test_bad_inputs(tmp_path, mlm_export):
  with pytest.raises(FileNotFoundError, match='no such directory'):
    onnx_export.export_onnx(str(tmp_path / 'missing'))
  (tmp_path / 'not_hf').mkdir()
  with pytest.raises(FileNotFoundError, match='not a Hugging Face model directory'):
    onnx_export.export_onnx(str(tmp_path / 'not_hf'))
  hf, _ = mlm_export
  with pytest.raises(FileExistsError, match='--overwrite'):
    onnx_export.export_onnx(hf)  # <hf>/onnx was written by the fixture
  with pytest.raises(SystemExit) as e:
    onnx_export.main(['--hf', str(tmp_path / 'missing')])
  assert e.value.code == 2


def test_failed_verification_writes_nothing(tmp_path, mlm_export, monkeypatch):
  hf, report = mlm_export
  # Reuse the fixture's graph instead of exporting again; make torch disagree by 1.
  monkeypatch.setattr(onnx_export, '_export_fp32',
                      lambda model, output, path, opset: os.link(report['onnx'], path))
  real = onnx_export.torch_outputs
  monkeypatch.setattr(onnx_export, 'torch_outputs', lambda *a: real(*a) + 1.0)
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match='ONNX verification failed.*Nothing was written'):
    onnx_export.export_onnx(hf, str(out))
  assert os.listdir(tmp_path) == []  # neither out nor a temporary directory


def test_flax_disagreement_is_an_error(tmp_path, mlm_export, monkeypatch):
  hf, report = mlm_export
  monkeypatch.setattr(onnx_export, '_export_fp32',
                      lambda model, output, path, opset: os.link(report['onnx'], path))
  real = onnx_export.flax_outputs
  monkeypatch.setattr(onnx_export, 'flax_outputs', lambda *a: real(*a) + 1e-3)
  with pytest.raises(ValueError, match=r'logits\(flax\)\| = 0.001 > atol'):
    onnx_export.export_onnx(hf, str(tmp_path / 'out'), quantize=False)
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_pruned_model_exports_its_smaller_layers(tmp_path):
  """A head- and FFN-pruned export (zero heads in the file) becomes an ONNX graph without those
  heads, equal to the unpruned-layout torch model that plain transformers loads."""
  import jax  # pylint: disable=g-import-not-at-top

  from flaxdistil.export import hf_export  # pylint: disable=g-import-not-at-top
  from flaxdistil.model import bert  # pylint: disable=g-import-not-at-top
  from flaxdistil.model import pruning  # pylint: disable=g-import-not-at-top
  cfg = bert.ModelConfig(model_type='distilbert', vocab_size=256, hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64)
  params = jax.device_get(bert.init_params(cfg, jax.random.PRNGKey(0)))
  pcfg, pparams = pruning.prune(params, cfg, ((0, 3), (1,)), [np.arange(40)] * 2)
  hf = str(tmp_path / 'hf')
  hf_export.export_hf(pparams, pcfg, hf)
  report = onnx_export.export_onnx(hf)
  full = transformers.AutoModelForMaskedLM.from_pretrained(hf).eval()  # zero heads kept
  feeds = _feeds(full.config, 2, 9, seed=0)
  got = onnx_export.ort_session(report['onnx']).run(['logits'], feeds)[0]
  real = feeds['attention_mask'].astype(bool)
  want = onnx_export.torch_outputs(full, 'logits', feeds)
  assert np.abs(got - want)[real].max() <= 1e-4
  import onnx  # pylint: disable=g-import-not-at-top
  shapes = {tuple(i.dims) for i in onnx.load(report['onnx']).graph.initializer}
  for width in (16, 24, 40):  # layer 0: 2 heads x 8, layer 1: 3 heads x 8, FFN: 40 neurons
    assert (width, 32) in shapes or (32, width) in shapes, (width, sorted(shapes))
