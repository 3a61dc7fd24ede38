"""The distillation train loop: one visible loop, one jitted step.

`train_and_evaluate(config, workdir)` loads the teacher and tokenizer, builds
the student, packs the data, and runs `train_step` under `jax.jit` with
`NamedSharding`s over a `Mesh`. The training state (student params, optimizer
state, step, RNG) is donated; the teacher's params are a separate,
non-donated, never-differentiated argument and are never checkpointed.
With all teacher alphas at 0 the same loop trains plain MLM (no teacher
forward), which is the from-scratch baseline and a way to pretrain a teacher.
"""

import functools
import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxdistil import checkpointing
from flaxdistil import glue
from flaxdistil import intermediate
from flaxdistil import losses
from flaxdistil import models
from flaxdistil import objective
from flaxdistil import setup
from flaxdistil import sharding

State = dict  # {'step', 'params', 'opt_state', 'rng', 'num_skipped'}


# ----------------------------------------------------------------------------- optimizer

def decay_mask(params) -> Any:
  """True for weight matrices/embeddings; LayerNorm and biases get no weight decay."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) in ('kernel', 'embedding'), params)


def make_optimizer(optim, num_train_steps: int) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with linear warmup + linear decay and global-norm clipping.

  Args:
    optim: the config's `optim` group (learning_rate, warmup_steps, b1, b2,
      eps, weight_decay, grad_clip_norm).
  Returns:
    `(tx, schedule)`; `schedule(step)` gives the learning rate.
  """
  warmup = int(optim.warmup_steps)
  schedule = optax.join_schedules([
      optax.linear_schedule(0.0, optim.learning_rate, max(warmup, 1)),
      optax.linear_schedule(optim.learning_rate, 0.0, max(num_train_steps - warmup, 1)),
  ], [warmup])
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask),
  )
  return tx, schedule


# ----------------------------------------------------------------------------- steps

def trainable_tree(state: State) -> dict:
  """What the optimizer updates: the student, plus projections if any."""
  return {'student': state['params'], **({'proj': state['proj']} if 'proj' in state else {})}


def _split_microbatches(x, num_microbatches: int):
  """`[B, ...] -> [A, B/A, ...]`, microbatch j = rows {k*A + j}.

  Strided (not contiguous) so that every device's contiguous block of rows
  contributes equally to every microbatch: the split needs no communication.
  """
  b = x.shape[0]
  return x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)


def masked_positions(labels, max_predictions: int):
  """First `max_predictions` masked positions per row and their labels.

  Args:
    labels: `[B, T]` int32, -100 where not predicted.
  Returns:
    `(positions [B, M] int32, labels [B, M] int32)`; rows with fewer masked
    tokens are filled with position 0 and label -100 (ignored), rows with
    more lose the excess (choose M well above `mlm_probability * T`).
  """
  order = jnp.argsort(labels == losses.IGNORE_INDEX, axis=-1, stable=True)[:, :max_predictions]
  gathered = jnp.take_along_axis(labels, order, axis=1)
  return jnp.where(gathered == losses.IGNORE_INDEX, 0, order).astype(jnp.int32), gathered


def _restrict_to_masked(batch, max_predictions: int):
  """Adds `logits_positions` and replaces `labels` by the gathered `[B, M]` ones."""
  if not max_predictions:
    return batch
  pos, labels = masked_positions(batch['labels'], max_predictions)
  return dict(batch, logits_positions=pos, labels=labels)


def make_train_step(student: nn.Module, teacher: nn.Module | None, tx, weights: losses.DistillWeights,
                    num_microbatches: int, skip_nonfinite: bool = True,
                    max_predictions_per_seq: int = 0,
                    inter: tuple[intermediate.IntermediateWeights, list[int]] | None = None,
                    vocab_chunk_size: int = 0,
                    offline: bool = False, teacher_input: str = 'masked'):
  """Builds `train_step(state, teacher_params, batch) -> (state, metrics)`.

  Args:
    student / teacher: `models.MaskedLM` modules (teacher None = plain MLM).
    tx: optax transformation.
    weights: loss coefficients.
    num_microbatches: gradient-accumulation factor A; the global batch
      `[B, T]` is processed as A microbatches of `B/A` in a `lax.scan`, and
      each microbatch loss is normalised by the *global* token counts, so the
      summed gradient equals the one-big-batch gradient up to rounding.
    skip_nonfinite: a non-finite loss or gradient leaves params and optimizer
      state unchanged and increments `num_skipped` (always true inside the
      step; the host decides whether to stop).
    max_predictions_per_seq: >0 runs the MLM heads of student and teacher
      only on up to that many masked positions per sequence (needs
      `restrict_ce_to_mask` or no KL/MSE term); 0 = logits everywhere.
    inter: `(IntermediateWeights, layer_map)` for TinyBERT/MiniLM
      intermediate-layer terms (`intermediate.py`), or None. Projection
      params of a narrower student live in `state['proj']` and are trained
      with the student (one optimizer, one clipping norm).
    vocab_chunk_size: >0 computes the vocabulary terms (mlm, ce, mse) of MLM
      batches with `losses.chunked_vocab_terms`, this many positions at a
      time, never holding `[B, T, V]` logits; 0 = dense logits. Not used
      `offline` (the sparse KL reads the student's full-vocabulary logits).
    offline: the teacher's targets come with the batch (`teacher.cache`:
      `teacher_topk_values`/`teacher_topk_ids [B, T, k]`, optional
      `teacher_logz [B, T]`, `teacher_hidden [B, T, H]`, intermediate
      `teacher_{field}_{i}`; `losses.cached_teacher_output`); no teacher
      forward (`teacher` only gives its layer count), the KL is
      `losses.sparse_kl_div_loss`.
    teacher_input: 'masked' (HF distiller: the teacher sees the student's
      masked input) or 'original' (the unmasked tokens, recovered from the
      labels; what a teacher cache stores, so offline at k = V equals it).

  The state: `{'step', 'params', 'opt_state', 'rng', 'num_skipped'}` plus
  `'proj'` when projections exist; the optimizer state is over the trainable
  tree `{'student': params[, 'proj': proj]}`. The batch: dict of `input_ids`,
  `attention_mask`, `labels`, all `[global_batch, seq_len]` int32 (MLM), or
  with `labels [global_batch]` and `token_type_ids` for sequence
  classification (`losses.task_terms`; models built with `num_labels`).
  """
  iw, layer_map = inter if inter else (intermediate.IntermediateWeights(), [])
  need_teacher = (teacher is not None and
                  objective.Objective(weights, inter, offline).needs_teacher_forward)
  out_flags = intermediate.model_kwargs(iw)
  vocab_alphas = {'alpha_mlm': 0.0, 'alpha_ce': 0.0, 'alpha_mse': 0.0}
  chunked = bool(vocab_chunk_size) and not offline and student.config.with_mlm_head and any(
      getattr(weights, k) for k in vocab_alphas)

  def loss_fn(trainable, teacher_params, mb, counts, rng):
    pos, types = mb.get('logits_positions'), mb.get('token_type_ids')
    task = _is_task_batch(mb)
    hidden_only = chunked and not task
    s_out = student.apply({'params': trainable['student']}, mb['input_ids'], mb['attention_mask'],
                          types, deterministic=False, rngs={'dropout': rng}, logits_positions=pos,
                          return_mlm_hidden=hidden_only, **out_flags)
    t_out = None
    if need_teacher:
      t_out = jax.lax.stop_gradient(teacher.apply(
          {'params': teacher_params}, mb.get('teacher_input_ids', mb['input_ids']),
          mb['attention_mask'], types, deterministic=True, logits_positions=pos,
          return_mlm_hidden=hidden_only, **out_flags))
    elif offline:
      t_out = losses.cached_teacher_output(mb, teacher.config.num_hidden_layers)
    if task:
      terms = losses.task_terms(s_out, t_out, mb, weights)
      loss = losses.combine(terms, counts, weights)
    elif hidden_only:
      cast = lambda proj, m: tuple(x.astype(m.config.dtype) for x in proj)
      t_proj = None
      if t_out is not None and (weights.alpha_ce or weights.alpha_mse):
        t_proj = cast(models.vocab_projection(teacher_params), teacher)
      loss, terms = losses.chunked_vocab_terms(
          s_out.mlm_hidden, cast(models.vocab_projection(trainable['student']), student),
          None if t_proj is None else t_out.mlm_hidden, t_proj, mb, weights, counts,
          vocab_chunk_size)
      rest = losses.distillation_terms(s_out, t_out, mb, weights._replace(**vocab_alphas))
      loss = loss + losses.combine(rest, counts, weights)
      terms = {**terms, **rest}
    else:
      terms = losses.distillation_terms(s_out, t_out, mb, weights)
      loss = losses.combine(terms, counts, weights)
    if inter:
      i_terms = intermediate.intermediate_terms(s_out, t_out, mb, iw, layer_map,
                                                trainable.get('proj'))
      loss = loss + intermediate.combine(i_terms, counts, iw)
      terms = {**terms, **i_terms}
    return loss, terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  losses.check_logits_restriction(weights, max_predictions_per_seq)

  def train_step(state: State, teacher_params, batch):
    if not _is_task_batch(batch):
      if need_teacher and teacher_input == 'original':
        labels = batch['labels']
        batch = dict(batch, teacher_input_ids=jnp.where(
            labels == losses.IGNORE_INDEX, batch['input_ids'], labels))
      batch = _restrict_to_masked(batch, max_predictions_per_seq)
      if offline and 'logits_positions' in batch:  # targets only where the student has logits
        pos = batch['logits_positions']
        take = lambda x: jnp.take_along_axis(x, pos.reshape(pos.shape + (1,) * (x.ndim - 2)), 1)
        batch.update({k: take(batch[k]) for k in ('teacher_topk_values', 'teacher_topk_ids',
                                                   'teacher_logz') if k in batch})
    counts = losses.term_counts(batch, weights)  # global normalisers
    if inter:
      counts.update(intermediate.intermediate_counts(batch, iw))
    step_rng = jax.random.fold_in(state['rng'], state['step'])
    mbs = jax.tree.map(lambda x: _split_microbatches(x, num_microbatches), batch)

    def body(carry, xs):
      i, mb = xs
      mb = jax.tree.map(lambda x: nn.with_logical_constraint(
          x, (('act_batch', 'act_len') + (None,) * x.ndim)[:x.ndim]), mb)
      (loss, terms), g = grad_fn(trainable, teacher_params, mb, counts,
                                 jax.random.fold_in(step_rng, i))
      g_acc, loss_acc, terms_acc = carry
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      terms_acc = jax.tree.map(jnp.add, terms_acc, terms)
      return (g_acc, loss_acc + loss, terms_acc), None

    trainable = trainable_tree(state)
    zeros_g = jax.tree.map(jnp.zeros_like, trainable)
    zero_terms = {k: (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)) for k in counts}
    (grads, loss, terms), _ = jax.lax.scan(
        body, (zeros_g, jnp.zeros((), jnp.float32), zero_terms),
        (jnp.arange(num_microbatches), mbs))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state['opt_state'], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    if skip_nonfinite:
      new_trainable, new_opt = keep(new_trainable, trainable), keep(new_opt, state['opt_state'])
    new_state = dict(state, step=state['step'] + 1, params=new_trainable['student'],
                     opt_state=new_opt,
                     num_skipped=state['num_skipped'] + (1 - finite.astype(jnp.int32)))
    if 'proj' in new_trainable:
      new_state['proj'] = new_trainable['proj']
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
               'num_skipped': new_state['num_skipped']}
    for k, (s, c) in terms.items():
      metrics[f'loss_{k}'] = s / jnp.maximum(c, 1.0)
    return new_state, metrics

  return train_step


def _is_task_batch(batch) -> bool:
  """Sequence classification batches have one label per example (static under jit)."""
  return batch['labels'].ndim == 1


def make_task_eval_step(model: nn.Module):
  """`eval_step(params, batch, reference_top1) -> (pairs, top1)` for classification.

  `pairs`: `nll` (gold-label cross-entropy), `acc`, `tp`/`fp`/`fn` of label 1
  (summed, so F1 is exact across batches and hosts) and `agree` with
  `reference_top1 [B]`; padding rows (label -100) count nowhere.
  """

  def eval_step(params, batch, reference_top1=None):
    out = model.apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                      batch.get('token_type_ids'), deterministic=True)
    labels, top1 = batch['labels'], jnp.argmax(out.class_logits, -1)
    valid = (labels != losses.IGNORE_INDEX).astype(jnp.float32)
    n = jnp.sum(valid)
    count = lambda x: (jnp.sum(x.astype(jnp.float32) * valid), n)
    pairs = {'nll': losses.mlm_cross_entropy(out.class_logits, labels),
             'acc': losses.accuracy(out.class_logits, labels),
             'tp': count((top1 == 1) & (labels == 1)), 'fp': count((top1 == 1) & (labels != 1)),
             'fn': count((top1 != 1) & (labels == 1))}
    if reference_top1 is not None:
      pairs['agree'] = count(top1 == reference_top1)
    return pairs, top1

  return eval_step


def make_eval_step(model: nn.Module, max_predictions_per_seq: int = 0):
  """`eval_step(params, batch, reference_top1) -> (pairs, top1)` for held-out metrics.

  `pairs` holds `(sum, count)` of masked-token NLL (`nll`), top-1 accuracy
  (`acc`) and, when `reference_top1 [B, T]` (the teacher's predictions) is
  given, top-1 agreement with it (`agree`); `top1 [B, T]` stays on device.
  """

  def eval_step(params, batch, reference_top1=None):
    batch = _restrict_to_masked(batch, max_predictions_per_seq)
    out = model.apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                      deterministic=True, logits_positions=batch.get('logits_positions'))
    top1 = jnp.argmax(out.logits, -1)
    pairs = {'nll': losses.mlm_cross_entropy(out.logits, batch['labels']),
             'acc': losses.accuracy(out.logits, batch['labels'])}
    if reference_top1 is not None:
      valid = (batch['labels'] != losses.IGNORE_INDEX).astype(jnp.float32)
      pairs['agree'] = (jnp.sum((top1 == reference_top1) * valid), jnp.sum(valid))
    return pairs, top1

  return eval_step


def evaluate(eval_fn, params, batches, reference_top1=None) -> dict:
  """Token-weighted held-out metrics over fixed (global, sharded) eval batches.

  Returns dict with `loss` (mean masked-token NLL, nats), `perplexity`,
  `accuracy` (top-1 on masked tokens), `num_tokens` (masked tokens scored),
  `agreement` (top-1 agreement with `reference_top1`, if given) and `_top1`
  (per-batch device arrays of predictions, to serve as a reference). For
  classification (`make_task_eval_step`) the unit is the example, and `f1`
  (of label 1) is added.
  """
  sums, top1 = {}, []
  for i, b in enumerate(batches):
    pairs, pred = eval_fn(params, b, None if reference_top1 is None else reference_top1[i])
    top1.append(pred)
    for k, (s, c) in jax.device_get(pairs).items():
      acc = sums.setdefault(k, [0.0, 0.0])
      acc[0] += float(s)
      acc[1] += float(c)
  mean = lambda k: sums[k][0] / max(sums[k][1], 1.0) if k in sums else 0.0
  out = {'loss': mean('nll'), 'perplexity': float(math.exp(min(mean('nll'), 50.0))),
         'accuracy': mean('acc'), 'num_tokens': int(sums.get('nll', [0, 0])[1]), '_top1': top1}
  if 'agree' in sums:
    out['agreement'] = mean('agree')
  if 'tp' in sums:
    out['f1'] = glue.f1_from_counts(sums['tp'][0], sums['fp'][0], sums['fn'][0])
  return out


# ----------------------------------------------------------------------------- logging

class MetricWriter:
  """metrics.jsonl + TensorBoard events in the workdir; only process 0 writes."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict, kind: str = 'train'):
    if not self.enabled:
      return
    rec = {'step': int(step), 'kind': kind}
    rec.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(rec) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(f'{kind}/{k}', float(v), int(step))

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class _Preemption:
  """Turns SIGTERM (TPU VM preemption notice) into a flag the loop checks."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not in the main thread (e.g. under some test runners)
      self._old = None

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def agreed(self) -> bool:
    """True on every host once any host got SIGTERM (all must save the same step)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# ----------------------------------------------------------------------------- main loop

def state_layout(student_config: models.ModelConfig, tx, mesh, rules, projection=None):
  """`(shardings, abstract_state)` of the train state for `mesh`/`rules`.

  The same layout restores a checkpoint onto any mesh, e.g. one CPU device
  for export of a checkpoint written by a sharded run.

  Args:
    projection: `(student_hidden, teacher_hidden)` when the state holds
      TinyBERT projections (`state['proj']`), else None.
  """
  boxed = models.abstract_params(student_config)
  p_shard = sharding.param_shardings(boxed, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = {
      'step': jax.ShapeDtypeStruct((), jnp.int32),
      'params': nn.meta.unbox(boxed),
      'rng': jax.ShapeDtypeStruct((2,), jnp.uint32),
      'num_skipped': jax.ShapeDtypeStruct((), jnp.int32),
  }
  shard = {'step': replicated, 'params': p_shard, 'rng': replicated, 'num_skipped': replicated}
  if projection:
    boxed_proj = intermediate.abstract_projection_params(*projection)
    abstract['proj'] = nn.meta.unbox(boxed_proj)
    shard['proj'] = sharding.param_shardings(boxed_proj, mesh, rules)
  trainable = trainable_tree(abstract)
  abstract['opt_state'] = jax.eval_shape(tx.init, trainable)
  shard['opt_state'] = sharding.opt_state_shardings(tx, trainable, trainable_tree(shard), mesh)
  return shard, checkpointing.abstract_like(abstract, shard)


def init_state(params, tx, rng, shardings=None, proj=None) -> State:
  """A fresh train state (step 0) from student params (host or device arrays).

  Args:
    params: student params; proj: projection params or None.
    rng: `jax.random.PRNGKey` for dropout (folded with the step).
    shardings: `state_layout(...)[0]` to place everything, or None (default
      device).
  """
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'rng': rng,
           'num_skipped': jnp.zeros((), jnp.int32)}
  if proj is not None:
    state['proj'] = proj
  init = tx.init
  if shardings is not None:
    state = {k: jax.device_put(v, shardings[k]) for k, v in state.items()}
    init = jax.jit(tx.init, out_shardings=shardings['opt_state'])
  state['opt_state'] = init(trainable_tree(state))
  return state


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs distillation (or plain MLM) training as described by `config`.

  Args:
    config: ConfigDict from `configs/*.py`.
    workdir: output directory: `checkpoints/`, `metrics.jsonl`,
      `tensorboard/`, `summary.json`. An existing run there is resumed.

  Returns:
    The final summary dict (last eval metrics of student and teacher, step,
    tokens/s); also written to `<workdir>/summary.json`.

  Raises:
    setup.ConfigError (a ValueError) for bad configs or inputs, with the fix.
  """
  setup.prepare_workdir(workdir)
  run = setup.build_run(config, workdir)  # models, params (host), data, mesh
  if jax.process_index() == 0:  # export and resumes read the run's config from here
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  mesh, rules = run.mesh, run.rules
  weights = run.weights
  tx, schedule = make_optimizer(config.optim, config.num_train_steps)

  # --- shardings and initial state
  state_shard, abstract_state = state_layout(run.student_config, tx, mesh, rules, run.projection)
  replicated = state_shard['step']
  b_shard = sharding.batch_sharding(mesh, rules)

  t_params = None
  if run.teacher_params is not None:
    t_rules = run.teacher_rules
    t_shard = sharding.param_shardings(models.abstract_params(run.teacher_config), mesh, t_rules)
    t_params = jax.device_put(run.teacher_params, t_shard)

  manager = checkpointing.make_manager(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                       async_save=config.checkpoint.async_save)
  fingerprint = run.fingerprint
  _meta = lambda step, ev: {'fingerprint': fingerprint, 'data_position': step, 'eval': ev,
                            'info': run.info}
  restored = checkpointing.restore_latest(manager, abstract_state)
  if restored is not None:
    state, meta = restored
    checkpointing.check_compatible(meta.get('fingerprint', {}), fingerprint)
    logging.info('Resumed from %s at step %d.', manager.directory, int(state['step']))
  else:
    state = init_state(run.student_params, tx, jax.random.PRNGKey(config.seed), state_shard,
                       proj=run.proj_params)
  run.student_params = run.teacher_params = run.proj_params = None  # host copies not needed

  teacher_model = run.teacher_model if t_params is not None else None
  max_pred = config.distill.max_predictions_per_seq
  step_fn = make_train_step(run.student_model, teacher_model, tx, weights,
                            config.optim.num_microbatches, max_predictions_per_seq=max_pred,
                            inter=run.inter, vocab_chunk_size=config.distill.vocab_chunk_size,
                            offline=run.offline, teacher_input=config.distill.teacher_input)
  step_t_params = None if run.offline else t_params  # offline: the step never reads the teacher
  with sharding.mesh_context(mesh, rules):
    # The batch's shardings come with it (make_global_batch): leaves differ in rank.
    p_train_step = jax.jit(step_fn, in_shardings=(state_shard,
                                                  None if step_t_params is None else t_shard, None),
                           out_shardings=(state_shard, replicated), donate_argnums=(0,))
  # Masked-token eval needs MLM heads; head-less (MiniLM-style) runs are scored by
  # scripts/embedding_report.py instead.
  if run.student_config.num_labels:
    make_eval = make_task_eval_step
    has_head = lambda cfg: cfg.num_labels == run.student_config.num_labels
  else:
    make_eval = functools.partial(make_eval_step, max_predictions_per_seq=max_pred)
    has_head = lambda cfg: cfg.with_mlm_head
  s_eval = jax.jit(make_eval(run.student_model)) if has_head(run.student_config) else None
  t_eval = (jax.jit(make_eval(run.teacher_model))
            if t_params is not None and has_head(run.teacher_config) else None)

  shard_batch = functools.partial(_to_global, batch_sharding=b_shard)
  # eval_batches() gives global batches; each host feeds its own rows.
  p_i, p_n = jax.process_index(), jax.process_count()
  eval_batches = [shard_batch({k: v[p_i * (len(v) // p_n):(p_i + 1) * (len(v) // p_n)]
                               for k, v in b.items()}) for b in run.eval_batches()]
  writer = MetricWriter(workdir)
  teacher_eval = None

  def run_eval(step):
    nonlocal teacher_eval
    if s_eval is None or not eval_batches:
      return {}
    with sharding.mesh_context(mesh, rules):
      if t_eval is not None and teacher_eval is None:
        teacher_eval = evaluate(t_eval, t_params, eval_batches)
        writer.write(step, {k: v for k, v in teacher_eval.items() if not k.startswith('_')},
                     'eval_teacher')
      res = evaluate(s_eval, state['params'], eval_batches,
                     reference_top1=teacher_eval['_top1'] if teacher_eval else None)
    scalars = {k: v for k, v in res.items() if not k.startswith('_')}
    writer.write(step, scalars, 'eval')
    logging.info('eval step %d: student %s%s', step, _fmt(scalars),
                 f' | teacher {_fmt({k: v for k, v in teacher_eval.items() if not k.startswith("_")})}'
                 if teacher_eval else '')
    return scalars

  start_step = int(state['step'])
  num_steps = config.num_train_steps
  stop_step = (min(num_steps, start_step + config.steps_per_run) if config.steps_per_run
               else num_steps)
  batches = run.train_batches(start_step)
  preempt = _Preemption()
  last_eval = {}
  t_log, tokens_since, steps_since = time.time(), 0.0, 0
  t_start, meas_tokens, meas_seconds, first_interval = time.time(), 0.0, 0.0, True
  step = start_step
  in_flight = None
  try:
    with sharding.mesh_context(mesh, rules):
      while step < stop_step:
        host_batch = next(batches)
        tokens_since += float(host_batch['attention_mask'].sum()) * jax.process_count()
        state, metrics = p_train_step(state, step_t_params, shard_batch(host_batch))
        # Dispatch is asynchronous: unchecked, the loop runs up to log_every_steps ahead of the
        # device, and a SIGTERM then waits for all of those steps before its checkpoint. Waiting
        # for the previous step keeps one step queued behind the running one.
        if in_flight is not None:
          jax.block_until_ready(in_flight)
        in_flight = metrics['loss']
        step += 1
        steps_since += 1
        stop_now = preempt.agreed()
        if step % config.log_every_steps == 0 or step == num_steps or stop_now:
          m = jax.device_get(metrics)
          dt = time.time() - t_log
          tps = tokens_since / max(dt, 1e-9)
          if not first_interval:  # the first interval includes compilation
            meas_tokens += tokens_since
            meas_seconds += dt
          first_interval = False
          scalars = {k: float(v) for k, v in m.items() if k not in ('finite',)}
          scalars.update(lr=float(schedule(step - 1)), tokens_per_sec=tps,
                         steps_per_sec=steps_since / max(dt, 1e-9))
          writer.write(step, scalars)
          eta = (num_steps - step) / max(scalars['steps_per_sec'], 1e-9)
          logging.info('step %d/%d %s | ETA %s', step, num_steps, _fmt(scalars),
                       time.strftime('%H:%M:%S', time.gmtime(eta)))
          if not bool(m['finite']):
            logging.warning('Non-finite loss/gradient at step %d: update skipped (%d skipped so far).',
                            step, int(m['num_skipped']))
            if config.optim.on_nonfinite == 'stop':
              raise FloatingPointError(
                  f'Non-finite loss or gradient at step {step}; stopped with the last good '
                  f'checkpoint in {manager.directory} (optim.on_nonfinite="stop").')
          t_log, tokens_since, steps_since = time.time(), 0.0, 0
        if config.eval_every_steps and step % config.eval_every_steps == 0 and step < num_steps:
          last_eval = run_eval(step)
          t_log, tokens_since, steps_since = time.time(), 0.0, 0  # keep eval out of tokens/s
        if step < stop_step and (step % config.checkpoint_every_steps == 0 or stop_now):
          checkpointing.save(manager, step, state, _meta(step, last_eval))
        if stop_now:
          manager.wait_until_finished()
          logging.warning('SIGTERM received: checkpoint for step %d written to %s. Resume with the '
                          'same command (same --workdir).', step, manager.directory)
          return {'step': step, 'preempted': True}
    if step == num_steps:
      last_eval = run_eval(step)
    if manager.latest_step() != step:
      checkpointing.save(manager, step, state, _meta(step, last_eval))
  finally:
    batches.close()
    manager.wait_until_finished()
    preempt.restore()
    writer.close()

  elapsed = time.time() - t_start
  summary = {'step': step, 'done': step == num_steps, 'student': last_eval,
             'teacher': {k: v for k, v in (teacher_eval or {}).items() if not k.startswith('_')},
             'train_tokens_per_sec': meas_tokens / meas_seconds if meas_seconds else None,
             'train_seconds': elapsed, 'num_skipped': int(state['num_skipped'])}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1)
  return summary


def _to_global(host_batch, batch_sharding):
  gbs = host_batch['input_ids'].shape[0] * jax.process_count()
  return sharding.make_global_batch(host_batch, batch_sharding, gbs)


def _fmt(d: dict) -> str:
  return ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in d.items())
