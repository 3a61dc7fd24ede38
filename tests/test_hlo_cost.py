"""hlo_cost: the per-chip cost walk of compiled HLO (loops by trip count, bytes, collectives)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdistil.training import hlo_cost


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def test_loop_free_bytes_equal_xla_cost_analysis_and_matmul_flops_exact():
  a = jnp.ones((64, 96), jnp.float32)
  b = jnp.ones((96, 48), jnp.float32)
  compiled = _compiled(lambda x, y: jnp.tanh(x @ y) @ y.T, a, b)
  cost = hlo_cost.hlo_cost(compiled.as_text())
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert cost.flops == 2 * 64 * 96 * 48 + 2 * 64 * 48 * 96  # the two matmuls, nothing else
  assert cost.bytes_accessed == pytest.approx(xla['bytes accessed'], rel=1e-6)
  assert cost.hbm_bytes == cost.bytes_accessed  # CPU: one memory space
  assert cost.loops == []


@pytest.mark.parametrize('n', [3, 7])
def test_scan_body_counted_by_trip_count_where_xla_counts_it_once(n):
  w = jnp.ones((32, 32), jnp.float32)

  def f(x, w):
    return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=n)[0]

  compiled = _compiled(f, jnp.ones((16, 32), jnp.float32), w)
  cost = hlo_cost.hlo_cost(compiled.as_text())
  one = 2 * 16 * 32 * 32
  assert cost.flops == n * one
  assert [t for _, t in cost.loops] == [n]
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert xla['flops'] < 2 * one  # the reason this module exists
  # retrip: the same program costed as if its loop ran 4n times
  assert hlo_cost.hlo_cost(compiled.as_text(), retrip=(n, 4 * n)).flops == 4 * n * one


def test_nested_loops_multiply():
  w = jnp.ones((8, 8), jnp.float32)

  def f(x, w):
    def outer(h, _):
      return jax.lax.scan(lambda g, _: (jnp.sin(g @ w), None), h, None, length=5)[0], None
    return jax.lax.scan(outer, x, None, length=3)[0]

  cost = hlo_cost.hlo_cost(_compiled(f, jnp.ones((4, 8), jnp.float32), w).as_text())
  assert cost.flops == 15 * 2 * 4 * 8 * 8


def test_batched_dot_flops():
  x = jnp.ones((3, 5, 7), jnp.float32)
  y = jnp.ones((3, 7, 11), jnp.float32)
  cost = hlo_cost.hlo_cost(_compiled(lambda a, b: jnp.einsum('bij,bjk->bik', a, b), x, y).as_text())
  assert cost.flops == 2 * 3 * 5 * 7 * 11


# A hand-written partitioned module in TPU's text conventions: a tiled layout with a VMEM
# (S(1)) array, mesh-style and iota replica groups, a loop whose compare sits in a fusion.
_TPU_TEXT = """
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cmp_fused (p0: s32[], p1: s32[]) -> pred[] {
  %p0 = s32[] parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %lt = pred[] compare(%p0, %p1), direction=LT
}

%cond (t: (s32[], f32[300,32])) -> pred[] {
  %t = (s32[], f32[300,32]{1,0:T(8,128)}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = s32[] constant(4)
  ROOT %f = pred[] fusion(%i, %c), kind=kLoop, calls=%cmp_fused
}

%body (t: (s32[], f32[300,32])) -> (s32[], f32[300,32]) {
  %t = (s32[], f32[300,32]{1,0:T(8,128)}) parameter(0)
  %x = f32[300,32]{1,0:T(8,128)} get-tuple-element(%t), index=1
  %r = f32[300,32]{1,0:T(8,128)} all-reduce(%x), channel_id=1, replica_groups=mesh['x'=4,'y'=2] {'x'}, to_apply=%add
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %o = (s32[], f32[300,32]{1,0:T(8,128)}) tuple(%i, %r)
}

ENTRY %main (p: f32[300,32]) -> f32[1200,32] {
  %p = f32[300,32]{1,0:T(8,128)} parameter(0)
  %v = f32[300,32]{1,0:T(8,128)S(1)} copy(%p)
  %z = s32[] constant(0)
  %t = (s32[], f32[300,32]{1,0:T(8,128)}) tuple(%z, %p)
  %w = (s32[], f32[300,32]{1,0:T(8,128)}) while(%t), condition=%cond, body=%body
  %y = f32[300,32]{1,0:T(8,128)} get-tuple-element(%w), index=1
  ROOT %g = f32[1200,32]{1,0:T(8,128)} all-gather(%y), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
}
"""


def test_tpu_text_trip_count_collectives_padding_and_memory_spaces():
  cost = hlo_cost.hlo_cost(_TPU_TEXT, num_devices=8)
  assert [t for _, t in cost.loops] == [4]  # the constant passed into the fused compare
  s = 300 * 32 * 4  # logical bytes of the f32[300,32] operand
  assert cost.collective_count == {'all-reduce': 4, 'all-gather': 1}
  assert cost.collective_bytes['all-reduce'] == pytest.approx(4 * 2 * 3 / 4 * s)  # groups of 4
  assert cost.collective_bytes['all-gather'] == pytest.approx(3 / 4 * 4 * s)  # groups of 4
  padded = 304 * 128 * 4  # T(8,128): 300 -> 304 rows, 32 -> 128 lanes
  gathered = 1200 * 128 * 4
  cond = 4 * (4 + 4 + 1)  # the fused compare: two s32[] operands and a pred[] result, 4 runs
  # copy: operand + result (the result in VMEM: not HBM); 4 all-reduces: operand + result;
  # the all-gather: operand + result.
  assert cost.bytes_accessed == pytest.approx(2 * padded + 4 * 2 * padded + padded + gathered
                                              + cond)
  assert cost.hbm_bytes == pytest.approx(cost.bytes_accessed - padded)


def test_type_bytes_and_no_entry():
  assert hlo_cost.type_bytes('(bf16[4,8]{1,0}, s32[])') == 4 * 8 * 2 + 4
  assert hlo_cost.type_bytes('f32[3]{0:T(128)}') == 128 * 4
  assert hlo_cost.type_bytes('f32[3]{0:T(128)}', padded=False) == 3 * 4
  with pytest.raises(ValueError, match='no ENTRY'):
    hlo_cost.hlo_cost('HloModule empty')
  assert np.isfinite(hlo_cost.HloCost().total_collective_bytes)


def test_scan_over_stacked_params_is_linear_not_quadratic_in_its_length():
  # Each iteration reads one layer's slice of the stacked params and writes one row of the
  # stacked outputs (in place), as scan_layers does: bytes grow with L, not L^2.
  def cost(n):
    def f(x, w):
      return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi),) * 2, x, w)
    args = (jnp.ones((8, 64), jnp.float32), jnp.ones((n, 64, 64), jnp.float32))
    return hlo_cost.hlo_cost(_compiled(f, *args).as_text()).bytes_accessed

  assert cost(32) / cost(8) == pytest.approx(4, rel=0.1)
