"""Train step and loop: sharded == single device, accumulation == big batch, exact resume."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from flaxdistil import losses
from flaxdistil import models
from flaxdistil import sharding
from flaxdistil import train
from flaxdistil import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = sharding.rules_tuple(tiny.get_config().mesh.logical_axis_rules)
AXES = ('data', 'fsdp', 'tensor')


def _setup(dropout=0.0):
  tcfg = models.ModelConfig(model_type='bert', vocab_size=96, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=32)
  scfg = models.ModelConfig(model_type='distilbert', vocab_size=96, hidden_size=32,
                            num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=32, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout)
  tparams = models.init_params(tcfg, jax.random.PRNGKey(0))
  sparams = models.init_params(scfg, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 96, size=(16, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[3, 7:] = 0
  mask[10, 4:] = 0
  ids[mask == 0] = 0
  labels = np.where((rng.random(ids.shape) < 0.3) & (mask == 1), ids, -100).astype(np.int32)
  batch = {'input_ids': ids, 'attention_mask': mask.astype(np.int32), 'labels': labels}
  return tcfg, scfg, tparams, sparams, batch


def _one_step(mesh_shape, num_microbatches=1, devices=None, dropout=0.0, teacher_rules=RULES,
              vocab_chunk_size=0, max_predictions_per_seq=0, restrict=False):
  tcfg, scfg, tparams, sparams, batch = _setup(dropout)
  cfg = tiny.get_config()
  tx, _ = train_step.make_optimizer(cfg.optim, 10)
  mesh = sharding.create_mesh(mesh_shape, AXES, devices=devices)
  shard, _ = train_step.state_layout(scfg, tx, mesh, RULES)
  t_shard = sharding.param_shardings(models.abstract_params(tcfg), mesh, teacher_rules)
  state = train_step.init_state(sparams, tx, jax.random.PRNGKey(0), shard)
  step = train_step.make_train_step(models.MaskedLM(scfg), models.MaskedLM(tcfg), tx,
                                    losses.DistillWeights(alpha_mse=0.1,
                                                          restrict_ce_to_mask=restrict),
                                    num_microbatches,
                                    max_predictions_per_seq=max_predictions_per_seq,
                                    vocab_chunk_size=vocab_chunk_size)
  b_shard = sharding.batch_sharding(mesh, RULES)
  with sharding.mesh_context(mesh, RULES):
    fn = jax.jit(step, in_shardings=(shard, t_shard, b_shard))
    new_state, metrics = fn(state, jax.device_put(tparams, t_shard),
                            jax.device_put(batch, b_shard))
  return jax.device_get(new_state['params']), jax.device_get(metrics), new_state


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def single_device():
  return _one_step((1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_sharded_step_equals_single_device(single_device, mesh_shape):
  assert jax.device_count() == 8, 'conftest sets 8 host devices'
  ref_params, ref_metrics, _ = single_device
  params, metrics, state = _one_step(mesh_shape)
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5)
  for k in ('loss_ce', 'loss_mlm', 'loss_cos', 'loss_mse'):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5)
  _assert_trees_close(params, ref_params)
  # The parameters really are distributed as the mesh says.
  w = state['params']['encoder']['layer_0']['intermediate']['kernel']
  n_shards = len({(s.index[0].start, s.index[1].start) for s in w.addressable_shards})
  expected = mesh_shape[1] * mesh_shape[2]  # ('embed'->fsdp, 'mlp'->tensor)
  assert n_shards == expected


def test_teacher_sharded_differently_from_student(single_device):
  # Student FSDP + tensor parallel, teacher fully replicated (no rules): same step.
  ref_params, ref_metrics, _ = single_device
  params, metrics, _ = _one_step((2, 2, 2), teacher_rules=())
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5)
  _assert_trees_close(params, ref_params)


def test_gradient_accumulation_equals_one_big_batch(single_device):
  ref_params, ref_metrics, _ = single_device
  params, metrics, _ = _one_step((8, 1, 1), num_microbatches=2)
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5)
  _assert_trees_close(params, ref_params)
  params4, metrics4, _ = _one_step((1, 1, 1), num_microbatches=4, devices=jax.devices()[:1])
  np.testing.assert_allclose(metrics4['loss'], ref_metrics['loss'], rtol=1e-5)
  _assert_trees_close(params4, ref_params)


@pytest.mark.parametrize('mesh_shape,num_microbatches,chunk',
                         [((1, 1, 1), 1, 5), ((2, 2, 2), 2, 4), ((8, 1, 1), 1, 12)])
def test_chunked_vocab_step_equals_dense_step(single_device, mesh_shape, num_microbatches, chunk):
  # vocab_chunk_size only changes how the logits are formed: same losses, same update, also
  # sharded (vocab over 'tensor') and with accumulation, and with a chunk not dividing seq_len.
  ref_params, ref_metrics, _ = single_device
  devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else None
  params, metrics, _ = _one_step(mesh_shape, num_microbatches, devices=devices,
                                 vocab_chunk_size=chunk)
  for k in ('loss', 'loss_ce', 'loss_mlm', 'loss_cos', 'loss_mse', 'grad_norm'):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
  _assert_trees_close(params, ref_params)


def test_chunked_vocab_step_on_masked_positions_equals_dense():
  one = jax.devices()[:1]
  ref_params, ref_metrics, _ = _one_step((1, 1, 1), devices=one, max_predictions_per_seq=6,
                                         restrict=True)
  params, metrics, _ = _one_step((1, 1, 1), devices=one, max_predictions_per_seq=6,
                                 restrict=True, vocab_chunk_size=4)
  for k in ('loss', 'loss_ce', 'loss_mlm', 'loss_mse'):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
  _assert_trees_close(params, ref_params)


def test_step_changes_only_student_and_skips_nonfinite():
  tcfg, scfg, tparams, sparams, batch = _setup()
  optim = tiny.get_config().optim
  optim.warmup_steps = 0  # non-zero learning rate at step 0
  tx, _ = train_step.make_optimizer(optim, 10)
  step = jax.jit(train_step.make_train_step(models.MaskedLM(scfg), models.MaskedLM(tcfg), tx,
                                            losses.DistillWeights(), 1))
  state = train_step.init_state(sparams, tx, jax.random.PRNGKey(0))
  t_before = jax.tree.map(np.array, tparams)
  new, m = step(state, tparams, batch)
  assert bool(m['finite']) and int(new['num_skipped']) == 0
  _assert_trees_close(tparams, t_before, rtol=0, atol=0)
  delta = np.abs(new['params']['encoder']['layer_0']['output']['kernel'] -
                 sparams['encoder']['layer_0']['output']['kernel']).max()
  assert delta > 0
  bad = jax.tree.map(lambda x: x, tparams)
  bad['mlm_head']['bias'] = bad['mlm_head']['bias'].at[0].set(jnp.nan)
  new2, m2 = step(new, bad, batch)
  assert not bool(m2['finite']) and int(new2['num_skipped']) == 1
  _assert_trees_close(new2['params'], new['params'], rtol=0, atol=0)
  assert int(new2['step']) == 2


def _run(workdir, **overrides):
  cfg = tiny.get_config()
  cfg.update_from_flattened_dict(overrides)
  return train.train_and_evaluate(cfg, str(workdir))


def _train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    recs = [json.loads(l) for l in f]
  return {r['step']: r['loss'] for r in recs if r['kind'] == 'train'}


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  full = _run(tmp_path / 'full')
  first = _run(tmp_path / 'split', steps_per_run=7)  # stops between checkpoints
  assert first['step'] == 7 and not first['done']
  resumed = _run(tmp_path / 'split')
  assert full['step'] == resumed['step'] == 20
  assert _train_losses(tmp_path / 'full') == _train_losses(tmp_path / 'split')
  from flaxdistil import export
  _, p_full, _, _ = export.load_student(str(tmp_path / 'full'))
  _, p_split, _, _ = export.load_student(str(tmp_path / 'split'))
  _assert_trees_close(p_full, p_split, rtol=0, atol=0)
  # Distillation learns: loss falls and the eval records exist for student and teacher.
  losses_full = _train_losses(tmp_path / 'full')
  assert losses_full[20] < losses_full[5]
  assert 0.0 <= full['student']['accuracy'] <= 1.0 and 'agreement' in full['student']
  assert full['teacher']['num_tokens'] == full['student']['num_tokens'] > 0


def _train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if r['kind'] == 'train'}


def test_logged_train_metrics_are_interval_means_and_a_finished_run_is_left_alone(tmp_path,
                                                                                   caplog):
  kw = {'num_train_steps': 6, 'eval_every_steps': 0, 'checkpoint_every_steps': 4}
  caplog.set_level('INFO')
  _run(tmp_path / 'every', log_every_steps=1, **kw)  # the per-step values
  caplog.clear()
  first = _run(tmp_path / 'interval', log_every_steps=3, **kw)
  # The console: the objective once, the compiling interval labelled, where everything is.
  assert caplog.text.count('loss = 5*ce(T=2) + 2*mlm + 1*cos') == 1
  assert caplog.text.count('first interval: includes compilation') == 1
  assert 'Done at step 6/6' in caplog.text and 'python -m flaxdistil.export --workdir' in caplog.text
  caplog.clear()
  per_step, logged = _train_records(tmp_path / 'every'), _train_records(tmp_path / 'interval')
  assert sorted(logged) == [3, 6] and sorted(per_step) == list(range(1, 7))
  for end in (3, 6):
    steps = [per_step[i] for i in range(end - 2, end + 1)]
    tokens = np.array([r['tokens'] for r in steps])
    assert logged[end]['tokens'] == tokens.sum() and logged[end]['num_steps'] == 3
    # Token-weighted: the total loss and the terms counted over tokens (ce and cos here).
    for k in ('loss', 'loss_ce', 'loss_cos'):
      want = np.dot([r[k] for r in steps], tokens) / tokens.sum()
      np.testing.assert_allclose(logged[end][k], want, rtol=1e-6, err_msg=f'{end} {k}')
      assert logged[end][k] != per_step[end][k], 'a mean, not the last step'
    np.testing.assert_allclose(logged[end]['grad_norm'], np.mean([r['grad_norm'] for r in steps]),
                               rtol=1e-6)
    # loss_mlm is over masked tokens (their count varies by step): within the steps' range.
    mlm = [r['loss_mlm'] for r in steps]
    assert min(mlm) <= logged[end]['loss_mlm'] <= max(mlm)
  # Running the finished run again trains nothing, appends nothing and keeps its summary.
  files = {n: (tmp_path / 'interval' / n).read_bytes() for n in ('metrics.jsonl', 'summary.json')}
  assert first['train_tokens_per_sec'] > 0
  again = _run(tmp_path / 'interval', log_every_steps=3, **kw)
  assert again == first
  for name, content in files.items():
    assert (tmp_path / 'interval' / name).read_bytes() == content, name
  assert 'is complete' in caplog.text and 'python -m flaxdistil.export --workdir' in caplog.text


def test_resume_with_incompatible_config_is_refused(tmp_path):
  _run(tmp_path, num_train_steps=2)
  with pytest.raises(ValueError, match='global_batch_size'):
    _run(tmp_path, num_train_steps=4, **{'data.global_batch_size': 32})
  # Harmless changes are accepted.
  summary = _run(tmp_path, num_train_steps=4, eval_every_steps=3, log_every_steps=1)
  assert summary['step'] == 4


def test_main_cli_two_steps_then_resume_and_bad_input(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  cmd = [sys.executable, '-m', 'flaxdistil.main', '--config', 'configs/tiny.py',
         '--workdir', str(tmp_path / 'w')]
  r = subprocess.run(cmd + ['--config.num_train_steps=2'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  r = subprocess.run(cmd + ['--config.num_train_steps=3'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Resumed from' in r.stderr
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'w' / 'checkpoints') if d.isdigit())
  assert steps[-1] == 3
  with open(tmp_path / 'w' / 'metrics.jsonl') as f:
    recs = [json.loads(l) for l in f]
  assert [r['step'] for r in recs if r['kind'] == 'train'] == [2, 3]
  r = subprocess.run(cmd + ['--config.data.max_seq_length=128'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert 'max_position_embeddings=64' in r.stderr


def test_masked_positions_gather():
  labels = jnp.array([[-100, 5, -100, 7, 9], [-100, -100, -100, -100, 3]])
  pos, lab = train_step.masked_positions(labels, 2)
  np.testing.assert_array_equal(pos, [[1, 3], [4, 0]])
  np.testing.assert_array_equal(lab, [[5, 7], [3, -100]])


def test_logits_on_masked_positions_only_gives_the_same_step():
  """max_predictions_per_seq only skips work: same loss and update as full logits."""
  tcfg, scfg, tparams, sparams, batch = _setup()
  optim = tiny.get_config().optim
  optim.warmup_steps = 0
  tx, _ = train_step.make_optimizer(optim, 10)
  w = losses.DistillWeights(restrict_ce_to_mask=True, alpha_mse=0.1)
  state = train_step.init_state(sparams, tx, jax.random.PRNGKey(0))
  outs = []
  for max_pred in (0, 12):
    step = jax.jit(train_step.make_train_step(models.MaskedLM(scfg), models.MaskedLM(tcfg), tx,
                                              w, 2, max_predictions_per_seq=max_pred))
    outs.append(step(state, tparams, batch))
  for k in ('loss', 'loss_ce', 'loss_mlm', 'loss_mse', 'loss_cos'):
    np.testing.assert_allclose(outs[0][1][k], outs[1][1][k], rtol=1e-5)
  _assert_trees_close(outs[0][0]['params'], outs[1][0]['params'])
  with pytest.raises(ValueError, match='restrict_ce_to_mask'):
    train_step.make_train_step(models.MaskedLM(scfg), models.MaskedLM(tcfg), tx,
                               losses.DistillWeights(), 1, max_predictions_per_seq=8)


def test_nonfinite_steps_are_skipped_or_stop_the_run(tmp_path):
  # An absurd learning rate blows the parameters up; the loss turns non-finite.
  skip = _run(tmp_path / 'skip', num_train_steps=6, log_every_steps=1, eval_every_steps=0,
              **{'optim.learning_rate': 1e30, 'optim.warmup_steps': 0})
  assert skip['num_skipped'] > 0
  from flaxdistil import export
  _, params, _, _ = export.load_student(str(tmp_path / 'skip'))
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
  with pytest.raises(FloatingPointError, match='last good checkpoint'):
    _run(tmp_path / 'stop', num_train_steps=6, log_every_steps=1, eval_every_steps=0,
         **{'optim.learning_rate': 1e30, 'optim.warmup_steps': 0, 'optim.on_nonfinite': 'stop'})


def test_streaming_run_resumes_exactly(tmp_path):
  """data.streaming: a run split in two (resume skips consumed batches) equals one run."""
  full = _run(tmp_path / 'stream', num_train_steps=4, eval_every_steps=0, log_every_steps=1,
              **{'data.streaming': True})
  assert full['step'] == 4
  _run(tmp_path / 'stream2', num_train_steps=4, eval_every_steps=0, log_every_steps=1,
       steps_per_run=2, **{'data.streaming': True})
  _run(tmp_path / 'stream2', num_train_steps=4, eval_every_steps=0, log_every_steps=1,
       **{'data.streaming': True})
  assert _train_losses(tmp_path / 'stream') == _train_losses(tmp_path / 'stream2')


def test_intermediate_terms_train_a_narrower_student_with_projections(tmp_path):
  """TinyBERT/MiniLM terms in the same loop: 4x32 teacher -> 2x16 student, projections trained,
  checkpointed, resumed exactly, and left out of the export."""
  kw = {'student.init': 'random', 'student.hidden_size': 16, 'student.intermediate_size': 32,
        'distill.alpha_cos': 0.0, 'distill.alpha_emb': 1.0, 'distill.alpha_hidden': 1.0,
        'distill.alpha_attn_kl': 1.0, 'distill.alpha_value_kl': 1.0,
        'distill.num_relation_heads': 2, 'eval_every_steps': 0, 'log_every_steps': 1,
        'num_train_steps': 6}
  full = _run(tmp_path / 'full', **kw)
  assert full['step'] == 6
  with open(tmp_path / 'full' / 'metrics.jsonl') as f:
    rec = [r for r in map(json.loads, f) if r['kind'] == 'train'][-1]
  for k in ('loss_emb', 'loss_hidden', 'loss_attn_kl', 'loss_value_kl', 'loss_ce', 'loss_mlm'):
    assert rec[k] > 0, k
  _run(tmp_path / 'split', steps_per_run=3, **kw)
  _run(tmp_path / 'split', **kw)
  assert _train_losses(tmp_path / 'full') == _train_losses(tmp_path / 'split')
  from flaxdistil import export
  scfg, params, meta, _ = export.load_student(str(tmp_path / 'full'))
  assert meta['fingerprint']['projection'] == [16, 32] and scfg.hidden_size == 16
  report = export.export(str(tmp_path / 'full'), str(tmp_path / 'hf'))
  assert report['max_abs_diff'] <= 1e-4


def test_mlm_only_baseline_has_the_distilled_students_shape(tmp_path):
  """Regression: with no loss term using the teacher, the student's default shape must still
  come from teacher.path (the DistilBERT ablation compares equal architectures)."""
  from flaxdistil import setup, synthetic
  import transformers
  syn = synthetic.write_corpus(str(tmp_path / 'syn'))
  tok = transformers.AutoTokenizer.from_pretrained(syn['tokenizer'])
  transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=len(tok), hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
      intermediate_size=40, max_position_embeddings=64)).save_pretrained(tmp_path / 'bert')
  cfg = tiny.get_config()
  cfg.update_from_flattened_dict({
      'teacher.random_init': False, 'teacher.path': str(tmp_path / 'bert'),
      'data.synthetic': False, 'data.tokenizer': syn['tokenizer'],
      'data.train_files': tuple(syn['train_files']), 'student.init': 'random',
      'distill.alpha_ce': 0.0, 'distill.alpha_cos': 0.0})
  run = setup.build_run(cfg, str(tmp_path / 'w'))
  s = run.student_config
  assert (s.hidden_size, s.num_attention_heads, s.intermediate_size) == (24, 3, 40)
  assert run.teacher_params is not None  # evaluated as the reference


def test_headless_teacher_gives_headless_student_trained_on_intermediate_terms(tmp_path):
  """A BertModel teacher (no MLM head, like MiniLM) distils through hidden states/attentions
  only; its student has no head, and asking for MLM or logit terms is refused."""
  from flaxdistil import export, setup, synthetic
  import transformers
  syn = synthetic.write_corpus(str(tmp_path / 'syn'))
  tok = transformers.AutoTokenizer.from_pretrained(syn['tokenizer'])
  transformers.BertModel(transformers.BertConfig(
      vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / 'enc')
  kw = {'teacher.random_init': False, 'teacher.path': str(tmp_path / 'enc'),
        'data.synthetic': False, 'data.tokenizer': syn['tokenizer'],
        'data.train_files': tuple(syn['train_files']), 'data.eval_files': (),
        'distill.alpha_ce': 0.0, 'distill.alpha_mlm': 0.0, 'distill.alpha_cos': 0.0,
        'distill.alpha_hidden': 1.0, 'distill.alpha_attn_kl': 1.0, 'distill.alpha_value_kl': 1.0,
        'eval_every_steps': 0, 'log_every_steps': 1, 'num_train_steps': 3}
  summary = _run(tmp_path / 'w', **kw)
  assert summary['done'] and summary['num_skipped'] == 0
  with open(tmp_path / 'w' / 'metrics.jsonl') as f:
    rec = [r for r in map(json.loads, f) if r['kind'] == 'train'][-1]
  assert rec['loss_hidden'] > 0 and rec['loss_attn_kl'] > 0 and rec['loss_value_kl'] > 0
  scfg, _, _, _ = export.load_student(str(tmp_path / 'w'))
  assert not scfg.with_mlm_head and scfg.num_hidden_layers == 2
  assert export.export(str(tmp_path / 'w'), str(tmp_path / 'hf'))['max_abs_diff'] <= 1e-4
  for key in ('distill.alpha_mlm', 'distill.alpha_ce'):
    cfg = tiny.get_config()
    cfg.update_from_flattened_dict(dict(kw, **{key: 1.0}))
    with pytest.raises(setup.ConfigError, match='no MLM head'):
      setup.build_run(cfg, str(tmp_path / 'x'))
