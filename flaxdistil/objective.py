"""What the student is trained on: the typed objective `setup.build_run` hands the loop.

`Objective` gathers the loss coefficients (`losses.DistillWeights`), the
intermediate-layer terms and their layer map (`LayerTerms`), where the
teacher's targets come from (a forward pass, or `teacher.cache` offline) and
how the step computes them (teacher input, vocabulary chunking, masked-only
logits). `Objective.needs_teacher_forward` is the one place deciding whether
the train step runs the teacher.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from flaxdistil import intermediate
from flaxdistil import losses

TEACHER_INPUTS = ('masked', 'original')


class LayerTerms(NamedTuple):
  """TinyBERT/MiniLM intermediate-layer terms: coefficients and the resolved layer map.

  A tuple so that `iw, layer_map = inter` (`train.make_train_step`) keeps working.
  `layer_map[j]` is the 0-based teacher layer student layer j is matched to.
  """
  weights: intermediate.IntermediateWeights
  layer_map: tuple[int, ...]


class Projection(NamedTuple):
  """Hidden sizes of TinyBERT `fit_dense` projections (student -> teacher width)."""
  student_hidden: int
  teacher_hidden: int


def distill_weights(config) -> losses.DistillWeights:
  """The config's logit/hidden-state coefficients (`distill.*`, `teacher.cache_tail_bucket`)."""
  d = config.distill
  return losses.DistillWeights(
      temperature=d.temperature, alpha_ce=d.alpha_ce, alpha_mlm=d.alpha_mlm,
      alpha_cos=d.alpha_cos, alpha_mse=d.alpha_mse, restrict_ce_to_mask=d.restrict_ce_to_mask,
      alpha_task=d.alpha_task, tail_bucket=config.teacher.cache_tail_bucket)


def intermediate_weights(d) -> intermediate.IntermediateWeights:
  """The `distill` group's TinyBERT/MiniLM coefficients (`alpha_emb`, ...)."""
  return intermediate.IntermediateWeights(
      alpha_emb=d.alpha_emb, alpha_hidden=d.alpha_hidden, alpha_attn_score=d.alpha_attn_score,
      alpha_attn_kl=d.alpha_attn_kl, alpha_value_kl=d.alpha_value_kl,
      num_relation_heads=d.num_relation_heads or None,
      relation_teacher_layer=d.relation_teacher_layer)


def has_intermediate_terms(iw: intermediate.IntermediateWeights | None) -> bool:
  """True when any intermediate-layer alpha is non-zero."""
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
      distiller) or 'original' (the unmasked tokens).
    vocab_chunk_size: >0 computes vocabulary terms this many positions at a time.
    max_predictions_per_seq: >0 runs MLM heads on that many masked positions only.
    task: sequence classification (`data.task` set) rather than MLM.
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

  @classmethod
  def from_config(cls, config, layer_map=()) -> Objective:
    """The objective `config` describes; `layer_map` as resolved for the models' depths.

    The layer map needs both models' layer counts (`intermediate.resolve_layer_map`);
    before they are known, the default `()` still answers every question that
    depends on the alphas alone (`uses_teacher`, `needs_teacher_forward`).
    """
    d = config.distill
    iw = intermediate_weights(d)
    return cls(
        weights=distill_weights(config),
        inter=LayerTerms(iw, tuple(layer_map)) if has_intermediate_terms(iw) else None,
        offline=bool(config.teacher.cache), teacher_input=d.teacher_input,
        vocab_chunk_size=d.vocab_chunk_size, max_predictions_per_seq=d.max_predictions_per_seq,
        task=bool(config.data.task))

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
