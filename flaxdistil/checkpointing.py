"""Orbax checkpoints of the student's training state, with exact resume.

Saved per step under `<workdir>/checkpoints/<step>/`:
  state: {'step', 'params', 'opt_state', 'rng', 'num_skipped'} (sharded arrays;
         every host writes its shards, Orbax coordinates),
  meta:  JSON: the run fingerprint (shapes, batch, seed, ...), the data
         position and the last eval metrics.
The teacher is never saved: it is an input of the run, not part of its state.

Atomicity is Orbax's: a step is written into a temporary directory and renamed
when complete, so a run killed while saving leaves the previous checkpoint as
the latest readable one. Restoring also falls back to older steps if the
newest one cannot be read.
"""

import json
import os
from typing import Any, Mapping

from absl import logging
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """`ocp.CheckpointManager` over `<workdir>/checkpoints` keeping the last K steps."""
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
  """Starts (async) saving `state` and `meta` at `step`; True if a save started."""
  return manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(dict(meta))),
      force=True)


def abstract_like(state: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct` tree (with target shardings) to restore into."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   step: int | None = None, partial: bool = False):
  """Restores step `step` (default: the newest readable one).

  Args:
    manager: from `make_manager`.
    abstract_state: `abstract_like(...)` of the state; arrays come back with
      its shardings (so a checkpoint of a sharded run restores onto one CPU).
    step: a specific step, or None.
    partial: restore only the entries of `abstract_state` (e.g. `{'params',
      'step'}` for export, independent of the optimizer state's layout).

  Returns:
    `(state, meta)`, or None when the directory holds no checkpoint.

  Raises:
    FileNotFoundError: `step` was given but is not in the directory.
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


def read_meta(workdir: str, step: int | None = None) -> dict | None:
  """The JSON metadata of a checkpoint step (default newest), without restoring arrays."""
  root = checkpoint_dir(workdir)
  if not os.path.isdir(root):
    return None
  steps = sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True)
  if step is not None:
    steps = [s for s in steps if s == step]
  for s in steps:
    path = os.path.join(root, str(s), 'meta', 'metadata')
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  return None


# Fields whose change between runs would silently corrupt a resumed run.
_BREAKING = ('student_config', 'teacher_config', 'global_batch_size', 'max_seq_length', 'seed',
             'train_data', 'student_init', 'tokenizer_vocab', 'projection', 'task',
             'teacher_targets')


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
  """Refuses to resume when a shape- or data-defining setting changed.

  Harmless settings (eval/log/checkpoint intervals, num_train_steps, learning
  rate) are not part of the fingerprint and may change.

  Raises:
    ValueError: listing each changed field with the saved and the new value.
  """
  diffs = []
  for k in _BREAKING:
    if k in saved and k in current and json.dumps(saved[k], sort_keys=True) != json.dumps(
        current[k], sort_keys=True):
      diffs.append(f'  {k}: checkpoint has {saved[k]!r}, config now has {current[k]!r}')
  if diffs:
    raise ValueError(
        'Refusing to resume: the config changed in a way that would corrupt the run:\n' +
        '\n'.join(diffs) +
        '\nRestore the original settings, or start a new run in a fresh --workdir.')
