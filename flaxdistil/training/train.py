"""The distillation train loop: one visible loop around one jitted step.

`train_and_evaluate(config, workdir)` builds the run (`setup.build_run`:
teacher, tokenizer, student, data, mesh), restores or initialises the train
state, and runs the step of `train_step.py` under `jax.jit` with
`NamedSharding`s. The training state (student params, optimizer state, step,
RNG) is donated; the teacher's params are a separate, non-donated,
never-differentiated argument and are never checkpointed. With all teacher
alphas at 0 the same loop trains plain MLM (no teacher forward), which is the
from-scratch baseline and a way to pretrain a teacher.

Evaluation is in `evaluation.py`, what gets written in `metric_writers.py`, printed in
`train_log.py` (console lines, progress bar) and drawn in `plots.py` (`curves.png`), checkpoints in
`checkpointing.py`.
"""

import contextlib
import dataclasses
import json
import os
import signal
import time

from absl import logging
import jax
import numpy as np

from flaxdistil.model import bert
from flaxdistil.storage import atomic
from flaxdistil.storage import lock
from flaxdistil.storage import space
from flaxdistil.training import checkpointing
from flaxdistil.training import evaluation
from flaxdistil.training import metric_writers
from flaxdistil.training import optimizer
from flaxdistil.training import plots
from flaxdistil.training import setup
from flaxdistil.training import sharding
from flaxdistil.training import train_log
from flaxdistil.training import train_state
from flaxdistil.training import train_step


class _Preemption:
  """Turns SIGTERM (TPU VM preemption notice) into a stop every host agrees on."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not in the main thread (e.g. under some test runners)
      self._old = None

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def should_stop(self, sync_point: bool) -> bool:
    """True when the loop must checkpoint and stop after this step.

    One process reads its own flag every step. Several processes must all
    stop at the same step, which takes an all-gather; that blocks the host
    until the device catches up, so it happens only at `sync_point` steps (log
    and checkpoint steps, which wait for the device anyway) and every host
    must pass the same `sync_point` for the same step.

    Args:
      sync_point: whether this step is one where all hosts may agree (log or checkpoint step).

    Returns:
      True when a SIGTERM reached this process (one process) or any process (several, at a
      sync point); False otherwise.
    """
    if jax.process_count() == 1:
      return self.requested
    if not sync_point:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

  def restore(self):
    """Puts back the SIGTERM handler that was installed before."""
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs distillation (or plain MLM, or task distillation) as described by `config`.

  Args:
    config: ConfigDict from `configs/*.py`.
    workdir: output directory: `checkpoints/`, `metrics.jsonl`,
      `tensorboard/`, `summary.json`, `config.json`, `curves.png`. An existing run there is
      resumed; a finished one (checkpoint at `num_train_steps`) is left as it
      is and its summary returned.

  Returns:
    The summary dict (`step`, `num_train_steps`, `done`, last eval metrics of `student` and
    `teacher`, `student_initial` (the step-0 eval with `eval_at_start`), `models` (`layers`,
    `hidden_size`, `params` of `teacher` and `student`), `train_tokens_per_sec` excluding the
    first, compiling, interval, `train_seconds`, `num_skipped`); also written to
    `<workdir>/summary.json`. A SIGTERM stop returns `{'step', 'preempted'}`.

  Raises:
    ConfigError: (a ValueError, `training/errors.py`; `setup.ConfigError`) a bad config or
      input, with the fix.
    DirectoryLockedError: another live run holds `workdir` (`storage/lock.py`); nothing of
      `workdir` was touched.
    ConfigError: also when resuming with a config that changes shapes or data
      (`checkpointing.check_compatible`).
    CorruptFileError: the checkpoint to resume from, the token cache or the teacher cache
      fails its checksums (the message names the file and the fix).
    DiskFullError: no space left for a checkpoint or the run's logs (the message names the
      directory, the space needed and the step a rerun resumes from).
    RuntimeError: checkpoints exist in `workdir` but none can be read.
    FloatingPointError: a non-finite step with `optim.on_nonfinite='stop'`, or
      `optim.max_consecutive_nonfinite` non-finite steps in a row.
  """
  setup.prepare_workdir(workdir)
  held = lock.hold(workdir, f'--workdir {os.path.abspath(workdir)}',
                   'Wait for that run to end or stop it, or pass another --workdir.',
                   jax.process_index())
  try:
    with space.reporting_disk_full(
        workdir, "the run's logs (metrics.jsonl, TensorBoard, config.json, summary.json)", None,
        'rerun the same command: it resumes from the newest complete checkpoint.'):
      return _train_and_evaluate(config, workdir)
  finally:
    held.release()


def _train_and_evaluate(config, workdir: str) -> dict:
  """`train_and_evaluate` once `workdir` is locked."""
  run = setup.build_run(config, workdir)  # models, params (host), data, mesh
  manager = checkpointing.make_manager(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                       async_save=config.checkpoint.async_save)
  num_steps = config.num_train_steps
  latest = manager.latest_step()
  if latest is not None and latest >= num_steps:
    return _already_complete(run, manager, workdir, latest, num_steps)
  if jax.process_index() == 0:  # export and resumes read the run's config from here
    with atomic.atomic_file(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  mesh, rules, objective = run.mesh, run.rules, run.objective
  tx, schedule = optimizer.make_optimizer(config.optim, num_steps)
  state_shard, abstract_state = train_state.state_layout(run.student_config, tx, mesh, rules,
                                                         run.projection)
  b_shard = sharding.batch_sharding(mesh, rules)
  t_params = t_shard = None
  if run.teacher_params is not None:
    t_shard, _ = sharding.model_param_layout(run.teacher_config, mesh, run.teacher_rules)
    t_params = jax.device_put(run.teacher_params, t_shard)

  meta = lambda step, ev, partial: {'fingerprint': run.fingerprint, 'data_position': step,
                                    'eval': ev, 'info': run.info, 'log_interval': partial,
                                    'nonfinite_in_a_row': interval.nonfinite_in_a_row}
  restored = checkpointing.restore_latest(manager, abstract_state)
  if restored is not None:
    state, saved = restored
    checkpointing.check_compatible(saved.get('fingerprint', {}), run.fingerprint)
    logging.info('Resumed from %s at step %d.', manager.directory, int(state['step']))
  else:
    state, saved = train_state.init_state(
        run.student_params, tx, jax.random.PRNGKey(config.seed), state_shard,
        proj=run.proj_params), {}
  # the host copies are on devices now: drop them (the old Run is the only other reference)
  run = dataclasses.replace(run, student_params=None, teacher_params=None, proj_params=None)

  p_train_step, reads_teacher = train_step.jit_run_step(
      run.student_config, run.teacher_config if t_params is not None else None, tx, objective,
      config.optim.num_microbatches, state_shard, t_shard)
  step_t_params = t_params if reads_teacher else None  # offline: the step never reads it
  shard_batch = lambda b: sharding.make_global_batch(
      b, b_shard, b['input_ids'].shape[0] * jax.process_count())
  writer = metric_writers.MetricWriter(workdir)
  run_eval = evaluation.Evaluator(run, t_params, shard_batch, writer)

  start_step = int(state['step'])
  initial_eval = {}
  if config.get('eval_at_start', False):
    if start_step == 0:
      initial_eval = run_eval(0, state['params'], state.get('proj'))
    else:  # resumed: the step-0 record of the first part, for the summary
      initial_eval = next(({k: v for k, v in r.items() if k not in ('step', 'kind')}
                           for r in plots.read_metrics(workdir)
                           if r.get('kind') == 'eval' and r.get('step') == 0), {})
  stop_step = (min(num_steps, start_step + config.steps_per_run) if config.steps_per_run
               else num_steps)
  logging.info('%s', objective.describe())
  logging.info('Training steps %d..%d of %d; logs every %d steps (means over the interval).',
               start_step + 1, stop_step, num_steps, config.log_every_steps)
  interval = metric_writers.IntervalMeans()
  interval.load(saved.get('log_interval', {}), state_shard['step'])  # resumed mid-interval
  interval.nonfinite_in_a_row = int(saved.get('nonfinite_in_a_row', 0))
  log = train_log.TrainLog(writer, interval, num_steps, start_step=start_step)
  ckpts = checkpointing.Checkpoints(manager, sum(x.size * x.dtype.itemsize
                                                 for x in jax.tree.leaves(abstract_state)))
  max_bad = int(config.optim.max_consecutive_nonfinite)
  batches = run.train_batches(start_step)
  preempt = _Preemption()
  last_eval = {}
  t_start = time.time()
  step, in_flight = start_step, None
  try:
    with sharding.mesh_context(mesh, rules):
      while step < stop_step:
        host_batch = next(batches)
        state, metrics = p_train_step(state, step_t_params, shard_batch(host_batch))
        log.add(metrics, float(host_batch['attention_mask'].sum()) * jax.process_count())
        # Dispatch is asynchronous: unchecked, the loop runs up to log_every_steps ahead of the
        # device, and a SIGTERM then waits for all of those steps before its checkpoint. Waiting
        # for the previous step keeps one step queued behind the running one.
        if in_flight is not None:
          jax.block_until_ready(in_flight)
        in_flight = metrics['loss']
        step += 1
        log_now = step % config.log_every_steps == 0 or step == num_steps
        ckpt_now = step % config.checkpoint_every_steps == 0 or step == stop_step
        stop_now = preempt.should_stop(sync_point=log_now or ckpt_now)
        if log_now:
          scalars = log.log(step, float(schedule(step - 1)))
          ckpts.poll()  # an async save that failed (e.g. disk full) stops the run now
          if scalars['nonfinite_steps']:
            _check_nonfinite(config, scalars, step, max_bad, manager.directory)
        if config.eval_every_steps and step % config.eval_every_steps == 0 and step < num_steps:
          t_eval_start = time.time()
          last_eval = run_eval(step, state['params'], state.get('proj'))
          log.exclude(time.time() - t_eval_start)  # keep eval out of tokens/s
        if (step < num_steps and ckpt_now) or stop_now:
          ckpts.save(step, state, meta(step, last_eval, interval.state()))
        if stop_now:
          ckpts.wait()
          logging.warning('SIGTERM received: checkpoint for step %d written to %s. Resume with the '
                          'same command (same --workdir).', step, manager.directory)
          log.close()
          plots.write_curves(workdir)
          logging.info('%s', train_log.output_locations(workdir, manager.directory))
          return {'step': step, 'preempted': True}
    log.close()
    if step == num_steps:
      last_eval = run_eval(step, state['params'], state.get('proj'))
      ckpts.save(step, state, meta(step, last_eval, {}))
    ckpts.wait()
  except BaseException:
    # Let a save in flight finish (the last good checkpoint of a 'stop'); its own failure must
    # not hide the error that got us here.
    with contextlib.suppress(Exception):
      ckpts.wait()
    raise
  finally:
    log.close()
    batches.close()
    preempt.restore()
    writer.close()

  describe = lambda cfg, params: {'layers': cfg.num_hidden_layers, 'hidden_size': cfg.hidden_size,
                                  'params': bert.count_params(params)}
  models = {'student': describe(run.student_config, state['params'])}
  if t_params is not None:
    models['teacher'] = describe(run.teacher_config, t_params)
  summary = {'step': step, 'num_train_steps': num_steps, 'done': step == num_steps,
             'student': last_eval, 'teacher': run_eval.teacher_metrics,
             **({'student_initial': initial_eval} if initial_eval else {}), 'models': models,
             'train_tokens_per_sec': log.tokens_per_sec,
             'train_seconds': time.time() - t_start, 'num_skipped': int(state['num_skipped'])}
  if jax.process_index() == 0:
    atomic.write_json(os.path.join(workdir, 'summary.json'), summary)
    plots.write_curves(workdir)
  logging.info('%s at step %d/%d. %s', 'Done' if summary['done'] else 'Stopped (steps_per_run)',
               step, num_steps, train_log.output_locations(workdir, manager.directory))
  return summary


def _check_nonfinite(config, scalars: dict, step: int, max_bad: int, ckpt_dir) -> None:
  """Warns about the interval's skipped steps; raises when the run must stop.

  Raises:
    FloatingPointError: `optim.on_nonfinite='stop'`, or `max_bad` (> 0) steps in a row were
      non-finite: a run that only ever skips its updates would train on without learning.
  """
  logging.warning('%d non-finite loss/gradient step(s) up to step %d: updates skipped '
                  '(%d skipped so far).', scalars['nonfinite_steps'], step, scalars['num_skipped'])
  if config.optim.on_nonfinite == 'stop':
    raise FloatingPointError(
        f'Non-finite loss or gradient up to step {step}; stopped with the last good '
        f'checkpoint in {ckpt_dir} (optim.on_nonfinite="stop").')
  in_a_row = scalars['nonfinite_in_a_row']
  if max_bad and in_a_row >= max_bad:
    raise FloatingPointError(
        f'The last {in_a_row} steps (up to step {step}) all had a non-finite loss, gradient or '
        f'update, so all were skipped (optim.on_nonfinite="skip") and the student has not '
        f'changed since step {step - in_a_row}: stopped instead of training on '
        f'(optim.max_consecutive_nonfinite={max_bad}). Check the teacher (teacher.path or '
        f'teacher.cache) and the data for inf/NaN, or lower optim.learning_rate; the last good '
        f'checkpoint is in {ckpt_dir}.')


def _already_complete(run: setup.Run, manager, workdir: str, latest: int, num_steps: int) -> dict:
  """A re-run of a finished run: checks the config still matches, changes nothing.

  Returns the first run's `summary.json` (its throughput included); if it is
  missing (killed after the last checkpoint), one made from the checkpoint's
  metadata, written once.

  Raises:
    ValueError: the config changed shapes or data (`checkpointing.check_compatible`).
  """
  saved = checkpointing.read_meta(workdir, latest) or {}
  checkpointing.check_compatible(saved.get('fingerprint', {}), run.fingerprint)
  path = os.path.join(workdir, 'summary.json')
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
  else:
    summary = {'step': latest, 'done': True, 'student': saved.get('eval', {}), 'teacher': {},
               'train_tokens_per_sec': None, 'train_seconds': None, 'num_skipped': None}
    if jax.process_index() == 0:
      atomic.write_json(path, summary)
  logging.info('The run in %s is complete (checkpoint at step %d, num_train_steps=%d): nothing to '
               'train; metrics.jsonl and summary.json are unchanged. Raise '
               '--config.num_train_steps to train on, or pass a new --workdir. %s', workdir, latest,
               num_steps, train_log.output_locations(workdir, manager.directory))
  return summary
