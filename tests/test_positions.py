"""Masked positions: the first M masked tokens per row, the batch restricted to them, gathers."""

import jax.numpy as jnp
import numpy as np

from flaxdistil.objectives import positions


def test_masked_positions_gather():
  labels = jnp.array([[-100, 5, -100, 7, 9], [-100, -100, -100, -100, 3]])
  pos, lab = positions.masked_positions(labels, 2)
  np.testing.assert_array_equal(pos, [[1, 3], [4, 0]])
  np.testing.assert_array_equal(lab, [[5, 7], [3, -100]])


def test_restrict_to_masked_replaces_labels_and_adds_positions():
  labels = np.array([[-100, 5, -100, 7, 9], [-100, -100, 4, -100, -100]], np.int32)
  ids = np.arange(10, dtype=np.int32).reshape(2, 5)
  batch = {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'labels': labels}
  assert positions.restrict_to_masked(batch, 0) is batch  # logits at every position
  out = positions.restrict_to_masked(batch, 3)
  assert set(out) == {'input_ids', 'attention_mask', 'labels', 'logits_positions'}
  assert out['logits_positions'].dtype == jnp.int32
  np.testing.assert_array_equal(out['logits_positions'], [[1, 3, 4], [2, 0, 0]])
  np.testing.assert_array_equal(out['labels'], [[5, 7, 9], [4, -100, -100]])
  # The inputs stay [B, T]; the caller's batch is not modified.
  assert out['input_ids'] is ids and batch['labels'] is labels and 'logits_positions' not in batch
  # More masked tokens than M: the first M in position order are kept.
  np.testing.assert_array_equal(positions.restrict_to_masked(batch, 1)['labels'], [[5], [4]])


def test_gather_at_positions_any_trailing_rank():
  rng = np.random.default_rng(0)
  pos = jnp.array([[4, 0, 2], [1, 1, 3]], jnp.int32)
  for shape in ((2, 5), (2, 5, 6), (2, 5, 3, 4)):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    got = positions.gather_at_positions(x, pos)
    assert got.shape == (2, 3) + shape[2:]
    want = np.stack([np.asarray(x)[b, np.asarray(pos)[b]] for b in range(2)])
    np.testing.assert_array_equal(got, want)
