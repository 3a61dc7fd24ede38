"""flaxdistil.model.pruning: which heads / neurons go (Michel et al.'s global ranking), and that
removing them computes what gating them to zero computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.model import pruning

CFG = bert.ModelConfig(model_type='distilbert', vocab_size=61, hidden_size=24,
                       num_hidden_layers=3, num_attention_heads=4, intermediate_size=20,
                       max_position_embeddings=16)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, CFG.vocab_size, (3, 9)).astype(np.int32)
  mask = np.ones((3, 9), np.int32)
  mask[1, 6:] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.fixture(scope='module')
def params():
  # perturb biases and LayerNorms too (0 / 1 at init would hide slicing mistakes)
  p = bert.init_params(CFG, jax.random.PRNGKey(0))
  leaves, tree = jax.tree_util.tree_flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [np.asarray(x + 0.05 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])


def test_select_heads_ranks_globally_after_per_layer_normalisation():
  # layer 1's raw scores are 100x larger; normalised, its head 0 is the least important of all
  imp = [np.array([0.5, 0.6, 0.7, 0.8]), np.array([1.0, 90.0, 95.0, 99.0]), np.ones(4)]
  assert pruning.select_heads(imp, 0.25) == ((0, 1), (0,), ())
  assert pruning.select_heads(imp, 0.25, normalize=False) == ((0, 1, 2), (), ())
  assert pruning.select_heads(imp, 0.0) == ((), (), ())


def test_select_heads_keeps_one_head_per_layer():
  imp = [np.array([0.0, 0.0, 0.0, 0.0]), np.array([5.0, 6.0, 7.0, 8.0])]
  out = pruning.select_heads(imp, 0.75, normalize=False)  # 6 of 8: layer 0 keeps one head
  assert [4 - len(h) for h in out] == [1, 1]
  with pytest.raises(ValueError, match='keep one per layer'):
    pruning.select_heads(imp, 0.95)
  with pytest.raises(ValueError, match=r'in \[0, 1\)'):
    pruning.select_heads(imp, 1.0)


def test_select_ffn_keeps_the_same_count_per_layer():
  imp = [np.array([3.0, 1.0, 2.0, 0.0]), np.array([0.0, 0.0, 9.0, 1.0])]
  kept = pruning.select_ffn(imp, 0.5)
  assert [k.tolist() for k in kept] == [[0, 2], [2, 3]]
  assert [len(k) for k in pruning.select_ffn(imp, 0.9)] == [1, 1]  # never 0
  with pytest.raises(ValueError, match='one intermediate_size'):
    pruning.select_ffn([np.ones(4), np.ones(3)], 0.5)


def test_pruning_equals_gating_the_units_to_zero(params):
  heads = ((1,), (0, 3), ())
  keep = [np.array([0, 2, 4, 6, 8, 10, 12, 14, 16, 18]), np.arange(10), np.arange(10, 20)]
  cfg, small = pruning.prune(params, CFG, heads, keep)
  assert cfg.pruned_heads == heads and cfg.intermediate_size == 10
  assert jax.tree.map(np.shape, small) == jax.tree.map(np.shape, bert.init_params(
      cfg, jax.random.PRNGKey(0)))
  gates = bert.gate_ones(CFG)
  for i in range(3):
    layer = gates['encoder'][f'layer_{i}']
    layer['attention']['head'] = jnp.ones(4).at[jnp.asarray(heads[i], jnp.int32)].set(0.0)
    layer['ffn'] = jnp.zeros(20).at[keep[i]].set(1.0)
  ids, mask = _inputs()
  gated = bert.MaskedLM(CFG).apply({'params': params, 'gates': gates}, ids, mask)
  pruned = bert.MaskedLM(cfg).apply({'params': small}, ids, mask)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(pruned.logits)[real], np.asarray(gated.logits)[real],
                             atol=2e-5)
  full = bert.MaskedLM(CFG).apply({'params': params}, ids, mask)
  assert np.abs(np.asarray(full.logits - pruned.logits))[real].max() > 1e-3
  assert bert.count_params(small) < bert.count_params(params)


def test_pruning_twice_accumulates_original_head_indices(params):
  cfg1, p1 = pruning.prune(params, CFG, ((0,), (), (2,)))
  assert pruning.kept_heads(cfg1, 0) == [1, 2, 3]
  cfg2, p2 = pruning.prune(p1, cfg1, ((0,), (3,), ()))  # local head 0 of layer 0 = original 1
  assert cfg2.pruned_heads == ((0, 1), (3,), (2,))
  once, _ = pruning.prune(params, CFG, ((0, 1), (3,), (2,)))
  _, p_once = pruning.prune(params, CFG, ((0, 1), (3,), (2,)))
  assert once == cfg2
  for a, b in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(p_once)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('heads, keep, match', [
    (((0, 1, 2, 3), (), ()), None, 'without heads'),
    (((4,), (), ()), None, 'cannot remove heads'),
    (((), ()), None, 'one entry per layer'),
    (None, [np.arange(5), np.arange(6), np.arange(5)], 'same number'),
    (None, [np.arange(5), np.arange(5), np.array([0, 0, 1, 2, 3])], 'distinct'),
])
def test_prune_errors(params, heads, keep, match):
  with pytest.raises(ValueError, match=match):
    pruning.prune(params, CFG, heads, keep)
