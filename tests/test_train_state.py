"""The train state's layout: leaves placed on the shardings it names (optimizer moments like their
parameters), a checkpoint restored onto another mesh, projections only with a projection."""

import jax
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.objectives import intermediate
from flaxdistil.training import checkpointing
from flaxdistil.training import optimizer
from flaxdistil.training import sharding
from flaxdistil.training import train_state
from flaxdistil.training.train_state import trainable_tree

from conftest import tiny_config

RULES = sharding.DEFAULT_LOGICAL_AXIS_RULES
AXES = sharding.DEFAULT_MESH_AXES
SCFG = bert.ModelConfig(model_type='distilbert', vocab_size=48, hidden_size=16,
                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16)


@pytest.fixture(scope='module')
def tx():
  return optimizer.make_optimizer(tiny_config().optim, 10)[0]


def _params():
  return jax.device_get(bert.init_params(SCFG, jax.random.PRNGKey(0)))


def _proj():
  return jax.device_get(intermediate.init_projection_params(jax.random.PRNGKey(1), 16, 32))


def _assert_placed(state, shard):
  """Every leaf of `state` carries the sharding `shard` names for it."""
  assert jax.tree.structure(state) == jax.tree.structure(shard)
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(shard)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (jax.tree_util.keystr(path), x.sharding, s)


def _adam_moments(opt_state):
  """The `mu` tree of the AdamW state inside the optimizer chain."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, 'mu'))
           if hasattr(s, 'mu')]
  assert len(found) == 1
  return found[0].mu


def test_init_state_places_every_leaf_on_the_given_shardings(tx):
  mesh = sharding.create_mesh((2, 2, 2), AXES)
  shard, abstract = train_state.state_layout(SCFG, tx, mesh, RULES)
  state = train_state.init_state(_params(), tx, jax.random.PRNGKey(2), shard)
  _assert_placed(state, shard)
  assert int(state['step']) == 0 and int(state['num_skipped']) == 0
  # The abstract state has the real one's shapes, dtypes and target shardings.
  for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert (x.shape, x.dtype) == (a.shape, a.dtype) and x.sharding.is_equivalent_to(
        a.sharding, x.ndim)
  # The optimizer's moments are sharded like the parameters they mirror (ZeRO-3 with fsdp).
  kernel = ('student', 'encoder', 'layer_0', 'intermediate', 'kernel')
  mu = _adam_moments(state['opt_state'])
  for k in kernel:
    mu = mu[k]
  w = state['params']['encoder']['layer_0']['intermediate']['kernel']
  assert mu.sharding.is_equivalent_to(w.sharding, 2)
  assert w.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert len({str(s.index) for s in mu.addressable_shards}) == 4


def test_state_layout_restores_a_checkpoint_onto_another_mesh(tx, tmp_path):
  written = sharding.create_mesh((2, 2, 2), AXES)
  w_shard, _ = train_state.state_layout(SCFG, tx, written, RULES)
  state = train_state.init_state(_params(), tx, jax.random.PRNGKey(2), w_shard)
  host = jax.device_get(state)
  manager = checkpointing.make_manager(str(tmp_path), async_save=False)
  checkpointing.save(manager, 0, state, {})
  manager.wait_until_finished()
  for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((4, 1, 2), None)):
    mesh = sharding.create_mesh(shape, AXES, devices=devices)
    shard, abstract = train_state.state_layout(SCFG, tx, mesh, RULES)
    restored, _ = checkpointing.restore_latest(manager, abstract)
    _assert_placed(restored, shard)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(restored)),
                            jax.tree.leaves(host)):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_projection_leaves_only_with_a_projection(tx):
  mesh = sharding.single_device_mesh()
  shard, abstract = train_state.state_layout(SCFG, tx, mesh, RULES)
  assert 'proj' not in shard and 'proj' not in abstract
  state = train_state.init_state(_params(), tx, jax.random.PRNGKey(2), shard)
  assert set(state) == {'step', 'params', 'opt_state', 'rng', 'num_skipped'}
  assert set(trainable_tree(state)) == {'student'}
  assert 'proj' not in _adam_moments(state['opt_state'])

  p_shard, p_abstract = train_state.state_layout(SCFG, tx, mesh, RULES, projection=(16, 32))
  proj = _proj()
  assert jax.tree.map(lambda x: x.shape, p_abstract['proj']) == jax.tree.map(
      lambda x: x.shape, proj)
  state = train_state.init_state(_params(), tx, jax.random.PRNGKey(2), p_shard, proj=proj)
  _assert_placed(state, p_shard)
  assert set(trainable_tree(state)) == {'student', 'proj'}
  # The projections are trained: the optimizer holds moments for them too.
  assert jax.tree.structure(_adam_moments(state['opt_state'])['proj']) == jax.tree.structure(proj)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['proj']), proj)
