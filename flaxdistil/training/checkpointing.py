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
the latest readable one. Restoring also falls back to older steps if the
newest one cannot be read.
"""

import json
import os
from typing import Any, Mapping

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flaxdistil.model import bert
from flaxdistil.objectives import intermediate
from flaxdistil.training import sharding

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


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   step: int | None = None, partial: bool = False):
  """Restores step `step` (default: the newest readable one).

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
  """The JSON metadata of a checkpoint step (default newest), without restoring arrays.

  Args:
    workdir: the run's directory.
    step: a specific step, or None for the newest step that has metadata.

  Returns:
    The `meta` dict `save` wrote, or None when there is no such checkpoint.
  """
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


# ----------------------------------------------------------------------------- the student alone

def _restore_student(workdir: str, step: int | None, with_projection: bool):
  """`(ModelConfig, {'params', 'step'[, 'proj']}, meta)` restored onto one device."""
  meta = read_meta(workdir, step)
  if meta is None:
    root = checkpoint_dir(workdir)
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
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
