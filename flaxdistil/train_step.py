"""The train step, its optimizer and the layout of the train state.

`make_train_step` builds the pure function `train_step(state, teacher_params,
batch) -> (state, metrics)`; `jit_train_step` compiles it with the state's
`NamedSharding`s and donation, the one jit wiring the train loop, the tests
and the benchmarks share. `state_layout` / `init_state` give the state's
shardings and a fresh state; the same layout restores a checkpoint onto any
mesh.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxdistil import checkpointing
from flaxdistil import intermediate
from flaxdistil import losses
from flaxdistil import models
from flaxdistil import objective
from flaxdistil import sharding

State = dict  # {'step', 'params', 'opt_state', 'rng', 'num_skipped'} [+ 'proj']

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


# ----------------------------------------------------------------------------- step

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


def restrict_to_masked(batch, max_predictions: int):
  """Adds `logits_positions [B, M]` and replaces `labels` by the gathered `[B, M]` ones.

  `max_predictions` 0 returns `batch` unchanged (logits at every position).
  """
  if not max_predictions:
    return batch
  pos, labels = masked_positions(batch['labels'], max_predictions)
  return dict(batch, logits_positions=pos, labels=labels)


def make_train_step(student: nn.Module, teacher: nn.Module | None, tx,
                    weights: losses.DistillWeights, num_microbatches: int,
                    skip_nonfinite: bool = True, max_predictions_per_seq: int = 0,
                    inter: tuple[intermediate.IntermediateWeights, list[int]] | None = None,
                    vocab_chunk_size: int = 0,
                    offline: bool = False, teacher_input: str = 'masked', task: bool = False):
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
  classification (`task=True`; models built with `num_labels`).

  The metrics (float32 scalars, replicated): `loss` (the step's total
  objective), `loss_<term>` (each term's mean over its own count: tokens,
  masked tokens or examples), `grad_norm` (before clipping), `finite` (bool),
  `num_skipped` (int32, run total), `tokens` (non-padding tokens in the global
  batch) and `terms` (`{term: (sum, count)}`, for exact interval means).

  Raises:
    ValueError: `max_predictions_per_seq` with a term that needs logits at
      every position (`losses.check_logits_restriction`).
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
    if not task:
      if need_teacher and teacher_input == 'original':
        labels = batch['labels']
        batch = dict(batch, teacher_input_ids=jnp.where(
            labels == losses.IGNORE_INDEX, batch['input_ids'], labels))
      batch = restrict_to_masked(batch, max_predictions_per_seq)
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
    metrics['tokens'] = jnp.sum(batch['attention_mask'], dtype=jnp.float32)
    metrics['terms'] = terms
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_shardings: dict, teacher_shardings=None):
  """`jax.jit` of a `make_train_step` step with the state's shardings, state donated.

  The state (argument 0) is donated: its buffers are reused for the new state,
  so the caller must not read the old one after the call. Batches carry their
  own shardings (`sharding.make_global_batch`; leaves differ in rank); metrics
  come back replicated. Call (or `.lower`) the result inside
  `sharding.mesh_context(mesh, rules)`: logical constraints resolve while
  tracing.

  Args:
    train_step: from `make_train_step`.
    state_shardings: `state_layout(...)[0]`.
    teacher_shardings: the teacher params' shardings, or None when the step
      gets `teacher_params=None` (plain MLM, offline).
  """
  replicated = state_shardings['step']
  return jax.jit(train_step, in_shardings=(state_shardings, teacher_shardings, None),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


# ----------------------------------------------------------------------------- state


def state_layout(student_config: models.ModelConfig, tx, mesh, rules, projection=None):
  """`(shardings, abstract_state)` of the train state for `mesh`/`rules`.

  The same layout restores a checkpoint onto any mesh, e.g. one CPU device
  for export of a checkpoint written by a sharded run. Abstract leaves carry
  their target sharding (`checkpointing.abstract_like`).

  Args:
    student_config: the student's shapes; tx: the optimizer (`make_optimizer`);
    mesh / rules: the mesh and its logical axis rules.
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
