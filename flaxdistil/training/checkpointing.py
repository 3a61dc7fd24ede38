"""Orbax checkpoints of the student's training state, with exact resume.

Saved per step under `<workdir>/checkpoints/<step>/`:
  state: {'step', 'params', 'opt_state', 'rng', 'num_skipped'} (sharded arrays;
         every host writes its shards, Orbax coordinates),
  meta:  JSON: the run fingerprint (shapes, batch, seed, ...), the data
         position and the last eval metrics.
The teacher is never saved: it is an input of the run, not part of its state.

`load_student` restores the student alone (params and step) onto one device, whatever the mesh
and optimizer of the run that wrote it: what export and the scripts read.

Atomicity is Orbax's: a step is written into a temporary directory and renamed
when complete, so a run killed while saving leaves the previous checkpoint as
the latest readable one. Integrity is ours: once Orbax has finalised a step,
process 0 writes `<step>/SHA256SUMS` (`storage/integrity.py`; `sha256sum -c`
reads it too), and every restore checks the step against it first, so a
truncated or altered file is refused with `CorruptFileError` naming the file
and the fix (delete that step) instead of being trained on. A step without
`SHA256SUMS` (written before checksums existed, or a kill between the rename
and the checksums) is restored unverified, with a warning; one that cannot be
read falls back to older steps. A save that finds the disk full raises
`DiskFullError` naming the directory, the space a checkpoint takes and the
step a rerun resumes from (`Checkpoints`).
"""

import json
import os
from typing import Any, Mapping

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flaxdistil.model import bert
from flaxdistil.objectives import intermediate
from flaxdistil.storage import integrity
from flaxdistil.storage import space
from flaxdistil.training import sharding
from flaxdistil.training.errors import ConfigError

CHECKPOINT_DIR = 'checkpoints'


def checkpoint_dir(workdir: str) -> str:
  """`<absolute workdir>/checkpoints`, the directory of the step subdirectories."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """`ocp.CheckpointManager` over `<workdir>/checkpoints` keeping the last K steps.

  Args:
    workdir: the run's directory.
    max_to_keep: K, the steps kept (older ones are deleted after a save).
    async_save: save in a background thread (`wait_until_finished` before reading them).
    read_only: never create, write or clean up (export, scripts).

  Returns:
    The manager; a writable one cleans up half-written steps of a killed run
    (`cleanup_tmp_directories`).
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,  # half-written steps of a killed run
      enable_async_checkpointing=async_save,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Mapping[str, Any],
         meta: Mapping[str, Any]) -> bool:
  """Starts (async) saving `state` and `meta` at `step`, whatever the manager's save interval.

  The bare Orbax save (no checksums, no disk-full message): the train loop saves through
  `Checkpoints`.

  Args:
    manager: from `make_manager`.
    step: the step number (the subdirectory name).
    state: the train state (`train_state.State`; sharded arrays, every host calls this).
    meta: JSON-able metadata (fingerprint, data position, last eval, log interval).

  Returns:
    True if a save started (`CheckpointManager.save`).
  """
  return manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(dict(meta))),
      force=True)


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  """The finalised directory of `step`: `<workdir>/checkpoints/<step>`."""
  return os.path.join(str(manager.directory), str(step))


def write_step_sums(manager: ocp.CheckpointManager, step: int) -> bool:
  """Writes `<step>/SHA256SUMS` over every file of a finalised step (process 0 only).

  Args:
    manager: the manager that saved `step` (its save must have finished).
    step: the step.

  Returns:
    True if written; False on other processes, or when the step is gone (deleted by
    `max_to_keep`) or not finalised.

  Raises:
    OSError: a file cannot be read, or the checksums cannot be written (e.g. ENOSPC).
  """
  d = step_dir(manager, step)
  if jax.process_index() != 0 or not os.path.isdir(d):
    return False
  integrity.write_sums(d)
  return True


def _older_step(steps, step: int) -> str:
  older = [s for s in steps if s < step]
  return (f'the newest older checkpoint is step {max(older)} (a rerun of the training command '
          f'resumes from it; export it with --step {max(older)})') if older else (
              'there is no older checkpoint (a rerun starts from step 0)')


def verify_step(manager: ocp.CheckpointManager, step: int) -> bool:
  """Checks a step's files against its `SHA256SUMS` before it is restored.

  With several processes each checks a share of the files and the verdicts are all-gathered,
  so all processes raise (or go on) together.

  Args:
    manager: from `make_manager`.
    step: the step about to be restored.

  Returns:
    True if verified, False if the step has no `SHA256SUMS` (restored unverified; logged).

  Raises:
    CorruptFileError: a file of the step is missing, truncated or altered; the message names
      it and the fix (delete the step; the step a rerun would resume from).
  """
  d = step_dir(manager, step)
  sums = integrity.read_sums(d)
  if sums is None:
    logging.warning('Checkpoint step %d has no %s (written before checksums existed, or the run '
                    'was killed right after the save): restoring it unverified.', step,
                    integrity.SUMS_FILE)
    return False
  fix = (f'Checkpoint step {step} is damaged: delete that step (rm -r {d}); '
         f'{_older_step(manager.all_steps(), step)}.')
  n, i = jax.process_count(), jax.process_index()
  error = None
  try:
    integrity.verify(d, fix, names=sorted(sums)[i::n], what='checkpoint file')
  except integrity.CorruptFileError as e:
    error = e
  if n > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    bad = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is None and bad.any():
      error = integrity.CorruptFileError(
          d, f'has a damaged file (found by process {int(np.argmax(bad))}; its log names it)', fix)
  if error is not None:
    raise error
  return True


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   step: int | None = None, partial: bool = False):
  """Restores step `step` (default: the newest readable one), verified first (`verify_step`).

  Args:
    manager: from `make_manager`.
    abstract_state: `sharding.abstract_like(...)` of the state; arrays come back with
      its shardings (so a checkpoint of a sharded run restores onto one CPU).
    step: a specific step, or None.
    partial: restore only the entries of `abstract_state` (e.g. `{'params',
      'step'}` for export, independent of the optimizer state's layout).

  Returns:
    `(state, meta)`, or None when the directory holds no checkpoint.

  Raises:
    FileNotFoundError: `step` was given but is not in the directory.
    CorruptFileError: the step to restore fails its checksums (no fallback to an older step:
      the message says which step to delete).
    RuntimeError: checkpoints exist but none could be read.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(
          f'no checkpoint for step {step} in {manager.directory}; available steps: {sorted(steps)}')
    steps = [step]
  errors = []
  for s in steps:
    verify_step(manager, s)
    try:
      if partial:
        state_args = ocp.args.PyTreeRestore(
            abstract_state, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
      else:
        state_args = ocp.args.StandardRestore(abstract_state)
      restored = manager.restore(
          s, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
      if errors:
        logging.warning('Fell back to checkpoint step %d; unreadable newer steps: %s', s, errors)
      return restored['state'], dict(restored['meta'])
    except Exception as e:  # pylint: disable=broad-except
      msg = f'{type(e).__name__}: {e}'
      errors.append((s, msg if len(msg) < 400 else msg[:400] + ' ...'))
      logging.warning('Checkpoint step %d unreadable (%s); trying an older one.', s, errors[-1][1])
  if errors:
    raise RuntimeError(f'No readable checkpoint in {manager.directory}: {errors}')
  return None


class Checkpoints:
  """The train loop's saves: Orbax's (async) save, then `SHA256SUMS`, and a full disk reported.

  `save` starts a save (after finishing the previous one), `poll` (at log steps) finishes an
  async save that completed in the background and raises its error now rather than at the
  next save, `wait` finishes everything. A save that fails for lack of space raises
  `DiskFullError` naming the checkpoint directory, the size of a checkpoint (the newest
  complete one on disk, else the state's bytes), the free space, and the step a rerun resumes
  from; the previous checkpoints are untouched (Orbax writes into a temporary directory, which
  the next start removes).

  Args:
    manager: from `make_manager` (writable).
    state_bytes: the train state's bytes in memory (all hosts), the size estimate before the
      first checkpoint exists.
  """

  def __init__(self, manager: ocp.CheckpointManager, state_bytes: int):
    self.manager, self.state_bytes = manager, state_bytes
    self._pending: list[int] = []   # saved steps whose SHA256SUMS is not written yet
    self._saving: int | None = None  # the step of the save in flight

  def _disk_full(self, step: int):
    steps = [s for s in self.manager.all_steps() if s != step]
    done = max(steps) if steps else None
    needed = space.tree_bytes(step_dir(self.manager, done)) if done is not None else (
        self.state_bytes)
    resume = f'it resumes from step {done}' if done is not None else 'it starts from step 0'
    return space.reporting_disk_full(
        str(self.manager.directory), f'checkpoint step {step}', needed,
        f'rerun the same command: {resume} (the newest complete checkpoint, intact), and '
        f'repeats the steps since.')

  def _finish(self) -> None:
    """Waits for the save in flight, then writes the checksums of the finished steps."""
    step = self._saving
    if step is not None:
      with self._disk_full(step):
        self.manager.wait_until_finished()
      self._saving = None
    for s in self._pending:
      with self._disk_full(s):
        write_step_sums(self.manager, s)
    self._pending = []

  def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Saves `step` (async if the manager is); checksums follow once it is finalised.

    Raises:
      DiskFullError: this save, or the previous async one, ran out of space.
    """
    self._finish()
    with self._disk_full(step):
      save(self.manager, step, state, meta)
    self._pending.append(step)
    if self.manager.is_saving_in_progress():
      self._saving = step
    else:  # a synchronous save: finalised already
      self._finish()

  def poll(self) -> None:
    """Finishes an async save that completed meanwhile; raises its error (e.g. disk full)."""
    if self._saving is not None:
      with self._disk_full(self._saving):
        self.manager.check_for_errors()
      if not self.manager.is_saving_in_progress():
        self._finish()

  def wait(self) -> None:
    """Waits for every save and writes their checksums.

    Raises:
      DiskFullError: the save in flight ran out of space.
    """
    self._finish()


def complete_steps(workdir: str) -> list[int]:
  """The finalised checkpoint steps of `workdir`, sorted (names only; no Orbax, no reads)."""
  root = checkpoint_dir(workdir)
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def resume_hint(workdir: str) -> str:
  """'They resume from step N, the newest complete checkpoint in DIR.' (or from step 0)."""
  steps = complete_steps(workdir)
  if not steps:
    return f'They start from step 0 (no complete checkpoint in {checkpoint_dir(workdir)} yet).'
  return (f'They resume from step {steps[-1]}, the newest complete checkpoint in '
          f'{checkpoint_dir(workdir)}, and repeat the steps since.')


def read_meta(workdir: str, step: int | None = None) -> dict | None:
  """The JSON metadata of a checkpoint step (default newest), without restoring arrays.

  Args:
    workdir: the run's directory.
    step: a specific step, or None for the newest step that has metadata.

  Returns:
    The `meta` dict `save` wrote, or None when there is no such checkpoint.

  Raises:
    CorruptFileError: the metadata file fails the step's `SHA256SUMS`.
  """
  root = checkpoint_dir(workdir)
  steps = complete_steps(workdir)[::-1]
  if step is not None:
    steps = [s for s in steps if s == step]
  for s in steps:
    path = os.path.join(root, str(s), 'meta', 'metadata')
    if os.path.exists(path):
      sums = integrity.read_sums(os.path.join(root, str(s)))
      if sums is not None and 'meta/metadata' in sums:  # read before any array: checked alone
        integrity.verify(os.path.join(root, str(s)),
                         f'Checkpoint step {s} is damaged: delete that step (rm -r '
                         f'{os.path.join(root, str(s))}); '
                         f'{_older_step(complete_steps(workdir), s)}.',
                         names=['meta/metadata'], what='checkpoint file')
      with open(path) as f:
        return json.load(f)
  return None


# ----------------------------------------------------------------------------- the student alone

def _restore_student(workdir: str, step: int | None, with_projection: bool):
  """`(ModelConfig, {'params', 'step'[, 'proj']}, meta)` restored onto one device."""
  meta = read_meta(workdir, step)
  if meta is None:
    root, steps = checkpoint_dir(workdir), complete_steps(workdir)
    raise FileNotFoundError(f'no checkpoint{"" if step is None else f" for step {step}"} in {root}; '
                            f'available steps: {steps}.')
  scfg = bert.ModelConfig(**meta['fingerprint']['student_config'])
  mesh, rules = sharding.single_device_mesh(), sharding.DEFAULT_LOGICAL_AXIS_RULES
  p_shard, params = sharding.model_param_layout(scfg, mesh, rules)
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  item = {'params': sharding.abstract_like(params, p_shard),
          'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=one)}
  projection = meta['fingerprint'].get('projection')
  if with_projection and projection:
    boxed_proj = intermediate.abstract_projection_params(*projection)
    item['proj'] = sharding.abstract_like(nn.meta.unbox(boxed_proj),
                                          sharding.param_shardings(boxed_proj, mesh, rules))
  manager = make_manager(workdir, read_only=True, async_save=False)
  restored = restore_latest(manager, item, step=step, partial=True)
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}.')
  state, meta = restored
  return scfg, jax.device_get(state), meta


def load_student(workdir: str, step: int | None = None):
  """Restores `(ModelConfig, params, meta, step)` of the student onto one device.

  Only the student's params (and the step) are read, so this works whatever
  the optimizer state or mesh of the run that wrote the checkpoint.

  Args:
    workdir: the run's directory.
    step: a specific step, or None for the newest readable one.

  Returns:
    `(ModelConfig, params, meta, step)`: the student's config (from the fingerprint), its
    params as a host numpy tree, the checkpoint's metadata, and the step (int).

  Raises:
    FileNotFoundError: no checkpoint in `workdir`, or `step` absent.
    RuntimeError: checkpoints exist but none could be read (`restore_latest`).
  """
  scfg, state, meta = _restore_student(workdir, step, with_projection=False)
  return scfg, state['params'], meta, int(state['step'])


def load_student_with_projection(workdir: str, step: int | None = None):
  """`load_student` plus the TinyBERT projections: `(ModelConfig, params, proj, meta, step)`.

  `proj` is `{'embedding': W_e, 'hidden': W_h}` (`intermediate.init_projection_params`
  layout) for a run that trained a student narrower than its teacher, else None.

  Args:
    workdir: the run's directory.
    step: a specific step, or None for the newest readable one.

  Returns:
    `(ModelConfig, params, proj, meta, step)`, host numpy trees.

  Raises:
    FileNotFoundError: no checkpoint in `workdir`, or `step` absent.
    RuntimeError: checkpoints exist but none could be read (`restore_latest`).
  """
  scfg, state, meta = _restore_student(workdir, step, with_projection=True)
  return scfg, state['params'], state.get('proj'), meta, int(state['step'])


# Fields whose change between runs would silently corrupt a resumed run.
_BREAKING = ('student_config', 'teacher_config', 'global_batch_size', 'max_seq_length', 'seed',
             'train_data', 'student_init', 'tokenizer_vocab', 'projection', 'task',
             'teacher_targets')


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
  """Refuses to resume when a shape- or data-defining setting changed.

  Harmless settings (eval/log/checkpoint intervals, num_train_steps, learning
  rate) are not part of the fingerprint and may change.

  Args:
    saved: the fingerprint in the checkpoint's metadata.
    current: the fingerprint of the run now (`setup.Run.fingerprint`); a field missing from
      either side is not compared.

  Raises:
    ConfigError: (a ValueError; exit code 2 from the command line) listing each changed field
      with the saved and the new value.
  """
  diffs = []
  for k in _BREAKING:
    if k in saved and k in current and json.dumps(saved[k], sort_keys=True) != json.dumps(
        current[k], sort_keys=True):
      diffs.append(f'  {k}: checkpoint has {saved[k]!r}, config now has {current[k]!r}')
  if diffs:
    raise ConfigError(
        'Refusing to resume: the config changed in a way that would corrupt the run:\n' +
        '\n'.join(diffs) +
        '\nRestore the original settings, or start a new run in a fresh --workdir.')
