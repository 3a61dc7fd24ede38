"""Distillation and MLM objectives as pure `(sum, count)` functions.

Every loss here returns a pair `(sum, count)` of float32 scalars instead of a
mean, so that averages stay token-weighted however the global batch is split
(over devices, hosts or gradient-accumulation microbatches): the caller sums
the pairs and divides once. Logits are cast to float32 before any softmax.
Cross-entropies and KLs are in nats (natural log); the cosine term is unitless
and the MSE term in squared logits.

The terms follow HF's DistilBERT `examples/research_projects/distillation/
distiller.py` (Sanh et al., 2019, "DistilBERT, a distilled version of BERT",
Sec. 2 "triple loss"):

  loss = alpha_ce  * T^2 * KL(softmax(t/T) || softmax(s/T))     (Hinton et al., 2015, Sec. 2)
       + alpha_mlm * CE(s, labels)                               (masked tokens only)
       + alpha_cos * (1 - cos(h_s, h_t))                         (last hidden states)
       + alpha_mse * sum_v (s - t)^2                             (optional; HF: MSELoss(sum) / n)

Offline distillation (`teacher.cache`) replaces the dense KL by `sparse_kl_div_loss`
over the teacher's stored top-k logits (equations in its docstring). The vocabulary terms
computed a chunk of positions at a time, without `[B, T, V]` logits, are in `chunked_vocab.py`.

Task distillation on sequence classification (`task_terms`; TinyBERT, Jiao et
al., 2020, Eq. 10, prediction-layer distillation):

  loss = alpha_ce   * T^2 * CE(softmax(t/T), softmax(s/T))        (soft cross-entropy, per example)
       + alpha_task * CE(s, gold label)                          (plain fine-tuning term)
       + alpha_cos  * (1 - cos(h_s, h_t))                        (as above)
"""

from typing import Mapping, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import jax.scipy.special

from flaxdistil.objectives import IGNORE_INDEX
from flaxdistil.objectives.cached_teacher import CachedTeacherOutput

Pair = Tuple[jax.Array, jax.Array]  # (sum, count), both float32 scalars


def as_f32(x) -> jax.Array:
  """Returns `x` as a float32 array (losses compute in float32 whatever the model dtype)."""
  return jnp.asarray(x, jnp.float32)


def weighted_sum(values, weights) -> Pair:
  """The weighted sum of `values` and the total weight.

  Args:
    values: float32 array, e.g. per-token losses `[B, T]`.
    weights: array broadcastable to `values` (0/1 mask or real weights).

  Returns:
    `(sum(values * w), sum(w))` float32 scalars, `w = float32(weights)`.
  """
  w = as_f32(weights)
  return jnp.sum(values * w), jnp.sum(w)


def weighted_total(terms: Mapping[str, Pair], counts: Mapping[str, jax.Array],
                   alphas: Mapping[str, float]) -> jax.Array:
  """`sum_k alphas[k] * sum_k / max(counts[k], 1)` over the `(sum, count)` terms present.

  `counts` are the global normalisers (`term_counts`, `intermediate.intermediate_counts`),
  not the terms' own counts, so microbatch totals add up to the global-batch mean.

  Args:
    terms: term name -> `(sum, count)`; the counts are not used.
    counts: term name -> global count, for every key of `terms`.
    alphas: term name -> coefficient, for every key of `terms`.

  Returns:
    The weighted total, a float32 scalar (nats for CE/KL terms).

  Raises:
    KeyError: a term without a count or an alpha.
  """
  total = jnp.zeros((), jnp.float32)
  for k, (s, _) in terms.items():
    total = total + alphas[k] * s / jnp.maximum(counts[k], 1.0)
  return total


def kl_div_loss(student_logits, teacher_logits, weights, temperature: float) -> Pair:
  """Temperature-scaled KL(teacher || student), summed over weighted tokens.

  Matches HF distiller's `ce_loss_fct = nn.KLDivLoss(reduction="batchmean")`
  applied to `log_softmax(s/T)` and `softmax(t/T)` and multiplied by `T**2`
  (the gradient-magnitude correction of Hinton et al., 2015).

  Args:
    student_logits: `[batch, seq_len, vocab_size]` any float dtype.
    teacher_logits: `[batch, seq_len, vocab_size]` any float dtype.
    weights: `[batch, seq_len]` 0/1 (or real) weights; padding must be 0.
    temperature: softmax temperature T > 0.

  Returns:
    `(sum over tokens of w * T^2 * KL, sum of w)`, float32 scalars; the sum in nats.
  """
  t = as_f32(temperature)
  s_logp = jax.nn.log_softmax(as_f32(student_logits) / t, axis=-1)
  t_logp = jax.nn.log_softmax(as_f32(teacher_logits) / t, axis=-1)
  # KL(p_t || p_s) = sum p_t (log p_t - log p_s); exp(log p) avoids a second softmax pass.
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)  # [B, T]
  total, n = weighted_sum(kl, weights)
  return total * t * t, n


def sparse_kl_div_loss(student_logits, topk_values, topk_ids, weights, temperature: float,
                       tail_bucket: bool = False, teacher_logz=None) -> Pair:
  """`T^2 * KL` against a teacher known only by its top-k logits (offline distillation).

  With `v_j`, `i_j` (j = 1..k) the teacher's top-k logits and ids and `s` the
  student's logits over the FULL vocabulary V, the student's log-probabilities are
  `log q_i = s_i/T - logsumexp_{v in V}(s_v/T)` (never renormalised over the top-k:
  that would hide the mass the student puts outside the teacher's top-k). Then

    tail_bucket=False:  p_j = softmax_j(v/T)   (teacher renormalised over its top-k)
        KL_k = sum_j p_j (log p_j - log q_{i_j})
    tail_bucket=True:  p_j = exp(v_j/T - L_t), L_t = logsumexp_V(t/T) (`teacher_logz`),
        p_tail = 1 - sum_j p_j,  q_tail = 1 - sum_j q_{i_j}
        KL_k+1 = sum_j p_j (log p_j - log q_{i_j}) + p_tail (log p_tail - log q_tail)

  Both are >= 0 (the first is KL(p || q restricted to the top-k) = KL(p || q/Q) - log Q
  with Q = sum_j q_{i_j} <= 1; the second is the KL of two distributions over k + 1
  buckets) and both equal the dense `kl_div_loss` when k = V (p_tail = 0). Without the tail
  bucket the -log Q term pushes all of the student's mass into the teacher's top-k set: on a
  flat teacher (bert-mini at T=2 keeps ~19% of its mass in its top-64) that wrecks perplexity
  (held-out perplexity 14,684 without the bucket vs 1,046 with it, k = 64, 150 steps of
  configs/wiki_mini.py; docs/offline.md), so `teacher.cache_tail_bucket` defaults on
  (`configs/distilbert.py`; this NamedTuple's own default is off).

  Args:
    student_logits: `[batch, seq_len, vocab_size]` any float dtype.
    topk_values: `[batch, seq_len, k]` teacher logits at temperature 1 (any float dtype,
      e.g. bfloat16 from the cache).
    topk_ids: `[batch, seq_len, k]` int32 vocabulary ids of `topk_values`.
    weights: `[batch, seq_len]`; padding must be 0.
    temperature: T > 0.
    tail_bucket: add the teacher's tail mass as one extra bucket (needs `teacher_logz`).
    teacher_logz: `[batch, seq_len]` float32 `logsumexp_V(t/T)` of the teacher at this T.

  Returns:
    `(sum over tokens of w * T^2 * KL, sum of w)`, float32 scalars; the sum in nats.

  Raises:
    ValueError: `tail_bucket` with k < V and no `teacher_logz`.
  """
  t = as_f32(temperature)
  s_logp = jax.nn.log_softmax(as_f32(student_logits) / t, axis=-1)          # [B, T, V], full-V norm
  s_logq = jnp.take_along_axis(s_logp, topk_ids.astype(jnp.int32), axis=-1)  # [B, T, k]
  v = as_f32(topk_values) / t
  if tail_bucket and topk_ids.shape[-1] < student_logits.shape[-1]:  # at k = V there is no tail
    if teacher_logz is None:
      raise ValueError('tail_bucket=True needs teacher_logz (logsumexp of the teacher over V).')
    t_logp = v - as_f32(teacher_logz)[..., None]                             # [B, T, k]
    p_tail = jnp.maximum(1.0 - jnp.sum(jnp.exp(t_logp), -1), 0.0)          # [B, T]
    q_tail = jnp.maximum(1.0 - jnp.sum(jnp.exp(s_logq), -1), 1e-30)
    tail = jax.scipy.special.xlogy(p_tail, p_tail) - jax.scipy.special.xlogy(p_tail, q_tail)
  else:
    t_logp = jax.nn.log_softmax(v, axis=-1)
    tail = 0.0
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logq), axis=-1) + tail       # [B, T]
  total, n = weighted_sum(kl, weights)
  return total * t * t, n


def mlm_cross_entropy(logits, labels) -> Pair:
  """Masked-LM cross-entropy over positions whose label is not -100.

  Matches `nn.CrossEntropyLoss(ignore_index=-100)` of HF `BertForMaskedLM`.

  Args:
    logits: `[batch, seq_len, vocab_size]` any float dtype.
    labels: `[batch, seq_len]` int32 token ids, -100 where not predicted.

  Returns:
    `(sum of token NLL in nats, number of predicted tokens)`, float32 scalars.
  """
  logits = as_f32(logits)
  valid = labels != IGNORE_INDEX
  safe = jnp.where(valid, labels, 0)
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  nll = (logz - gold) * valid
  return jnp.sum(nll), jnp.sum(as_f32(valid))


def accuracy(logits, labels) -> Pair:
  """Top-1 accuracy over positions whose label is not -100.

  Args:
    logits: `[..., num_classes]` (`[B, T, V]` MLM or `[B, C]` classification).
    labels: `logits.shape[:-1]` int32, -100 where not scored.

  Returns:
    `(number correct, number scored)`, float32 scalars.
  """
  valid = labels != IGNORE_INDEX
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  return jnp.sum(as_f32(correct)), jnp.sum(as_f32(valid))


def agreement(student_logits, teacher_logits, weights) -> Pair:
  """Student/teacher top-1 agreement over weighted positions.

  Args:
    student_logits / teacher_logits: `[..., vocab_size]` of the same shape.
    weights: `logits.shape[:-1]`, e.g. the masked positions.

  Returns:
    `(weighted number of agreeing positions, sum of weights)`, float32 scalars;
    their ratio is the agreement fraction.
  """
  same = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
  return weighted_sum(as_f32(same), weights)


def cosine_embedding_loss(student_hidden, teacher_hidden, weights) -> Pair:
  """`1 - cos(h_s, h_t)` per token, summed over weighted tokens.

  Matches HF distiller's `nn.CosineEmbeddingLoss(reduction="mean")` with target
  1 on the last hidden states of non-padding tokens. Student and teacher must
  have the same hidden size.

  Args:
    student_hidden: `[batch, seq_len, hidden_size]`.
    teacher_hidden: `[batch, seq_len, hidden_size]`.
    weights: `[batch, seq_len]`.

  Returns:
    `(sum of w * (1 - cos), sum of w)`, float32 scalars (unitless).

  Raises:
    ValueError: hidden sizes differ (the message points at `distill.alpha_cos=0`).
  """
  if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
    raise ValueError(
        f'alpha_cos needs equal hidden sizes, got student {student_hidden.shape[-1]} vs '
        f'teacher {teacher_hidden.shape[-1]}; set distill.alpha_cos=0 for a narrower student.')
  s, t = as_f32(student_hidden), as_f32(teacher_hidden)
  eps = 1e-8  # torch.nn.functional.cosine_similarity's eps
  cos = jnp.sum(s * t, -1) / (
      jnp.maximum(jnp.linalg.norm(s, axis=-1), eps) * jnp.maximum(jnp.linalg.norm(t, axis=-1), eps))
  return weighted_sum(1.0 - cos, weights)


def mse_logits_loss(student_logits, teacher_logits, weights) -> Pair:
  """Squared error between logits, summed over vocab and weighted tokens.

  Matches HF distiller's `nn.MSELoss(reduction="sum")(s, t) / num_tokens`.

  Args:
    student_logits / teacher_logits: `[batch, seq_len, vocab_size]` any float dtype.
    weights: `[batch, seq_len]`; padding must be 0.

  Returns:
    `(sum over tokens of w * sum_v (s - t)^2, sum of w)`, float32 scalars.
  """
  d = as_f32(student_logits) - as_f32(teacher_logits)
  return weighted_sum(jnp.sum(d * d, -1), weights)


def soft_cross_entropy(student_logits, teacher_logits, weights, temperature: float) -> Pair:
  """TinyBERT's prediction-layer loss: `T^2 * -sum_c softmax(t/T)_c log softmax(s/T)_c`.

  TinyBERT (Eq. 10, code `soft_cross_entropy`) uses T = 1 and no T^2; the T^2
  factor (Hinton et al., 2015) keeps gradients comparable across T and is 1
  at T = 1. Differs from `kl_div_loss` by the teacher entropy, a constant.

  Args:
    student_logits / teacher_logits: `[batch, num_labels]` any float dtype.
    weights: `[batch]` 1 for real examples, 0 for padding rows.
    temperature: T > 0.

  Returns:
    `(sum over examples of w * T^2 * CE, sum of w)`, float32 scalars; the sum in nats.
  """
  t = as_f32(temperature)
  s_logp = jax.nn.log_softmax(as_f32(student_logits) / t, axis=-1)
  t_p = jax.nn.softmax(as_f32(teacher_logits) / t, axis=-1)
  total, n = weighted_sum(jnp.sum(t_p * s_logp, -1), weights)
  return -total * t * t, n


class DistillWeights(NamedTuple):
  """The objective's coefficients (HF distiller names; `alpha_task` for gold labels)."""
  temperature: float = 2.0
  alpha_ce: float = 5.0
  alpha_mlm: float = 2.0
  alpha_cos: float = 1.0
  alpha_mse: float = 0.0
  restrict_ce_to_mask: bool = False
  alpha_task: float = 0.0
  tail_bucket: bool = False  # cached top-k KL: teacher's tail mass as an extra bucket


def distillation_terms(student_out, teacher_out, batch: Mapping[str, jax.Array],
                       w: DistillWeights) -> dict:
  """All `(sum, count)` pairs of the objective for one (micro)batch.

  Terms whose alpha is 0 are not computed at all (no teacher forward is needed
  when only alpha_mlm is non-zero).

  Args:
    student_out: `bert.ModelOutput` of the student (`logits [B, T, V]`, or `[B, M, V]`
      at `logits_positions`; `hidden_states[-1] [B, T, H]`).
    teacher_out: the teacher's `ModelOutput`, a `CachedTeacherOutput` (offline: the
      KL is `sparse_kl_div_loss`), or None when training plain MLM.
    batch: dict with `attention_mask [B, T]` and `labels [B, T]` (-100 = none).
    w: coefficients.

  Returns:
    dict term name -> (sum, count); names: 'ce', 'mlm', 'cos', 'mse'.

  Raises:
    ValueError: alpha_cos with different student / teacher hidden sizes, or a
      cached top-k KL with `tail_bucket` but no `logz` in the cache.
  """
  labels = batch['labels']
  token_w = batch['attention_mask']
  if w.restrict_ce_to_mask:
    token_w = (labels != IGNORE_INDEX).astype(jnp.int32)
  terms = {}
  if w.alpha_mlm:
    terms['mlm'] = mlm_cross_entropy(student_out.logits, labels)
  if w.alpha_ce and isinstance(teacher_out, CachedTeacherOutput):
    terms['ce'] = sparse_kl_div_loss(student_out.logits, teacher_out.topk_values,
                                     teacher_out.topk_ids, token_w, w.temperature,
                                     w.tail_bucket, teacher_out.logz)
  elif w.alpha_ce:
    terms['ce'] = kl_div_loss(student_out.logits, teacher_out.logits, token_w, w.temperature)
  if w.alpha_mse:
    terms['mse'] = mse_logits_loss(student_out.logits, teacher_out.logits, token_w)
  if w.alpha_cos:
    terms['cos'] = cosine_embedding_loss(
        student_out.hidden_states[-1], teacher_out.hidden_states[-1], batch['attention_mask'])
  return terms


def task_terms(student_out, teacher_out, batch: Mapping[str, jax.Array],
               w: DistillWeights) -> dict:
  """`(sum, count)` pairs of sequence-classification distillation (module docstring).

  Args:
    student_out / teacher_out: `ModelOutput`s with `class_logits [B, C]`
      (teacher None when only `alpha_task` is set: plain fine-tuning).
    batch: `labels [B]` int32 (-100 = padding row), `attention_mask [B, T]`.
    w: coefficients (`alpha_ce`, `alpha_task`, `alpha_cos`, `temperature`).

  Returns:
    dict with 'ce' (soft CE), 'task' (gold-label CE), 'cos' for non-zero alphas.

  Raises:
    ValueError: alpha_cos with different student / teacher hidden sizes.
  """
  labels = batch['labels']
  valid = (labels != IGNORE_INDEX).astype(jnp.float32)
  terms = {}
  if w.alpha_task:
    terms['task'] = mlm_cross_entropy(student_out.class_logits, labels)
  if w.alpha_ce:
    terms['ce'] = soft_cross_entropy(student_out.class_logits, teacher_out.class_logits, valid,
                                     w.temperature)
  if w.alpha_cos:
    terms['cos'] = cosine_embedding_loss(
        student_out.hidden_states[-1], teacher_out.hidden_states[-1], batch['attention_mask'])
  return terms


def check_logits_restriction(w: DistillWeights, max_predictions_per_seq: int) -> None:
  """MLM heads on masked positions only leave no logits for a KL/MSE over all tokens.

  Args:
    w: the coefficients.
    max_predictions_per_seq: `distill.max_predictions_per_seq` (0 = logits everywhere).

  Raises:
    ValueError: `max_predictions_per_seq > 0` with a KL/MSE term that is not
      restricted to masked tokens.
  """
  if max_predictions_per_seq and (w.alpha_ce or w.alpha_mse) and not w.restrict_ce_to_mask:
    raise ValueError('distill.max_predictions_per_seq>0 computes logits on masked tokens only: '
                     'set distill.restrict_ce_to_mask=True (or alpha_ce=alpha_mse=0), or set '
                     'max_predictions_per_seq=0.')


def term_alphas(w: DistillWeights) -> dict[str, float]:
  """Term name -> coefficient, for every term `distillation_terms` / `task_terms` can return.

  The one table of the logit / hidden-state terms (the intermediate ones are
  `intermediate.term_alphas`); a term is computed only when its alpha is non-zero.
  """
  return {'ce': w.alpha_ce, 'mlm': w.alpha_mlm, 'cos': w.alpha_cos, 'mse': w.alpha_mse,
          'task': w.alpha_task}


def term_counts(batch: Mapping[str, jax.Array], w: DistillWeights) -> dict:
  """Normalisers of each term computed from the batch alone (no model).

  Used to scale microbatch losses by the *global* count so that summed
  microbatch gradients equal the gradient of the global token-weighted mean.
  MLM batches (`labels [B, T]`) count masked or real tokens; classification
  batches (`labels [B]`, `task_terms`) count examples for 'ce' and 'task'.

  Args:
    batch: the global batch, `labels` and `attention_mask` (as the loss reads them).
    w: the coefficients; only terms with a non-zero alpha get a count.

  Returns:
    term name -> float32 scalar count: 'mlm', 'task' = labelled positions;
    'ce', 'mse' = labelled positions with `restrict_ce_to_mask` or for
    classification, else real tokens; 'cos' = real tokens.
  """
  labels, mask = batch['labels'], batch['attention_mask']
  n_labels = jnp.sum(as_f32(labels != IGNORE_INDEX))  # masked tokens, or examples
  n_tokens = jnp.sum(as_f32(mask))
  kl_n = n_labels if (labels.ndim == 1 or w.restrict_ce_to_mask) else n_tokens
  counts = {'mlm': n_labels, 'task': n_labels, 'ce': kl_n, 'mse': kl_n, 'cos': n_tokens}
  return {k: counts[k] for k, alpha in term_alphas(w).items() if alpha}


def combine(terms: dict, counts: dict, w: DistillWeights) -> jax.Array:
  """`sum_k alpha_k * sum_k / count_k` with counts from `term_counts` (max 1).

  Args:
    terms: `distillation_terms` / `task_terms` output.
    counts: `term_counts` of the global batch.
    w: the coefficients.

  Returns:
    The (micro)batch's share of the objective, a float32 scalar (nats for the CE/KL
    terms; the cos and mse terms are unitless / squared logits).
  """
  return weighted_total(terms, counts, term_alphas(w))
