"""The train step: the loss of one microbatch, gradient accumulation, the optimizer update.

`make_loss_fn` runs student (and teacher) on one microbatch and combines the objective's terms;
`make_train_step` builds the pure function `train_step(state, teacher_params, batch) ->
(state, metrics)` around it; `jit_train_step` compiles that with the state's `NamedSharding`s and
donation, the one jit wiring the train loop, the tests, the benchmarks and the ahead-of-time
compile check share. Only the student (and its projections) is differentiated: the teacher's
outputs pass through `stop_gradient` and its params are a separate, non-donated argument.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxdistil.model import bert
from flaxdistil.objectives import cached_teacher
from flaxdistil.objectives import chunked_vocab
from flaxdistil.objectives import intermediate
from flaxdistil.objectives import losses
from flaxdistil.objectives.objective import Objective
from flaxdistil.training.train_state import State
from flaxdistil.training.train_state import trainable_tree

# Vocabulary-term alphas set to 0: the dense terms left once `chunked_vocab` computed those.
_NO_VOCAB_TERMS = {'alpha_mlm': 0.0, 'alpha_ce': 0.0, 'alpha_mse': 0.0}


def _split_microbatches(x, num_microbatches: int):
  """`[B, ...] -> [A, B/A, ...]`, microbatch j = rows {k*A + j}.

  Strided (not contiguous) so that every device's contiguous block of rows
  contributes equally to every microbatch: the split needs no communication.
  """
  b = x.shape[0]
  return x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)


def make_loss_fn(student: nn.Module, teacher: nn.Module | None, objective: Objective):
  """`loss_fn(trainable, teacher_params, mb, counts, rng) -> (loss, terms)` of one microbatch.

  The terms are those of `losses.py` (DistilBERT's triple loss, Sanh et al., 2019, Sec. 2;
  TinyBERT's prediction-layer loss for tasks, Eq. 10), their vocabulary-chunked form
  (`chunked_vocab.py`) and `intermediate.py`'s (TinyBERT Sec. 3.1, MiniLM Sec. 3.1-3.2).

  Args:
    student: the student's `bert.MaskedLM`.
    teacher: the teacher's `bert.MaskedLM`; None trains plain MLM (or fine-tunes on gold
      labels). Offline (`objective.offline`) the teacher module only gives its layer count:
      its targets come with the batch.
    objective: what to compute.

  Returns:
    `loss_fn`. It takes `trainable` (`{'student': params[, 'proj'][, 'gates']}`; `gates`, the
    model's gate collection `bert.gate_ones`, only for pruning importance), the teacher's params,
    a prepared microbatch (`Objective.prepare_batch`), the global `counts`
    (`Objective.counts`) and a dropout rng, and returns the microbatch's share of the
    objective `loss` (float32 scalar, nats; summed over microbatches it is the global-batch
    objective) and `terms` `{name: (sum, count)}` with the microbatch's own counts.
  """
  weights, inter = objective.weights, objective.inter
  need_teacher = teacher is not None and objective.needs_teacher_forward
  out_flags = objective.model_kwargs()
  hidden_only = objective.chunked(student.config.with_mlm_head)

  def loss_fn(trainable, teacher_params, mb, counts, rng):
    """`(loss, terms)` of microbatch `mb` (see `make_loss_fn`)."""
    pos, types = mb.get('logits_positions'), mb.get('token_type_ids')
    variables = {'params': trainable['student']}
    if 'gates' in trainable:  # head / FFN-neuron gates of `training/importance.py`
      variables['gates'] = trainable['gates']
    s_out = student.apply(variables, mb['input_ids'], mb['attention_mask'],
                          types, deterministic=False, rngs={'dropout': rng}, logits_positions=pos,
                          return_mlm_hidden=hidden_only, **out_flags)
    t_out = None
    if need_teacher:
      t_out = jax.lax.stop_gradient(teacher.apply(
          {'params': teacher_params}, mb.get('teacher_input_ids', mb['input_ids']),
          mb['attention_mask'], types, deterministic=True, logits_positions=pos,
          return_mlm_hidden=hidden_only, **out_flags))
    elif objective.offline:  # the teacher module, if given, only tells its layer count
      t_out = cached_teacher.cached_teacher_output(
          mb, teacher.config.num_hidden_layers if teacher is not None else 0)
    if objective.task:
      terms = losses.task_terms(s_out, t_out, mb, weights)
      loss = losses.combine(terms, counts, weights)
    elif hidden_only:
      cast = lambda proj, m: tuple(x.astype(m.config.dtype) for x in proj)
      t_proj = None
      if t_out is not None and (weights.alpha_ce or weights.alpha_mse):
        t_proj = cast(bert.vocab_projection(teacher_params), teacher)
      loss, terms = chunked_vocab.chunked_vocab_terms(
          s_out.mlm_hidden, cast(bert.vocab_projection(trainable['student']), student),
          None if t_proj is None else t_out.mlm_hidden, t_proj, mb, weights, counts,
          objective.vocab_chunk_size)
      rest = losses.distillation_terms(s_out, t_out, mb, weights._replace(**_NO_VOCAB_TERMS))
      loss = loss + losses.combine(rest, counts, weights)
      terms = {**terms, **rest}
    else:
      terms = losses.distillation_terms(s_out, t_out, mb, weights)
      loss = losses.combine(terms, counts, weights)
    if inter is not None:
      i_terms = intermediate.intermediate_terms(s_out, t_out, mb, inter.weights, inter.layer_map,
                                                trainable.get('proj'))
      loss = loss + intermediate.combine(i_terms, counts, inter.weights)
      terms = {**terms, **i_terms}
    return loss, terms

  return loss_fn


def make_train_step(student: nn.Module, teacher: nn.Module | None, tx: optax.GradientTransformation,
                    objective: Objective, num_microbatches: int, skip_nonfinite: bool = True):
  """Builds `train_step(state, teacher_params, batch) -> (state, metrics)`.

  Args:
    student: the student's `bert.MaskedLM`.
    teacher: the teacher's `bert.MaskedLM` (None = plain MLM; see `make_loss_fn`).
    tx: optax transformation (`optimizer.make_optimizer`).
    objective: the run's objective (`setup.Run.objective`).
    num_microbatches: gradient-accumulation factor A; the global batch
      `[B, T]` is processed as A microbatches of `B/A` in a `lax.scan`, and
      each microbatch loss is normalised by the *global* token counts, so the
      summed gradient equals the one-big-batch gradient up to rounding.
    skip_nonfinite: a non-finite loss, gradient or updated parameter leaves params and
      optimizer state unchanged and increments `num_skipped` (the host decides whether
      to stop, `optim.on_nonfinite` and `optim.max_consecutive_nonfinite`).

  Returns:
    `train_step(state, teacher_params, batch) -> (state, metrics)`, pure, to jit
    (`jit_train_step`); the new state has `step + 1`.

  The state: `train_state.State`; the optimizer state is over the trainable
  tree `{'student': params[, 'proj': proj]}`. The batch: dict of `input_ids`,
  `attention_mask`, `labels`, all `[global_batch, seq_len]` int32 (MLM), or
  with `labels [global_batch]` and `token_type_ids` for sequence
  classification (`objective.task`; models built with `num_labels`); offline,
  also the cached targets (`teacher_topk_values`/`teacher_topk_ids [B, T, k]`,
  optional `teacher_logz [B, T]`, `teacher_hidden [B, T, H]`, intermediate
  `teacher_{field}_{i}`; `cached_teacher.cached_teacher_output`).

  The metrics (float32 scalars, replicated): `loss` (the step's total
  objective, nats), `loss_<term>` (each term's mean over its own count:
  tokens, masked tokens or examples), `grad_norm` (before clipping), `finite`
  (bool: loss, gradient norm and updated parameters all finite), `num_skipped`
  (int32, run total), `tokens` (non-padding tokens in the global batch) and
  `terms` (`{term: (sum, count)}`, for exact interval means).
  """
  grad_fn = jax.value_and_grad(make_loss_fn(student, teacher, objective), has_aux=True)

  def train_step(state: State, teacher_params, batch):
    """One optimizer step on the global `batch` (see `make_train_step`)."""
    batch = objective.prepare_batch(batch)
    counts = objective.counts(batch)  # global normalisers
    step_rng = jax.random.fold_in(state['rng'], state['step'])
    mbs = jax.tree.map(lambda x: _split_microbatches(x, num_microbatches), batch)

    def body(carry, xs):
      """Adds microbatch `xs = (i, mb)`'s gradients, loss and term sums to `carry`."""
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
    updates, new_opt = tx.update(grads, state['opt_state'], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    # Finite loss and gradients can still give an overflowing update (an absurd learning rate):
    # the new parameters are checked too, so a skipped step never leaves inf/NaN behind for a
    # checkpoint (one fused pass over the parameters, next to the update itself).
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.all(jnp.asarray([jnp.isfinite(x).all()
                                     for x in jax.tree.leaves(new_trainable)])))
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
    state_shardings: `train_state.state_layout(...)[0]`.
    teacher_shardings: the teacher params' shardings, or None when the step
      gets `teacher_params=None` (plain MLM, offline).

  Returns:
    The jitted `train_step(state, teacher_params, batch) -> (state, metrics)`.
  """
  replicated = state_shardings['step']
  return jax.jit(train_step, in_shardings=(state_shardings, teacher_shardings, None),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))




def jit_run_step(student_config: bert.ModelConfig, teacher_config: bert.ModelConfig | None, tx,
                 objective: Objective, num_microbatches: int, state_shardings: dict,
                 teacher_shardings=None):
  """The jitted step of a run, as the train loop builds it (and `train_compile` compiles it).

  Args:
    student_config: the student's config.
    teacher_config: the teacher's config, or None (no teacher loaded).
    tx: the optimizer.
    objective: the run's objective.
    num_microbatches: `optim.num_microbatches`.
    state_shardings: `train_state.state_layout(...)[0]`.
    teacher_shardings: the teacher params' shardings (None without a teacher).

  Returns:
    `(jitted step, reads_teacher)`: `reads_teacher` is False when the step takes
    `teacher_params=None` (no teacher, or offline: the teacher module only gives its depth).
  """
  teacher = bert.MaskedLM(teacher_config) if teacher_config is not None else None
  step_fn = make_train_step(bert.MaskedLM(student_config), teacher, tx, objective,
                            num_microbatches)
  reads_teacher = teacher is not None and not objective.offline
  return jit_train_step(step_fn, state_shardings,
                        teacher_shardings if reads_teacher else None), reads_teacher
