"""The vocabulary terms (mlm, ce, mse) without ever holding `[B, T, V]` logits.

The tied decoder `logits = h @ embedding.T + bias` of student and teacher runs a chunk of positions
at a time in a `lax.scan`, and each chunk's gradient w.r.t. the student logits is formed in closed
form and turned into gradients of `h`, `embedding` and `bias` right away (a `jax.custom_vjp`, like
Liger-Kernel's fused linear cross-entropy, Hsu et al., 2024). Same values as
`losses.distillation_terms` + `losses.combine` restricted to those terms; peak memory
`[B, chunk, V]` float32 per model instead of `[B, T, V]`, no logits recomputed in the backward pass.
"""

import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from flaxdistil.objectives import IGNORE_INDEX
from flaxdistil.objectives import losses
from flaxdistil.objectives.losses import as_f32

# The terms computed here, in the order of the `coef` tuples below.
VOCAB_TERMS = ('mlm', 'ce', 'mse')


def _vocab_chunk(s_h, s_emb, s_bias, t_h, t_emb, t_bias, labels, kl_w, coef, *, temperature,
                 with_grad: bool):
  """Vocabulary terms of one chunk of positions, and their gradient w.r.t. the student logits.

  s_h / t_h: [B, C, H]; labels / kl_w: [B, C]; coef: (c_mlm, c_ce, c_mse) float32 scalars
  (alpha / global count, 0 for a term that is off). Returns (sums dict, grad [B, C, V] float32 of
  sum_k coef_k * sum_k, or None).
  """
  c_mlm, c_ce, c_mse = coef
  s = jnp.einsum('bch,vh->bcv', s_h, s_emb, preferred_element_type=jnp.float32) + as_f32(s_bias)
  sums, g = {}, jnp.zeros_like(s) if with_grad else None
  if c_mlm is not None:
    valid = labels != IGNORE_INDEX
    logz = jax.nn.logsumexp(s, axis=-1, keepdims=True)  # [B, C, 1]
    gold = jnp.take_along_axis(s, jnp.where(valid, labels, 0)[..., None], axis=-1)
    sums['mlm'] = jnp.sum((logz - gold)[..., 0] * valid)
    if with_grad:  # d/ds CE = softmax(s) - onehot(y) on predicted positions
      onehot = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.float32)
      g = g + c_mlm * as_f32(valid)[..., None] * (jnp.exp(s - logz) - onehot)
  if c_ce is not None or c_mse is not None:
    t = jnp.einsum('bch,vh->bcv', t_h, t_emb, preferred_element_type=jnp.float32) + as_f32(t_bias)
    w = as_f32(kl_w)[..., None]
  if c_ce is not None:
    temp = as_f32(temperature)
    s_logp = jax.nn.log_softmax(s / temp, axis=-1)
    t_logp = jax.nn.log_softmax(t / temp, axis=-1)
    t_p = jnp.exp(t_logp)
    sums['ce'] = jnp.sum(jnp.sum(t_p * (t_logp - s_logp), -1) * w[..., 0]) * temp * temp
    if with_grad:  # d/ds T^2 KL(p_t || softmax(s/T)) = T (p_s - p_t)
      g = g + c_ce * temp * w * (jnp.exp(s_logp) - t_p)
  if c_mse is not None:
    d = s - t
    sums['mse'] = jnp.sum(jnp.sum(d * d, -1) * w[..., 0])
    if with_grad:
      g = g + c_mse * 2.0 * w * d
  return sums, g


def _to_chunks(x, chunk: int):
  """[B, M, ...] -> [M/chunk, B, chunk, ...] (chunks along positions: batch sharding untouched)."""
  b, m = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, m // chunk, chunk) + x.shape[2:]), 1, 0)


def _scan_chunks(s_h, s_emb, s_bias, t_h, t_emb, t_bias, labels, kl_w, coef, temperature,
                 chunk, with_grad):
  """Runs `_vocab_chunk` over position chunks; returns (sums, (d_h, d_emb, d_bias) or None)."""
  m = s_h.shape[1]
  pad = -m % chunk
  if pad:  # padded positions: label ignored, weight 0 -> they add nothing
    pad_to = lambda x, v: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2),
                                  constant_values=v)
    s_h, labels, kl_w = pad_to(s_h, 0), pad_to(labels, IGNORE_INDEX), pad_to(kl_w, 0)
    t_h = None if t_h is None else pad_to(t_h, 0)
  xs = (_to_chunks(s_h, chunk), None if t_h is None else _to_chunks(t_h, chunk),
        _to_chunks(labels, chunk), _to_chunks(kl_w, chunk))
  sums0 = {k: jnp.zeros((), jnp.float32)
           for k, c in zip(VOCAB_TERMS, coef) if c is not None}
  carry0 = (sums0, (jnp.zeros(s_emb.shape, jnp.float32), jnp.zeros(s_bias.shape, jnp.float32))
            if with_grad else None)

  def body(carry, x):
    """One chunk: adds its sums (and emb/bias gradients) to `carry`; emits its d_h or None."""
    sums, acc = carry
    sh, th, y, w = x
    part, g = _vocab_chunk(sh, s_emb, s_bias, th, t_emb, t_bias, y, w, coef,
                           temperature=temperature, with_grad=with_grad)
    sums = {k: sums[k] + part[k] for k in sums}
    if not with_grad:
      return (sums, None), None
    d_emb = acc[0] + jnp.einsum('bcv,bch->vh', g, sh, preferred_element_type=jnp.float32)
    d_bias = acc[1] + jnp.sum(g, axis=(0, 1))
    d_h = jnp.einsum('bcv,vh->bch', g.astype(s_emb.dtype), s_emb,
                     preferred_element_type=jnp.float32)
    return (sums, (d_emb, d_bias)), d_h.astype(s_h.dtype)

  (sums, acc), d_h = jax.lax.scan(body, carry0, xs)
  if not with_grad:
    return sums, None
  d_h = jnp.moveaxis(d_h, 0, 1).reshape(s_h.shape)[:, :m]  # [B, M, H]
  return sums, (d_h, acc[0].astype(s_emb.dtype), acc[1].astype(s_bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _fused_vocab_loss(s_h, s_emb, s_bias, t_h, t_emb, t_bias, labels, kl_w, coef, temperature,
                      chunk):
  sums, _ = _scan_chunks(s_h, s_emb, s_bias, t_h, t_emb, t_bias, labels, kl_w, coef, temperature,
                         chunk, with_grad=False)
  return sums


def _fused_fwd(s_h, s_emb, s_bias, t_h, t_emb, t_bias, labels, kl_w, coef, temperature, chunk):
  sums, grads = _scan_chunks(s_h, s_emb, s_bias, t_h, t_emb, t_bias, labels, kl_w, coef,
                             temperature, chunk, with_grad=True)
  return sums, (grads, coef, t_h, t_emb, t_bias, labels, kl_w)


def _fused_bwd(temperature, chunk, res, ct):  # pylint: disable=unused-argument
  (d_h, d_emb, d_bias), coef, t_h, t_emb, t_bias, labels, kl_w = res
  # The gradients were formed for the loss sum_k coef_k * sums_k; a cotangent on sums_k
  # other than coef_k (times one common factor) cannot be honoured.
  scale = [ct[k] / c for k, c in zip(VOCAB_TERMS, coef) if c is not None]
  s = scale[0] if scale else jnp.zeros((), jnp.float32)
  zeros = lambda x: None if x is None else jnp.zeros_like(x)
  return (s * d_h, s * d_emb, s * d_bias, zeros(t_h), zeros(t_emb), zeros(t_bias), None,
          zeros(kl_w), tuple(None if c is None else jnp.zeros_like(c) for c in coef))


_fused_vocab_loss.defvjp(_fused_fwd, _fused_bwd)


def chunked_vocab_terms(student_hidden, student_proj, teacher_hidden, teacher_proj, batch,
                        w: losses.DistillWeights, counts: Mapping[str, jax.Array],
                        chunk_size: int) -> tuple[jax.Array, dict]:
  """The vocabulary terms (mlm, ce, mse) without ever holding `[B, T, V]` logits.

  Same values as `losses.distillation_terms` + `losses.combine` restricted to those terms (module
  docstring). Each chunk's gradient w.r.t. the student logits is the closed form `T (p_s - p_t)`
  for T^2 KL, `softmax(s) - onehot(y)` for CE and `2 (s - t)` for MSE.

  Args:
    student_hidden: `[B, M, H]` the student's `ModelOutput.mlm_hidden` (compute dtype).
    student_proj: `(embedding [V, H], bias [V])` of the student (`bert.vocab_projection`),
      cast to the compute dtype by the caller; differentiable.
    teacher_hidden / teacher_proj: the same for the teacher, or None when neither alpha_ce nor
      alpha_mse is set (no gradient flows to them).
    batch: `labels [B, M]` (-100 = not predicted) and `attention_mask [B, M]`.
    w: coefficients; `restrict_ce_to_mask` weights KL/MSE by masked positions.
    counts: global normalisers from `losses.term_counts` (keys 'mlm', 'ce', 'mse' as present).
    chunk_size: positions per chunk (M is padded up to a multiple).

  Returns:
    `(loss, terms)`: `loss = sum_k alpha_k * sum_k / max(count_k, 1)` (float32 scalar; mlm and
    ce in nats) with the global `counts` (differentiable w.r.t. the student inputs) and `terms`
    `{k: (sum, count)}` with this batch's own counts, as `distillation_terms` returns them. The
    sums are not differentiable on their own: only `loss` carries the gradient.

  Raises:
    ValueError: alpha_ce or alpha_mse set without `teacher_hidden`.
  """
  labels = batch['labels']
  kl_w = (labels != IGNORE_INDEX) if w.restrict_ce_to_mask else batch['attention_mask']
  alphas = losses.term_alphas(w)
  coef = tuple(as_f32(alphas[k]) / jnp.maximum(counts[k], 1.0) if alphas[k] else None
               for k in VOCAB_TERMS)
  if (coef[1] is not None or coef[2] is not None) and teacher_hidden is None:
    raise ValueError('alpha_ce/alpha_mse need the teacher\'s mlm_hidden and projection.')
  t_emb, t_bias = teacher_proj if teacher_proj is not None else (None, None)
  sums = _fused_vocab_loss(student_hidden, *student_proj, teacher_hidden, t_emb, t_bias, labels,
                           as_f32(kl_w), coef, float(w.temperature), int(chunk_size))
  loss = sum((c * sums[k] for k, c in zip(VOCAB_TERMS, coef) if c is not None),
             jnp.zeros((), jnp.float32))
  # This (micro)batch's own counts, as distillation_terms: pairs add up over microbatches.
  local = {'mlm': jnp.sum(as_f32(labels != IGNORE_INDEX)), 'ce': jnp.sum(as_f32(kl_w))}
  local['mse'] = local['ce']
  return loss, {k: (v, local[k]) for k, v in sums.items()}
