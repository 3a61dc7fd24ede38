r"""Build a teacher cache: run the teacher once over the training rows and store its targets.

  python -m flaxdistil.cache_teacher --config configs/wiki_mini.py --out runs/cache_k64 \
      [--num_rows N] [--config.teacher.cache_top_k=64] [--config.key=value]
  python -m flaxdistil.main --config configs/wiki_mini.py --workdir runs/offline \
      --config.teacher.cache=runs/cache_k64

Rerunning the same command after a kill resumes (finished shards are kept). On a multi-host
cluster run it on every host (as main.py): each host writes its own shards. Format, equations and
guarantees of the format: flaxdistil/data/teacher_cache.py. This module is the builder: it runs the
teacher of a training config (`setup.build_run`, the same data, masking and objective as the run)
and writes the shards and the manifest.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from flaxdistil import cli
from flaxdistil import console
from flaxdistil.data import progress
from flaxdistil.data import teacher_cache as tc_lib
from flaxdistil.storage import atomic
from flaxdistil.storage import integrity
from flaxdistil.storage import lock
from flaxdistil.storage import space
from flaxdistil.training import setup
from flaxdistil.training import sharding

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- builder

def plan_rows(row_fn, num_steps: int, global_batch_size: int, num_packed: int,
              num_rows: int = 0) -> np.ndarray:
  """The packed rows a run reads, in reading order, without repeats.

  Args:
    row_fn: `step -> [global_batch_size]` int64 row indices (`BatchIterator.rows`).
    num_steps: the run's steps (`num_train_steps`).
    global_batch_size: rows per step.
    num_packed: rows of the packed corpus (no more distinct rows exist).
    num_rows: rows to cache; 0 = those of steps `[0, num_steps)`. Capped at `num_packed`.

  Returns:
    `[R]` row indices, R = min(num_rows or num_steps * global_batch_size, num_packed): each
    row at its first read.
  """
  target = min(num_rows or num_steps * global_batch_size, num_packed)
  seen, out, step = np.zeros(num_packed, bool), [], 0
  total = 0
  while total < target:
    r = row_fn(step)
    r = r[~seen[r]]
    r = r[np.sort(np.unique(r, return_index=True)[1])]  # a batch straddling epochs may repeat rows
    seen[r] = True
    out.append(r)
    total += len(r)
    step += 1
  return np.concatenate(out)[:target] if out else np.zeros((0,), np.int64)


def make_targets_fn(model, top_k: int, temperature: float, values_dtype, hidden_dtype,
                    layers: dict | None = None):
  """The function computing what the cache stores for one batch of teacher inputs (to jit).

  Args:
    model: the teacher's `bert.MaskedLM` (with its MLM head).
    top_k: k, the logits kept per position.
    temperature: T of the stored log-partition `logz`.
    values_dtype: storage dtype of the top-k values (`teacher_cache.storage_dtype`).
    hidden_dtype: storage dtype of the last hidden state and of the `layers` outputs; None
      stores no hidden state (`layers` must then be empty).
    layers: `{field: [layer index, ...]}` of `ModelOutput` fields to store (`hidden_states`,
      `attentions`, `attention_scores`, `values`; `teacher_cache.needed_layers`); None = none.

  Returns:
    `fn(params, input_ids [B, T] int32, attention_mask [B, T] int32) -> dict`:
    `topk_values [B, T, k]` in values_dtype (the float32 logits, not divided by T, sorted
    descending), `topk_ids [B, T, k]` int32, `logz [B, T]` float32 (`logsumexp_V(logits / T)`,
    nats), with `hidden_dtype` also `hidden [B, T, H]` (last hidden state), and per `layers`
    entry `{field}_{i}` in hidden_dtype (`ModelOutput.{field}[i]`: `[B, T, H]` hidden states,
    `[B, heads, T, T]` attentions / attention scores, `[B, heads, T, head_dim]` values).
  """
  layers = layers or {}
  flags = {'output_attentions': 'attentions' in layers,
           'output_attention_scores': 'attention_scores' in layers,
           'output_values': 'values' in layers}

  def fn(params, input_ids, attention_mask):
    """The targets of one batch (see `make_targets_fn`)."""
    out = model.apply({'params': params}, input_ids, attention_mask, None, deterministic=True,
                      **flags)
    logits = out.logits.astype(jnp.float32)                    # [B, T, V]
    values, ids = jax.lax.top_k(logits, top_k)                 # sorted descending
    res = {'topk_values': values.astype(values_dtype), 'topk_ids': ids.astype(jnp.int32),
           'logz': jax.nn.logsumexp(logits / temperature, axis=-1)}
    if hidden_dtype is not None:
      res['hidden'] = out.hidden_states[-1].astype(hidden_dtype)
    for field, idx in layers.items():
      for i in idx:
        res[f'{field}_{i}'] = getattr(out, field)[i].astype(hidden_dtype)
    return res

  return fn


def _teacher_inputs(idx: np.ndarray, packed, it, gbs: int, masked: bool, memo: dict):
  """`(input_ids, attention_mask) [n, T]` the teacher sees for cache indices `idx [n]`; `memo`
  keeps the last step's masked batch, which spans several teacher batches."""
  if not masked:
    ids = packed[idx]
    return ids, ids != 0  # pad id 0, as BatchIterator's default pad_token_id
  steps = idx // gbs
  ids, mask = np.empty((len(idx), packed.shape[1]), np.int32), np.empty((len(idx), packed.shape[1]),
                                                                         np.int32)
  for st in np.unique(steps):
    if int(st) not in memo:
      memo.clear()
      memo[int(st)] = it.global_batch(int(st))
    b, sel = memo[int(st)], steps == st
    ids[sel], mask[sel] = b['input_ids'][idx[sel] % gbs], b['attention_mask'][idx[sel] % gbs]
  return ids, mask


def build(config, out: str, workdir: str, num_rows: int = 0, rows_per_shard: int = 1024,
          batch_size: int = 0) -> dict:
  """Builds (or resumes) the cache of `config`'s teacher over its packed training rows.

  Args:
    config: a training config (configs/*.py); `teacher.cache_top_k`,
      `teacher.cache_values_dtype`, `teacher.cache_hidden_dtype` and `distill.temperature`
      (of the stored logsumexp) set what is stored; the intermediate outputs its TinyBERT/MiniLM
      alphas and layer map read (`needed_layers`) plus `teacher.cache_hidden_layers` are stored
      too; `dtype='bfloat16'` runs the teacher in bf16.
    out: the cache directory (created; an unfinished build there is resumed).
    workdir: scratch directory for `setup.build_run` (the synthetic corpus of
      `data.synthetic`; the token cache is under `data.cache_dir`, as for training).
    num_rows: rows to cache (0 = the rows the configured run reads in `num_train_steps`).
    rows_per_shard: rows per shard file (the unit of resumption).
    batch_size: rows per teacher forward (0 = `data.eval_batch_size`).
  Returns:
    The manifest written to `out/manifest.json`: the plan (identity, shapes, k, dtypes, T,
    `rows`, shards) with `complete=True`, `bytes` (all shards), `num_tokens` (non-padding tokens
    of the cached rows), `bytes_per_token`, `build_seconds`, `shards_built_this_run`. For a cache
    that is already complete, its manifest as it is.

  Raises:
    ConfigError: (`training/errors.py`, raised as its alias `setup.ConfigError`) streaming data
      or a task config, no teacher with an MLM head, `teacher.cache_top_k` above vocab_size,
      intermediate terms with an empty `teacher.cache_hidden_dtype`, `out` holding a cache (or
      unfinished build) for another config, or any problem `setup.build_run` finds.
    ValueError: an unknown `teacher.cache_values_dtype` / `cache_hidden_dtype`.
  """
  t0 = time.time()
  if config.data.streaming or config.data.task:
    raise setup.ConfigError('cache_teacher needs packed MLM data: data.streaming=False, no data.task.')
  run = setup.build_run(config, workdir)
  if run.teacher_params is None or not run.teacher_config.with_mlm_head:
    raise setup.ConfigError('cache_teacher needs a teacher with an MLM head (teacher.path or '
                            'teacher.random_init).')
  tc = config.teacher
  k = int(tc.cache_top_k) or run.teacher_config.vocab_size  # 0: k = V, the dense targets
  if not 0 < k <= run.teacher_config.vocab_size:
    raise setup.ConfigError(f'teacher.cache_top_k={k} must be in [0, vocab_size='
                            f'{run.teacher_config.vocab_size}] (0 = vocab_size).')
  values_dtype, hidden_dtype = tc_lib.storage_dtype(tc.cache_values_dtype), (
      tc_lib.storage_dtype(tc.cache_hidden_dtype) if tc.cache_hidden_dtype else None)
  n_layers = run.teacher_config.num_hidden_layers
  layers = tc_lib.stored_layers(run.objective.inter, n_layers, tuple(tc.cache_hidden_layers),
                                tc.cache_hidden_dtype)  # the last hidden state: the `hidden` column
  if layers and hidden_dtype is None:
    raise setup.ConfigError(f'the intermediate terms need teacher {layers} stored, in '
                            'teacher.cache_hidden_dtype, which is empty; set it to "bfloat16".')
  packed, gbs = run.train_packed, int(config.data.global_batch_size)
  masked = tc.cache_teacher_input == 'masked'
  it = run.train_batches(0)
  it.close()  # only its pure (seed, step) functions are used: no prefetching
  if masked:  # cache index = sample = step * B + i of the run's masked stream
    rows = np.arange(num_rows or config.num_train_steps * gbs, dtype=np.int64)
  else:
    rows = plan_rows(it.rows, config.num_train_steps, gbs, len(packed), num_rows)
  t = int(config.data.max_seq_length)
  plan = {
      'format_version': tc_lib.FORMAT_VERSION, 'complete': False,
      **tc_lib.identity(run.teacher_params, packed, run.fingerprint['tokenizer_vocab'], t),
      'data_shape': list(packed.shape), 'teacher': run.info['teacher'],
      'teacher_config': run.fingerprint['teacher_config'], 'teacher_dtype': config.dtype,
      'top_k': k, 'values_dtype': tc.cache_values_dtype, 'ids_dtype': 'int32',
      'hidden_dtype': tc.cache_hidden_dtype or None, 'hidden_size': run.teacher_config.hidden_size,
      'layers': layers,
      'temperature': float(config.distill.temperature),
      'teacher_input': tc.cache_teacher_input, 'index': 'sample' if masked else 'row',
      'masking': tc_lib.masking_identity(config, it.global_batch(0)['input_ids']) if masked else None,
      'rows_per_shard': int(rows_per_shard), 'num_shards': -(-len(rows) // rows_per_shard),
      'batch_size': 0, 'seed': config.seed, 'rows': rows.tolist(),
  }
  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes, devices=jax.local_devices())
  rules = run.teacher_rules
  shards_n = sharding.num_batch_shards(mesh, rules)
  bs = batch_size or config.data.eval_batch_size
  plan['batch_size'] = bs = max(shards_n, bs - bs % shards_n)
  plan = json.loads(json.dumps(plan))  # as the manifest reads back (tuples as lists)
  os.makedirs(out, exist_ok=True)
  with lock.hold(out, f'--out {os.path.abspath(out)}', 'Wait for that build to end or stop it, '
                 'or pass another --out.', jax.process_index()), space.reporting_disk_full(
                     out, 'the teacher cache', lambda: _space_needed(out, plan),
                     'rerun the same command: finished shards are kept and the build goes on '
                     'with the missing ones.'):
    mpath = os.path.join(out, tc_lib.MANIFEST)
    if os.path.exists(mpath):
      with open(mpath) as f:
        old = json.load(f)
      same = {k_: v for k_, v in old.items() if k_ in plan and k_ != 'complete'} == {
          k_: v for k_, v in plan.items() if k_ != 'complete'}
      if not same:
        diff = sorted(k_ for k_ in plan if k_ != 'complete' and old.get(k_) != plan[k_])
        raise setup.ConfigError(f'--out {out!r} holds a cache for another config (differs in '
                                f'{diff}); choose a new --out or delete it.')
      if tc_lib.complete(out, old):
        logging.info('%s is already complete.', out)
        return old
    elif jax.process_index() == 0:
      atomic.write_json(mpath, plan)

    t_shard, _ = sharding.model_param_layout(run.teacher_config, mesh, rules)
    b_shard = sharding.batch_sharding(mesh, rules)
    fn = make_targets_fn(run.teacher_model, k, float(config.distill.temperature),
                         values_dtype, hidden_dtype, layers)
    with sharding.mesh_context(mesh, rules):
      jfn = jax.jit(fn, in_shardings=(t_shard, b_shard, b_shard))
      params = jax.device_put(run.teacher_params, t_shard)
      done, memo = 0, {}
      mine = [s for s in range(plan['num_shards'])
              if s % jax.process_count() == jax.process_index()]
      todo = [s for s in mine if not os.path.exists(os.path.join(out, tc_lib.shard_name(s)))]
      num_rows_mine = lambda shards: sum(len(rows[s * rows_per_shard:(s + 1) * rows_per_shard])
                                         for s in shards)
      bar = progress.progress_bar(num_rows_mine(mine), 'teacher cache', 'row',
                                  initial=num_rows_mine(mine) - num_rows_mine(todo))
      for s in todo:
        path = os.path.join(out, tc_lib.shard_name(s))
        srows = rows[s * rows_per_shard:(s + 1) * rows_per_shard]
        parts = []
        for i in range(0, len(srows), bs):
          ids, mask = _teacher_inputs(srows[i:i + bs], packed, it, gbs, masked, memo)
          n = len(ids)
          pad = np.zeros((bs - n, t), ids.dtype)  # pad rows, dropped below
          ids, mask = np.concatenate([ids, pad]), np.concatenate([mask, pad]).astype(np.int32)
          res = jax.device_get(jfn(params, *jax.device_put((ids, mask), b_shard)))
          parts.append({k_: np.asarray(v)[:n] for k_, v in res.items()})
          bar.update(n)
        arrays = {'row': srows, **{k_: np.concatenate([p[k_] for p in parts]) for k_ in parts[0]}}
        tc_lib.write_shard(path, arrays)
        done += 1
        logging.info('shard %d/%d written (%d rows, %.0f s)', s + 1, plan['num_shards'], len(srows),
                     time.time() - t0)
      bar.close()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('flaxdistil_teacher_cache_done')
    sizes = [os.path.getsize(os.path.join(out, tc_lib.shard_name(s)))
             for s in range(plan['num_shards'])]
    packed_rows = rows
    if masked:  # the packed row behind each sample
      steps = rows // gbs
      packed_rows = np.concatenate([it.rows(int(st))[rows[steps == st] % gbs]
                                    for st in np.unique(steps)])
    tokens = int((packed[packed_rows] != 0).sum())
    manifest = dict(plan, complete=True, bytes=int(sum(sizes)), num_tokens=tokens,
                    bytes_per_token=round(sum(sizes) / max(tokens, 1), 2),
                    build_seconds=round(time.time() - t0, 1), shards_built_this_run=done,
                    checksums=integrity.SUMS_FILE)
    if jax.process_index() == 0:
      atomic.write_json(mpath, manifest)
      names = [tc_lib.shard_name(s) for s in range(plan['num_shards'])]
      integrity.write_sums(out, names + [tc_lib.MANIFEST], known={
          n: tc_lib.shard_sha256(out, s) for s, n in enumerate(names)})
    return manifest


def _space_needed(out: str, plan: dict) -> int:
  """About how many bytes the missing shards of `out` need (the mean of those written, else
  the manifest's row layout at 8 bytes per stored value)."""
  sizes = [os.path.getsize(os.path.join(out, tc_lib.shard_name(s))) for s in range(
      plan['num_shards']) if os.path.exists(os.path.join(out, tc_lib.shard_name(s)))]
  left = plan['num_shards'] - len(sizes)
  if sizes:
    return int(left * sum(sizes) / len(sizes))
  values = plan['max_seq_length'] * (2 * plan['top_k'] + 1 + plan['hidden_size'])
  return left * plan['rows_per_shard'] * values * 8


# ----------------------------------------------------------------------------- command line

def _define_flags():
  """The CLI's flags, defined only when this module runs, so the builder can be imported next to
  `flaxdistil.main` (which defines `--config` too)."""
  config_flags.DEFINE_config_file('config', None, 'Training config (configs/*.py).', lock_config=True)
  cli.define_multihost_flags()
  flags.DEFINE_string('out', None, 'Cache directory (created; an unfinished build there is resumed).')
  flags.DEFINE_integer('num_rows', 0, 'Packed rows to cache; 0 = the rows the configured run reads '
                       '(num_train_steps x global_batch_size, in its data order).')
  flags.DEFINE_integer('rows_per_shard', 1024, 'Rows per shard file (the unit of resumption).')
  flags.DEFINE_integer('batch_size', 0, 'Rows per teacher forward; 0 = data.eval_batch_size.')
  flags.DEFINE_string('build_workdir', None, 'Scratch dir for data preparation; default OUT/../'
                      '<basename>_work (outside the cache, so its size is the cache alone).')


def main(argv):
  """Builds the cache of `--config` in `--out`, then prints a JSON summary line (`app.run`).

  Args:
    argv: the command line left after absl parsed its flags; only the program name is allowed.

  Raises:
    app.UsageError: positional arguments beyond the program name.
    SystemExit: `error: ...` and the code of `cli.exit_on_error` (2 a `ConfigError`, 4 the disk
      is full, 5 a corrupt input file, 6 another build holds `--out`, 7 a lost process).
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.setup()
  cli.initialize_from_flags()
  out = FLAGS.out.rstrip('/')
  workdir = FLAGS.build_workdir or os.path.join(os.path.dirname(out) or '.',
                                                os.path.basename(out) + '_work')
  with cli.exit_on_error(FLAGS.config):
    setup.prepare_workdir(workdir)
    m = build(FLAGS.config, out, workdir, num_rows=FLAGS.num_rows,
              rows_per_shard=FLAGS.rows_per_shard, batch_size=FLAGS.batch_size)
  summary = {k: m.get(k) for k in ('top_k', 'values_dtype', 'hidden_dtype', 'num_shards', 'bytes',
                                   'num_tokens', 'bytes_per_token', 'build_seconds')}
  summary['rows'] = len(m['rows'])
  print(json.dumps({'out': os.path.abspath(out), **summary}))


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['config', 'out'])
  app.run(main)
