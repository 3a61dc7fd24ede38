"""Mesh shapes and their errors, batch divisibility, parameter shardings that replicate what a mesh
axis does not divide, batch shards, and global batches of mixed rank."""

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.training import sharding

AXES = ('data', 'fsdp', 'tensor')
RULES = sharding.DEFAULT_LOGICAL_AXIS_RULES


def test_resolve_mesh_shape_takes_the_rest_for_minus_one():
  assert sharding.resolve_mesh_shape((2, -1, 1), AXES, 8) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert sharding.resolve_mesh_shape((-1, 1, 1), AXES, 8) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert sharding.resolve_mesh_shape((2, 2, 2), AXES, 8) == {'data': 2, 'fsdp': 2, 'tensor': 2}


@pytest.mark.parametrize('shape, match', [
    ((8, 1), r'mesh.shape \(8, 1\) and mesh.axes .* differ in length'),
    ((-1, -1, 2), 'at most one -1'),
    ((3, -1, 1), '8 devices are not divisible by 3'),
    ((2, 2, 1), r'needs 4 devices but 8 are available; use -1'),
    ((4, 4, 1), 'needs 16 devices but 8'),
])
def test_mesh_shape_errors(shape, match):
  with pytest.raises(ValueError, match=match):
    sharding.resolve_mesh_shape(shape, AXES, 8)
  with pytest.raises(ValueError, match=match):  # create_mesh checks the same, before any mesh
    sharding.create_mesh(shape, AXES)


def test_create_mesh_over_the_given_devices():
  mesh = sharding.create_mesh((2, -1, 2), AXES)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2} and mesh.axis_names == AXES
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  four = jax.devices()[4:]
  mesh = sharding.create_mesh((-1, 1, 1), AXES, devices=four)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert {d.id for d in mesh.devices.flat} == {d.id for d in four}
  one = sharding.single_device_mesh()
  assert dict(one.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert list(one.devices.flat) == [jax.local_devices()[0]]


def test_check_batch_divisibility_names_the_numbers_and_the_fix():
  shape = {'data': 2, 'fsdp': 4, 'tensor': 1}  # 8 batch shards
  sharding.check_batch_divisibility(32, 2, shape, RULES)  # 16 rows per microbatch: fine
  with pytest.raises(ValueError, match=r'^data.global_batch_size=32 is not divisible by '
                     r'optim.num_microbatches=3\.$'):
    sharding.check_batch_divisibility(32, 3, shape, RULES)
  with pytest.raises(ValueError) as e:
    sharding.check_batch_divisibility(24, 2, shape, RULES)
  assert str(e.value) == (
      'microbatch of 12 sequences (global_batch_size=24 / num_microbatches=2) is not divisible by '
      "the 8 batch shards of mesh {'data': 2, 'fsdp': 4, 'tensor': 1}; choose global_batch_size "
      'as a multiple of 16.')
  # A tensor-parallel axis holds no batch shards; a Mesh works as its shape does.
  sharding.check_batch_divisibility(4, 2, {'data': 1, 'fsdp': 1, 'tensor': 8}, RULES)
  mesh = sharding.create_mesh((4, 1, 2), AXES)
  sharding.check_batch_divisibility(8, 2, mesh, RULES)
  with pytest.raises(ValueError, match='the 4 batch shards'):
    sharding.check_batch_divisibility(8, 4, mesh, RULES)


def test_num_batch_shards_for_a_mesh_and_for_a_shape():
  assert sharding.num_batch_shards(sharding.create_mesh((2, 2, 2), AXES), RULES) == 4
  assert sharding.num_batch_shards({'data': 8, 'fsdp': 1, 'tensor': 1}, RULES) == 8
  assert sharding.num_batch_shards({'data': 1, 'fsdp': 1, 'tensor': 8}, RULES) == 1
  # Rules as a config holds them (lists), a single mesh axis, and no batch sharding at all.
  assert sharding.num_batch_shards({'data': 2, 'fsdp': 4}, [['act_batch', ['data', 'fsdp']]]) == 8
  assert sharding.num_batch_shards({'data': 2, 'fsdp': 4}, (('act_batch', 'fsdp'),)) == 4
  assert sharding.num_batch_shards({'data': 2, 'fsdp': 4}, (('act_batch', None),)) == 1


def _spec(tree, *path):
  for k in path:
    tree = tree[k]
  return tree.spec


def test_param_shardings_replicate_only_the_dimension_the_axis_does_not_divide():
  mesh = sharding.create_mesh((1, 2, 4), AXES)  # fsdp 2 ('embed'), tensor 4 ('vocab', 'mlp')
  small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=16)
  uneven = sharding.param_shardings(
      bert.abstract_params(bert.ModelConfig(vocab_size=30522, **small)), mesh, RULES)
  # 30522 % 4 != 0: the vocab dimension is replicated, the embedding dimension stays sharded.
  assert _spec(uneven, 'embeddings', 'word_embeddings', 'embedding') == P(None, 'fsdp')
  assert _spec(uneven, 'mlm_head', 'bias') == P(None)
  # Dimensions that divide keep their axes, in the same tree.
  assert _spec(uneven, 'encoder', 'layer_0', 'intermediate', 'kernel') == P('fsdp', 'tensor')
  even = sharding.param_shardings(
      bert.abstract_params(bert.ModelConfig(vocab_size=30524, **small)), mesh, RULES)
  assert _spec(even, 'embeddings', 'word_embeddings', 'embedding') == P('tensor', 'fsdp')
  assert _spec(even, 'mlm_head', 'bias') == P('tensor')
  # Every leaf is a NamedSharding on `mesh` that the leaf's shape can be placed with.
  shapes = bert.unbox(bert.abstract_params(bert.ModelConfig(vocab_size=30522, **small)))
  for s, x in zip(jax.tree.leaves(uneven), jax.tree.leaves(shapes)):
    assert s.mesh == mesh and s.shard_shape(x.shape)  # raises for an uneven split


def test_make_global_batch_gives_rank_1_leaves_the_batch_axis_only():
  mesh = sharding.create_mesh((4, 2, 1), AXES)
  b_shard = sharding.batch_sharding(mesh, RULES)
  assert b_shard.spec == P(('data', 'fsdp'), None)
  rng = np.random.default_rng(0)
  host = {'input_ids': rng.integers(0, 50, (16, 6)).astype(np.int32),
          'labels': np.arange(16, dtype=np.int32),                     # one label per example
          'teacher_topk_values': rng.normal(size=(16, 6, 3)).astype(np.float32)}
  out = sharding.make_global_batch(host, b_shard, 16)
  assert out['input_ids'].sharding.spec == P(('data', 'fsdp'), None)
  assert out['labels'].sharding.spec == P(('data', 'fsdp'))
  assert out['teacher_topk_values'].sharding.spec == P(('data', 'fsdp'), None, None)
  for k, v in host.items():
    assert out[k].shape == v.shape
    np.testing.assert_array_equal(out[k], v)
    # 8 row blocks of 2 rows, one per device.
    starts = sorted(s.index[0].start for s in out[k].addressable_shards)
    assert starts == list(range(0, 16, 2)), k
