"""What the student is trained on: the typed objective of a run.

`Objective` gathers the loss coefficients (`losses.DistillWeights`), the
intermediate-layer terms and their layer map (`LayerTerms`), where the
teacher's targets come from (a forward pass, or `teacher.cache` offline) and
how the step computes them (teacher input, vocabulary chunking, masked-only
logits). `training/setup.py` builds it once from the config; the train step,
the evaluator and the teacher-cache builder read it. `needs_teacher_forward`
is the one place deciding whether the train step runs the teacher, and
`term_alphas` the one table of every term's coefficient.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from flaxdistil.objectives import IGNORE_INDEX
from flaxdistil.objectives import intermediate
from flaxdistil.objectives import losses
from flaxdistil.objectives import positions

TEACHER_INPUTS = ('masked', 'original')
# Batch keys of cached teacher targets that live on token positions (gathered with the logits).
_CACHED_POSITION_KEYS = ('teacher_topk_values', 'teacher_topk_ids', 'teacher_logz')


class LayerTerms(NamedTuple):
  """TinyBERT/MiniLM intermediate-layer terms: coefficients and the resolved layer map.

  `layer_map[j]` is the 0-based teacher layer student layer j is matched to
  (`intermediate.resolve_layer_map`).
  """
  weights: intermediate.IntermediateWeights
  layer_map: tuple[int, ...]


class Projection(NamedTuple):
  """Hidden sizes of TinyBERT `fit_dense` projections (student -> teacher width)."""
  student_hidden: int
  teacher_hidden: int


def has_intermediate_terms(iw: intermediate.IntermediateWeights | None) -> bool:
  """True when `iw` is given and any of its intermediate-layer alphas is non-zero."""
  return iw is not None and any(intermediate.term_alphas(iw).values())


@dataclasses.dataclass(frozen=True)
class Objective:
  """The training objective; immutable.

  Attributes:
    weights: logit / hidden-state / task coefficients.
    inter: intermediate-layer terms, or None when every intermediate alpha is 0.
      A plain `(IntermediateWeights, layer_map)` tuple is accepted and converted.
    offline: the teacher's targets come with the batch (`teacher.cache`).
    teacher_input: 'masked' (the teacher sees the student's masked input, HF
      distiller) or 'original' (the unmasked tokens, recovered from the labels).
    vocab_chunk_size: >0 computes vocabulary terms this many positions at a time
      (`chunked_vocab`); not used offline (the sparse KL reads full logits).
    max_predictions_per_seq: >0 runs MLM heads on that many masked positions only.
    task: sequence classification (`data.task` set) rather than MLM.

  Raises:
    ValueError: an unknown `teacher_input`, or `max_predictions_per_seq > 0`
      with a KL/MSE term over all tokens (`losses.check_logits_restriction`).
  """
  weights: losses.DistillWeights
  inter: LayerTerms | None = None
  offline: bool = False
  teacher_input: str = 'masked'
  vocab_chunk_size: int = 0
  max_predictions_per_seq: int = 0
  task: bool = False

  def __post_init__(self):
    if self.inter is not None and not isinstance(self.inter, LayerTerms):
      iw, layer_map = self.inter
      object.__setattr__(self, 'inter', LayerTerms(iw, tuple(layer_map)))
    if self.inter is not None and not has_intermediate_terms(self.inter.weights):
      object.__setattr__(self, 'inter', None)  # all alphas 0: no intermediate outputs needed
    if self.teacher_input not in TEACHER_INPUTS:
      raise ValueError(f'distill.teacher_input={self.teacher_input!r}: use "masked" or '
                       '"original".')
    losses.check_logits_restriction(self.weights, self.max_predictions_per_seq)

  def with_layer_map(self, layer_map: Sequence[int]) -> Objective:
    """The same objective with the layer map resolved for the models' depths.

    Args:
      layer_map: Ls 0-based teacher layer indices (`intermediate.resolve_layer_map`).

    Returns:
      A new `Objective`, or `self` when there are no intermediate terms.
    """
    if self.inter is None:
      return self
    return dataclasses.replace(self, inter=LayerTerms(self.inter.weights, tuple(layer_map)))

  @property
  def intermediate_weights(self) -> intermediate.IntermediateWeights | None:
    """`inter.weights`, or None without intermediate terms."""
    return None if self.inter is None else self.inter.weights

  @property
  def uses_teacher(self) -> bool:
    """Some term compares the student with teacher outputs (computed or cached)."""
    w = self.weights
    return bool(w.alpha_ce or w.alpha_cos or w.alpha_mse or self.inter is not None)

  @property
  def needs_teacher_forward(self) -> bool:
    """The train step must run the teacher: some term reads it and no cache stands in.

    MLM-only or gold-label-only objectives need no teacher; offline distillation
    reads the teacher's targets from the batch instead.
    """
    return self.uses_teacher and not self.offline

  def term_alphas(self) -> dict[str, float]:
    """Every term's coefficient by name (`losses.term_alphas` + `intermediate.term_alphas`)."""
    out = losses.term_alphas(self.weights)
    if self.inter is not None:
      out.update(intermediate.term_alphas(self.inter.weights))
    return out

  def model_kwargs(self) -> dict[str, bool]:
    """`MaskedLM.__call__` output flags both models need (`intermediate.model_kwargs`).

    Returns:
      `{'output_attentions', 'output_attention_scores', 'output_values'}` -> bool, all False
      without intermediate terms.
    """
    return intermediate.model_kwargs(self.intermediate_weights or intermediate.IntermediateWeights())

  def chunked(self, student_has_mlm_head: bool) -> bool:
    """True if the vocabulary terms go through `chunked_vocab` (no `[B, T, V]` logits).

    That is: `vocab_chunk_size > 0`, online, MLM (not a task), a student MLM head and
    a non-zero alpha_mlm, alpha_ce or alpha_mse.
    """
    w = self.weights
    return (bool(self.vocab_chunk_size) and not self.offline and not self.task
            and student_has_mlm_head and bool(w.alpha_mlm or w.alpha_ce or w.alpha_mse))

  def prepare_batch(self, batch: Mapping[str, jax.Array]) -> dict:
    """The global batch as the loss reads it: teacher input, logits positions, cached targets.

    MLM batches only (classification batches are returned unchanged): with
    `teacher_input='original'` adds `teacher_input_ids [B, T]` (the masked
    positions' labels put back); with `max_predictions_per_seq` adds
    `logits_positions [B, M]` and gathers `labels` (and, offline, the cached
    `teacher_topk_values` / `teacher_topk_ids` / `teacher_logz`) to `[B, M]`.
    `teacher_input_ids` is added only when the teacher runs
    (`needs_teacher_forward`).

    Args:
      batch: the global batch (`input_ids`, `attention_mask`, `labels`, cached
        targets if offline).

    Returns:
      A new dict; `batch` is not modified.
    """
    batch = dict(batch)
    if self.task:
      return batch
    if self.needs_teacher_forward and self.teacher_input == 'original':
      labels = batch['labels']
      batch['teacher_input_ids'] = jnp.where(labels == IGNORE_INDEX, batch['input_ids'], labels)
    batch = positions.restrict_to_masked(batch, self.max_predictions_per_seq)
    if self.offline and 'logits_positions' in batch:  # targets only where the student has logits
      pos = batch['logits_positions']
      batch.update({k: positions.gather_at_positions(batch[k], pos)
                    for k in _CACHED_POSITION_KEYS if k in batch})
    return batch

  def counts(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Global normaliser of every enabled term (float32 scalars), from the batch alone.

    Microbatch losses are divided by these global counts, so that summed
    microbatch gradients equal the gradient of the global token-weighted mean.

    Args:
      batch: the prepared global batch (`prepare_batch`).

    Returns:
      term name -> count (`losses.term_counts` + `intermediate.intermediate_counts`).
    """
    counts = losses.term_counts(batch, self.weights)
    if self.inter is not None:
      counts.update(intermediate.intermediate_counts(batch, self.inter.weights))
    return counts

  def describe(self) -> str:
    """The objective as a line, `loss = 5*ce(T=2) + 2*mlm + 1*cos`, non-zero terms only.

    The logged `loss` is this sum of the logged `loss_<term>` values (exactly per
    step; over an interval up to the different token weights of the terms).
    """
    w = self.weights
    masked = ', masked only' if w.restrict_ce_to_mask else ''
    names = {'ce': f'ce(T={w.temperature:g}{masked})'}
    terms = [f'{a:g}*{names.get(k, k)}' for k, a in self.term_alphas().items() if a]
    return 'loss = ' + (' + '.join(terms) if terms else '0 (every alpha is 0)')
