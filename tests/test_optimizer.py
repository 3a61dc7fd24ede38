"""The student's optimizer: weight decay on kernels and embeddings only, linear warmup then linear
decay to 0 at num_train_steps."""

import jax
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.objectives import intermediate
from flaxdistil.training import optimizer

from conftest import tiny_config

CFG = bert.ModelConfig(model_type='bert', vocab_size=40, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)


def _names(path):
  return [getattr(k, 'key', None) for k in path]


def test_decay_mask_kernels_and_embeddings_only():
  params = {'student': jax.device_get(bert.init_params(CFG, jax.random.PRNGKey(0))),
            'proj': jax.device_get(intermediate.init_projection_params(jax.random.PRNGKey(1), 16,
                                                                       32))}
  mask = optimizer.decay_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  decayed = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  for path, m in jax.tree_util.tree_leaves_with_path(mask):
    names = _names(path)
    if names[-1] in ('kernel', 'embedding'):
      assert m, names
    else:  # LayerNorm scale / bias, dense biases, the MLM output bias, projections' own names
      assert not m, names
  ln = params['student']['encoder']['layer_0']['attention_layer_norm']
  assert set(ln) == {'scale', 'bias'}
  assert "['student']['embeddings']['word_embeddings']['embedding']" in decayed
  assert "['student']['encoder']['layer_0']['attention']['query']['kernel']" in decayed
  assert not any('LayerNorm' in p or 'layer_norm' in p for p in decayed)
  assert "['student']['mlm_head']['bias']" not in decayed


def _optim(**kw):
  optim = tiny_config().optim
  for k, v in kw.items():
    setattr(optim, k, v)
  return optim


@pytest.mark.slow
def test_weight_decay_reaches_only_the_masked_leaves():
  # Zero gradients: AdamW's update is the decay alone, -lr * weight_decay * param.
  optim = _optim(warmup_steps=0, weight_decay=0.1, learning_rate=1e-2)
  tx, _ = optimizer.make_optimizer(optim, 10)
  # Shifted so that no leaf is 0 (biases start at 0): a decayed leaf would show it.
  params = jax.tree.map(lambda x: np.asarray(x) + 0.5,
                        bert.init_params(CFG, jax.random.PRNGKey(0)))
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  mask = optimizer.decay_mask(params)
  for (path, u), p, m in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params),
                             jax.tree.leaves(mask)):
    want = -1e-2 * 0.1 * p if m else np.zeros_like(p)
    np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-12, err_msg=jax.tree_util.keystr(path))


def test_schedule_warms_up_then_decays_linearly_to_zero_at_num_train_steps():
  _, schedule = optimizer.make_optimizer(_optim(warmup_steps=4, learning_rate=1e-3), 10)
  lr = [float(schedule(s)) for s in range(13)]
  np.testing.assert_allclose(lr[:5], [0, 2.5e-4, 5e-4, 7.5e-4, 1e-3], atol=1e-9)
  np.testing.assert_allclose(lr[4:11], np.linspace(1e-3, 0, 7), atol=1e-9)  # steps 4..10
  assert lr[10] == pytest.approx(0.0, abs=1e-12) and lr[11] == lr[12] == pytest.approx(0.0)
  # No warmup: the peak at step 0.
  _, flat = optimizer.make_optimizer(_optim(warmup_steps=0, learning_rate=1e-3), 10)
  assert float(flat(0)) == pytest.approx(1e-3) and float(flat(5)) == pytest.approx(5e-4)
