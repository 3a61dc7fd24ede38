"""Offline distillation: sparse KL properties, cache round trip, exactness, resume, refusal."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from flaxdistil import losses
from flaxdistil import setup
from flaxdistil import teacher_cache
from flaxdistil import train_step


def _logits(seed, v=40, scale=3.0):
  r = np.random.default_rng(seed)
  return (r.normal(size=(2, 5, v)) * scale).astype(np.float32)


def _np_kl(p_logits, q_logits, t):
  lp = jax.nn.log_softmax(p_logits / t, -1)
  lq = jax.nn.log_softmax(q_logits / t, -1)
  return np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))


@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0])
@pytest.mark.parametrize('tail_bucket', [False, True])
def test_sparse_kl_with_k_equal_vocab_is_the_dense_kl(temperature, tail_bucket):
  s, t = _logits(0), _logits(1)
  w = np.ones((2, 5), np.float32)
  w[1, 3:] = 0  # padding
  logz = jax.nn.logsumexp(t / temperature, -1)
  dense = losses.kl_div_loss(s, t, w, temperature)
  for k in (t.shape[-1],) + ((t.shape[-1] - 1,) if tail_bucket else ()):
    # k = V - 1 with the tail bucket: the bucket is the one remaining token, again the dense KL.
    values, ids = jax.lax.top_k(t, k)
    sparse = losses.sparse_kl_div_loss(s, values, ids, w, temperature, tail_bucket, logz)
    np.testing.assert_allclose(sparse[0], dense[0], rtol=1e-5, err_msg=f'k={k}')
    assert sparse[1] == dense[1] == 8


@pytest.mark.parametrize('k', [1, 3, 10])
def test_sparse_kl_is_nonnegative_normalises_student_over_full_vocab_and_scales_by_t2(k):
  temperature = 2.0
  for seed in range(5):
    s, t = _logits(2 * seed), _logits(2 * seed + 1)
    w = np.ones((2, 5), np.float32)
    values, ids = jax.lax.top_k(t, k)
    logz = jax.nn.logsumexp(t / temperature, -1)
    plain = losses.sparse_kl_div_loss(s, values, ids, w, temperature)[0]
    tail = losses.sparse_kl_div_loss(s, values, ids, w, temperature, True, logz)[0]
    assert plain >= 0 and tail >= 0
    # Reference, written out: p = teacher softmax over its top-k, log q = student log-softmax
    # over all V gathered at the top-k ids (NOT renormalised over the top-k: the peer bug).
    p = jax.nn.softmax(values / temperature, -1)
    logq = jnp.take_along_axis(jax.nn.log_softmax(s / temperature, -1), ids, -1)
    ref = float(jnp.sum(p * (jnp.log(p) - logq))) * temperature ** 2
    np.testing.assert_allclose(plain, ref, rtol=1e-5)
    renormalised_student = float(jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(logq, -1))))
    if k < 10:  # the buggy variant misses -log(sum_j q_j) > 0
      assert plain / temperature ** 2 > renormalised_student + 1e-3
  # A student equal to the teacher: tail-bucket KL is 0; T^2 factor on the plain KL.
  t = _logits(7)
  values, ids = jax.lax.top_k(t, 5)
  w = np.ones((2, 5), np.float32)
  logz = jax.nn.logsumexp(t / 3.0, -1)
  assert abs(float(losses.sparse_kl_div_loss(t, values, ids, w, 3.0, True, logz)[0])) < 1e-4
  at1 = losses.sparse_kl_div_loss(s, values, ids, w, 1.0)[0]
  p = jax.nn.softmax(values, -1)
  logq = jnp.take_along_axis(jax.nn.log_softmax(s, -1), ids, -1)
  np.testing.assert_allclose(at1, float(jnp.sum(p * (jnp.log(p) - logq))), rtol=1e-5)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16', 'float32'])
def test_shard_round_trip_is_bit_exact(tmp_path, dtype):
  r = np.random.default_rng(0)
  dt = teacher_cache._DTYPES[dtype]
  arrays = {'row': np.array([5, 2, 9], np.int64),
            'topk_values': (r.normal(size=(3, 4, 6)) * 10).astype(dt),
            'topk_ids': r.integers(0, 30522, (3, 4, 6)).astype(np.int32),
            'logz': r.normal(size=(3, 4)).astype(np.float32),
            'hidden': r.normal(size=(3, 4, 8)).astype(dt)}
  path = str(tmp_path / 'shard.arrow')
  teacher_cache.write_shard(path, arrays)
  back = teacher_cache.read_shard(
      path, {'topk_values': (4, 6), 'topk_ids': (4, 6), 'logz': (4,), 'hidden': (4, 8)},
      {'topk_values': dt, 'topk_ids': np.int32, 'logz': np.float32, 'hidden': dt})
  for k, v in arrays.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    assert back[k].tobytes() == v.tobytes(), k
  assert not [f for f in os.listdir(tmp_path) if f.startswith('.tmp_')]


def _config(**over):
  c = tiny.get_config()
  c.log_every_steps = 1
  c.num_train_steps = 3
  c.eval_every_steps = 0
  c.data.eval_num_sequences = 16
  c.teacher.cache_values_dtype = 'float32'
  c.teacher.cache_hidden_dtype = 'float32'
  for k, v in over.items():
    group, key = k.split('.') if '.' in k else (None, k)
    (c[group] if group else c)[key] = v
  return c


def _build(out, workdir, **kw):
  c = _config(**{'teacher.cache_top_k': 0})  # k = V
  return teacher_cache.build(c, out, workdir, rows_per_shard=16, batch_size=8, **kw), c


def _shard_bytes(d):
  return {f: open(os.path.join(d, f), 'rb').read() for f in sorted(os.listdir(d))
          if f.startswith('shard-')}


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('cache')
  m, c = _build(str(root / 'cache'), str(root / 'work'))
  return root, m, c


def test_build_writes_a_complete_manifest(built):
  root, m, c = built
  assert m['complete'] and m['num_shards'] == 3 and len(m['rows']) == 3 * 16
  assert m['top_k'] == m['teacher_config']['vocab_size'] and c.teacher.cache_top_k == 0
  assert m['values_dtype'] == 'float32'
  assert m['bytes'] == sum(len(b) for b in _shard_bytes(str(root / 'cache')).values())
  cache = teacher_cache.TeacherCache(str(root / 'cache'), top_k=4, hidden=True)
  f = cache.features(np.asarray(m['rows'][20:23]))
  assert f['teacher_topk_values'].shape == (3, 32, 4) and f['teacher_hidden'].shape == (3, 32, 32)
  assert np.all(np.diff(f['teacher_topk_values'], axis=-1) <= 0)  # sorted: top-4 of top-V
  with pytest.raises(ValueError, match='not in teacher.cache'):
    cache.features(np.array([max(set(range(636)) - set(m['rows']))]))


def test_killed_build_resumes_to_an_identical_cache(built, tmp_path, monkeypatch):
  root, full, _ = built
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
    _build(out, str(root / 'work'))
  assert not json.load(open(os.path.join(out, 'manifest.json')))['complete']
  with pytest.raises(ValueError, match='unfinished build'):
    teacher_cache.TeacherCache(out)
  monkeypatch.setattr(teacher_cache, 'write_shard', real_write)
  resumed, _ = _build(out, str(root / 'work'))
  assert resumed['shards_built_this_run'] == 2
  assert _shard_bytes(out) == _shard_bytes(str(root / 'cache'))
  timing = ('build_seconds', 'shards_built_this_run')
  assert {k: v for k, v in resumed.items() if k not in timing} == {
      k: v for k, v in full.items() if k not in timing}


def test_mismatched_cache_is_refused(built, tmp_path):
  root, m, _ = built
  cache = teacher_cache.TeacherCache(str(root / 'cache'))
  ok = {k: m[k] for k in teacher_cache.IDENTITY_KEYS}
  cache.check(ok)
  with pytest.raises(ValueError, match=r'built for another run \(data_fingerprint: cache has'):
    cache.check(dict(ok, data_fingerprint='other'))
  with pytest.raises(ValueError, match='exceeds the k='):
    teacher_cache.TeacherCache(str(root / 'cache'), top_k=m['top_k'] + 1)
  # Through the training setup: another teacher (one more layer) is refused with the fix.
  c = _config(**{'teacher.cache': str(root / 'cache'), 'teacher.num_hidden_layers': 3,
                 'teacher.cache_top_k': 0})
  with pytest.raises(setup.ConfigError, match='teacher_fingerprint.*cache_teacher'):
    setup.build_run(c, str(root / 'work'))


def _step_metrics(root, over: dict, start_step: int = 0, steps: int = 2) -> list:
  """Metrics of `steps` train steps from `start_step` with the loop's pieces (build_run,
  make_train_step, BatchIterator with the cache hook) on `_config(**over)`."""
  c = _config(**over)
  run = setup.build_run(c, str(root / 'work'))
  tx, _ = train_step.make_optimizer(c.optim, c.num_train_steps)
  step = jax.jit(train_step.make_train_step(
      run.student_model, run.teacher_model, tx, run.weights, c.optim.num_microbatches,
      max_predictions_per_seq=c.distill.max_predictions_per_seq, inter=run.inter,
      offline=run.offline, teacher_input=c.distill.teacher_input))
  state = train_step.init_state(run.student_params, tx, jax.random.PRNGKey(c.seed),
                                proj=run.proj_params)
  out = []
  with run.train_batches(start_step) as batches:
    for _ in range(steps):
      state, metrics = step(state, None if run.offline else run.teacher_params, next(batches))
      out.append(jax.device_get(metrics))
  return out


@pytest.mark.parametrize('max_predictions', [0, 6])
def test_offline_run_at_k_equal_vocab_equals_online_run_with_original_input(built, max_predictions):
  """The loop's pieces (build_run, make_train_step, BatchIterator with the cache hook), 2 steps."""
  root, _, _ = built
  over = {'distill.restrict_ce_to_mask': bool(max_predictions),
          'distill.max_predictions_per_seq': max_predictions, 'optim.num_microbatches': 1}

  online = _step_metrics(root, {**over, 'distill.teacher_input': 'original'})
  offline = _step_metrics(root, {**over, 'teacher.cache': str(root / 'cache'),
                                 'teacher.cache_top_k': 0})
  for a, b in zip(online, offline):
    for k in ('loss', 'loss_ce', 'loss_mlm', 'loss_cos', 'grad_norm'):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=k)
  if max_predictions:  # today's default, the teacher seeing the masked input, is another objective
    masked = _step_metrics(root, over)
    assert not np.isclose(masked[0]['loss_ce'], online[0]['loss_ce'], rtol=1e-2)


_INTER = {'distill.alpha_emb': 1.0, 'distill.alpha_hidden': 1.0, 'distill.alpha_attn_score': 0.5,
          'distill.alpha_attn_kl': 1.0, 'distill.alpha_value_kl': 1.0}


def test_intermediate_layers_cached_equal_the_online_teacher_and_missing_ones_are_refused(built):
  """TinyBERT + MiniLM terms from a cache (k = V, float32) equal online with the unmasked input."""
  root, _, _ = built
  c = _config(**_INTER, **{'teacher.cache_top_k': 0, 'teacher.cache_hidden_layers': (1,)})
  m = teacher_cache.build(c, str(root / 'cache_inter'), str(root / 'work'), rows_per_shard=16,
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
    setup.build_run(_config(**_INTER, **{'teacher.cache': str(root / 'cache'),
                                          'teacher.cache_top_k': 0}), str(root / 'work'))


def test_resume_refuses_other_teacher_targets(built):
  """A run started online must not resume from a cache (and vice versa): another objective."""
  from flaxdistil import checkpointing  # pylint: disable=g-import-not-at-top
  root, _, _ = built
  online = setup.build_run(_config(), str(root / 'work')).fingerprint
  offline = setup.build_run(_config(**{'teacher.cache': str(root / 'cache'),
                                       'teacher.cache_top_k': 8}), str(root / 'work')).fingerprint
  assert online['teacher_targets'] == 'online' and offline['teacher_targets']['top_k'] == 8
  checkpointing.check_compatible(offline, offline)
  with pytest.raises(ValueError, match='teacher_targets'):
    checkpointing.check_compatible(online, offline)


@pytest.mark.parametrize('max_predictions', [0, 6])
def test_masked_input_cache_equals_the_default_online_run_and_refuses_another_masking(
    built, max_predictions):
  """`cache_teacher_input='masked'`: the teacher on the run's own masked stream, stored per
  sample; at k = V an offline run equals online KD with the teacher on the masked input (the HF
  distiller's objective, `teacher_input='masked'`), and a run with another masking is refused."""
  root, _, _ = built
  over = {'distill.restrict_ce_to_mask': bool(max_predictions),
          'distill.max_predictions_per_seq': max_predictions, 'optim.num_microbatches': 2,
          'teacher.cache_teacher_input': 'masked', 'teacher.cache_top_k': 0}
  out = str(root / f'cache_masked_{max_predictions}')
  m = teacher_cache.build(_config(**over), out, str(root / 'work'), rows_per_shard=20,
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
    setup.build_run(_config(**over, **{'teacher.cache': out, 'distill.mlm_probability': 0.2}),
                    str(root / 'work'))
