"""Checkpoints: refusing an incompatible resume field by field, falling back past an unreadable
step, checksums written after each save and a damaged step refused with the fix, the student of a
sharded run restored onto one device, and the JSON metadata alone."""

import dataclasses
import glob
import os

import jax
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.objectives import intermediate
from flaxdistil.storage import integrity
from flaxdistil.storage import space
from flaxdistil.training import checkpointing
from flaxdistil.training import sharding

from conftest import flip_byte
from conftest import small_filesystem

ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
SCFG = bert.ModelConfig(model_type='distilbert', vocab_size=50, hidden_size=16,
                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16)


def _student_config(cfg):
  """The fingerprint's `student_config`, as setup writes it."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in bert.COMPUTE_FIELDS}


# ----------------------------------------------------------------------------- check_compatible

FINGERPRINT = {'student_config': {'hidden_size': 16, 'num_hidden_layers': 2},
               'global_batch_size': 8, 'max_seq_length': 32, 'seed': 0,
               'train_data': {'files': ['a.txt'], 'rows': 100}, 'teacher_targets': 'online'}


def test_check_compatible_names_each_changed_field_with_both_values():
  checkpointing.check_compatible(FINGERPRINT, dict(FINGERPRINT))
  # Key order inside a field does not matter; fields not in the fingerprint may change.
  checkpointing.check_compatible(FINGERPRINT, dict(
      FINGERPRINT, train_data={'rows': 100, 'files': ['a.txt']}, num_train_steps=99))
  # A field only one side has (an older checkpoint) is not a change.
  checkpointing.check_compatible({k: v for k, v in FINGERPRINT.items() if k != 'seed'},
                                 FINGERPRINT)
  changed = dict(FINGERPRINT, global_batch_size=16, seed=1,
                 student_config={'hidden_size': 16, 'num_hidden_layers': 3})
  with pytest.raises(ValueError) as e:
    checkpointing.check_compatible(FINGERPRINT, changed)
  msg = str(e.value)
  assert msg.startswith('Refusing to resume')
  assert '  global_batch_size: checkpoint has 8, config now has 16' in msg
  assert '  seed: checkpoint has 0, config now has 1' in msg
  assert ("  student_config: checkpoint has {'hidden_size': 16, 'num_hidden_layers': 2}, "
          "config now has {'hidden_size': 16, 'num_hidden_layers': 3}") in msg
  assert 'max_seq_length' not in msg and 'train_data' not in msg  # unchanged: not listed
  assert msg.endswith('start a new run in a fresh --workdir.')


# ----------------------------------------------------------------------------- restore_latest

def _save_steps(workdir, steps):
  manager = checkpointing.make_manager(workdir, async_save=False)
  for s in steps:
    checkpointing.save(manager, s, {'x': np.full((4,), s, np.float32), 'step': np.int32(s)},
                       {'data_position': s})
  manager.wait_until_finished()


def _abstract():
  return {'x': jax.ShapeDtypeStruct((4,), np.float32, sharding=ONE),
          'step': jax.ShapeDtypeStruct((), np.int32, sharding=ONE)}


def _corrupt(workdir, step):
  """Overwrites every array chunk of `step`'s state with garbage (bit rot, a torn copy)."""
  files = glob.glob(os.path.join(checkpointing.checkpoint_dir(workdir), str(step), 'state', '**',
                                 'd', '*'), recursive=True)
  assert files
  for f in files:
    with open(f, 'wb') as fh:
      fh.write(b'garbage')


# Orbax leaves an unawaited coroutine behind when a read fails: its noise, not ours.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_restore_latest_falls_back_past_an_unreadable_newest_step(tmp_path, caplog):
  wd = str(tmp_path)
  assert checkpointing.restore_latest(checkpointing.make_manager(wd, async_save=False),
                                      _abstract()) is None  # no checkpoint yet
  _save_steps(wd, [1, 2, 3])
  manager = checkpointing.make_manager(wd, read_only=True, async_save=False)
  state, meta = checkpointing.restore_latest(manager, _abstract())
  assert int(state['step']) == 3 and meta == {'data_position': 3}
  state, meta = checkpointing.restore_latest(manager, _abstract(), step=2)
  np.testing.assert_array_equal(state['x'], [2, 2, 2, 2])
  assert state['x'].sharding == ONE
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 7 .* steps: \[1, 2, 3\]'):
    checkpointing.restore_latest(manager, _abstract(), step=7)

  _corrupt(wd, 3)
  caplog.set_level('WARNING')
  state, meta = checkpointing.restore_latest(manager, _abstract())
  assert int(state['step']) == 2 and meta == {'data_position': 2}
  np.testing.assert_array_equal(state['x'], [2, 2, 2, 2])
  assert 'Fell back to checkpoint step 2' in caplog.text
  _corrupt(wd, 2)
  _corrupt(wd, 1)
  with pytest.raises(RuntimeError, match='No readable checkpoint') as e:
    checkpointing.restore_latest(manager, _abstract())
  assert all(f'({s}, ' in str(e.value) for s in (1, 2, 3))  # each step's error is listed


# ----------------------------------------------------------------------------- checksums

def _checkpoints(workdir, steps, async_save=False):
  """`Checkpoints` (the train loop's saver) over `steps`, each state `x = [s, s, s, s]`."""
  ckpts = checkpointing.Checkpoints(
      checkpointing.make_manager(workdir, async_save=async_save), state_bytes=20)
  for s in steps:
    ckpts.save(s, {'x': np.full((4,), s, np.float32), 'step': np.int32(s)}, {'data_position': s})
    ckpts.poll()
  ckpts.wait()
  return ckpts


@pytest.mark.parametrize('async_save', [False, True])
def test_saves_get_checksums_and_a_damaged_step_is_refused_with_the_fix(tmp_path, async_save):
  wd = str(tmp_path)
  _checkpoints(wd, [1, 2], async_save)
  root = checkpointing.checkpoint_dir(wd)
  for s in (1, 2):  # every file of the step, written once Orbax finalised it
    sums = integrity.read_sums(os.path.join(root, str(s)))
    assert sorted(sums) == integrity.files_under(os.path.join(root, str(s)))
    assert 'meta/metadata' in sums and any(n.startswith('state/') for n in sums)
  manager = checkpointing.make_manager(wd, read_only=True, async_save=False)
  state, _ = checkpointing.restore_latest(manager, _abstract())
  assert int(state['step']) == 2
  data = sorted(glob.glob(os.path.join(root, '2', 'state', '**', 'd', '*'), recursive=True))[0]
  flip_byte(data, -10)
  with pytest.raises(integrity.CorruptFileError) as e:  # no fallback: refused, with the fix
    checkpointing.restore_latest(manager, _abstract())
  assert str(e.value).startswith(f'{data} is corrupt: this checkpoint file (')
  assert str(e.value).endswith(
      f'Checkpoint step 2 is damaged: delete that step (rm -r {root}/2); the newest older '
      'checkpoint is step 1 (a rerun of the training command resumes from it; export it with '
      '--step 1).')
  flip_byte(os.path.join(root, '1', 'meta', 'metadata'), 2)  # metadata, read alone by export
  with pytest.raises(integrity.CorruptFileError, match=r'1/meta/metadata is corrupt.*there is no '
                     r'older checkpoint \(a rerun starts from step 0\)'):
    checkpointing.read_meta(wd, step=1)


def test_a_save_that_finds_the_disk_full_names_the_need_and_keeps_the_previous_step(tmp_path):
  wd = tmp_path / 'w'
  root = checkpointing.checkpoint_dir(str(wd))
  big = lambda s: {'x': np.random.default_rng(s).random(1 << 16, np.float32),  # 256 KiB that
                   'step': np.int32(s)}  # does not compress
  with small_filesystem(root, 400 << 10):  # room for one step
    ckpts = checkpointing.Checkpoints(checkpointing.make_manager(str(wd), async_save=False),
                                      state_bytes=1 << 18)
    ckpts.save(1, big(1), {})
    with pytest.raises(space.DiskFullError) as e:
      ckpts.save(2, big(2), {})
    assert str(e.value).startswith(f'No space left on device writing checkpoint step 2 in {root}: '
                                   'it needs about ')
    assert str(e.value).endswith('rerun the same command: it resumes from step 1 (the newest '
                                 'complete checkpoint, intact), and repeats the steps since.')
    assert 200 << 10 < e.value.needed < 300 << 10  # the size of step 1 on disk (compressed)
    assert checkpointing.complete_steps(str(wd)) == [1]
    integrity.verify(os.path.join(root, '1'), 'intact')


def test_a_step_without_checksums_is_restored_unverified(tmp_path, caplog):
  wd = str(tmp_path)
  _save_steps(wd, [3])  # the bare Orbax save: as a step saved before checksums existed
  caplog.set_level('WARNING')
  state, _ = checkpointing.restore_latest(
      checkpointing.make_manager(wd, read_only=True, async_save=False), _abstract())
  assert int(state['step']) == 3 and 'has no SHA256SUMS' in caplog.text
  assert checkpointing.resume_hint(wd) == (
      f'They resume from step 3, the newest complete checkpoint in '
      f'{checkpointing.checkpoint_dir(wd)}, and repeat the steps since.')


# ----------------------------------------------------------------------------- the student alone

def _save_sharded_run(workdir, proj=None):
  """A step-5 state of SCFG sharded over all 8 devices, saved as the train loop saves it."""
  import optax  # pylint: disable=g-import-not-at-top

  from flaxdistil.training import train_state  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh((2, 2, 2), sharding.DEFAULT_MESH_AXES)
  tx = optax.adamw(1e-3)
  params = jax.device_get(bert.init_params(SCFG, jax.random.PRNGKey(0)))
  projection = None if proj is None else (16, 32)
  shard, _ = train_state.state_layout(SCFG, tx, mesh, sharding.DEFAULT_LOGICAL_AXIS_RULES,
                                      projection)
  state = train_state.init_state(params, tx, jax.random.PRNGKey(1), shard, proj=proj)
  state['step'] = jax.device_put(np.int32(5), shard['step'])
  w = state['params']['encoder']['layer_0']['intermediate']['kernel']
  assert len({str(s.index) for s in w.addressable_shards}) == 4  # really sharded (fsdp x tensor)
  manager = checkpointing.make_manager(workdir, async_save=False)
  checkpointing.save(manager, 5, state, {'fingerprint': {'student_config': _student_config(SCFG),
                                                         'projection': projection}})
  manager.wait_until_finished()
  return params


def test_load_student_of_a_sharded_run_onto_one_device(tmp_path):
  wd = str(tmp_path / 'run')
  params = _save_sharded_run(wd)
  scfg, got, meta, step = checkpointing.load_student(wd)
  assert scfg == SCFG and step == 5 and meta['fingerprint']['projection'] is None
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert isinstance(a, np.ndarray)  # host arrays, whatever the writer's mesh
    np.testing.assert_array_equal(a, b)
  assert checkpointing.load_student_with_projection(wd)[2] is None
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 3 .*available steps: \[5\]'):
    checkpointing.load_student(wd, step=3)
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    checkpointing.load_student(str(tmp_path / 'empty'))


def test_load_student_with_projection(tmp_path):
  wd = str(tmp_path / 'run')
  proj = jax.device_get(intermediate.init_projection_params(jax.random.PRNGKey(2), 16, 32))
  params = _save_sharded_run(wd, proj=proj)
  scfg, got, got_proj, meta, step = checkpointing.load_student_with_projection(wd)
  assert step == 5 and meta['fingerprint']['projection'] == [16, 32]
  jax.tree.map(np.testing.assert_array_equal, got, params)
  jax.tree.map(np.testing.assert_array_equal, got_proj, proj)


def test_read_meta_reads_the_newest_or_a_given_step_without_arrays(tmp_path):
  wd = str(tmp_path)
  assert checkpointing.read_meta(wd) is None  # no checkpoints directory
  _save_steps(wd, [1, 2])
  assert checkpointing.read_meta(wd) == {'data_position': 2}
  assert checkpointing.read_meta(wd, step=1) == {'data_position': 1}
  assert checkpointing.read_meta(wd, step=4) is None
  # A newer step directory without metadata (a save cut short) is skipped, as are other entries.
  os.makedirs(os.path.join(checkpointing.checkpoint_dir(wd), '3', 'state'))
  os.makedirs(os.path.join(checkpointing.checkpoint_dir(wd), '9.orbax-checkpoint-tmp-1', 'meta'))
  assert checkpointing.read_meta(wd) == {'data_position': 2}
  assert checkpointing.read_meta(wd, step=3) is None
