"""Analytic model FLOPs of a distillation step: the matmuls of teacher and student, counted once.

The MFU convention (Chowdhery et al., 2022, "PaLM", App. B; Kaplan et al., 2020, Sec. 2.1): a
forward pass costs 2 FLOPs per multiply-add of every matmul, the backward pass twice the forward,
rematerialisation is not counted (it is work the hardware does, not the model). Per token, a
BERT layer of hidden size H, intermediate size I and sequence length T costs
`2 * (4 H^2 + 2 H I)` (Q, K, V, output; FFN in and out) plus `4 T H` for `Q K^T` and `P V`; the
MLM head `2 * (H^2 + H V)` (transform, tied decoder) on every position it runs on (all of them,
or `max_predictions_per_seq` per sequence); a classification head `2 * (H^2 + H C)` per sequence.
The teacher runs forward only; the student forward and backward. Embedding lookups, LayerNorm,
softmax and the losses are not matmuls and are left out (a few per cent at BERT shapes).
"""

from __future__ import annotations

from flaxdistil.model.bert import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
  """Weights one encoder layer multiplies each token by: `4 H^2 + 2 H I`."""
  h = cfg.hidden_size
  return 4 * h * h + 2 * h * cfg.intermediate_size


def head_matmul_params(cfg: ModelConfig) -> int:
  """Weights of the MLM head per predicted position (`H^2 + H V`); 0 without an MLM head."""
  h = cfg.hidden_size
  return h * h + h * cfg.vocab_size if cfg.with_mlm_head else 0


def forward_flops(cfg: ModelConfig, batch_size: int, seq_len: int, *, head_positions: int = 0,
                  classifier: bool = False) -> int:
  """FLOPs of one forward pass of `cfg` over `[batch_size, seq_len]` tokens.

  Args:
    cfg: the model.
    batch_size: sequences.
    seq_len: tokens per sequence (T of the attention term).
    head_positions: positions per sequence the MLM head runs on (0: no MLM head work).
    classifier: count the sequence-classification head (`cfg.num_labels` classes, on [CLS]).

  Returns:
    FLOPs (2 per multiply-add) of the encoder, attention and the heads asked for.
  """
  tokens = batch_size * seq_len
  h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
  encoder = 2 * tokens * n_layers * layer_matmul_params(cfg)
  attention = tokens * n_layers * 4 * seq_len * h
  head = 2 * batch_size * head_positions * head_matmul_params(cfg)
  cls = 2 * batch_size * (h * h + h * cfg.num_labels) if classifier and cfg.num_labels else 0
  return encoder + attention + head + cls


def step_flops(student: ModelConfig, teacher: ModelConfig | None, *, batch_size: int, seq_len: int,
               num_microbatches: int = 1, head_positions: int | None = None,
               student_head: bool = True, teacher_head: bool = True,
               projected_states: int = 0) -> dict:
  """Model FLOPs of one optimizer step (teacher forward + student forward and backward).

  Args:
    student: the student's config.
    teacher: the teacher's config, or None when the step runs no teacher (plain MLM, a teacher
      cache).
    batch_size: sequences per optimizer step (the global batch).
    seq_len: tokens per sequence.
    num_microbatches: gradient-accumulation factor (only divides the per-microbatch figure).
    head_positions: positions per sequence the MLM heads run on; None = all `seq_len`
      (`distill.max_predictions_per_seq` when it is set).
    student_head: the student's head runs (an MLM term, or its classifier on a task).
    teacher_head: the teacher's head runs (a logit term: alpha_ce / alpha_mse).
    projected_states: hidden-state pairs compared through TinyBERT's `fit_dense` projection
      (student H_s -> teacher H_t per token, forward and backward).

  Returns:
    `{'teacher_matmul_params', 'student_matmul_params'` (per token, vocab projection
    included), `'tokens_per_step', 'teacher_fwd_flops', 'student_fwd_bwd_flops',
    'flops_per_step', 'flops_per_microbatch'}` (ints but the last).
  """
  positions = seq_len if head_positions is None else head_positions
  cls_s = bool(student.num_labels)
  s_fwd = forward_flops(student, batch_size, seq_len,
                        head_positions=positions if student_head and not cls_s else 0,
                        classifier=student_head and cls_s)
  if projected_states and teacher is not None:
    s_fwd += 2 * batch_size * seq_len * projected_states * student.hidden_size * teacher.hidden_size
  t_fwd = 0
  if teacher is not None:
    cls_t = bool(teacher.num_labels)
    t_fwd = forward_flops(teacher, batch_size, seq_len,
                          head_positions=positions if teacher_head and not cls_t else 0,
                          classifier=teacher_head and cls_t)
  n = lambda cfg: cfg.num_hidden_layers * layer_matmul_params(cfg) + head_matmul_params(cfg)
  total = t_fwd + 3 * s_fwd
  return {'teacher_matmul_params': n(teacher) if teacher is not None else 0,
          'student_matmul_params': n(student), 'tokens_per_step': batch_size * seq_len,
          'teacher_fwd_flops': t_fwd, 'student_fwd_bwd_flops': 3 * s_fwd,
          'flops_per_step': total, 'flops_per_microbatch': total / num_microbatches}
