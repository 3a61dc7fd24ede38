"""Intermediate-layer distillation objectives (TinyBERT, MiniLM), `(sum, count)` style.

Everything here is a pure function of model outputs and follows the
`losses.py` convention: each term returns a pair `(sum, count)` of float32
scalars, so averages stay token-weighted however the global batch is split;
the caller sums pairs and divides once (`combine`). Inputs are cast to float32
before any arithmetic, and teacher inputs pass through `stop_gradient` (the
teacher is a fixed target; the train step also stops its gradient).

TinyBERT (Jiao et al., 2020, "TinyBERT: Distilling BERT for Natural Language
Understanding", Sec. 3.1) with layer mapping n = g(m):

  L_embd = MSE(E^S W_e, E^T)                              (Eq. 9)   'emb'
  L_hidn = sum_m MSE(H^S_m W_h, H^T_g(m))                  (Eq. 8)   'hidden'
  L_attn = sum_m 1/h sum_i MSE(A^S_{m,i}, A^T_{g(m),i})    (Eq. 7)   'attn_score'
           (A = pre-softmax attention scores, equal head counts)

MiniLM (Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation for
Task-Agnostic Compression of Pre-Trained Transformers", Sec. 3.1-3.2), last
layers only:

  L_AT = 1/(A_h |x|) sum_a sum_t KL(A^T_{a,t} || A^S_{a,t})    (Eq. 5)   'attn_kl'
  L_VR = 1/(A_h |x|) sum_a sum_t KL(VR^T_{a,t} || VR^S_{a,t})  (Eq. 6-8) 'value_kl'
         VR = softmax(V V^T / sqrt(d_k))

and MiniLMv2 (Wang et al., 2021, Sec. 3.1) "relation heads": concatenate the
heads' vectors and re-split them into R relation heads, so teacher and student
head counts may differ.

Normalisation (documented deviations from the reference code, which averages
over padded positions too): MSE terms are means over *real* elements
(`hidden`/`emb`: count = real tokens, sum = per-token mean over the teacher
hidden dimension; `attn_score`: count = real (query, key) pairs, sum =
per-pair mean over heads); KL terms count real query rows (tokens), each row's
KL averaged over heads. Layer sums (Eq. 7-8 sum over mapped layers) go into the
`sum`, the count is taken once, so `sum / count` equals the papers' sum of
per-layer means.

Projection parameters (TinyBERT `fit_dense`, W_e/W_h) for a student narrower
than its teacher are trained together with the student (same optimizer), kept
in checkpoints next to the student params, and left out of exports: they are
not part of the student model and the exported HF model never needs them.
"""

from __future__ import annotations

import numbers
from typing import Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxdistil.objectives.losses import Pair
from flaxdistil.objectives.losses import as_f32
from flaxdistil.objectives.losses import weighted_sum
from flaxdistil.objectives.losses import weighted_total

TERM_NAMES = ('emb', 'hidden', 'attn_score', 'attn_kl', 'value_kl')
# Floor for log of probabilities given as probabilities (not logits): keeps
# KL finite where a student probability underflowed to 0.
_LOG_FLOOR = 1e-30


def _const(x):
  """Teacher tensors are targets: never differentiate through them."""
  return jax.lax.stop_gradient(as_f32(x))


# ----------------------------------------------------------------------------- layer maps

def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
  """TinyBERT's uniform mapping g(m) = m * k, k = Lt / Ls (Sec. 3.1, "Mapping Function").

  Student layer m (1-based) learns from teacher layer m*k (1-based), returned
  as 0-based teacher layer indices `m*k - 1`: 12 -> 4 gives [2, 5, 8, 11],
  4 -> 2 gives [1, 3]. Entry j is the teacher layer for (0-based) student
  layer j; index `hidden_states` with `j + 1` (entry 0 is the embeddings).

  Args:
    num_student_layers: Ls.
    num_teacher_layers: Lt, a multiple of Ls.

  Returns:
    Ls increasing 0-based teacher layer indices; the last is always Lt - 1.

  Raises:
    ValueError: non-positive layer counts, more student than teacher layers, or
      Lt not divisible by Ls (pass an explicit list to `resolve_layer_map`).
  """
  ls, lt = int(num_student_layers), int(num_teacher_layers)
  if ls < 1 or lt < 1:
    raise ValueError(f'layer counts must be >= 1, got student {ls}, teacher {lt}.')
  if ls > lt:
    raise ValueError(
        f'student has more layers ({ls}) than the teacher ({lt}); pass an explicit '
        f'layer map (one teacher layer per student layer) instead of the uniform one.')
  if lt % ls:
    raise ValueError(
        f'uniform layer map needs teacher layers ({lt}) divisible by student layers '
        f'({ls}); pass an explicit list of {ls} increasing 0-based teacher layer '
        f'indices, e.g. {[round((m + 1) * lt / ls) - 1 for m in range(ls)]}.')
  k = lt // ls
  return [m * k + k - 1 for m in range(ls)]


def resolve_layer_map(num_student_layers: int, num_teacher_layers: int,
                      explicit: Sequence[int] | None = None) -> list[int]:
  """The uniform map, or `explicit` after validation.

  Args:
    num_student_layers: Ls.
    num_teacher_layers: Lt.
    explicit: optional list of Ls 0-based teacher layer indices (student layer
      j learns from teacher layer explicit[j]); strictly increasing, each in
      [0, Lt). None or empty = `uniform_layer_map`.

  Returns:
    Ls 0-based teacher layer indices (ints).

  Raises:
    ValueError: wrong length, non-integer, out-of-range or non-increasing
      entries (message names the problem), or see `uniform_layer_map`.
  """
  ls, lt = int(num_student_layers), int(num_teacher_layers)
  if explicit is None or len(explicit) == 0:
    return uniform_layer_map(ls, lt)
  layers = list(explicit)
  if len(layers) != ls:
    raise ValueError(
        f'layer map {layers} has {len(layers)} entries but the student has {ls} layers; '
        f'give exactly one teacher layer per student layer.')
  if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in layers):
    raise ValueError(f'layer map {layers} must hold integer layer indices.')
  layers = [int(x) for x in layers]
  bad = [x for x in layers if not 0 <= x < lt]
  if bad:
    raise ValueError(
        f'layer map {layers} has teacher indices {bad} outside [0, {lt}); indices are '
        f'0-based teacher layers (the embeddings are not a layer).')
  if any(b <= a for a, b in zip(layers, layers[1:])):
    raise ValueError(f'layer map {layers} must be strictly increasing.')
  return layers


# ----------------------------------------------------------------------------- projections

class HiddenProjection(nn.Module):
  """TinyBERT's learnable W_h / W_e (`fit_dense`): student hidden -> teacher hidden.

  `x: [..., student_hidden]` (any float dtype) -> `[..., teacher_hidden]`
  float32. Kernel `[student_hidden, teacher_hidden]` with logical axes
  ('embed', None) (sharded like the student's embedding axis, teacher axis
  replicated), bias (None,); normal(0.02) / zeros init as HF `_init_weights`.
  """
  teacher_hidden_size: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(
        self.teacher_hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ('embed', None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        name='dense')(as_f32(x))


def _init_projection_boxed(rng, student_hidden: int, teacher_hidden: int):
  x = jnp.zeros((1, student_hidden), jnp.float32)
  r_emb, r_hid = jax.random.split(rng)
  mod = HiddenProjection(teacher_hidden)
  return {'embedding': mod.init(r_emb, x)['params'], 'hidden': mod.init(r_hid, x)['params']}


def init_projection_params(rng: jax.Array, student_hidden: int, teacher_hidden: int):
  """TinyBERT's W_e and W_h for a student narrower (or wider) than its teacher.

  Train these with the student, keep them in checkpoints, leave them out of
  exports.

  Args:
    rng: PRNG key (split into one key per projection).
    student_hidden: Hs.
    teacher_hidden: Ht.

  Returns:
    Unboxed float32 params `{'embedding': W_e, 'hidden': W_h}`, each a
    `HiddenProjection` param tree (`{'dense': {'kernel': [Hs, Ht], 'bias': [Ht]}}`),
    or None when Hs == Ht: TinyBERT then compares representations directly and
    no extra parameters exist.
  """
  if int(student_hidden) == int(teacher_hidden):
    return None
  return nn.meta.unbox(_init_projection_boxed(rng, int(student_hidden), int(teacher_hidden)))


def abstract_projection_params(student_hidden: int, teacher_hidden: int):
  """The shapes of `init_projection_params` without computing them.

  Args:
    student_hidden: Hs.
    teacher_hidden: Ht.

  Returns:
    Boxed (`nn.Partitioned`, logical axis names) tree of float32 `ShapeDtypeStruct`s,
    for shardings; None when Hs == Ht.
  """
  if int(student_hidden) == int(teacher_hidden):
    return None
  return jax.eval_shape(lambda r: _init_projection_boxed(r, int(student_hidden), int(teacher_hidden)),
                        jax.random.PRNGKey(0))


def _project(x, proj, teacher_hidden: int, what: str):
  """Applies a HiddenProjection param tree (or checks widths when proj is None)."""
  if proj is None:
    if x.shape[-1] != teacher_hidden:
      raise ValueError(
          f'{what}: student hidden size {x.shape[-1]} != teacher hidden size {teacher_hidden}; '
          f'pass projection params from intermediate.init_projection_params.')
    return as_f32(x)
  return HiddenProjection(teacher_hidden).apply({'params': proj}, x)


# ----------------------------------------------------------------------------- terms

def _token_mse(s, t, weights) -> Pair:
  d = s - t
  return weighted_sum(jnp.mean(d * d, axis=-1), weights)


def embedding_mse(s_emb, t_emb, weights, proj=None) -> Pair:
  """TinyBERT embedding loss MSE(E^S W_e, E^T) (Eq. 9).

  Args:
    s_emb: `[batch, seq_len, Hs]` student embedding output (`hidden_states[0]`).
    t_emb: `[batch, seq_len, Ht]` teacher embedding output.
    weights: `[batch, seq_len]` token weights (attention mask; padding 0).
    proj: `HiddenProjection` params W_e (`init_projection_params(...)['embedding']`)
      or None when Hs == Ht.

  Returns:
    `(sum over tokens of w * mean_d (s W_e - t)^2, sum of w)` float32 scalars.

  Raises:
    ValueError: Hs != Ht without `proj`.
  """
  t = _const(t_emb)
  return _token_mse(_project(s_emb, proj, t.shape[-1], 'embedding_mse'), t, weights)


def _check_map(n_student: int, n_teacher: int, layer_map, what: str):
  if len(layer_map) != n_student:
    raise ValueError(f'{what}: layer_map has {len(layer_map)} entries for {n_student} '
                     f'student layers.')
  if max(layer_map) >= n_teacher or min(layer_map) < 0:
    raise ValueError(f'{what}: layer_map {list(layer_map)} indexes outside the teacher\'s '
                     f'{n_teacher} layers.')


def hidden_mse(s_hidden, t_hidden, weights, layer_map, proj=None) -> Pair:
  """TinyBERT hidden-state loss sum_m MSE(H^S_m W_h, H^T_g(m)) (Eq. 8).

  Args:
    s_hidden: Ls arrays `[batch, seq_len, Hs]`, the student *layer* outputs
      (`hidden_states[1:]`, embeddings excluded).
    t_hidden: Lt arrays `[batch, seq_len, Ht]` (teacher `hidden_states[1:]`).
    weights: `[batch, seq_len]` token weights.
    layer_map: Ls 0-based teacher layer indices (`resolve_layer_map`).
    proj: W_h params (shared by all layers, as in the paper) or None if Hs == Ht.

  Returns:
    `(sum over mapped layers and tokens of w * mean_d err^2, sum of w)` float32 scalars.

  Raises:
    ValueError: layer_map does not fit the layer counts; Hs != Ht without proj.
  """
  _check_map(len(s_hidden), len(t_hidden), layer_map, 'hidden_mse')
  total = jnp.zeros((), jnp.float32)
  count = jnp.sum(as_f32(weights))
  for j, i in enumerate(layer_map):
    t = _const(t_hidden[i])
    total = total + _token_mse(_project(s_hidden[j], proj, t.shape[-1], 'hidden_mse'), t,
                               weights)[0]
  return total, count


def _check_heads(s_shape, t_shape, what: str, hint: str):
  if s_shape[1] != t_shape[1]:
    raise ValueError(
        f'{what} needs equal attention head counts, got student {s_shape[1]} vs teacher '
        f'{t_shape[1]}; {hint}')
  if s_shape[0] != t_shape[0] or s_shape[2] != t_shape[2]:
    raise ValueError(f'{what}: student {s_shape} and teacher {t_shape} batch/seq_len differ.')


def attention_score_mse(s_scores, t_scores, attention_mask, layer_map) -> Pair:
  """TinyBERT attention loss sum_m 1/h sum_i MSE(A^S_{m,i}, A^T_{g(m),i}) (Eq. 7).

  A = pre-softmax scores (`ModelOutput.attention_scores`, padded keys at
  finfo.min); pairs with a padded query or key are excluded (TinyBERT's code
  zeroes them instead, but keeps them in the mean).

  Args:
    s_scores: Ls arrays `[batch, heads, seq_len, seq_len]`.
    t_scores: Lt arrays `[batch, heads, seq_len, seq_len]`, same head count.
    attention_mask: `[batch, seq_len]` 1 = token, 0 = padding.
    layer_map: Ls 0-based teacher layer indices.

  Returns:
    `(sum over mapped layers and real (query, key) pairs of mean_h err^2,
    number of real (query, key) pairs)` float32 scalars.

  Raises:
    ValueError: head counts differ (use MiniLM relations instead), shapes or
      layer_map mismatch.
  """
  _check_map(len(s_scores), len(t_scores), layer_map, 'attention_score_mse')
  m = as_f32(attention_mask)
  pair = (m[:, :, None] * m[:, None, :])[:, None]  # [B, 1, T, T]
  total = jnp.zeros((), jnp.float32)
  for j, i in enumerate(layer_map):
    s, t = as_f32(s_scores[j]), _const(t_scores[i])
    _check_heads(s.shape, t.shape, 'attention_score_mse (TinyBERT)',
                 'set alpha_attn_score=0 and use the MiniLM value relation '
                 '(alpha_value_kl with num_relation_heads), which allows different head counts.')
    # where() rather than multiply: masked entries are finfo.min and must not
    # produce inf * 0.
    d = jnp.where(pair > 0, s - t, 0.0)
    total = total + jnp.sum(jnp.mean(d * d, axis=1))
  return total, jnp.sum(pair)


def _row_kl(t_logp, s_logp, attention_mask) -> Pair:
  """KL(t || s) over keys per row [B, h, T, T] log-probs; mean over heads, sum real rows."""
  key = as_f32(attention_mask)[:, None, None, :] > 0
  kl = jnp.sum(jnp.where(key, jnp.exp(t_logp) * (t_logp - s_logp), 0.0), axis=-1)  # [B, h, T]
  return weighted_sum(jnp.mean(kl, axis=1), attention_mask)


def attention_kl(s_probs_last, t_probs_last, attention_mask) -> Pair:
  """MiniLM self-attention distribution transfer (Eq. 5), last layers.

  Args:
    s_probs_last: `[batch, heads, seq_len, seq_len]` student attention
      probabilities (`ModelOutput.attentions[-1]`).
    t_probs_last: same shape, teacher (same head count).
    attention_mask: `[batch, seq_len]`.

  Returns:
    `(sum over real query rows of mean_h KL(t_row || s_row), number of real
    query rows)` float32 scalars, KL in nats; padded keys and query rows are
    excluded.

  Raises:
    ValueError: head counts differ (MiniLM v1 needs equal heads), or batch / seq_len differ.
  """
  _check_heads(s_probs_last.shape, t_probs_last.shape, 'attention_kl (MiniLM)',
               'set alpha_attn_kl=0 and use value_relation_kl with num_relation_heads '
               '(MiniLMv2 relation heads).')
  s_logp = jnp.log(jnp.maximum(as_f32(s_probs_last), _LOG_FLOOR))
  t_logp = jnp.log(jnp.maximum(_const(t_probs_last), _LOG_FLOOR))
  return _row_kl(t_logp, s_logp, attention_mask)


def _relation_logp(values, attention_mask, num_relation_heads):
  """log softmax(V V^T / sqrt(d_r)) over real keys: [B, h, T, d] -> [B, R, T, T]."""
  v = as_f32(values)
  b, h, t, d = v.shape
  if num_relation_heads:
    r = int(num_relation_heads)
    if (h * d) % r:
      raise ValueError(f'value_relation_kl: hidden size {h * d} is not divisible by '
                       f'num_relation_heads={r}; choose R dividing both hidden sizes.')
    # Concatenate heads back to [B, T, H] (the value projection's layout), re-split.
    v = v.transpose(0, 2, 1, 3).reshape(b, t, r, h * d // r).transpose(0, 2, 1, 3)
  logits = jnp.einsum('bhqd,bhkd->bhqk', v, v) * (v.shape[-1] ** -0.5)
  key = as_f32(attention_mask)[:, None, None, :] > 0
  return jax.nn.log_softmax(jnp.where(key, logits, jnp.finfo(jnp.float32).min), axis=-1)


def value_relation_kl(s_values_last, t_values_last, attention_mask,
                      num_relation_heads: int | None = None) -> Pair:
  """MiniLM value-relation transfer (Eq. 6-8); MiniLMv2 relation heads.

  VR = softmax(V V^T / sqrt(d_r)) per (relation) head, with V the value
  vectors of the last layer (`ModelOutput.values[-1]`) and d_r the head size
  of each model separately.

  Args:
    s_values_last: `[batch, heads_s, seq_len, head_dim_s]` any float dtype.
    t_values_last: `[batch, heads_t, seq_len, head_dim_t]`.
    attention_mask: `[batch, seq_len]`.
    num_relation_heads: None = per attention head (MiniLM; needs heads_s ==
      heads_t); R = concatenate heads and re-split into R relation heads of
      size H/R (MiniLMv2), so head counts and widths may differ.

  Returns:
    `(sum over real query rows of mean over (relation) heads of KL(VR^T || VR^S),
    number of real query rows)` float32 scalars, KL in nats.

  Raises:
    ValueError: head counts (or batch / seq_len) differ without num_relation_heads,
      or R does not divide a hidden size.
  """
  if not num_relation_heads:
    _check_heads(s_values_last.shape, t_values_last.shape, 'value_relation_kl',
                 'pass num_relation_heads (MiniLMv2 relation heads) to compare models '
                 'with different head counts.')
  s_logp = _relation_logp(s_values_last, attention_mask, num_relation_heads)
  t_logp = _relation_logp(_const(t_values_last), attention_mask, num_relation_heads)
  return _row_kl(t_logp, s_logp, attention_mask)


# ----------------------------------------------------------------------------- objective

class IntermediateWeights(NamedTuple):
  """Coefficients of the intermediate terms (0 = term skipped).

  `num_relation_heads`: MiniLMv2 relation heads for 'value_kl' (None = per
  attention head). `relation_teacher_layer`: teacher layer (0-based, negative
  from the end) for 'attn_kl'/'value_kl'; MiniLM uses the last (-1), MiniLMv2
  an upper-middle layer for large teachers. The student side is always its
  last layer.
  """
  alpha_emb: float = 0.0
  alpha_hidden: float = 0.0
  alpha_attn_score: float = 0.0
  alpha_attn_kl: float = 0.0
  alpha_value_kl: float = 0.0
  num_relation_heads: int | None = None
  relation_teacher_layer: int = -1


def term_alphas(w: IntermediateWeights) -> dict:
  """Term name -> alpha for all of `TERM_NAMES` (names as `intermediate_terms` returns them)."""
  return dict(zip(TERM_NAMES, w[:5]))


def model_kwargs(w: IntermediateWeights) -> dict:
  """Extra `MaskedLM.__call__` flags both models need for these terms.

  Returns:
    `{'output_attentions', 'output_attention_scores', 'output_values'}` -> bool.
  """
  return {'output_attentions': bool(w.alpha_attn_kl),
          'output_attention_scores': bool(w.alpha_attn_score),
          'output_values': bool(w.alpha_value_kl)}


def _need(out, field: str, flag: str, who: str):
  value = getattr(out, field)
  if value is None:
    raise ValueError(f'{who} output has no {field}; call the model with {flag}=True '
                     f'(intermediate.model_kwargs(weights) lists the flags).')
  return value


def intermediate_terms(student_out, teacher_out, batch: Mapping[str, jax.Array],
                       weights: IntermediateWeights, layer_map: Sequence[int],
                       proj_params=None) -> dict:
  """All intermediate `(sum, count)` pairs for one (micro)batch.

  Args:
    student_out / teacher_out: `bert.ModelOutput`s, produced with
      `**model_kwargs(weights)` (hidden_states always present); the teacher's may
      be a `cached_teacher.CachedTeacherOutput` (offline).
    batch: dict with `attention_mask [B, T]`.
    weights: coefficients; terms with alpha 0 are not computed.
    layer_map: Ls 0-based teacher layer indices (`resolve_layer_map`).
    proj_params: `init_projection_params(...)` (`{'embedding', 'hidden'}`) for a
      narrower student, else None.

  Returns:
    dict name -> (sum, count) with names from `TERM_NAMES`
    ('emb', 'hidden', 'attn_score', 'attn_kl', 'value_kl').

  Raises:
    ValueError: a needed output is missing (names the model flag), or any
      error of the individual terms.
  """
  mask = batch['attention_mask']
  proj = proj_params or {}
  terms = {}
  if weights.alpha_emb:
    terms['emb'] = embedding_mse(student_out.hidden_states[0], teacher_out.hidden_states[0],
                                 mask, proj.get('embedding'))
  if weights.alpha_hidden:
    terms['hidden'] = hidden_mse(student_out.hidden_states[1:], teacher_out.hidden_states[1:],
                                 mask, layer_map, proj.get('hidden'))
  if weights.alpha_attn_score:
    flag = 'output_attention_scores'
    terms['attn_score'] = attention_score_mse(
        _need(student_out, 'attention_scores', flag, 'student'),
        _need(teacher_out, 'attention_scores', flag, 'teacher'), mask, layer_map)
  tl = weights.relation_teacher_layer
  if weights.alpha_attn_kl:
    terms['attn_kl'] = attention_kl(
        _need(student_out, 'attentions', 'output_attentions', 'student')[-1],
        _need(teacher_out, 'attentions', 'output_attentions', 'teacher')[tl], mask)
  if weights.alpha_value_kl:
    terms['value_kl'] = value_relation_kl(
        _need(student_out, 'values', 'output_values', 'student')[-1],
        _need(teacher_out, 'values', 'output_values', 'teacher')[tl], mask,
        weights.num_relation_heads)
  return terms


def intermediate_counts(batch: Mapping[str, jax.Array], weights: IntermediateWeights) -> dict:
  """Global normalisers of each enabled term from the batch alone (as `losses.term_counts`).

  Tokens for 'emb', 'hidden', 'attn_kl', 'value_kl'; real (query, key) pairs
  (sum over sequences of n_b^2) for 'attn_score'. Equal to the counts
  `intermediate_terms` returns for the same batch.

  Args:
    batch: the global batch; only `attention_mask [B, T]` is read.
    weights: the coefficients; only terms with a non-zero alpha get a count.

  Returns:
    term name -> float32 scalar count.
  """
  m = as_f32(batch['attention_mask'])
  n_tok = jnp.sum(m)
  n_pairs = jnp.sum(jnp.sum(m, axis=-1) ** 2)
  return {k: n_pairs if k == 'attn_score' else n_tok
          for k, a in term_alphas(weights).items() if a}


def combine(terms: dict, counts: dict, weights: IntermediateWeights) -> jax.Array:
  """`sum_k alpha_k * sum_k / max(count_k, 1)` over the intermediate terms present.

  Same contract as `losses.combine`; add the two totals in the train step.

  Args:
    terms: `intermediate_terms` output.
    counts: `intermediate_counts` of the global batch.
    weights: the coefficients.

  Returns:
    This (micro)batch's share of the intermediate objective, a float32 scalar (MSE terms in
    squared activations, KL terms in nats).
  """
  return weighted_total(terms, counts, term_alphas(weights))
