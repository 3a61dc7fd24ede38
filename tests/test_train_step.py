"""The train step, compiled as the loop compiles it (`jit_train_step`): sharded == single device,
accumulation == one big batch, chunked vocabulary == dense, masked-position logits == full logits,
only the student changes and a non-finite step is skipped; the same for the GLUE classification
step (soft cross-entropy + gold labels + cos)."""

import jax
import numpy as np
import pytest

from flaxdistil.model import bert
from flaxdistil.objectives import losses
from flaxdistil.objectives.objective import Objective
from flaxdistil.training import optimizer
from flaxdistil.training import sharding
from flaxdistil.training import train_state
from flaxdistil.training import train_step

from conftest import assert_trees_close
from conftest import tiny_config

RULES = sharding.rules_tuple(tiny_config().mesh.logical_axis_rules)
AXES = ('data', 'fsdp', 'tensor')


def _setup(dropout=0.0):
  """Teacher/student configs, host (numpy) params and a padded batch with ~30% masked tokens.

  Host params: placing them on devices copies them, so a donated state never takes them along.
  """
  tcfg = bert.ModelConfig(model_type='bert', vocab_size=96, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=32)
  scfg = bert.ModelConfig(model_type='distilbert', vocab_size=96, hidden_size=32,
                          num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=32, hidden_dropout_prob=dropout,
                          attention_probs_dropout_prob=dropout)
  tparams = jax.device_get(bert.init_params(tcfg, jax.random.PRNGKey(0)))
  sparams = jax.device_get(bert.init_params(scfg, jax.random.PRNGKey(1)))
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 96, size=(16, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[3, 7:] = 0
  mask[10, 4:] = 0
  ids[mask == 0] = 0
  labels = np.where((rng.random(ids.shape) < 0.3) & (mask == 1), ids, -100).astype(np.int32)
  batch = {'input_ids': ids, 'attention_mask': mask.astype(np.int32), 'labels': labels}
  return tcfg, scfg, tparams, sparams, batch


class _Compiled:
  """A step on `mesh` as the train loop wires it: `state_layout`, `init_state`, `jit_train_step`.

  `init()` gives a fresh state each time: the compiled step donates (deletes) the one it gets.
  """

  def __init__(self, step, scfg, tcfg, tx, mesh, teacher_rules=RULES):
    self.mesh, self.tx = mesh, tx
    self.shard, _ = train_state.state_layout(scfg, tx, mesh, RULES)
    self.t_shard = sharding.param_shardings(bert.abstract_params(tcfg), mesh, teacher_rules)
    self.b_shard = sharding.batch_sharding(mesh, RULES)
    self.fn = train_step.jit_train_step(step, self.shard, self.t_shard)

  def init(self, sparams):
    return train_state.init_state(sparams, self.tx, jax.random.PRNGKey(0), self.shard)

  def teacher(self, tparams):
    return jax.device_put(tparams, self.t_shard)

  def __call__(self, state, t_params, batch):
    with sharding.mesh_context(self.mesh, RULES):
      return self.fn(state, t_params, jax.device_put(batch, self.b_shard))


def _one_step(mesh_shape, num_microbatches=1, devices=None, dropout=0.0, teacher_rules=RULES,
              vocab_chunk_size=0, max_predictions_per_seq=0, restrict=False):
  tcfg, scfg, tparams, sparams, batch = _setup(dropout)
  tx, _ = optimizer.make_optimizer(tiny_config().optim, 10)
  mesh = sharding.create_mesh(mesh_shape, AXES, devices=devices)
  objective = Objective(losses.DistillWeights(alpha_mse=0.1, restrict_ce_to_mask=restrict),
                        max_predictions_per_seq=max_predictions_per_seq,
                        vocab_chunk_size=vocab_chunk_size)
  step = train_step.make_train_step(bert.MaskedLM(scfg), bert.MaskedLM(tcfg), tx, objective,
                                    num_microbatches)
  compiled = _Compiled(step, scfg, tcfg, tx, mesh, teacher_rules)
  new_state, metrics = compiled(compiled.init(sparams), compiled.teacher(tparams), batch)
  return jax.device_get(new_state['params']), jax.device_get(metrics), new_state


def _single_device(step, scfg, tcfg, tx):
  return _Compiled(step, scfg, tcfg, tx, sharding.single_device_mesh())


@pytest.fixture(scope='module')
def single_device():
  return _one_step((1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_sharded_step_equals_single_device(single_device, mesh_shape):
  assert jax.device_count() == 8, 'conftest sets 8 host devices'
  ref_params, ref_metrics, _ = single_device
  params, metrics, state = _one_step(mesh_shape)
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5)
  for k in ('loss_ce', 'loss_mlm', 'loss_cos', 'loss_mse'):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5)
  assert_trees_close(params, ref_params)
  # The parameters really are distributed as the mesh says.
  w = state['params']['encoder']['layer_0']['intermediate']['kernel']
  n_shards = len({(s.index[0].start, s.index[1].start) for s in w.addressable_shards})
  expected = mesh_shape[1] * mesh_shape[2]  # ('embed'->fsdp, 'mlp'->tensor)
  assert n_shards == expected


@pytest.mark.slow
def test_teacher_sharded_differently_from_student(single_device):
  # Student FSDP + tensor parallel, teacher fully replicated (no rules): same step.
  ref_params, ref_metrics, _ = single_device
  params, metrics, _ = _one_step((2, 2, 2), teacher_rules=())
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5)
  assert_trees_close(params, ref_params)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(single_device):
  ref_params, ref_metrics, _ = single_device
  params, metrics, _ = _one_step((8, 1, 1), num_microbatches=2)
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5)
  assert_trees_close(params, ref_params)
  params4, metrics4, _ = _one_step((1, 1, 1), num_microbatches=4, devices=jax.devices()[:1])
  np.testing.assert_allclose(metrics4['loss'], ref_metrics['loss'], rtol=1e-5)
  assert_trees_close(params4, ref_params)


@pytest.mark.parametrize('mesh_shape,num_microbatches,chunk',
                         [((1, 1, 1), 1, 5), ((2, 2, 2), 2, 4), ((8, 1, 1), 1, 12)])
@pytest.mark.slow
def test_chunked_vocab_step_equals_dense_step(single_device, mesh_shape, num_microbatches, chunk):
  # vocab_chunk_size only changes how the logits are formed: same losses, same update, also
  # sharded (vocab over 'tensor') and with accumulation, and with a chunk not dividing seq_len.
  ref_params, ref_metrics, _ = single_device
  devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else None
  params, metrics, _ = _one_step(mesh_shape, num_microbatches, devices=devices,
                                 vocab_chunk_size=chunk)
  for k in ('loss', 'loss_ce', 'loss_mlm', 'loss_cos', 'loss_mse', 'grad_norm'):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
  assert_trees_close(params, ref_params)


@pytest.mark.slow
def test_chunked_vocab_step_on_masked_positions_equals_dense():
  one = jax.devices()[:1]
  ref_params, ref_metrics, _ = _one_step((1, 1, 1), devices=one, max_predictions_per_seq=6,
                                         restrict=True)
  params, metrics, _ = _one_step((1, 1, 1), devices=one, max_predictions_per_seq=6,
                                 restrict=True, vocab_chunk_size=4)
  for k in ('loss', 'loss_ce', 'loss_mlm', 'loss_mse'):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
  assert_trees_close(params, ref_params)


@pytest.mark.slow
def test_step_changes_only_student_and_skips_nonfinite():
  tcfg, scfg, tparams, sparams, batch = _setup()
  optim = tiny_config().optim
  optim.warmup_steps = 0  # non-zero learning rate at step 0
  tx, _ = optimizer.make_optimizer(optim, 10)
  step = _single_device(train_step.make_train_step(bert.MaskedLM(scfg), bert.MaskedLM(tcfg), tx,
                                                   Objective(losses.DistillWeights()), 1),
                        scfg, tcfg, tx)
  t_before = jax.tree.map(np.array, tparams)
  t_dev = step.teacher(tparams)
  new, m = step(step.init(sparams), t_dev, batch)
  assert bool(m['finite']) and int(new['num_skipped']) == 0
  # The teacher is neither changed nor donated: its device copy is still readable and equal.
  assert_trees_close(jax.device_get(t_dev), t_before, rtol=0, atol=0)
  delta = np.abs(new['params']['encoder']['layer_0']['output']['kernel'] -
                 sparams['encoder']['layer_0']['output']['kernel']).max()
  assert delta > 0
  bad = jax.tree.map(np.array, tparams)
  bad['mlm_head']['bias'][0] = np.nan
  new_params = jax.device_get(new['params'])  # `new` is donated to the next call
  new2, m2 = step(new, step.teacher(bad), batch)
  assert not bool(m2['finite']) and int(new2['num_skipped']) == 1
  assert_trees_close(new2['params'], new_params, rtol=0, atol=0)
  assert int(new2['step']) == 2


def test_an_update_that_overflows_is_skipped_though_loss_and_gradient_are_finite():
  """Finite loss and gradients, non-finite new parameters (an update that overflows): skipped,
  so no inf/NaN reaches the state, nor a checkpoint of it."""
  import optax  # pylint: disable=g-import-not-at-top
  tcfg, scfg, tparams, sparams, batch = _setup()
  tx = optax.scale(np.inf)  # every non-zero gradient becomes an infinite update
  step = _single_device(train_step.make_train_step(bert.MaskedLM(scfg), bert.MaskedLM(tcfg), tx,
                                                   Objective(losses.DistillWeights()), 1),
                        scfg, tcfg, tx)
  new, m = step(step.init(sparams), step.teacher(tparams), batch)
  assert np.isfinite(float(m['loss'])) and np.isfinite(float(m['grad_norm']))
  assert not bool(m['finite']) and int(new['num_skipped']) == 1
  assert_trees_close(new['params'], sparams, rtol=0, atol=0)


@pytest.mark.slow
def test_logits_on_masked_positions_only_gives_the_same_step():
  """max_predictions_per_seq only skips work: same loss and update as full logits."""
  tcfg, scfg, tparams, sparams, batch = _setup()
  optim = tiny_config().optim
  optim.warmup_steps = 0
  tx, _ = optimizer.make_optimizer(optim, 10)
  w = losses.DistillWeights(restrict_ce_to_mask=True, alpha_mse=0.1)
  outs = []
  for max_pred in (0, 12):
    step = _single_device(train_step.make_train_step(
        bert.MaskedLM(scfg), bert.MaskedLM(tcfg), tx,
        Objective(w, max_predictions_per_seq=max_pred), 2), scfg, tcfg, tx)
    outs.append(jax.device_get(step(step.init(sparams), step.teacher(tparams), batch)))
  for k in ('loss', 'loss_ce', 'loss_mlm', 'loss_mse', 'loss_cos'):
    np.testing.assert_allclose(outs[0][1][k], outs[1][1][k], rtol=1e-5)
  assert_trees_close(outs[0][0]['params'], outs[1][0]['params'])
  with pytest.raises(ValueError, match='restrict_ce_to_mask'):
    Objective(losses.DistillWeights(), max_predictions_per_seq=8)


# ----------------------------------------------------------------------------- classification

def _task_setup():
  tcfg = bert.ModelConfig(model_type='bert', vocab_size=60, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=16, num_labels=2, with_mlm_head=False)
  scfg = bert.ModelConfig(model_type='distilbert', vocab_size=60, hidden_size=32,
                            num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=16, num_labels=2, with_mlm_head=False,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            classifier_dropout=0.0)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 60, size=(16, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[2, 6:] = 0
  types = np.zeros_like(ids)
  types[:, 5:] = 1
  batch = {'input_ids': np.where(mask == 1, ids, 0), 'attention_mask': mask,
           'token_type_ids': types * mask, 'labels': rng.integers(0, 2, 16).astype(np.int32)}
  return (tcfg, scfg, bert.init_params(tcfg, jax.random.PRNGKey(0)),
          bert.init_params(scfg, jax.random.PRNGKey(1)), batch)


def _task_step(mesh_shape, num_microbatches=1, devices=None):
  tcfg, scfg, tparams, sparams, batch = _task_setup()
  tx, _ = optimizer.make_optimizer(tiny_config().optim, 10)
  mesh = sharding.create_mesh(mesh_shape, AXES, devices=devices)
  shard, _ = train_state.state_layout(scfg, tx, mesh, RULES)
  t_shard = sharding.param_shardings(bert.abstract_params(tcfg), mesh, RULES)
  state = train_state.init_state(sparams, tx, jax.random.PRNGKey(0), shard)
  w = losses.DistillWeights(temperature=2.0, alpha_ce=1.0, alpha_mlm=0.0, alpha_cos=0.5,
                            alpha_task=1.0)
  step = train_step.make_train_step(bert.MaskedLM(scfg), bert.MaskedLM(tcfg), tx,
                                    Objective(w, task=True), num_microbatches)
  with sharding.mesh_context(mesh, RULES):
    gbatch = sharding.make_global_batch(batch, sharding.batch_sharding(mesh, RULES), 16)
    new_state, metrics = train_step.jit_train_step(step, shard, t_shard)(
        state, jax.device_put(tparams, t_shard), gbatch)
  return jax.device_get(new_state['params']), jax.device_get(metrics)


@pytest.mark.slow
def test_task_step_sharded_and_accumulated_equal_single_device():
  ref_params, ref_m = _task_step((1, 1, 1), devices=jax.devices()[:1])
  assert ref_m['loss_ce'] > 0 and ref_m['loss_task'] > 0 and ref_m['loss_cos'] > 0
  for mesh_shape, nmb in (((2, 2, 2), 1), ((8, 1, 1), 2), ((1, 1, 1), 4)):
    params, m = _task_step(mesh_shape, nmb, devices=None if mesh_shape[0] > 1 else
                           jax.devices()[:1])
    for k in ('loss', 'loss_ce', 'loss_task', 'loss_cos'):
      np.testing.assert_allclose(m[k], ref_m[k], rtol=2e-5, err_msg=f'{mesh_shape} {nmb} {k}')
    assert_trees_close(params, ref_params)  # rtol=2e-5, atol=2e-6


@pytest.mark.slow
def test_scan_layers_step_equals_unrolled_step(single_device):
  # config.scan_layers only changes how the layers are compiled: same losses and update, also
  # with accumulation and the jit wiring of the train loop (`jit_run_step`).
  import dataclasses  # pylint: disable=g-import-not-at-top
  ref_params, ref_metrics, _ = single_device
  tcfg, scfg, tparams, sparams, batch = _setup()
  tcfg = dataclasses.replace(tcfg, scan_layers=True)
  scfg = dataclasses.replace(scfg, num_hidden_layers=1, scan_layers=True)
  tx, _ = optimizer.make_optimizer(tiny_config().optim, 10)
  mesh = sharding.create_mesh((2, 2, 2), AXES)
  objective = Objective(losses.DistillWeights(alpha_mse=0.1))
  shard, _ = train_state.state_layout(scfg, tx, mesh, RULES)
  t_shard, _ = sharding.model_param_layout(tcfg, mesh, RULES)
  fn, reads_teacher = train_step.jit_run_step(scfg, tcfg, tx, objective, 2, shard, t_shard)
  assert reads_teacher
  state = train_state.init_state(sparams, tx, jax.random.PRNGKey(0), shard)
  with sharding.mesh_context(mesh, RULES):
    new_state, metrics = fn(state, jax.device_put(tparams, t_shard),
                            jax.device_put(batch, sharding.batch_sharding(mesh, RULES)))
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5)
  assert_trees_close(jax.device_get(new_state['params']), ref_params)


def test_gates_in_the_trainable_tree_reach_the_student():
  """`trainable['gates']` (pruning importance) gates the student: ones change nothing, a zero
  head gate changes the loss."""
  tcfg, scfg, tparams, sparams, batch = _setup()
  obj = Objective(losses.DistillWeights())
  loss_fn = train_step.make_loss_fn(bert.MaskedLM(scfg), bert.MaskedLM(tcfg), obj)
  mb = obj.prepare_batch(batch)
  counts = obj.counts(mb)
  run = lambda trainable: float(loss_fn(trainable, tparams, mb, counts, jax.random.PRNGKey(0))[0])
  gates = bert.gate_ones(scfg)
  plain = run({'student': sparams})
  assert run({'student': sparams, 'gates': gates}) == plain
  gates['encoder']['layer_0']['attention']['head'] = gates['encoder']['layer_0']['attention'][
      'head'].at[0].set(0.0)
  assert abs(run({'student': sparams, 'gates': gates}) - plain) > 1e-6
