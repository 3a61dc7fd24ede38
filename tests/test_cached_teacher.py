"""flaxdistil.objectives.cached_teacher: cached batch entries in the teacher's ModelOutput layout."""

import numpy as np

from flaxdistil.objectives import cached_teacher


def test_cached_output_has_model_output_layout_and_none_where_not_cached():
  b, t, k, h = 2, 5, 3, 4
  key = cached_teacher.cached_layer_key
  batch = {'teacher_topk_values': np.zeros((b, t, k)), 'teacher_topk_ids': np.zeros((b, t, k)),
           'teacher_hidden': np.full((b, t, h), 7.0),            # the last hidden state
           key('hidden_states', 0): np.full((b, t, h), 1.0),    # embeddings
           key('values', 2): np.full((b, 2, t, 2), 3.0)}        # layer 2 of 3 (the last)
  out = cached_teacher.cached_teacher_output(batch, num_teacher_layers=3)
  assert key('attentions', 1) == 'teacher_attentions_1'
  assert len(out.hidden_states) == 4 and len(out.values) == 3
  assert out.hidden_states[0][0, 0, 0] == 1.0 and out.hidden_states[-1][0, 0, 0] == 7.0
  assert out.hidden_states[1] is None and out.hidden_states[2] is None
  assert out.values[-1][0, 0, 0, 0] == 3.0 and out.values[0] is None  # [-1] = the last layer
  assert out.attentions is None and out.attention_scores is None and out.logz is None


def test_without_intermediate_entries_only_the_last_hidden_state_is_served():
  batch = {'teacher_topk_values': np.zeros((1, 2, 1)), 'teacher_topk_ids': np.zeros((1, 2, 1)),
           'teacher_logz': np.ones((1, 2))}
  out = cached_teacher.cached_teacher_output(batch, num_teacher_layers=0)  # layer count unknown
  assert out.hidden_states is None and out.logz.shape == (1, 2)
