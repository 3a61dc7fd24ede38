"""The teacher-cache builder (`flaxdistil/cache_teacher.py`): the rows a run reads, a complete
manifest, a killed build resumed to identical shards, a build that finds the disk full finished
by the same command, and caches whose targets make an offline run equal the online one (k = V,
float32), with intermediate layers and with the masked input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxdistil import cache_teacher
from flaxdistil.data import teacher_cache
from flaxdistil.storage import integrity
from flaxdistil.training import optimizer
from flaxdistil.training import setup
from flaxdistil.training import sharding
from flaxdistil.training import train_state
from flaxdistil.training import train_step

from conftest import CACHE_RUN
from conftest import ROOT
from conftest import build_cache
from conftest import cache_config
from conftest import small_filesystem
from conftest import subprocess_env


def test_plan_rows_in_reading_order_without_repeats_and_capped():
  # Two epochs of 5 packed rows read 4 per step; step 1 straddles them and holds row 2 twice.
  stream = np.array([3, 0, 4, 1, 2, 4, 2, 0, 3, 1], np.int64)
  row_fn = lambda step: stream[4 * step:4 * step + 4]
  np.testing.assert_array_equal(cache_teacher.plan_rows(row_fn, 1, 4, 5), [3, 0, 4, 1])
  # Steps [0, 2) would be 8 rows: only 5 exist, each once, in the order the run first reads them.
  np.testing.assert_array_equal(cache_teacher.plan_rows(row_fn, 2, 4, 5), [3, 0, 4, 1, 2])
  np.testing.assert_array_equal(cache_teacher.plan_rows(row_fn, 2, 4, 5, num_rows=2), [3, 0])
  np.testing.assert_array_equal(cache_teacher.plan_rows(row_fn, 1, 4, 5, num_rows=99),
                                [3, 0, 4, 1, 2])
  assert cache_teacher.plan_rows(row_fn, 0, 4, 5).shape == (0,)


def _shard_bytes(d):
  return {f: open(os.path.join(d, f), 'rb').read() for f in sorted(os.listdir(d))
          if f.startswith('shard-') and f.endswith('.arrow')}


@pytest.mark.slow
def test_build_writes_a_complete_manifest(built_cache):
  root, m, c = built_cache
  assert m['complete'] and m['num_shards'] == 3 and len(m['rows']) == 3 * 16
  assert m['top_k'] == m['teacher_config']['vocab_size'] and c.teacher.cache_top_k == 0
  assert m['values_dtype'] == 'float32'
  assert m['bytes'] == sum(len(b) for b in _shard_bytes(str(root / 'cache')).values())


@pytest.mark.slow
def test_killed_build_resumes_to_an_identical_cache(built_cache, tmp_path, monkeypatch):
  root, full, _ = built_cache
  real_write, calls = teacher_cache.write_shard, []

  def dying_write(path, arrays):
    calls.append(path)
    if len(calls) == 2:  # killed while writing the second shard: a stray temporary file
      open(os.path.join(os.path.dirname(path), '.tmp_dead.arrow'), 'wb').write(b'partial')
      raise KeyboardInterrupt
    return real_write(path, arrays)

  monkeypatch.setattr(teacher_cache, 'write_shard', dying_write)
  out = str(tmp_path / 'cache')
  with pytest.raises(KeyboardInterrupt):
    build_cache(out, str(root / 'work'))
  assert not json.load(open(os.path.join(out, 'manifest.json')))['complete']
  with pytest.raises(ValueError, match='unfinished build'):
    teacher_cache.TeacherCache(out)
  monkeypatch.setattr(teacher_cache, 'write_shard', real_write)
  resumed, _ = build_cache(out, str(root / 'work'))
  assert resumed['shards_built_this_run'] == 2
  assert _shard_bytes(out) == _shard_bytes(str(root / 'cache'))
  timing = ('build_seconds', 'shards_built_this_run')
  assert {k: v for k, v in resumed.items() if k not in timing} == {
      k: v for k, v in full.items() if k not in timing}


def _step_metrics(root, over: dict, start_step: int = 0, steps: int = 2) -> list:
  """Metrics of `steps` train steps from `start_step` with the loop's pieces (build_run,
  state_layout, jit_train_step, BatchIterator with the cache hook, make_global_batch) on
  `cache_config(**over)`."""
  c = cache_config(**over)
  run = setup.build_run(c, str(root / 'work'))
  tx, _ = optimizer.make_optimizer(c.optim, c.num_train_steps)
  shard, _ = train_state.state_layout(run.student_config, tx, run.mesh, run.rules, run.projection)
  t_params = t_shard = None
  if not run.objective.offline:
    t_shard, _ = sharding.model_param_layout(run.teacher_config, run.mesh, run.teacher_rules)
    t_params = jax.device_put(run.teacher_params, t_shard)
  step = train_step.jit_train_step(
      train_step.make_train_step(run.student_model, run.teacher_model, tx, run.objective,
                                 c.optim.num_microbatches), shard, t_shard)
  state = train_state.init_state(run.student_params, tx, jax.random.PRNGKey(c.seed), shard,
                                 proj=run.proj_params)
  b_shard = sharding.batch_sharding(run.mesh, run.rules)
  out = []
  with sharding.mesh_context(run.mesh, run.rules), run.train_batches(start_step) as batches:
    for _ in range(steps):
      b = next(batches)
      state, metrics = step(state, t_params,
                            sharding.make_global_batch(b, b_shard, b['input_ids'].shape[0]))
      out.append(jax.device_get(metrics))
  return out


@pytest.mark.slow
@pytest.mark.parametrize('max_predictions', [0, 6])
def test_offline_run_at_k_equal_vocab_equals_online_run_with_original_input(built_cache,
                                                                            max_predictions):
  """The loop's pieces (`_step_metrics`), 2 steps."""
  root, _, _ = built_cache
  over = {'distill.restrict_ce_to_mask': bool(max_predictions),
          'distill.max_predictions_per_seq': max_predictions, 'optim.num_microbatches': 1}

  online = _step_metrics(root, {**over, 'distill.teacher_input': 'original'})
  offline = _step_metrics(root, {**over, 'teacher.cache': str(root / 'cache'),
                                 'teacher.cache_top_k': 0})
  for a, b in zip(online, offline):
    for k in ('loss', 'loss_ce', 'loss_mlm', 'loss_cos', 'grad_norm'):
      # atol: loss_ce near 0.008 differs by float32 summation order alone (2e-7 seen, rtol 2.5e-5)
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=k)
  if max_predictions:  # today's default, the teacher seeing the masked input, is another objective
    masked = _step_metrics(root, over)
    assert not np.isclose(masked[0]['loss_ce'], online[0]['loss_ce'], rtol=1e-2)


_INTER = {'distill.alpha_emb': 1.0, 'distill.alpha_hidden': 1.0, 'distill.alpha_attn_score': 0.5,
          'distill.alpha_attn_kl': 1.0, 'distill.alpha_value_kl': 1.0}


@pytest.mark.slow
def test_intermediate_layers_cached_equal_the_online_teacher_and_missing_ones_are_refused(
    built_cache):
  """TinyBERT + MiniLM terms from a cache (k = V, float32) equal online with the unmasked input."""
  root, _, _ = built_cache
  c = cache_config(**_INTER, **{'teacher.cache_top_k': 0, 'teacher.cache_hidden_layers': (1,)})
  m = cache_teacher.build(c, str(root / 'cache_inter'), str(root / 'work'), rows_per_shard=16,
                          batch_size=8)
  # uniform map of 2 student onto 4 teacher layers: [1, 3]; hidden_states[4] is the `hidden` column
  assert m['layers'] == {'hidden_states': [0, 1, 2], 'attention_scores': [1, 3],
                         'attentions': [3], 'values': [3]}
  cache = teacher_cache.TeacherCache(str(root / 'cache_inter'), hidden=True,
                                     layers={'hidden_states': [1, 4], 'values': [3]})
  f = cache.features(np.asarray(m['rows'][:3]))
  assert f['teacher_values_3'].shape == (3, 4, 32, 8)
  np.testing.assert_array_equal(f['teacher_hidden_states_4'], f['teacher_hidden'])

  inter = {**_INTER, 'optim.num_microbatches': 2}
  online = _step_metrics(root, {**inter, 'distill.teacher_input': 'original'})
  offline = _step_metrics(root, {**inter, 'teacher.cache': str(root / 'cache_inter'),
                                  'teacher.cache_top_k': 0})
  for a, b in zip(online, offline):
    for k in ('loss', 'loss_ce', 'loss_cos', 'loss_emb', 'loss_hidden', 'loss_attn_score',
              'loss_attn_kl', 'loss_value_kl', 'grad_norm'):
      np.testing.assert_allclose(b[k], a[k], rtol=5e-5, err_msg=k)
  # the first cache stores no intermediate layers: a run reading them is refused with the fix
  with pytest.raises(setup.ConfigError, match=r'hidden_states\[0\].*rebuild the cache'):
    setup.build_run(cache_config(**_INTER, **{'teacher.cache': str(root / 'cache'),
                                              'teacher.cache_top_k': 0}), str(root / 'work'))


@pytest.mark.slow
@pytest.mark.parametrize('max_predictions', [0, 6])
def test_masked_input_cache_equals_the_default_online_run_and_refuses_another_masking(
    built_cache, max_predictions):
  """`cache_teacher_input='masked'`: the teacher on the run's own masked stream, stored per
  sample; at k = V an offline run equals online KD with the teacher on the masked input (the HF
  distiller's objective, `teacher_input='masked'`), and a run with another masking is refused."""
  root, _, _ = built_cache
  over = {'distill.restrict_ce_to_mask': bool(max_predictions),
          'distill.max_predictions_per_seq': max_predictions, 'optim.num_microbatches': 2,
          'teacher.cache_teacher_input': 'masked', 'teacher.cache_top_k': 0}
  out = str(root / f'cache_masked_{max_predictions}')
  m = cache_teacher.build(cache_config(**over), out, str(root / 'work'), rows_per_shard=20,
                          batch_size=8)
  assert m['index'] == 'sample' and m['rows'] == list(range(3 * 16)) and m['num_shards'] == 3

  # from step 1: samples 16..47, across shards
  online = _step_metrics(root, {**over, 'distill.teacher_input': 'masked'}, start_step=1)
  offline = _step_metrics(root, {**over, 'teacher.cache': out}, start_step=1)
  for a, b in zip(online, offline):  # float rounding: loss_ce ~3e-3 here differs by ~1e-7
    for k in ('loss', 'loss_ce', 'loss_mlm', 'loss_cos', 'grad_norm'):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-7, err_msg=k)
  with pytest.raises(setup.ConfigError,
                     match='another masked stream.*mlm_probability: cache 0.15, run 0.2'):
    setup.build_run(cache_config(**over, **{'teacher.cache': out, 'distill.mlm_probability': 0.2}),
                    str(root / 'work'))


def _cli_build(out, workdir):
  """The cache of `build_cache` (k = V, float32, 16 rows a shard) by the command line."""
  flags = [f'--config.{k}={v}' for k, v in CACHE_RUN.items()] + ['--config.teacher.cache_top_k=0']
  return subprocess.run(
      [sys.executable, '-m', 'flaxdistil.cache_teacher', '--config', 'configs/tiny.py', *flags,
       '--out', str(out), '--build_workdir', str(workdir), '--rows_per_shard=16', '--batch_size=8'],
      cwd=ROOT, env=subprocess_env(2), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_disk_full_during_a_build_then_the_same_command_finishes_an_identical_cache(tmp_path):
  ref = _cli_build(tmp_path / 'ref', tmp_path / 'work')
  assert ref.returncode == 0, ref.stderr[-3000:]
  shard = os.path.getsize(tmp_path / 'ref' / teacher_cache.shard_name(0))
  with small_filesystem(tmp_path / 'fs', int(1.6 * shard)) as fs:  # one shard fits, not two
    out = tmp_path / 'fs' / 'cache'
    r = _cli_build(out, tmp_path / 'work')
    assert r.returncode == 4, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
    assert len(errors) == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith(f'error: No space left on device writing the teacher cache in '
                                f'{out}: it needs about '), errors[0]
    assert errors[0].endswith('rerun the same command: finished shards are kept and the build '
                              'goes on with the missing ones.')
    assert not json.load(open(out / 'manifest.json'))['complete']
    assert not [f for f in os.listdir(out) if f.startswith('.tmp_')]  # nothing half-written
    done = sorted(f for f in os.listdir(out) if f.endswith('.arrow'))
    assert done == [teacher_cache.shard_name(0)]
    fs.resize(64 << 20)
    r = _cli_build(out, tmp_path / 'work')
    assert r.returncode == 0, r.stderr[-3000:]
    shards = lambda d: {k: v for k, v in integrity.read_sums(str(d)).items()
                        if k.startswith('shard')}
    assert shards(out) == shards(tmp_path / 'ref')  # bit-identical to the uninterrupted build
    assert len(shards(out)) == 3
    teacher_cache.TeacherCache(str(out))
