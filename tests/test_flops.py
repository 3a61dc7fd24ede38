"""model/flops.py: the analytic step FLOPs, against the old benchmark formula and the compiler."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.model import flops
from flaxdistil.training import hlo_cost

BASE = bert.ModelConfig(vocab_size=30522)  # bert-base
STUDENT = dataclasses.replace(BASE, model_type='distilbert', num_hidden_layers=6)


def test_bert_base_to_distilbert_step_equals_the_benchmarks_formula():
  # benchmarks/README.md: 643.8 GFLOP for a batch of 8 x 128 (the published benchmark table).
  f = flops.step_flops(STUDENT, BASE, batch_size=8, seq_len=128)
  assert f['flops_per_step'] == 643_804_692_480
  assert f['teacher_matmul_params'] == 108_965_376 and f['student_matmul_params'] == 66_498_048
  assert f['tokens_per_step'] == 1024
  assert f['flops_per_step'] == f['teacher_fwd_flops'] + f['student_fwd_bwd_flops']


def test_shapes_heads_and_microbatches():
  f = flops.step_flops(STUDENT, BASE, batch_size=64, seq_len=128, num_microbatches=8)
  assert f['flops_per_microbatch'] == f['flops_per_step'] / 8
  # Logits on 20 masked positions per sequence: only the heads shrink, by 108 positions.
  g = flops.step_flops(STUDENT, BASE, batch_size=64, seq_len=128, head_positions=20)
  head = lambda cfg: 2 * 64 * cfg.hidden_size * (cfg.hidden_size + cfg.vocab_size)  # a position
  assert f['flops_per_step'] - g['flops_per_step'] == (head(BASE) + 3 * head(STUDENT)) * 108
  # No teacher (offline / plain MLM): the student's share only.
  h = flops.step_flops(STUDENT, None, batch_size=64, seq_len=128)
  assert h['teacher_fwd_flops'] == 0 and h['flops_per_step'] == f['student_fwd_bwd_flops']
  # The intermediate size is the config's, not 4 x hidden.
  narrow = dataclasses.replace(STUDENT, intermediate_size=1024)
  assert flops.layer_matmul_params(narrow) == 4 * 768 ** 2 + 2 * 768 * 1024


@pytest.mark.slow
def test_forward_flops_equal_the_compiled_programs_matmuls():
  cfg = bert.ModelConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3,
                         num_attention_heads=4, intermediate_size=48, max_position_embeddings=16)
  params = bert.init_params(cfg, jax.random.PRNGKey(0))
  ids = jnp.ones((2, 16), jnp.int32)
  fwd = jax.jit(lambda p, i: bert.MaskedLM(cfg).apply({'params': p}, i, jnp.ones_like(i)).logits)
  cost = hlo_cost.hlo_cost(fwd.lower(params, ids).compile().as_text())
  assert cost.flops == flops.forward_flops(cfg, 2, 16, head_positions=16)
  cls = dataclasses.replace(cfg, num_labels=3, with_mlm_head=False)
  params = bert.init_params(cls, jax.random.PRNGKey(0))
  fwd = jax.jit(lambda p, i: bert.MaskedLM(cls).apply({'params': p}, i,
                                                      jnp.ones_like(i)).class_logits)
  cost = hlo_cost.hlo_cost(fwd.lower(params, ids).compile().as_text())
  assert np.isclose(cost.flops, flops.forward_flops(cls, 2, 16, classifier=True))
