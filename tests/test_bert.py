"""MaskedLM properties: param counts vs transformers, tree/axis names, init,
masking, dropout, remat, bf16, config validation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flaxdistil.model import bert
from flaxdistil.model.bert import MaskedLM
from flaxdistil.model.bert import ModelConfig

SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=16)


def _cfg(model_type='bert', **kw):
  return ModelConfig(model_type=model_type, **{**SMALL, **kw})


def _inputs(batch=3, seq=9, vocab=97, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  mask[1, 5:] = 0
  mask[2, 2:] = 0
  ids[mask == 0] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.fixture(scope='module')
def bert_params():
  return bert.init_params(_cfg('bert'), jax.random.PRNGKey(0))


def _torch_count(model):
  return sum(p.numel() for p in model.parameters())  # tied weights once


def test_param_count_bert_base_matches_transformers():
  ours = bert.count_params(bert.abstract_params(ModelConfig()))
  with torch.device('meta'):  # shapes only: no memory, no init time
    theirs = _torch_count(transformers.BertForMaskedLM(transformers.BertConfig()))
  assert ours == theirs == 109_514_298


def test_param_count_distilbert_base_matches_transformers():
  cfg = ModelConfig(model_type='distilbert', num_hidden_layers=6,
                    type_vocab_size=0)
  ours = bert.count_params(bert.abstract_params(cfg))
  with torch.device('meta'):
    theirs = _torch_count(
        transformers.DistilBertForMaskedLM(transformers.DistilBertConfig()))
  assert ours == theirs == 66_985_530


def test_param_count_encoder_only_matches_bertmodel_without_pooler():
  hf = transformers.BertConfig(
      vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=16)
  theirs = _torch_count(transformers.BertModel(hf, add_pooling_layer=False))
  ours = bert.count_params(bert.abstract_params(_cfg(with_mlm_head=False)))
  assert ours == theirs


def test_param_tree_names_and_shapes(bert_params):
  shapes = jax.tree_util.tree_map(lambda x: x.shape, bert_params)
  assert set(shapes) == {'embeddings', 'encoder', 'mlm_head'}
  assert shapes['embeddings']['word_embeddings']['embedding'] == (97, 32)
  assert shapes['embeddings']['position_embeddings']['embedding'] == (16, 32)
  assert shapes['embeddings']['token_type_embeddings']['embedding'] == (2, 32)
  assert set(shapes['encoder']) == {'layer_0', 'layer_1'}
  layer = shapes['encoder']['layer_1']
  assert set(layer) == {'attention', 'attention_layer_norm', 'intermediate',
                        'output', 'output_layer_norm'}
  assert set(layer['attention']) == {'query', 'key', 'value', 'output'}
  assert layer['intermediate']['kernel'] == (32, 64)
  assert layer['output']['kernel'] == (64, 32)
  assert shapes['mlm_head'] == {
      'transform': {'kernel': (32, 32), 'bias': (32,)},
      'transform_layer_norm': {'scale': (32,), 'bias': (32,)},
      'bias': (97,)}
  leaves = jax.tree_util.tree_leaves(bert_params)
  assert all(x.dtype == jnp.float32 for x in leaves)


def test_distilbert_has_same_tree_minus_token_types(bert_params):
  d = bert.init_params(_cfg('distilbert'), jax.random.PRNGKey(0))
  assert 'token_type_embeddings' not in d['embeddings']
  b = dict(bert_params, embeddings={
      k: v for k, v in bert_params['embeddings'].items()
      if k != 'token_type_embeddings'})
  assert (jax.tree_util.tree_structure(b) == jax.tree_util.tree_structure(d))


def test_logical_axis_names():
  specs = nn.get_partition_spec(bert.abstract_params(_cfg()))
  P = jax.sharding.PartitionSpec
  emb, layer, head = specs['embeddings'], specs['encoder']['layer_0'], specs['mlm_head']
  assert emb['word_embeddings']['embedding'] == P('vocab', 'embed')
  assert emb['position_embeddings']['embedding'] == P(None, 'embed')
  assert emb['token_type_embeddings']['embedding'] == P(None, 'embed')
  assert emb['LayerNorm']['scale'] == P('embed')
  for n in ('query', 'key', 'value'):
    assert layer['attention'][n]['kernel'] == P('embed', 'heads')
    assert layer['attention'][n]['bias'] == P('heads')
  assert layer['attention']['output']['kernel'] == P('heads', 'embed')
  assert layer['attention']['output']['bias'] == P('embed')
  assert layer['intermediate']['kernel'] == P('embed', 'mlp')
  assert layer['intermediate']['bias'] == P('mlp')
  assert layer['output']['kernel'] == P('mlp', 'embed')
  assert layer['output_layer_norm']['bias'] == P('embed')
  assert head['transform']['kernel'] == P('embed', None)
  assert head['bias'] == P('vocab')
  # Every leaf is boxed, so sharding code sees no unannotated params.
  boxed = jax.tree_util.tree_leaves(
      bert.abstract_params(_cfg()), is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in boxed)


def test_init_statistics_follow_hf_init_weights(bert_params):
  p = bert_params
  w = np.asarray(p['embeddings']['word_embeddings']['embedding'])  # 3104 values
  k = np.asarray(p['encoder']['layer_0']['intermediate']['kernel'])  # 2048 values
  assert abs(w.std() - 0.02) < 0.001 and abs(k.std() - 0.02) < 0.001
  assert abs(w.mean()) < 0.002
  assert np.all(np.asarray(p['encoder']['layer_0']['intermediate']['bias']) == 0)
  assert np.all(np.asarray(p['embeddings']['LayerNorm']['scale']) == 1)
  assert np.all(np.asarray(p['encoder']['layer_1']['output_layer_norm']['bias']) == 0)
  assert np.all(np.asarray(p['mlm_head']['bias']) == 0)


@pytest.mark.slow
def test_outputs_shapes_and_attention_properties(bert_params):
  cfg = _cfg()
  ids, mask = _inputs()
  out = MaskedLM(cfg).apply({'params': bert_params}, ids, mask,
                            output_attentions=True)
  assert out.logits.shape == (3, 9, 97) and out.logits.dtype == jnp.float32
  assert len(out.hidden_states) == 3
  assert all(h.shape == (3, 9, 32) for h in out.hidden_states)
  assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, 9, 9)
  probs = np.asarray(out.attentions[1])
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # Padded keys get exactly zero probability.
  assert np.all(probs[1, :, :, 5:] == 0) and np.all(probs[2, :, :, 2:] == 0)
  assert MaskedLM(cfg).apply({'params': bert_params}, ids, mask).attentions is None


@pytest.mark.slow
def test_padding_does_not_change_real_token_outputs(bert_params):
  """Extra padding, with arbitrary ids under it, leaves real positions intact."""
  cfg = _cfg()
  ids, mask = _inputs()
  out = MaskedLM(cfg).apply({'params': bert_params}, ids, mask).logits
  junk = jnp.where(mask == 0, 17, ids)
  out2 = MaskedLM(cfg).apply({'params': bert_params}, junk, mask).logits
  longer_ids = jnp.pad(ids, ((0, 0), (0, 4)))
  longer_mask = jnp.pad(mask, ((0, 0), (0, 4)))
  out3 = MaskedLM(cfg).apply({'params': bert_params}, longer_ids, longer_mask).logits
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(out2)[real], np.asarray(out)[real], atol=1e-5)
  np.testing.assert_allclose(np.asarray(out3)[:, :9][real], np.asarray(out)[real],
                             atol=1e-5)


@pytest.mark.slow
def test_token_type_ids_matter_for_bert_only(bert_params):
  ids, mask = _inputs()
  tt = jnp.ones_like(ids)
  m = MaskedLM(_cfg())
  a = m.apply({'params': bert_params}, ids, mask).logits
  b = m.apply({'params': bert_params}, ids, mask, tt).logits
  z = m.apply({'params': bert_params}, ids, mask, jnp.zeros_like(ids)).logits
  assert np.abs(np.asarray(a - b)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(a), np.asarray(z))
  dcfg = _cfg('distilbert')
  dp = bert.init_params(dcfg, jax.random.PRNGKey(0))
  d1 = MaskedLM(dcfg).apply({'params': dp}, ids, mask).logits
  d2 = MaskedLM(dcfg).apply({'params': dp}, ids, mask, tt).logits
  np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))


@pytest.mark.slow
def test_dropout_only_when_not_deterministic(bert_params):
  m = MaskedLM(_cfg())
  ids, mask = _inputs()
  det = m.apply({'params': bert_params}, ids, mask).logits
  det2 = m.apply({'params': bert_params}, ids, mask, deterministic=True).logits
  np.testing.assert_array_equal(np.asarray(det), np.asarray(det2))
  r = lambda s: {'dropout': jax.random.PRNGKey(s)}
  a = m.apply({'params': bert_params}, ids, mask, deterministic=False, rngs=r(1)).logits
  a2 = m.apply({'params': bert_params}, ids, mask, deterministic=False, rngs=r(1)).logits
  b = m.apply({'params': bert_params}, ids, mask, deterministic=False, rngs=r(2)).logits
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
  assert np.abs(np.asarray(a - b)).max() > 1e-3
  assert np.abs(np.asarray(a - det)).max() > 1e-3
  with pytest.raises(Exception, match='dropout'):
    m.apply({'params': bert_params}, ids, mask, deterministic=False)


@pytest.mark.slow
def test_remat_same_values_and_grads(bert_params):
  ids, mask = _inputs()

  def loss(p, cfg):
    out = MaskedLM(cfg).apply({'params': p}, ids, mask)
    return jnp.sum(out.logits ** 2) * 1e-3

  f = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  v1, g1 = f(bert_params, _cfg())
  v2, g2 = f(bert_params, _cfg(remat=True))
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)
  assert np.abs(np.asarray(g1['encoder']['layer_0']['attention']['query']['kernel'])).max() > 0


@pytest.mark.slow
def test_bf16_compute_close_to_fp32(bert_params):
  ids, mask = _inputs()
  f32 = MaskedLM(_cfg()).apply({'params': bert_params}, ids, mask)
  bf = MaskedLM(_cfg(dtype=jnp.bfloat16)).apply({'params': bert_params}, ids, mask,
                                                output_attentions=True)
  assert bf.logits.dtype == jnp.bfloat16
  assert bf.attentions[0].dtype == jnp.float32  # softmax kept in float32
  real = np.asarray(mask).astype(bool)
  diff = np.abs(np.asarray(bf.logits, np.float32) - np.asarray(f32.logits))[real]
  assert diff.max() < 0.1


def test_encoder_only_has_no_head_and_no_logits():
  cfg = _cfg(with_mlm_head=False)
  p = bert.init_params(cfg, jax.random.PRNGKey(0))
  assert 'mlm_head' not in p
  out = MaskedLM(cfg).apply({'params': p}, *_inputs())
  assert out.logits is None and out.hidden_states[-1].shape == (3, 9, 32)


@pytest.mark.parametrize('name', ['gelu', 'gelu_new', 'relu'])
def test_activations_match_transformers(name):
  x = np.linspace(-6, 6, 101, dtype=np.float32)
  ours = np.asarray(bert._ACTIVATIONS[name](jnp.asarray(x)))  # pylint: disable=protected-access
  theirs = transformers.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.slow
def test_logical_constraints_work_under_mesh_and_rules(bert_params):
  """With rules + a mesh active, jitted outputs equal the unconstrained ones."""
  ids, mask = _inputs(batch=4)
  ref = MaskedLM(_cfg()).apply({'params': bert_params}, ids, mask).logits
  devices = np.array(jax.devices()[:2] if len(jax.devices()) >= 2 else jax.devices())
  mesh = jax.sharding.Mesh(devices, ('data',))
  rules = (('act_batch', 'data'), ('act_len', None), ('act_embed', None),
           ('act_mlp', None), ('vocab', None))
  fn = jax.jit(lambda p, i, m: MaskedLM(_cfg()).apply({'params': p}, i, m).logits)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = fn(bert_params, ids, mask)
  if len(devices) >= 2:  # the logits constraint ('act_batch' -> 'data') applied
    assert out.sharding.spec[0] == 'data'
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_bad_inputs_raise_clear_errors(bert_params):
  m = MaskedLM(_cfg())
  ids, mask = _inputs()
  with pytest.raises(ValueError, match='attention_mask shape'):
    m.apply({'params': bert_params}, ids, mask[:, :4])
  with pytest.raises(ValueError, match='max_position_embeddings'):
    long = jnp.ones((1, 17), jnp.int32)
    m.apply({'params': bert_params}, long, long)
  with pytest.raises(ValueError, match=r'\[batch, seq_len\]'):
    m.apply({'params': bert_params}, ids[0], mask[0])


@pytest.mark.parametrize('kw, match', [
    (dict(model_type='roberta'), "'bert' or 'distilbert'"),
    (dict(hidden_act='swish'), 'hidden_act'),
    (dict(hidden_size=30), 'divisible'),
    (dict(type_vocab_size=0), 'type_vocab_size'),
    (dict(attention_implementation='flash'), "attention_implementation 'flash' is not supported"),
])
def test_config_validation(kw, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(_cfg(), **kw)


def test_count_params_on_boxed_unboxed_and_abstract(bert_params):
  cfg = _cfg()
  n = bert.count_params(bert_params)
  assert n == bert.count_params(bert.abstract_params(cfg))
  boxed = MaskedLM(cfg).init(jax.random.PRNGKey(0), *_inputs())['params']
  assert n == bert.count_params(boxed)
  # 97*32 + 16*32 + 2*32 + 64 + 2 layers + head
  layer = 4 * (32 * 32 + 32) + 64 + (32 * 64 + 64) + (64 * 32 + 32) + 64
  head = 32 * 32 + 32 + 64 + 97
  assert n == 97 * 32 + 16 * 32 + 2 * 32 + 64 + 2 * layer + head


def test_logits_positions_equal_gathered_full_logits(bert_params):
  cfg = _cfg('bert')
  ids, mask = _inputs()
  full = MaskedLM(cfg).apply({'params': bert_params}, ids, mask).logits  # [B, T, V]
  pos = jnp.array([[0, 4, 8], [1, 1, 3], [2, 0, 5]], jnp.int32)
  part = MaskedLM(cfg).apply({'params': bert_params}, ids, mask, logits_positions=pos).logits
  assert part.shape == (3, 3, cfg.vocab_size)
  np.testing.assert_allclose(part, jnp.take_along_axis(full, pos[..., None], axis=1),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('model_type, implementation',
                         [('bert', None), ('distilbert', None), ('bert', 'xla')])
def test_fused_attention_path_equals_explicit_probs_path(bert_params, model_type, implementation):
  # Without output_attentions the core runs through jax.nn.dot_product_attention; asking for
  # the probabilities forces the explicit einsum/softmax path. Both must agree, padding included.
  cfg = _cfg(model_type, attention_implementation=implementation)
  params = bert_params if model_type == 'bert' else bert.init_params(cfg, jax.random.PRNGKey(3))
  ids, mask = _inputs()
  fused = MaskedLM(cfg).apply({'params': params}, ids, mask)
  explicit = MaskedLM(cfg).apply({'params': params}, ids, mask, output_attentions=True)
  valid = np.asarray(mask)[..., None] > 0
  for a, b in zip(fused.hidden_states, explicit.hidden_states):
    np.testing.assert_allclose(np.where(valid, a, 0), np.where(valid, b, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.where(valid, fused.logits, 0), np.where(valid, explicit.logits, 0),
                             rtol=1e-5, atol=1e-5)


def test_cudnn_attention_gets_a_full_mask_and_equals_explicit_path(bert_params, monkeypatch):
  # cuDNN runs only on NVIDIA GPUs (benchmarks/attention_parity.py checks it there); on CPU this
  # checks what the model hands it: implementation='cudnn' and the key mask broadcast to
  # [B, 1, T, T] (cuDNN refuses a [B, 1, 1, T] one), computed here by the XLA implementation.
  calls = []
  xla_attention = jax.nn.dot_product_attention

  def fake_cudnn(q, k, v, mask=None, implementation=None):
    calls.append((implementation, mask.shape, np.asarray(mask)))
    return xla_attention(q, k, v, mask=mask, implementation='xla')

  monkeypatch.setattr(jax.nn, 'dot_product_attention', fake_cudnn)
  cfg = _cfg('bert', attention_implementation='cudnn')
  ids, mask = _inputs()
  fused = MaskedLM(cfg).apply({'params': bert_params}, ids, mask)
  explicit = MaskedLM(_cfg('bert')).apply({'params': bert_params}, ids, mask,
                                          output_attentions=True)
  assert [(c[0], c[1]) for c in calls] == [('cudnn', (3, 1, 9, 9))] * cfg.num_hidden_layers
  key_mask = np.asarray(mask)[:, None, None, :] > 0  # [B, 1, 1, T]
  np.testing.assert_array_equal(calls[0][2], np.broadcast_to(key_mask, (3, 1, 9, 9)))
  valid = np.asarray(mask)[..., None] > 0
  np.testing.assert_allclose(np.where(valid, fused.logits, 0), np.where(valid, explicit.logits, 0),
                             rtol=1e-5, atol=1e-5)


def test_mlm_hidden_and_vocab_projection_rebuild_logits(bert_params):
  cfg = _cfg('bert')
  ids, mask = _inputs()
  model = MaskedLM(cfg)
  logits = model.apply({'params': bert_params}, ids, mask).logits
  out = model.apply({'params': bert_params}, ids, mask, return_mlm_hidden=True)
  assert out.logits is None and out.mlm_hidden.shape == (3, 9, 32)
  emb, bias = bert.vocab_projection(bert_params)
  np.testing.assert_allclose(out.mlm_hidden @ emb.T + bias, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('remat', [False, True])
def test_scan_layers_same_outputs_and_grads_as_unrolled(bert_params, remat):
  ids, mask = _inputs()

  def loss(p, cfg):
    out = MaskedLM(cfg).apply({'params': p}, ids, mask, output_attentions=True,
                              output_attention_scores=True, output_values=True)
    extra = sum(jnp.sum(jnp.where(jnp.isfinite(s), s, 0.0) * 1e-9) for s in out.attention_scores)
    return (jnp.sum(out.logits ** 2) * 1e-3 + sum(jnp.sum(h ** 2) for h in out.hidden_states) * 1e-3
            + sum(jnp.sum(a * v.mean()) for a, v in zip(out.attentions, out.values)) + extra)

  f = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  v1, g1 = f(bert_params, _cfg(remat=remat))
  v2, g2 = f(bert_params, _cfg(remat=remat, scan_layers=True))
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))
  # Same parameter tree: scanning is a compute option, not a layout.
  assert jax.tree.structure(bert.init_params(_cfg(scan_layers=True), jax.random.PRNGKey(0))) == (
      jax.tree.structure(bert_params))


@pytest.mark.slow
def test_scan_layers_dropout_and_the_unrolled_fallback(bert_params):
  ids, mask = _inputs()
  cfg = _cfg(scan_layers=True)
  a = MaskedLM(cfg).apply({'params': bert_params}, ids, mask, deterministic=False,
                          rngs={'dropout': jax.random.PRNGKey(1)})
  b = MaskedLM(cfg).apply({'params': bert_params}, ids, mask, deterministic=False,
                          rngs={'dropout': jax.random.PRNGKey(2)})
  c = MaskedLM(cfg).apply({'params': bert_params}, ids, mask)
  assert len(a.hidden_states) == 3 and a.attentions is None
  assert not np.allclose(a.logits, b.logits) and not np.allclose(a.logits, c.logits)
  # Layers of unequal shapes (as pruned ones) cannot be stacked: the stack runs unrolled.
  enc = bert.Encoder(cfg)
  params = dict(bert_params['encoder'])
  assert enc.bind({'params': params})._stacked_layer_params() is not None
  layer = jax.tree.map(lambda x: x, params['layer_1'])
  layer['intermediate'] = {'kernel': jnp.zeros((32, 40)), 'bias': jnp.zeros((40,))}
  assert enc.bind({'params': dict(params, layer_1=layer)})._stacked_layer_params() is None


# ----------------------------------------------------------------------------- pruned heads, gates

def test_pruned_heads_are_normalised_and_shape_each_layer():
  cfg = _cfg(pruned_heads=[[3, 1], []])
  assert cfg.pruned_heads == ((1, 3), ())
  assert [cfg.layer_num_heads(i) for i in range(2)] == [2, 4] and cfg.head_dim == 8
  # HF's {layer: heads} dict with JSON string keys, and a fingerprint's lists, mean the same
  assert _cfg(pruned_heads={'0': [1, 3]}).pruned_heads == cfg.pruned_heads
  assert _cfg(pruned_heads=[[], []]).pruned_heads == ()  # nothing pruned: the plain config
  p = bert.init_params(cfg, jax.random.PRNGKey(0))
  att0, att1 = p['encoder']['layer_0']['attention'], p['encoder']['layer_1']['attention']
  assert att0['query']['kernel'].shape == (32, 16) and att0['output']['kernel'].shape == (16, 32)
  assert att1['value']['kernel'].shape == (32, 32)
  out = MaskedLM(cfg).apply({'params': p}, *_inputs(), output_attentions=True, output_values=True)
  assert [a.shape[1] for a in out.attentions] == [2, 4] and out.values[0].shape[-1] == 8


@pytest.mark.parametrize('pruned, match', [
    ([[0]], 'one \\(possibly empty\\) tuple'),
    ([[4], []], r'distinct heads in \[0, 4\)'),
    ([[1, 1], []], 'distinct'),
    ([[0, 1, 2, 3], []], 'keep at least one'),
    ({5: [0]}, 'names layers'),
])
def test_pruned_heads_validation(pruned, match):
  with pytest.raises(ValueError, match=match):
    _cfg(pruned_heads=pruned)


def test_gates_at_one_are_the_identity_and_zero_gates_remove_units(bert_params):
  cfg, (ids, mask) = _cfg(), _inputs()
  m = MaskedLM(cfg)
  plain = m.apply({'params': bert_params}, ids, mask).logits
  gates = bert.gate_ones(cfg)
  assert gates['encoder']['layer_1']['attention']['head'].shape == (4,)
  assert gates['encoder']['layer_0']['ffn'].shape == (64,)
  np.testing.assert_array_equal(m.apply({'params': bert_params, 'gates': gates}, ids, mask).logits,
                                plain)
  # gate 0 on head 2 of layer 0 == zero rows of its output kernel (the head contributes nothing)
  g = jax.tree.map(lambda x: x, gates)
  g['encoder']['layer_0']['attention']['head'] = jnp.array([1.0, 1.0, 0.0, 1.0])
  g['encoder']['layer_1']['ffn'] = jnp.ones(64).at[5].set(0.0)
  p = jax.tree.map(np.array, bert_params)
  p['encoder']['layer_0']['attention']['output']['kernel'][16:24] = 0.0
  p['encoder']['layer_1']['output']['kernel'][5] = 0.0
  gated = m.apply({'params': bert_params, 'gates': g}, ids, mask).logits
  np.testing.assert_allclose(gated, m.apply({'params': p}, ids, mask).logits, atol=1e-5)
  assert np.abs(np.asarray(gated - plain)).max() > 1e-3


def test_gate_gradients_match_finite_differences_also_with_remat(bert_params):
  ids, mask = _inputs()

  def loss(g, cfg):
    out = MaskedLM(cfg).apply({'params': bert_params, 'gates': g}, ids, mask)
    return jnp.sum(out.logits.astype(jnp.float32) ** 2) * 1e-3

  gates = bert.gate_ones(_cfg())
  grads = jax.grad(loss)(gates, _cfg())
  remat = jax.grad(loss)(gates, _cfg(remat=True))
  for x, y in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(remat)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  eps, head = 1e-2, grads['encoder']['layer_1']['attention']['head']
  for h in range(4):
    up, down = (jax.tree.map(lambda x: x, gates) for _ in range(2))
    up['encoder']['layer_1']['attention']['head'] = jnp.ones(4).at[h].set(1 + eps)
    down['encoder']['layer_1']['attention']['head'] = jnp.ones(4).at[h].set(1 - eps)
    fd = (loss(up, _cfg()) - loss(down, _cfg())) / (2 * eps)
    np.testing.assert_allclose(float(head[h]), float(fd), rtol=2e-2, atol=1e-4)
