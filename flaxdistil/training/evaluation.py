"""Held-out evaluation: jitted eval steps and token-weighted metrics over fixed batches.

Three kinds of step: masked-LM (`make_eval_step`: NLL, perplexity, top-1), classification
(`make_task_eval_step`) and, for head-less encoder students, the teacher-student comparison of
`make_encoder_eval_step` (sentence-embedding cosine, last-layer MSE). The eval steps return
`(sum, count)` pairs, so means are exact across batches, microbatches and hosts; `evaluate` sums
them on the host.
"""

import math

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxdistil.data import glue
from flaxdistil.objectives import IGNORE_INDEX
from flaxdistil.objectives import intermediate
from flaxdistil.objectives import losses
from flaxdistil.objectives import positions
from flaxdistil.training import sharding
from flaxdistil.training import train_log


def make_task_eval_step(model: nn.Module):
  """`eval_step(params, batch, reference_top1) -> (pairs, top1)` for classification.

  Args:
    model: a `bert.MaskedLM` built with `num_labels`.

  Returns:
    `eval_step(params, batch, reference_top1=None)`, `batch` holding `input_ids`,
    `attention_mask` `[B, T]`, optional `token_type_ids` and `labels [B]` int32. It returns
    `(pairs, top1)`: `pairs` maps `nll` (gold-label cross-entropy, nats), `acc`, `tp`/`fp`/`fn`
    of label 1 (summed, so F1 is exact across batches and hosts) and, with
    `reference_top1 [B]`, `agree` to `(sum, count)` float32 scalars; `top1 [B]` int32 are
    the predicted labels. Padding rows (label -100) count nowhere.
  """

  def eval_step(params, batch, reference_top1=None):
    """`(pairs, top1)` of one classification batch (see `make_task_eval_step`)."""
    out = model.apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                      batch.get('token_type_ids'), deterministic=True)
    labels, top1 = batch['labels'], jnp.argmax(out.class_logits, -1)
    valid = (labels != IGNORE_INDEX).astype(jnp.float32)
    n = jnp.sum(valid)
    count = lambda x: (jnp.sum(x.astype(jnp.float32) * valid), n)
    pairs = {'nll': losses.mlm_cross_entropy(out.class_logits, labels),
             'acc': losses.accuracy(out.class_logits, labels),
             **{k: count(v) for k, v in glue.positive_class_outcomes(top1, labels).items()}}
    if reference_top1 is not None:
      pairs['agree'] = count(top1 == reference_top1)
    return pairs, top1

  return eval_step


def make_eval_step(model: nn.Module, max_predictions_per_seq: int = 0):
  """`eval_step(params, batch, reference_top1) -> (pairs, top1)` for held-out MLM metrics.

  Args:
    model: a `bert.MaskedLM` with its MLM head.
    max_predictions_per_seq: M > 0 computes logits only at the first M masked positions of
      each row (`positions.restrict_to_masked`, as the train step); 0 at every position.

  Returns:
    `eval_step(params, batch, reference_top1=None)` on `input_ids`, `attention_mask`,
    `labels` `[B, T]` int32 (-100 = not masked). It returns `(pairs, top1)`: `pairs` holds
    `(sum, count)` float32 scalars of masked-token NLL (`nll`, nats), top-1 accuracy (`acc`)
    and, when `reference_top1` (the teacher's `top1` on the same batch) is given, top-1
    agreement with it (`agree`); `top1` (`[B, T]`, or `[B, M]` with M) int32 stays on device.
  """

  def eval_step(params, batch, reference_top1=None):
    """`(pairs, top1)` of one MLM batch (see `make_eval_step`)."""
    batch = positions.restrict_to_masked(batch, max_predictions_per_seq)
    out = model.apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                      deterministic=True, logits_positions=batch.get('logits_positions'))
    top1 = jnp.argmax(out.logits, -1)
    pairs = {'nll': losses.mlm_cross_entropy(out.logits, batch['labels']),
             'acc': losses.accuracy(out.logits, batch['labels'])}
    if reference_top1 is not None:
      valid = (batch['labels'] != IGNORE_INDEX).astype(jnp.float32)
      pairs['agree'] = (jnp.sum((top1 == reference_top1) * valid), jnp.sum(valid))
    return pairs, top1

  return eval_step


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """The sentence embedding of sentence-transformers' mean pooling (all-MiniLM-L6-v2).

  Args:
    hidden: `[batch, seq_len, hidden]` last-layer hidden states.
    attention_mask: `[batch, seq_len]`, 1 for real tokens.

  Returns:
    `[batch, hidden]` in `hidden`'s dtype: the mean over real tokens (a row without any: zeros).
  """
  m = attention_mask[..., None].astype(hidden.dtype)
  return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def make_encoder_eval_step(student: nn.Module, teacher: nn.Module):
  """`eval_step(params, batch, teacher_params, proj=None) -> pairs` of encoder distillation.

  For a student without MLM head (MiniLM-style, `configs/demo.py`): both models read the
  original tokens of the held-out rows (masked positions put back from `labels`) and are compared
  at the last layer, as sentence encoders.

  Args:
    student: the student `bert.MaskedLM`.
    teacher: the teacher `bert.MaskedLM`.

  Returns:
    `eval_step(params, batch, teacher_params, proj=None)` on `input_ids`, `attention_mask`,
    `labels` `[B, T]` int32; `proj` is the TinyBERT `W_h` param tree mapping a narrower student
    to the teacher's width (`state['proj']['hidden']`), None when the widths are equal. It
    returns `(sum, count)` float32 pairs: `cos`, cosine of the mean-pooled embeddings (`mean_pool`)
    per row; `token_cos`, cosine of the last hidden states per real token; `mse`, squared error
    of the last hidden states per real token and feature.
  """

  def eval_step(params, batch, teacher_params, proj=None):
    """The `(sum, count)` pairs of one batch (see `make_encoder_eval_step`)."""
    mask, labels = batch['attention_mask'], batch['labels']
    ids = jnp.where(labels != IGNORE_INDEX, labels, batch['input_ids'])  # the unmasked text
    h_t = teacher.apply({'params': teacher_params}, ids, mask).hidden_states[-1]  # [B, T, Ht]
    h_s = student.apply({'params': params}, ids, mask).hidden_states[-1]          # [B, T, Hs]
    h_t, h_s = h_t.astype(jnp.float32), h_s.astype(jnp.float32)
    if proj is not None:
      h_s = intermediate.HiddenProjection(h_t.shape[-1]).apply({'params': proj}, h_s)
    e_s, e_t = mean_pool(h_s, mask), mean_pool(h_t, mask)                        # [B, H]
    cosine = lambda a, b: jnp.sum(a * b, -1) / jnp.maximum(
        jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
    rows = (jnp.sum(mask, -1) > 0).astype(jnp.float32)                           # [B]
    real = mask.astype(jnp.float32)                                              # [B, T]
    return {'cos': (jnp.sum(cosine(e_s, e_t) * rows), jnp.sum(rows)),
            'token_cos': (jnp.sum(cosine(h_s, h_t) * real), jnp.sum(real)),
            'mse': (jnp.sum((h_s - h_t) ** 2 * real[..., None]), jnp.sum(real) * h_t.shape[-1])}

  return eval_step


def evaluate_encoder(eval_fn, params, batches, teacher_params, proj=None) -> dict:
  """Held-out teacher-student comparison of an encoder student over fixed eval batches.

  Args:
    eval_fn: a jitted `make_encoder_eval_step` step.
    params: the student's params; `teacher_params` the teacher's (device arrays).
    batches: list of global batch dicts (`input_ids`, `attention_mask`, `labels`).
    proj: `W_h` params of a narrower student, or None.

  Returns:
    `embedding_cosine` (mean over rows of the cosine of mean-pooled last hidden states: 1 = the
    teacher's sentence embedding), `token_cosine` (mean over real tokens of the cosine of their
    last hidden states), `hidden_mse` (mean squared error of last hidden states over real tokens
    and features) and `num_sequences` (rows scored).
  """
  sums = {}
  for b in batches:
    for k, (s, c) in jax.device_get(eval_fn(params, b, teacher_params, proj)).items():
      acc = sums.setdefault(k, [0.0, 0.0])
      acc[0] += float(s)
      acc[1] += float(c)
  mean = lambda k: sums[k][0] / max(sums[k][1], 1.0)
  return {'embedding_cosine': mean('cos'), 'token_cosine': mean('token_cos'),
          'hidden_mse': mean('mse'), 'num_sequences': int(sums['cos'][1])}


def evaluate(eval_fn, params, batches, reference_top1=None) -> dict:
  """Token-weighted held-out metrics over fixed (global, sharded) eval batches.

  Args:
    eval_fn: a jitted `make_eval_step` / `make_task_eval_step` step.
    params: the model's params (device arrays, any sharding).
    batches: list of batch dicts (`input_ids`, `attention_mask`, `labels`).
    reference_top1: `_top1` of an earlier `evaluate` on the same batches
      (the teacher's), or None.

  Returns:
    A dict with `loss` (mean masked-token NLL, nats), `perplexity` (`exp(loss)`, loss capped
    at 50), `accuracy` (top-1 on masked tokens), `num_tokens` (masked tokens scored),
    `agreement` (top-1 agreement with `reference_top1`, if given) and `_top1` (per-batch
    device arrays of predictions, to serve as a reference). For classification
    (`make_task_eval_step`) the unit is the example, and `f1` (of label 1) is added.
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


def make_eval_steps(run, with_teacher: bool = True):
  """Jitted `(student_eval, teacher_eval)` steps for a `setup.Run`; None where not scored.

  Classification students (`num_labels`) get `make_task_eval_step`, the
  others `make_eval_step`. A model without the matching head (a head-less,
  MiniLM-style student, or a teacher with another label count) gets None:
  masked-token metrics need MLM heads (`Evaluator` scores a head-less student
  against its teacher with `make_encoder_eval_step` instead).

  Args:
    run: the `setup.Run` (configs, models, `objective.max_predictions_per_seq`).
    with_teacher: False (no teacher params) gives no teacher step.

  Returns:
    `(student_eval, teacher_eval)`: `jax.jit` of the step for each model, or None.
  """
  if run.student_config.num_labels:
    make = make_task_eval_step
    has_head = lambda cfg: cfg.num_labels == run.student_config.num_labels
  else:
    max_pred = run.objective.max_predictions_per_seq  # MLM heads on masked positions, as training
    make = lambda m: make_eval_step(m, max_predictions_per_seq=max_pred)
    has_head = lambda cfg: cfg.with_mlm_head
  s_eval = jax.jit(make(run.student_model)) if has_head(run.student_config) else None
  t_eval = (jax.jit(make(run.teacher_model))
            if with_teacher and run.teacher_config is not None and has_head(run.teacher_config)
            else None)
  return s_eval, t_eval


def _public(res: dict) -> dict:
  return {k: v for k, v in res.items() if not k.startswith('_')}


class Evaluator:
  """Held-out evaluation during training: the student at each call, the teacher once.

  Args:
    run: the `setup.Run` (models, objective, eval batches, mesh).
    teacher_params: device params of the teacher, or None (no teacher metrics).
    shard_batch: host-local batch -> global `jax.Array` batch.
    writer: `metric_writers.MetricWriter` ('eval' and, once, 'eval_teacher' records).

  `run.eval_batches()` gives global batches; each host feeds its own rows. Calling it returns the
  student's metrics (`loss`, `perplexity`, `accuracy`, `num_tokens`, `agreement` with the
  teacher's top-1; task metrics for classification; for a head-less encoder student with a
  teacher, `evaluate_encoder`'s `embedding_cosine` and `hidden_mse`), `{}` when nothing can be
  scored.
  """

  def __init__(self, run, teacher_params, shard_batch, writer):
    self.s_eval, self.t_eval = make_eval_steps(run, with_teacher=teacher_params is not None)
    scfg = run.student_config
    self.encoder_eval = None
    if (self.s_eval is None and not scfg.num_labels and not scfg.with_mlm_head
        and teacher_params is not None):
      self.encoder_eval = jax.jit(make_encoder_eval_step(run.student_model, run.teacher_model))
    p_i, p_n = jax.process_index(), jax.process_count()
    self.batches = [shard_batch({k: v[p_i * (len(v) // p_n):(p_i + 1) * (len(v) // p_n)]
                                 for k, v in b.items()}) for b in run.eval_batches()]
    self.run, self.t_params, self.writer = run, teacher_params, writer
    self.teacher = None  # the teacher's metrics (with its top-1), computed on first use

  @property
  def teacher_metrics(self) -> dict:
    """The teacher's metrics without `_top1`; `{}` before the first call or without a teacher."""
    return _public(self.teacher or {})

  def __call__(self, step: int, student_params, proj=None) -> dict:
    """Scores `student_params` at `step`, writes the 'eval' record and logs one line.

    Args:
      step: the train step (0: the initial student).
      student_params: the student's device params.
      proj: the train state's TinyBERT projections (`state['proj']`) or None; only the encoder
        comparison of a narrower student reads them (`proj['hidden']`, W_h).

    Returns:
      The metrics (class docstring), `{}` when nothing is scored.
    """
    if (self.s_eval is None and self.encoder_eval is None) or not self.batches:
      return {}
    with sharding.mesh_context(self.run.mesh, self.run.rules):
      if self.encoder_eval is not None:
        res = evaluate_encoder(self.encoder_eval, student_params, self.batches, self.t_params,
                               None if proj is None else proj['hidden'])
      else:
        if self.t_eval is not None and self.teacher is None:
          self.teacher = evaluate(self.t_eval, self.t_params, self.batches)
          self.writer.write(step, self.teacher_metrics, 'eval_teacher')
        res = _public(evaluate(self.s_eval, student_params, self.batches,
                               reference_top1=self.teacher['_top1'] if self.teacher else None))
    self.writer.write(step, res, 'eval')
    teacher = self.teacher_metrics
    logging.info('eval step %d: student %s%s', step, train_log.fmt(res),
                 f' | teacher {train_log.fmt(teacher)}' if teacher else '')
    return res
