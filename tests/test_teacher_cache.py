"""The teacher cache's format and reader: bit-exact shards, the top-k of the stored targets,
refusal of a cache built for another run, and of a damaged one before use (the builder:
test_cache_teacher.py)."""

import json
import os
import shutil

import numpy as np
import pytest

from flaxdistil.data import teacher_cache
from flaxdistil.storage import integrity
from flaxdistil.training import checkpointing
from flaxdistil.training import setup

from conftest import build_cache
from conftest import cache_config
from conftest import flip_byte


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


def test_features_are_the_top_k_of_the_stored_targets_and_unknown_rows_are_refused(
    built_cache):
  root, m, _ = built_cache
  cache = teacher_cache.TeacherCache(str(root / 'cache'), top_k=4, hidden=True)
  f = cache.features(np.asarray(m['rows'][20:23]))
  assert f['teacher_topk_values'].shape == (3, 32, 4) and f['teacher_hidden'].shape == (3, 32, 32)
  assert np.all(np.diff(f['teacher_topk_values'], axis=-1) <= 0)  # sorted: top-4 of top-V
  with pytest.raises(ValueError, match='not in teacher.cache'):
    cache.features(np.array([max(set(range(636)) - set(m['rows']))]))


def test_mismatched_cache_is_refused(built_cache):
  root, m, _ = built_cache
  cache = teacher_cache.TeacherCache(str(root / 'cache'))
  ok = {k: m[k] for k in teacher_cache.IDENTITY_KEYS}
  cache.check(ok)
  with pytest.raises(ValueError, match=r'built for another run \(data_fingerprint: cache has'):
    cache.check(dict(ok, data_fingerprint='other'))
  with pytest.raises(ValueError, match='exceeds the k='):
    teacher_cache.TeacherCache(str(root / 'cache'), top_k=m['top_k'] + 1)
  # Through the training setup: another teacher (one more layer) is refused with the fix.
  c = cache_config(**{'teacher.cache': str(root / 'cache'), 'teacher.num_hidden_layers': 3,
                      'teacher.cache_top_k': 0})
  with pytest.raises(setup.ConfigError, match='teacher_fingerprint.*cache_teacher'):
    setup.build_run(c, str(root / 'work'))


@pytest.mark.slow
def test_resume_refuses_other_teacher_targets(built_cache):
  """A run started online must not resume from a cache (and vice versa): another objective."""
  root, _, _ = built_cache
  online = setup.build_run(cache_config(), str(root / 'work')).fingerprint
  offline = setup.build_run(cache_config(**{'teacher.cache': str(root / 'cache'),
                                            'teacher.cache_top_k': 8}),
                            str(root / 'work')).fingerprint
  assert online['teacher_targets'] == 'online' and offline['teacher_targets']['top_k'] == 8
  checkpointing.check_compatible(offline, offline)
  with pytest.raises(ValueError, match='teacher_targets'):
    checkpointing.check_compatible(online, offline)


def test_feature_spec_and_planned_manifest_match_the_built_cache(built_cache):
  # What the ahead-of-time compile feeds the offline step is what the reader gives it.
  root, m, c = built_cache
  inter = setup.objective_from_config(c).inter
  planned = teacher_cache.planned_manifest(c, m['teacher_config'], m['top_k'], inter)
  assert planned == {k: m[k] for k in planned}
  kw = {'top_k': 4, 'hidden': True, 'logz': True}
  real = teacher_cache.TeacherCache(str(root / 'cache'), **kw).features(np.asarray(m['rows'][:3]))
  assert {k: (v.shape[1:], v.dtype) for k, v in real.items()} == teacher_cache.feature_spec(m, **kw)


def test_feature_spec_of_intermediate_layers(tmp_path):
  t, k, h, heads, n = 6, 3, 8, 2, 4
  layers = {'hidden_states': [0, 2], 'attentions': [1], 'values': [3]}
  m = {'format_version': teacher_cache.FORMAT_VERSION, 'complete': True, 'top_k': k,
       'max_seq_length': t, 'hidden_size': h, 'values_dtype': 'bfloat16',
       'hidden_dtype': 'float16', 'layers': layers, 'rows_per_shard': 2, 'num_shards': 1,
       'rows': [0, 1], 'data_shape': [2, t], 'index': 'row',
       'teacher_config': {'hidden_size': h, 'num_attention_heads': heads, 'num_hidden_layers': n}}
  r = np.random.default_rng(0)
  arrays = {'row': np.array([0, 1], np.int64),
            'topk_values': r.normal(size=(2, t, k)).astype(teacher_cache._DTYPES['bfloat16']),
            'topk_ids': r.integers(0, 9, (2, t, k)).astype(np.int32),
            'logz': np.zeros((2, t), np.float32), 'hidden': np.zeros((2, t, h), np.float16),
            'hidden_states_0': np.zeros((2, t, h), np.float16),
            'hidden_states_2': np.zeros((2, t, h), np.float16),
            'attentions_1': np.zeros((2, heads, t, t), np.float16),
            'values_3': np.zeros((2, heads, t, h // heads), np.float16)}
  teacher_cache.write_shard(str(tmp_path / teacher_cache.shard_name(0)), arrays)
  with open(tmp_path / teacher_cache.MANIFEST, 'w') as f:
    json.dump(m, f)
  want = {'hidden_states': [0, 2, n], 'attentions': [1], 'values': [3]}  # n: the `hidden` column
  kw = {'hidden': True, 'logz': True, 'layers': want}
  real = teacher_cache.TeacherCache(str(tmp_path), **kw).features(np.array([1, 0]))
  assert {k_: (v.shape[1:], v.dtype) for k_, v in real.items()} == teacher_cache.feature_spec(m, **kw)


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_a_damaged_shard_is_refused_before_use_and_the_fix_rebuilds_only_it(built_cache, tmp_path,
                                                                           damage):
  root, m, _ = built_cache
  out = tmp_path / 'cache'
  shutil.copytree(root / 'cache', out)
  shard = out / teacher_cache.shard_name(1)
  if damage == 'flip':
    flip_byte(shard, -100)  # inside the last record batch: a silently different target
  else:
    with open(shard, 'r+b') as f:
      f.truncate(os.path.getsize(shard) // 2)
  with pytest.raises(integrity.CorruptFileError) as e:
    teacher_cache.TeacherCache(str(out))
  sums = out / integrity.SUMS_FILE
  assert str(e.value).startswith(f'{shard} is corrupt: this teacher cache file (')
  assert str(e.value).endswith(
      f'Delete it (rm {shard} {shard}.sha256 {sums}) and rerun the command that built it (python '
      f'-m flaxdistil.cache_teacher --config ... --out {out}): only that shard is computed again.')
  # Through the training setup the error keeps its type (exit code 5, not a config error).
  c = cache_config(**{'teacher.cache': str(out), 'teacher.cache_top_k': 0})
  with pytest.raises(integrity.CorruptFileError):
    setup.build_run(c, str(root / 'work'))
  for f in (shard, shard.with_name(shard.name + '.sha256'), sums):  # the fix
    os.remove(f)
  rebuilt, _ = build_cache(str(out), str(root / 'work'))
  assert rebuilt['shards_built_this_run'] == 1
  shards = lambda d: {k: v for k, v in integrity.read_sums(str(d)).items() if k.startswith('shard')}
  assert shards(out) == shards(root / 'cache')  # the same bytes as the first build
  teacher_cache.TeacherCache(str(out))  # verified again


def test_a_damaged_manifest_and_unchanged_caches_read_once(built_cache, tmp_path):
  root, _, _ = built_cache
  out = tmp_path / 'cache'
  shutil.copytree(root / 'cache', out)
  first = teacher_cache.TeacherCache(str(out))
  assert first.top_k == first.manifest['top_k']
  # The second open finds every file unchanged (stamps) and hashes nothing.
  report = integrity.verify(str(out), 'x', stamps=True)
  assert report.hashed_bytes == 0 and report.stamped_bytes > 0
  manifest = out / teacher_cache.MANIFEST
  flip_byte(manifest, 20)
  with pytest.raises(integrity.CorruptFileError) as e:
    teacher_cache.TeacherCache(str(out))
  assert str(e.value).startswith(f'{manifest} is corrupt')
  assert f'Delete it (rm {manifest} {out / integrity.SUMS_FILE}) and rerun the command' in str(
      e.value)
  for f in (manifest, out / integrity.SUMS_FILE):  # the fix: the build writes both again
    os.remove(f)
  rebuilt, _ = build_cache(str(out), str(root / 'work'))
  assert rebuilt['shards_built_this_run'] == 0 and rebuilt['complete']
  teacher_cache.TeacherCache(str(out))
