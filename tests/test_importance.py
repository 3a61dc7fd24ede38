"""flaxdistil.training.importance: Michel et al.'s head / FFN-neuron importance is the mean over
batches of |d objective / d gate|, the run's own objective, without dropout."""

import dataclasses

import jax
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.training import importance
from flaxdistil.training import setup
from flaxdistil.training import train_step

from conftest import tiny_config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  return setup.build_run(tiny_config(), str(tmp_path_factory.mktemp('imp')))


def test_importance_is_the_mean_absolute_gate_derivative_of_the_objective(run):
  batches = run.eval_batches()[:2]
  scfg = run.student_config
  imp = importance.importance(scfg, run.student_params, run.teacher_model, run.teacher_params,
                              run.objective, batches)
  assert imp['num_batches'] == 2 and len(imp['heads']) == scfg.num_hidden_layers
  assert imp['heads'][0].shape == (scfg.num_attention_heads,)
  assert imp['ffn'][1].shape == (scfg.intermediate_size,)
  assert all(np.all(x >= 0) for x in imp['heads'] + imp['ffn'])
  student = bert.MaskedLM(dataclasses.replace(scfg, hidden_dropout_prob=0.0,
                                              attention_probs_dropout_prob=0.0))
  loss_fn = train_step.make_loss_fn(student, run.teacher_model, run.objective)

  def loss(batch, layer, kind, unit, value):
    batch = run.objective.prepare_batch(batch)
    gates = bert.gate_ones(scfg)
    g = gates['encoder'][f'layer_{layer}']
    if kind == 'head':
      g['attention']['head'] = g['attention']['head'].at[unit].set(value)
    else:
      g['ffn'] = g['ffn'].at[unit].set(value)
    return float(loss_fn({'student': run.student_params, 'gates': gates}, run.teacher_params,
                         batch, run.objective.counts(batch), jax.random.PRNGKey(0))[0])

  # the most important units: a float32 loss of ~11 nats resolves their finite differences
  eps = 0.1
  units = [(0, 'head', int(np.argmax(imp['heads'][0]))), (1, 'head', int(np.argmax(imp['heads'][1]))),
           (1, 'ffn', int(np.argmax(imp['ffn'][1])))]
  for layer, kind, unit in units:
    fd = np.mean([abs(loss(b, layer, kind, unit, 1 + eps) - loss(b, layer, kind, unit, 1 - eps))
                  / (2 * eps) for b in batches])
    got = imp['heads'][layer][unit] if kind == 'head' else imp['ffn'][layer][unit]
    np.testing.assert_allclose(got, fd, rtol=5e-2, atol=1e-5, err_msg=f'{kind} {layer}/{unit}')
  assert np.isclose(imp['loss'], np.mean([loss(b, 0, 'head', 0, 1.0) for b in batches]),
                    rtol=1e-5)


def test_importance_of_a_pruned_model_has_its_own_head_counts(run):
  from flaxdistil.model import pruning  # pylint: disable=g-import-not-at-top
  cfg, params = pruning.prune(run.student_params, run.student_config, ((0, 1), (2,)))
  imp = importance.importance(cfg, params, run.teacher_model, run.teacher_params, run.objective,
                              run.eval_batches()[:1])
  assert [len(h) for h in imp['heads']] == [2, 3]
  assert all(np.all(np.isfinite(h)) and np.all(h >= 0) for h in imp['heads'])
  with pytest.raises(ValueError, match='No batches'):
    importance.importance(cfg, params, run.teacher_model, run.teacher_params, run.objective, [])

