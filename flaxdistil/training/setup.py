"""From a config to everything the train loop needs, with clear input errors.

`build_run(config, workdir)` first checks the config alone (`validate`: no file
is read, no model loaded), then loads the tokenizer and the teacher, derives and
initialises the student (`student_init`), builds the mesh and packs the data.
Every problem raises `ConfigError` naming the key and the fix; the checks that
need a loaded model (vocabulary, positions, heads, layer counts) come right
after it is loaded, before the data is tokenised.
"""

import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable

import jax

from flaxdistil.data import glue
from flaxdistil.data import synthetic
from flaxdistil.data import tokenization
from flaxdistil.model import bert
from flaxdistil.model import student_init
from flaxdistil.objectives import intermediate
from flaxdistil.objectives import losses
from flaxdistil.objectives import objective as objective_lib
from flaxdistil.objectives.objective import Objective
from flaxdistil.objectives.objective import Projection
from flaxdistil.training import errors
from flaxdistil.training import run_data
from flaxdistil.training import run_models
from flaxdistil.training import sharding

ConfigError = errors.ConfigError  # what build_run and validate raise


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything `train.train_and_evaluate` needs; params are host numpy trees.

  Immutable (`dataclasses.FrozenInstanceError` on assignment); the loop drops the host copies of
  the params with `dataclasses.replace(run, student_params=None, ...)`. `objective` is the one
  `Objective` of the run (layer map resolved), read by the step, the evaluator and the cache
  builder; `mesh` the one mesh over all devices.
  """
  student_config: bert.ModelConfig
  student_model: Any
  student_params: Any
  teacher_config: bert.ModelConfig | None
  teacher_model: Any
  teacher_params: Any
  mesh: Any
  rules: tuple
  teacher_rules: tuple
  objective: Objective
  fingerprint: dict
  train_batches: Callable[[int], Any]   # start_step -> BatchIterator
  eval_batches: Callable[[], list]
  info: dict                            # provenance for checkpoints' metadata and model cards
  projection: Projection | None = None  # TinyBERT projections of a narrower student, or None
  proj_params: Any = None               # their initial values (host)
  train_packed: Any = None              # packed training rows [N, T] int32 (MLM, not streaming)


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks it is writable (a read-only path fails here).

  Raises:
    ConfigError: `workdir` cannot be created or written to.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'--workdir {workdir!r} is not writable ({e.strerror}); pass a directory you '
                      'can write to.') from e


def distill_weights(config) -> losses.DistillWeights:
  """The config's logit/hidden-state coefficients (`distill.*`, `teacher.cache_tail_bucket`).

  Args:
    config: the run's ConfigDict.

  Returns:
    The `losses.DistillWeights` of the DistilBERT triple loss and the task terms.
  """
  d = config.distill
  return losses.DistillWeights(
      temperature=d.temperature, alpha_ce=d.alpha_ce, alpha_mlm=d.alpha_mlm,
      alpha_cos=d.alpha_cos, alpha_mse=d.alpha_mse, restrict_ce_to_mask=d.restrict_ce_to_mask,
      alpha_task=d.alpha_task, tail_bucket=config.teacher.cache_tail_bucket)


def intermediate_weights(d) -> intermediate.IntermediateWeights:
  """The `distill` group's TinyBERT/MiniLM coefficients (`alpha_emb`, ...).

  Args:
    d: the config's `distill` group.

  Returns:
    `intermediate.IntermediateWeights` (`num_relation_heads` 0 becomes None: relations per
    attention head, as MiniLM).
  """
  return intermediate.IntermediateWeights(
      alpha_emb=d.alpha_emb, alpha_hidden=d.alpha_hidden, alpha_attn_score=d.alpha_attn_score,
      alpha_attn_kl=d.alpha_attn_kl, alpha_value_kl=d.alpha_value_kl,
      num_relation_heads=d.num_relation_heads or None,
      relation_teacher_layer=d.relation_teacher_layer)


def objective_from_config(config) -> Objective:
  """The `Objective` `config` describes, its layer map not yet resolved.

  The layer map needs both models' layer counts; `build_run` resolves it with
  `Objective.with_layer_map` once they are loaded. Before that, every question
  that depends on the alphas alone (`uses_teacher`, `needs_teacher_forward`)
  is answered already.

  Args:
    config: the run's ConfigDict (`distill`, `teacher.cache`, `data.task`).

  Returns:
    The `Objective`, with `inter=None` when every intermediate-layer alpha is 0.

  Raises:
    ConfigError: an unknown `distill.teacher_input`, or logits restricted to
      masked positions with a term over all tokens.
  """
  d = config.distill
  iw = intermediate_weights(d)
  try:
    return Objective(
        weights=distill_weights(config),
        inter=objective_lib.LayerTerms(iw, ()) if objective_lib.has_intermediate_terms(iw) else None,
        offline=bool(config.teacher.cache), teacher_input=d.teacher_input,
        vocab_chunk_size=d.vocab_chunk_size, max_predictions_per_seq=d.max_predictions_per_seq,
        task=bool(config.data.task))
  except ValueError as e:
    raise ConfigError(str(e)) from e


def validate(config, num_devices: int | None = None, num_processes: int | None = None
             ) -> Objective:
  """Checks everything `config` alone decides, before any file is read or model loaded.

  Pure: reads no path (a nonexistent teacher.path or data file is found by
  `build_run`), only the number of devices and processes. What needs a loaded
  model or tokenizer (vocabulary sizes, max_position_embeddings, heads, layer
  counts, cache identity) is checked by `build_run` right after loading.

  Args:
    config: the run's ConfigDict.
    num_devices: devices the mesh covers; None = `jax.device_count()` (another number: a
      topology compiled for ahead of time, `train_compile`).
    num_processes: hosts sharing the global batch; None = `jax.process_count()`.

  Returns:
    The run's `Objective` (`objective_from_config`; layer map not yet resolved).

  Raises:
    ConfigError: naming the key and the fix, e.g. an unknown dtype, task or
      student.init, no tokenizer source, both data.train_files and
      data.dataset, MLM terms on a classification task, a teacher term without
      a teacher, a teacher.cache that cannot serve the objective, or a
      global batch not divisible by hosts, microbatches and batch shards.
  """
  d, dist, t, s = config.data, config.distill, config.teacher, config.student
  obj = objective_from_config(config)
  run_models.compute_dtype(config.dtype)
  run_models.attention_implementation(config)

  # Data source.
  tok_path = d.tokenizer or t.path or s.path
  if not d.synthetic and not tok_path:
    raise ConfigError('No tokenizer: set data.tokenizer (or teacher.path / student.path, whose '
                      'tokenizer is used).')
  if not d.synthetic and not d.train_files and not d.dataset:
    raise ConfigError('data.train_files is empty; list text/json/parquet files, set data.dataset (a '
                      'hub name or local dataset directory) or data.synthetic=True.')
  if (d.synthetic or d.train_files) and d.dataset:
    raise ConfigError(f'Both data.train_files and data.dataset={d.dataset!r} are set; use one.')

  # Task vs MLM.
  if d.task:
    try:
      glue.get_task(d.task)
    except ValueError as e:
      raise ConfigError(f'data.task: {e}') from e
    if not d.synthetic and (len(d.train_files) != 1 or len(d.eval_files) > 1):
      raise ConfigError(f'data.task={d.task!r} takes one train TSV and at most one eval TSV '
                        f'(train.tsv, dev.tsv), got {list(d.train_files)} / {list(d.eval_files)}.')
    if dist.alpha_mlm or dist.alpha_mse:
      raise ConfigError(f'data.task={d.task!r} trains sequence classification: set '
                        'distill.alpha_mlm=0 and distill.alpha_mse=0 (use alpha_ce for soft labels, '
                        'alpha_task for gold).')
  elif dist.alpha_task:
    raise ConfigError('distill.alpha_task needs a classification task (data.task="sst2"/"mrpc").')
  if d.streaming and dist.mlm_smoothing:
    raise ConfigError('distill.mlm_smoothing needs token counts of the whole corpus; it is not '
                      'available with data.streaming=True.')

  # Student and teacher.
  if s.model_type not in ('bert', 'distilbert'):
    raise ConfigError(f'student.model_type={s.model_type!r}: use "distilbert" or "bert" (the '
                      'latter to fine-tune a BERT teacher).')
  if s.init not in student_init.INITS:
    raise ConfigError(f'student.init={s.init!r}: use "teacher", "random" or "pretrained".')
  if s.init == 'pretrained' and not s.path:
    raise ConfigError('student.init="pretrained" needs student.path (a HF BERT/DistilBERT dir).')
  if run_models.teacher_loaded(config, obj) and not t.path and not t.random_init:
    raise ConfigError(run_models.NEEDS_TEACHER)

  # Objective.
  if t.cache_teacher_input not in objective_lib.TEACHER_INPUTS:  # read by cache_teacher's build
    raise ConfigError(f'teacher.cache_teacher_input={t.cache_teacher_input!r}: use '
                      '"original" or "masked".')
  if obj.offline:
    if d.streaming or d.task:
      raise ConfigError('teacher.cache needs packed MLM data (data.streaming=False, no data.task).')
    if not run_models.teacher_loaded(config, obj):
      raise ConfigError('teacher.cache needs the teacher it was built from (teacher.path) to check '
                        'its identity and to evaluate it.')
    if dist.alpha_mse:
      raise ConfigError('teacher.cache stores top-k logits, not the full logits distill.alpha_mse '
                        'compares: set distill.alpha_mse=0 (or train online without teacher.cache).')

  if config.optim.on_nonfinite not in ('skip', 'stop'):
    raise ConfigError(f'optim.on_nonfinite={config.optim.on_nonfinite!r}: use "skip" (skip the '
                      'update and count it) or "stop".')
  if config.optim.max_consecutive_nonfinite < 0:
    raise ConfigError(f'optim.max_consecutive_nonfinite={config.optim.max_consecutive_nonfinite}: '
                      'use a count of steps >= 1, or 0 to never stop for skipped steps.')

  # Batch layout.
  gbs = d.global_batch_size
  hosts = jax.process_count() if num_processes is None else num_processes
  if gbs % hosts:
    raise ConfigError(f'data.global_batch_size={gbs} is not divisible by {hosts} hosts; use a '
                      f'multiple of {hosts}.')
  try:
    mesh_shape = sharding.resolve_mesh_shape(
        config.mesh.shape, config.mesh.axes,
        jax.device_count() if num_devices is None else num_devices)
    sharding.check_batch_divisibility(gbs, config.optim.num_microbatches, mesh_shape,
                                      sharding.rules_tuple(config.mesh.logical_axis_rules))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return obj


def resolve_models(config, obj: Objective, tcfg, pcfg, vocab_size: int, num_labels: int,
                   tok_path: str | None):
  """From the teacher's and a pretrained student's configs to the run's models and objective.

  What `build_run` and `run_shapes` (no weights) share: the compute options on the teacher,
  the student's shape, the checks that need both configs, the layer map and projections.

  Args:
    config: the run's ConfigDict.
    obj: the `Objective` of `validate`.
    tcfg: the teacher's `ModelConfig` (`run_models.load_teacher`), or None.
    pcfg: the `student.path` config (`run_models.load_pretrained_student`), or None.
    vocab_size: the tokenizer's size.
    num_labels: the task's label count; 0 for MLM.
    tok_path: where the tokenizer comes from (for messages).

  Returns:
    `(teacher config, student config, objective with its layer map, projection or None)`,
    both configs with the run's compute options (`run_models.compute_options`).

  Raises:
    ConfigError: as `run_models.check_loaded`, `run_models.check_student_init` and
      `run_models.resolve_objective`.
  """
  if tcfg is not None:
    tcfg = dataclasses.replace(tcfg, **run_models.compute_options(config))
  scfg = run_models.student_config(config, tcfg, vocab_size, num_labels, pcfg)
  run_models.check_loaded(config, tok_path, vocab_size, tcfg, scfg, pcfg)
  run_models.check_student_init(config, scfg, tcfg, pcfg)
  obj, projection = run_models.resolve_objective(config, obj, scfg, tcfg)
  return tcfg, scfg, obj, projection


@dataclasses.dataclass(frozen=True)
class RunShapes:
  """What a run's train step is made of, without weights or data (`run_shapes`).

  `mesh_shape` is `{axis: size}` over the devices it was derived for; `task` the GLUE task or
  None; `vocab_size` the tokenizer's size the run would use.
  """
  objective: Objective
  teacher_config: bert.ModelConfig | None
  student_config: bert.ModelConfig
  projection: Projection | None
  mesh_shape: dict
  rules: tuple
  teacher_rules: tuple
  task: Any
  vocab_size: int


def run_shapes(config, num_devices: int | None = None, num_processes: int | None = None
               ) -> RunShapes:
  """The models, objective and mesh `build_run` would build, from shapes alone.

  No weights are loaded and no data is read: the teacher's shape comes from `teacher.path`'s
  config.json (`hf_conversion.read_hf_config`) or `teacher.random_init`'s fields, a pretrained
  student's from its config.json; the tokenizer is loaded only when nothing else gives the
  vocabulary (a random-init teacher; `data.synthetic` needs none: its size is fixed). The same
  checks as `build_run` run on them (`validate`, `resolve_models`).

  Args:
    config: the run's ConfigDict.
    num_devices: devices of the mesh (None: `jax.device_count()`).
    num_processes: hosts (None: `jax.process_count()`).

  Returns:
    The `RunShapes`.

  Raises:
    ConfigError: as `validate` and `resolve_models`, or a teacher/student/tokenizer path that
      cannot be read.
  """
  obj = validate(config, num_devices, num_processes)
  d = config.data
  task = glue.get_task(d.task) if d.task else None
  num_labels = len(task.label_names) if task else 0
  tok_path = d.tokenizer or config.teacher.path or config.student.path
  from_checkpoint = bool(run_models.teacher_loaded(config, obj) and config.teacher.path)
  vocab_size = None
  if d.synthetic:
    vocab_size, tok_path = synthetic.vocab_size(), 'data.synthetic'
  elif not from_checkpoint:  # a random-init teacher, or no teacher: the tokenizer's size
    try:
      vocab_size = len(tokenization.load_tokenizer(tok_path))
    except (OSError, ValueError) as e:
      raise ConfigError(f'Cannot load tokenizer from {tok_path!r}: {e}') from e
  tcfg, _ = run_models.load_teacher(config, obj, vocab_size or 0, num_labels, weights=False)
  pcfg, _ = run_models.load_pretrained_student(config, num_labels, weights=False)
  if vocab_size is None:  # the teacher's vocabulary (build_run checks its tokenizer against it)
    vocab_size = tcfg.vocab_size
  tcfg, scfg, obj, projection = resolve_models(config, obj, tcfg, pcfg, vocab_size, num_labels,
                                               tok_path)
  rules = sharding.rules_tuple(config.mesh.logical_axis_rules)
  mesh_shape = sharding.resolve_mesh_shape(
      config.mesh.shape, config.mesh.axes,
      jax.device_count() if num_devices is None else num_devices)
  return RunShapes(objective=obj, teacher_config=tcfg, student_config=scfg, projection=projection,
                   mesh_shape=mesh_shape, rules=rules,
                   teacher_rules=sharding.rules_tuple(config.teacher.logical_axis_rules or rules),
                   task=task, vocab_size=vocab_size)


def build_run(config, workdir: str) -> Run:
  """Validates `config`, then builds models, params, mesh and data for the loop.

  Order: `validate(config)` (no I/O), tokenizer and models (then the checks that
  need them), student init, data. Writes only the synthetic corpus (with
  `data.synthetic`) under `workdir` and the token cache under `data.cache_dir`.

  Args:
    config: the run's ConfigDict (configs/*.py).
    workdir: the run's directory (only the synthetic corpus is written there).

  Returns:
    The `Run`: models, host params, mesh, rules, resolved objective, batch factories,
    fingerprint and provenance.

  Raises:
    ConfigError: with the problem and the fix (see `validate`; then missing
      paths, vocab mismatch, max_seq_length above max_position_embeddings,
      teacher without MLM head, empty dataset, a teacher.cache of another run...).
  """
  obj = validate(config)
  d = config.data
  train_files, eval_files, tok_path = list(d.train_files), list(d.eval_files), d.tokenizer
  if d.synthetic:
    paths = synthetic.write_corpus(os.path.join(workdir, 'synthetic'), seed=config.seed)
    train_files, eval_files, tok_path = paths['train_files'], paths['eval_files'], paths['tokenizer']
  tok_path = tok_path or config.teacher.path or config.student.path
  try:
    tokenizer = tokenization.load_tokenizer(tok_path)
  except (OSError, ValueError) as e:
    raise ConfigError(f'Cannot load tokenizer from {tok_path!r}: {e}') from e
  vocab_size = len(tokenizer)

  task = glue.get_task(d.task) if d.task else None
  num_labels = len(task.label_names) if task else 0
  tcfg, tparams = run_models.load_teacher(config, obj, vocab_size, num_labels)
  pcfg, pparams = run_models.load_pretrained_student(config, num_labels)
  tcfg, scfg, obj, projection = resolve_models(config, obj, tcfg, pcfg, vocab_size, num_labels,
                                               tok_path)
  sparams = run_models.init_student(config, scfg, tcfg, tparams, (pcfg, pparams))
  proj_params = None
  if projection is not None:
    proj_params = jax.device_get(intermediate.init_projection_params(
        jax.random.PRNGKey(config.seed + 3), *projection))

  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes)
  rules = sharding.rules_tuple(config.mesh.logical_axis_rules)
  t_rules = sharding.rules_tuple(config.teacher.logical_axis_rules or rules)

  packed = None
  if task is None:
    train_batches, eval_batches, packed = run_data.mlm_batches(config, tokenizer, scfg, train_files,
                                                       eval_files, mesh, rules)
  else:
    train_batches, eval_batches = run_data.task_batches(config, task, tokenizer, train_files, eval_files,
                                                mesh, rules)

  strip = lambda c: None if c is None else {k: v for k, v in dataclasses.asdict(c).items()
                                            if k not in bert.COMPUTE_FIELDS}
  tokenizer_fp = hashlib.sha1(' '.join(sorted(tokenizer.get_vocab())).encode()).hexdigest()[:16]
  if obj.offline:
    features, targets = run_data.open_teacher_cache(config, tparams, packed, tokenizer_fp, obj.inter,
                                            tcfg.num_hidden_layers, train_batches)
    train_batches = functools.partial(train_batches, row_features=features)
  else:
    targets = 'online' if tcfg is not None else None
  fingerprint = {
      'student_config': strip(scfg), 'teacher_config': strip(tcfg),
      'global_batch_size': d.global_batch_size, 'max_seq_length': d.max_seq_length,
      'seed': config.seed,
      'train_data': run_data.files_id(train_files) + ([[d.dataset, d.dataset_split, d.text_column]]
                                              if d.dataset else []),
      'student_init': config.student.init,
      'projection': None if projection is None else tuple(projection), 'task': d.task,
      'tokenizer_vocab': tokenizer_fp,
      # where the teacher's targets come from: a resumed run switching between online and a cache,
      # or to a cache with another k, would change its objective mid-run
      'teacher_targets': targets,
  }
  return Run(
      student_config=scfg, student_model=bert.MaskedLM(scfg), student_params=sparams,
      teacher_config=tcfg, teacher_model=bert.MaskedLM(tcfg) if tcfg else None,
      teacher_params=tparams, mesh=mesh, rules=rules, teacher_rules=t_rules, objective=obj,
      fingerprint=fingerprint, train_batches=train_batches, eval_batches=eval_batches,
      projection=projection, proj_params=proj_params, train_packed=packed,
      info={'teacher': config.teacher.path or ('random' if tcfg else None),
            'tokenizer': os.path.abspath(tok_path) if os.path.isdir(tok_path) else tok_path,
            'train_files': [os.path.abspath(f) for f in train_files],
            'dataset': d.dataset or None,
            'student_init': config.student.init,
            'task': d.task,
            'id2label': dict(enumerate(task.label_names)) if task else None,
            'distill': config.distill.to_dict()})
