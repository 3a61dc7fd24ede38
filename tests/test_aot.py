"""aot: the abstract step is the train loop's step; the OOM parser, the estimate and the search."""

import jax
import numpy as np
import pytest

from flaxdistil.training import aot
from flaxdistil.training import hlo_cost
from flaxdistil.training import optimizer
from flaxdistil.training import setup
from flaxdistil.training import sharding
from flaxdistil.training import topology
from flaxdistil.training import train_state
from flaxdistil.training import train_step

from conftest import cache_config
from conftest import tiny_config


def _train_loops_lowering(config, workdir):
  """The step as `train.train_and_evaluate` builds and first calls it, lowered (not run)."""
  run = setup.build_run(config, workdir)
  tx, _ = optimizer.make_optimizer(config.optim, config.num_train_steps)
  shard, _ = train_state.state_layout(run.student_config, tx, run.mesh, run.rules, run.projection)
  t_shard = t_params = None
  if run.teacher_params is not None:
    t_shard, _ = sharding.model_param_layout(run.teacher_config, run.mesh, run.teacher_rules)
    t_params = jax.device_put(run.teacher_params, t_shard)
  state = train_state.init_state(run.student_params, tx, jax.random.PRNGKey(config.seed), shard,
                                 proj=run.proj_params)
  step, reads = train_step.jit_run_step(run.student_config, run.teacher_config, tx, run.objective,
                                        config.optim.num_microbatches, shard, t_shard)
  batches = run.train_batches(0)
  host = next(batches)
  batches.close()
  batch = sharding.make_global_batch(host, sharding.batch_sharding(run.mesh, run.rules),
                                     config.data.global_batch_size)
  with sharding.mesh_context(run.mesh, run.rules):
    return step.lower(state, t_params if reads else None, batch), batch


@pytest.mark.parametrize('overrides', [
    {},
    {'optim.num_microbatches': 1, 'mesh.shape': (2, 2, 2), 'distill.vocab_chunk_size': 8,
     'scan_layers': True},
    {'distill.alpha_hidden': 1.0, 'distill.alpha_attn_kl': 1.0, 'student.hidden_size': 16,
     'distill.alpha_cos': 0.0, 'student.init': 'random'},
])
def test_abstract_step_lowers_to_the_train_loops_program(tmp_path, overrides):
  # Same objective, models, mesh, shardings and jit wiring: the same StableHLO, byte for byte.
  config = tiny_config(**overrides)
  want, batch = _train_loops_lowering(config, str(tmp_path))
  spec = aot.build_step(config, jax.devices())
  assert {k: (v.shape, v.dtype, v.sharding) for k, v in batch.items()} == {
      k: (v.shape, v.dtype, v.sharding) for k, v in spec.batch.items()}
  assert aot.lower(spec).as_text() == want.as_text()


@pytest.mark.slow
def test_abstract_offline_step_lowers_to_the_train_loops_program(built_cache):
  # The cached targets' shapes and dtypes come from the cache's manifest; the step reads no
  # teacher params.
  root, _, _ = built_cache
  cfg = cache_config(**{'teacher.cache': str(root / 'cache'), 'teacher.cache_top_k': 0,
                        'optim.num_microbatches': 1})
  want, batch = _train_loops_lowering(cfg, str(root / 'work'))
  spec = aot.build_step(cfg, jax.devices())
  assert spec.teacher is None and 'teacher_topk_values' in spec.batch
  assert {k: (v.shape, v.dtype, v.sharding) for k, v in batch.items()} == {
      k: (v.shape, v.dtype, v.sharding) for k, v in spec.batch.items()}
  assert aot.lower(spec).as_text() == want.as_text()


def test_oom_messages_are_parsed():
  e = aot.parse_oom('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in '
                    'memory space hbm. Used 17.67G of 15.75G hbm. Exceeded hbm capacity by 1.92G.')
  assert e.used_bytes == pytest.approx(17.67 * 2 ** 30) and e.available_bytes == pytest.approx(
      15.75 * 2 ** 30)
  e = aot.parse_oom('RESOURCE_EXHAUSTED: program (17.67G) exceeds available HBM (15.75G)')
  assert e.used_bytes > e.available_bytes
  assert aot.parse_oom('INVALID_ARGUMENT: something else') is None


def test_estimate_is_a_roofline_of_the_program():
  chip = topology.CHIPS['v5e']
  cost = hlo_cost.HloCost(flops=197e12 * 0.010, hbm_bytes=819e9 * 0.004,
                          collective_bytes={'all-reduce': 200e9 * 0.002})
  model = {'tokens_per_step': 8192, 'flops_per_step': 8 * 197e12 * 0.006}
  e = aot.estimate(cost, model, chips=8, chip=chip, num_train_steps=1000)
  assert e['compute_s'] == pytest.approx(0.010) and e['memory_s'] == pytest.approx(0.004)
  assert e['collective_s'] == pytest.approx(0.002)
  assert e['step_time_s'] == pytest.approx(0.012)  # max(compute, memory) + collectives
  assert e['mfu'] == pytest.approx(0.5) and e['tokens_per_s_per_chip'] == pytest.approx(
      8192 / 0.012 / 8)
  assert e['run_hours'] == pytest.approx(12 / 3600)
  assert aot.estimate(cost, model, 8, None, 10) is None


def test_search_finds_the_largest_fitting_power_of_two_and_picks_the_fastest(monkeypatch):
  # A fake compiler: memory per chip linear in the microbatch m (state + activations), over the
  # chip's 16 GiB it does not fit (XLA's message names the bytes); step time falls with m.
  per_m = {(0, False): 1.5, (16, False): 0.4, (0, True): 0.9, (16, True): 0.2}  # GiB per m
  gib, calls = 2 ** 30, []

  def fake(config, target, devices, trip_scale):
    m = config.data.global_batch_size // trip_scale[0] // 8
    key = (int(config.distill.vocab_chunk_size), bool(config.remat))
    calls.append(m)
    mem = (1.0 + per_m[key] * m) * gib
    if mem > 15.75 * gib:
      raise aot.OutOfMemory('RESOURCE_EXHAUSTED', mem, 15.75 * gib)
    t = 1.0 / m + (0.1 if key[1] else 0) + (0.01 if tuple(config.mesh.shape)[1] != 1 else 0)
    return {'memory': {'total': mem},
            'estimate': {'step_time_s': t, 'tokens_per_s_per_chip': 1.0, 'mfu': 0.1}}

  monkeypatch.setattr(aot, 'compile_report', fake)
  target = topology.parse_target('v5e-8')
  devices = [type('D', (), {'process_index': 0, 'device_kind': 'TPU v5 lite'})()] * 8
  res = aot.search(tiny_config(**{'data.global_batch_size': 4096}), target, devices, tensor=0,
                   chunk=16, log=lambda s: None)
  largest = lambda k: 2 ** int(np.log2((15.75 - 1.0) / per_m[k]))  # 8, 32, 16, 64
  got = {(r['layout'], r['vocab_chunk_size'], r['remat']): r['microbatch_per_device']
         for r in res['rows']}
  assert got == {(lay, c, r): largest((c, r)) for lay in ('data', 'fsdp') for c in (0, 16)
                 for r in (False, True)}
  assert res['best']['layout'] == 'data' and res['best']['microbatch_per_device'] == 32
  assert res['flags'] == {'mesh.shape': (-1, 1, 1), 'optim.num_microbatches': 16,
                          'distill.vocab_chunk_size': 16, 'remat': False}
  # Bounded: a handful of compiles per row (512 = 4096 / 8 sequences per device at most).
  assert max(r['compiles'] for r in res['rows']) <= 4 and len(calls) <= 8 * 4
  assert all(r['num_microbatches'] * r['microbatch_per_device'] * 8 == 4096 for r in res['rows'])
