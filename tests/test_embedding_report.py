"""scripts/embedding_report.py on tiny random models: pooling, batching, checkpoint restore."""

import dataclasses
import os
import sys

import jax
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.objectives import intermediate
from flaxdistil.training import checkpointing

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import embedding_report as er  # pylint: disable=g-import-not-at-top,wrong-import-position

CFG = bert.ModelConfig(model_type='distilbert', vocab_size=64, hidden_size=16,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=64, with_mlm_head=False)


def _random_ids(n, rng):
  return [list(rng.integers(5, CFG.vocab_size, rng.integers(2, 30))) for _ in range(n)]


def test_mean_pool_ignores_padding_and_batching_keeps_row_order():
  enc = er.make_encoder(CFG, bert.init_params(CFG, jax.random.PRNGKey(1)))
  ids = _random_ids(6, np.random.default_rng(0))  # 2 batches of 4, the last one filled
  one_by_one = np.stack([np.asarray(enc(np.array([x], np.int32), np.ones((1, len(x)), np.int32)))[0]
                         for x in ids])                          # [N, H], no padding at all
  batched = er.embed(enc, ids, batch_size=4, pad_id=0)            # sorted, padded to x8, last batch filled
  np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
  assert er.mean_cosine(batched, batched) > 1 - 1e-6


@pytest.mark.slow
def test_load_run_restores_params_and_projection(tmp_path):
  scfg = CFG
  params = bert.init_params(scfg, jax.random.PRNGKey(2))
  proj = intermediate.init_projection_params(jax.random.PRNGKey(3), 16, 32)
  config = {k: v for k, v in dataclasses.asdict(scfg).items() if k not in ('dtype', 'remat')}
  for name, state, projection in (('narrow', {'params': params, 'proj': proj}, [16, 32]),
                                  ('same', {'params': params}, None)):
    wd = str(tmp_path / name)
    manager = checkpointing.make_manager(wd, async_save=False)
    checkpointing.save(manager, 7, {**state, 'step': np.int32(7)},
                       {'fingerprint': {'student_config': config, 'projection': projection}})
    manager.wait_until_finished()
    got_cfg, got_params, got_proj, step = er.load_run(wd)
    assert got_cfg == scfg and step == 7
    jax.tree.map(np.testing.assert_array_equal, got_params, params)
    if projection:
      jax.tree.map(np.testing.assert_array_equal, got_proj, proj)
      pooled = np.ones((3, 16), np.float32)                       # W_h maps 16 -> 32
      assert er.project(pooled, got_proj['hidden'], 32).shape == (3, 32)
    else:
      assert got_proj is None
