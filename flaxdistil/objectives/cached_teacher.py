"""A teacher cache's targets in the shape of the teacher's model output (offline distillation).

`data/teacher_cache.py` stores the teacher's top-k logits and intermediate outputs; its reader
puts them into batches under the keys `cached_layer_key` names. `cached_teacher_output(batch)`
turns those entries back into a `CachedTeacherOutput`, laid out like `bert.ModelOutput`, so the
loss functions read cached and computed teachers alike (`losses.distillation_terms` switches to
the sparse top-k KL for it; `intermediate.intermediate_terms` is unchanged).
"""

from typing import Mapping, NamedTuple

import jax


class CachedTeacherOutput(NamedTuple):
  """The teacher's stored targets standing in for its `ModelOutput` (offline distillation).

  topk_values / topk_ids: `[B, T, k]`; logz: `[B, T]` float32 or None. The intermediate fields
  have `ModelOutput`'s length and layout, None at the layers the cache did not serve:
  hidden_states: L + 1 entries `[B, T, H]` (the last one is what alpha_cos reads);
  attentions / attention_scores: L entries `[B, h, T, T]`; values: L entries `[B, h, T, d]`.
  """
  topk_values: jax.Array
  topk_ids: jax.Array
  logz: jax.Array | None = None
  hidden_states: tuple | None = None
  attentions: tuple | None = None
  attention_scores: tuple | None = None
  values: tuple | None = None


def cached_layer_key(field: str, index: int) -> str:
  """Batch key of a cached intermediate teacher output.

  Args:
    field: a `bert.ModelOutput` field: 'hidden_states', 'attentions', 'attention_scores' or
      'values'.
    index: its index in that field's tuple (for `hidden_states`, 0 = the embeddings).

  Returns:
    `teacher_{field}_{index}`, e.g. `teacher_hidden_states_2`.
  """
  return f'teacher_{field}_{index}'


def cached_teacher_output(batch: Mapping[str, jax.Array],
                          num_teacher_layers: int) -> CachedTeacherOutput:
  """The `CachedTeacherOutput` of a batch carrying `teacher.cache` targets.

  Args:
    batch: `teacher_topk_values`, `teacher_topk_ids`, optional `teacher_logz`, `teacher_hidden`
      (last hidden state) and `teacher_{field}_{i}` entries (`teacher_cache.TeacherCache.features`).
    num_teacher_layers: L, so that negative layer indices (MiniLM's last layer) resolve as online.

  Returns:
    The batch's arrays (no copy) as a `CachedTeacherOutput`; an intermediate field is None when
    the batch holds none of its layers, else a tuple with None at the layers it lacks.

  Raises:
    KeyError: the batch has no `teacher_topk_values` / `teacher_topk_ids`.
  """
  n = num_teacher_layers
  sizes = {'hidden_states': n + 1, 'attentions': n, 'attention_scores': n, 'values': n}
  fields = {f: [batch.get(cached_layer_key(f, i)) for i in range(size)]
            for f, size in sizes.items()}
  if 'teacher_hidden' in batch:
    fields['hidden_states'][n] = batch['teacher_hidden']
  return CachedTeacherOutput(
      batch['teacher_topk_values'], batch['teacher_topk_ids'], batch.get('teacher_logz'),
      **{f: tuple(v) if any(x is not None for x in v) else None for f, v in fields.items()})
