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

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from flaxdistil.data import corpus
from flaxdistil.data import glue
from flaxdistil.data import input_pipeline
from flaxdistil.data import synthetic
from flaxdistil.data import teacher_cache
from flaxdistil.data import tokenization
from flaxdistil.model import bert
from flaxdistil.model import hf_conversion
from flaxdistil.model import student_init
from flaxdistil.objectives import intermediate
from flaxdistil.objectives import losses
from flaxdistil.objectives import objective as objective_lib
from flaxdistil.objectives.objective import Objective
from flaxdistil.objectives.objective import Projection
from flaxdistil.storage import hub
from flaxdistil.training import sharding


class ConfigError(ValueError):
  """A config or input problem; the message says how to fix it."""


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
  train_packed: Any = None              # packed training rows [N, T] (MLM, not streaming)


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks it is writable (a read-only path fails here)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'--workdir {workdir!r} is not writable ({e.strerror}); pass a directory you '
                      'can write to.') from e


def _dtype(name: str):
  try:
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[name]
  except KeyError:
    raise ConfigError(f'dtype={name!r}: use "float32" or "bfloat16".') from None


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


def objective_from_config(config) -> Objective:
  """The `Objective` `config` describes, its layer map not yet resolved.

  The layer map needs both models' layer counts; `build_run` resolves it with
  `Objective.with_layer_map` once they are loaded. Before that, every question
  that depends on the alphas alone (`uses_teacher`, `needs_teacher_forward`)
  is answered already.

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


def _teacher_loaded(config, obj: Objective) -> bool:
  # A teacher given by path is always loaded: it defines the student's default shape (so an
  # MLM-only baseline has the same architecture as the distilled student) and is evaluated
  # as the reference, even when no loss term uses it.
  return obj.uses_teacher or config.student.init == 'teacher' or bool(config.teacher.path)


_NEEDS_TEACHER = ('The objective needs a teacher (alpha_ce/alpha_cos/alpha_mse > 0 or '
                  'student.init="teacher") but teacher.path is empty; set teacher.path, '
                  'or set those alphas to 0 and student.init="random" for plain MLM.')


def validate(config) -> Objective:
  """Checks everything `config` alone decides, before any file is read or model loaded.

  Pure: reads no path (a nonexistent teacher.path or data file is found by
  `build_run`), only the number of devices and processes. What needs a loaded
  model or tokenizer (vocabulary sizes, max_position_embeddings, heads, layer
  counts, cache identity) is checked by `build_run` right after loading.

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
  _dtype(config.dtype)

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
  if _teacher_loaded(config, obj) and not t.path and not t.random_init:
    raise ConfigError(_NEEDS_TEACHER)

  # Objective.
  if t.cache_teacher_input not in objective_lib.TEACHER_INPUTS:  # read by cache_teacher's build
    raise ConfigError(f'teacher.cache_teacher_input={t.cache_teacher_input!r}: use '
                      '"original" or "masked".')
  if obj.offline:
    if d.streaming or d.task:
      raise ConfigError('teacher.cache needs packed MLM data (data.streaming=False, no data.task).')
    if not _teacher_loaded(config, obj):
      raise ConfigError('teacher.cache needs the teacher it was built from (teacher.path) to check '
                        'its identity and to evaluate it.')
    if dist.alpha_mse:
      raise ConfigError('teacher.cache stores top-k logits, not the full logits distill.alpha_mse '
                        'compares: set distill.alpha_mse=0 (or train online without teacher.cache).')

  # Batch layout.
  gbs = d.global_batch_size
  hosts = jax.process_count()
  if gbs % hosts:
    raise ConfigError(f'data.global_batch_size={gbs} is not divisible by {hosts} hosts; use a '
                      f'multiple of {hosts}.')
  try:
    mesh_shape = sharding.resolve_mesh_shape(config.mesh.shape, config.mesh.axes,
                                             jax.device_count())
    sharding.check_batch_divisibility(gbs, config.optim.num_microbatches, mesh_shape,
                                      sharding.rules_tuple(config.mesh.logical_axis_rules))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return obj


def load_teacher(config, obj: Objective, vocab_size: int, num_labels: int = 0):
  """`(ModelConfig, numpy params)` of the teacher, or `(None, None)` if none is needed.

  `num_labels > 0` (a GLUE task): logit terms need a teacher fine-tuned on the
  task, i.e. a `*ForSequenceClassification` checkpoint with that many labels.

  Raises:
    ConfigError: the teacher cannot be loaded, or lacks the head the
      objective reads.
  """
  t, dist = config.teacher, config.distill
  if not _teacher_loaded(config, obj):
    return None, None
  if t.path:
    if not os.path.isdir(t.path) and hub.looks_like_local_path(t.path):
      raise ConfigError(f'teacher.path {t.path!r} does not exist; pass a Hugging Face BERT directory '
                        '(config.json + model.safetensors or pytorch_model.bin) or a hub name.')
    try:
      tcfg, tparams = hf_conversion.load_hf_model(t.path)
    except (FileNotFoundError, ValueError, OSError) as e:
      raise ConfigError(f'Cannot load teacher from {t.path!r}: {e}') from e
  elif t.random_init:
    tcfg = bert.ModelConfig(
        model_type='bert', vocab_size=vocab_size, hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings)
    tparams = jax.device_get(bert.init_params(tcfg, jax.random.PRNGKey(config.seed + 1)))
  else:
    raise ConfigError(_NEEDS_TEACHER)
  if num_labels:
    if dist.alpha_ce and tcfg.num_labels != num_labels:
      raise ConfigError(
          f'Teacher {t.path!r} has no {num_labels}-label classification head (num_labels='
          f'{tcfg.num_labels}): fine-tune it on the task first (configs/glue.py:teacher) and pass '
          'the exported directory as teacher.path, or set distill.alpha_ce=0.')
  elif not tcfg.with_mlm_head and (dist.alpha_ce or dist.alpha_mse):
    raise ConfigError(f'Teacher {t.path!r} has no MLM head (a plain BertModel): set '
                      'distill.alpha_ce=0 and distill.alpha_mse=0 and distill via hidden states.')
  return tcfg, tparams


def student_config(config, tcfg: bert.ModelConfig | None, vocab_size: int,
                   num_labels: int = 0, pretrained: bert.ModelConfig | None = None
                   ) -> bert.ModelConfig:
  """The student's shape: 0 in a field means "the teacher's value".

  With `student.init='pretrained'` the pretrained checkpoint's shape is the
  reference instead (`pretrained`), so fine-tuning a BERT keeps its shape.
  `num_labels > 0` gives a sequence-classification head and no MLM head.
  """
  s = config.student
  ref = pretrained or tcfg
  pick = lambda v, attr, default: v if v else (getattr(ref, attr) if ref else default)
  return bert.ModelConfig(
      model_type=s.model_type,
      vocab_size=ref.vocab_size if ref else vocab_size,
      type_vocab_size=ref.type_vocab_size if ref and ref.type_vocab_size else 2,
      hidden_size=pick(s.hidden_size, 'hidden_size', 768),
      # A same-type pretrained model keeps its depth; BERT -> DistilBERT picks layers.
      num_hidden_layers=pick(0 if student_init.same_type(pretrained, s) else s.num_hidden_layers,
                             'num_hidden_layers', 6),
      num_attention_heads=pick(s.num_attention_heads, 'num_attention_heads', 12),
      intermediate_size=pick(s.intermediate_size, 'intermediate_size', 3072),
      max_position_embeddings=pick(s.max_position_embeddings, 'max_position_embeddings', 512),
      hidden_dropout_prob=s.hidden_dropout_prob,
      attention_probs_dropout_prob=s.attention_probs_dropout_prob,
      # A head-less teacher (BertModel, e.g. MiniLM) gives a head-less student: no MLM
      # logits exist to distil, and an export of an untrained head would mislead.
      with_mlm_head=not num_labels and (tcfg.with_mlm_head if tcfg else True),
      num_labels=num_labels,
      classifier_dropout=s.classifier_dropout,
      dtype=_dtype(config.dtype), remat=config.remat)


def load_pretrained_student(config, num_labels: int):
  """`(ModelConfig, params)` of `student.path` for `student.init='pretrained'`, or (None, None).

  Raises:
    ConfigError: the checkpoint cannot be loaded or does not fit `student.model_type`.
  """
  s = config.student
  if s.init != 'pretrained':
    return None, None
  try:
    return student_init.load_pretrained_student(s.path, s.model_type, num_labels)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def init_student(config, scfg, tcfg, tparams, pretrained=(None, None)):
  """Student params (numpy) for `student.init` (`student_init.init_student`).

  Raises:
    ConfigError: the source cannot initialise this student (names the fix).
  """
  try:
    return student_init.init_student(config.student.init, scfg, config.seed,
                                     teacher=(tcfg, tparams), pretrained=pretrained,
                                     layers=list(config.student.layers) or None)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _files_id(files) -> list:
  return [[os.path.basename(f), os.path.getsize(f)] for f in files if os.path.exists(f)]


def _eval_batch_size(d, mesh, rules) -> int:
  """`data.eval_batch_size` rounded down to a multiple of the batch shards (at least one row each)."""
  shards = sharding.num_batch_shards(mesh, rules)
  return max(shards, d.eval_batch_size - d.eval_batch_size % shards)


def _mlm_batches(config, tokenizer, scfg, train_files, eval_files, mesh, rules):
  """`(train_batches, eval_batches)` of packed, masked text (MLM distillation)."""
  d, gbs, vocab_size = config.data, config.data.global_batch_size, len(tokenizer)
  cache_dir = d.cache_dir or corpus.default_cache_dir()
  source = dict(dataset=d.dataset, dataset_split=d.dataset_split, text_column=d.text_column)
  try:
    # Every host builds-or-waits on the same key (flock); the first one tokenises, the rest map it.
    packed = None if d.streaming else input_pipeline.load_packed(
        train_files, tokenizer, d.max_seq_length, cache_dir=cache_dir, num_proc=d.num_proc, **source)
    packed_eval = None
    if d.dataset and d.dataset_eval_split:
      packed_eval = input_pipeline.load_packed(
          (), tokenizer, d.max_seq_length, cache_dir=cache_dir, num_proc=d.num_proc,
          **dict(source, dataset_split=d.dataset_eval_split))
    elif eval_files:
      packed_eval = input_pipeline.load_packed(eval_files, tokenizer, d.max_seq_length,
                                               cache_dir=cache_dir, num_proc=d.num_proc,
                                               text_column=d.text_column)
  except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
    raise ConfigError(str(e)) from e
  special_ids = sorted(set(tokenizer.all_special_ids))
  mask_kwargs = dict(mask_token_id=tokenizer.mask_token_id, vocab_size=vocab_size,
                     special_token_ids=special_ids, mlm_probability=config.distill.mlm_probability)
  token_probs = None
  if config.distill.mlm_smoothing:
    token_probs = input_pipeline.token_probabilities(packed, scfg.vocab_size,
                                                     config.distill.mlm_smoothing, special_ids)
  logging.info('train: %s packed sequences of %d tokens; eval: %s',
               'streamed' if packed is None else len(packed), d.max_seq_length,
               None if packed_eval is None else len(packed_eval))

  def train_batches(start_step: int, row_features=None):
    if d.streaming:  # position = step: resuming re-reads and skips start_step batches
      return input_pipeline.streaming_batches(
          train_files, tokenizer, d.max_seq_length, global_batch_size=gbs, seed=config.seed,
          start_position=start_step, process_index=jax.process_index(),
          process_count=jax.process_count(), mlm_probability=config.distill.mlm_probability,
          **source)
    return input_pipeline.BatchIterator(
        packed, global_batch_size=gbs, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        token_probs=token_probs, row_features=row_features, **mask_kwargs)

  def eval_batches():
    if packed_eval is None:
      return []
    return input_pipeline.eval_batches(packed_eval, _eval_batch_size(d, mesh, rules),
                                       config.seed + 12345, d.eval_num_sequences or None,
                                       **mask_kwargs)

  return train_batches, eval_batches, packed


def _open_teacher_cache(config, tparams, packed, tokenizer_fp: str, inter, num_teacher_layers,
                        train_batches):
  """`(row_features hook, fingerprint entry)` serving `teacher.cache`, after checking it fits."""
  t, d = config.teacher, config.distill  # streaming, task and alpha_mse: checked by validate
  try:
    cache = teacher_cache.TeacherCache(
        t.cache, top_k=t.cache_top_k, hidden=bool(d.alpha_cos), logz=t.cache_tail_bucket,
        layers=teacher_cache.needed_layers(inter, num_teacher_layers))
    cache.check(teacher_cache.identity(tparams, packed, tokenizer_fp, config.data.max_seq_length))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if cache.by_sample:  # the teacher saw this run's masked stream: the masking must be the same
    it = train_batches(0)
    it.close()
    want = teacher_cache.masking_identity(config, it.global_batch(0)['input_ids'])
    have = cache.manifest['masking']
    if want != have:
      diff = [f'{k}: cache {have.get(k)!r}, run {v!r}' for k, v in want.items() if have.get(k) != v]
      raise ConfigError(f'teacher.cache={t.cache!r} holds the teacher on another masked stream '
                        f'({"; ".join(diff)}); a masked-input cache serves only runs with its '
                        'seed, global_batch_size and masking. Rebuild it for this config, or use '
                        'a teacher.cache_teacher_input="original" cache.')
  if t.cache_tail_bucket and cache.manifest['temperature'] != d.temperature:
    raise ConfigError(f'teacher.cache_tail_bucket needs the teacher\'s logsumexp at '
                      f'T={d.temperature}, but {t.cache!r} stores it at '
                      f'T={cache.manifest["temperature"]}; rebuild the cache with this temperature '
                      'or set teacher.cache_tail_bucket=False.')
  logging.info('teacher.cache %s: k=%d of %d stored (%s), %d rows', t.cache, cache.top_k,
               cache.manifest['top_k'], cache.manifest['values_dtype'],
               len(cache.manifest['rows']))
  return cache.features, {'cache': cache.manifest.get('teacher_fingerprint'),
                          'data': cache.manifest.get('data_fingerprint'),
                          'top_k': cache.top_k, 'tail_bucket': bool(t.cache_tail_bucket),
                          'teacher_input': cache.manifest.get('teacher_input')}


def _task_batches(config, task, tokenizer, train_files, eval_files, mesh, rules):
  """`(train_batches, eval_batches)` of a GLUE task's labelled TSV files."""
  d = config.data  # one train TSV, at most one eval TSV: checked by validate
  try:
    train = glue.load_split(train_files[0], task, tokenizer, d.max_seq_length)
    dev = glue.load_split(eval_files[0], task, tokenizer, d.max_seq_length) if eval_files else None
  except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
    raise ConfigError(str(e)) from e
  truncated = float(np.mean(train['attention_mask'][:, -1] == 1))
  logging.info('%s: %d train / %s eval examples of %d tokens (%.1f%% truncated)', task.name,
               len(train['labels']), None if dev is None else len(dev['labels']),
               d.max_seq_length, 100 * truncated)

  def train_batches(start_step: int):
    return glue.ClassificationBatches(
        train, global_batch_size=d.global_batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())

  def eval_batches():
    return [] if dev is None else glue.eval_batches(dev, _eval_batch_size(d, mesh, rules))

  return train_batches, eval_batches


def _check_loaded(config, tok_path, vocab_size, tcfg, scfg, pcfg) -> None:
  """The checks that need the loaded tokenizer and model configs; ConfigError naming the fix."""
  d = config.data
  if tcfg is not None and vocab_size > tcfg.vocab_size:
    raise ConfigError(
        f'Tokenizer {tok_path!r} has {vocab_size} tokens but the teacher\'s vocab_size is '
        f'{tcfg.vocab_size}: they do not belong together; use the teacher\'s own tokenizer '
        '(data.tokenizer="" takes it from teacher.path).')
  for name, cfg in (('teacher', tcfg), ('student', scfg)):
    if cfg is not None and d.max_seq_length > cfg.max_position_embeddings:
      raise ConfigError(
          f'data.max_seq_length={d.max_seq_length} exceeds the {name}\'s max_position_embeddings='
          f'{cfg.max_position_embeddings}; use --config.data.max_seq_length<={cfg.max_position_embeddings}.')
  if student_init.same_type(pcfg, config.student) and (
      pcfg.hidden_size, pcfg.num_hidden_layers) != (scfg.hidden_size, scfg.num_hidden_layers):
    raise ConfigError(f'student.path {config.student.path!r} has {pcfg.num_hidden_layers} layers x '
                      f'{pcfg.hidden_size}; leave student.hidden_size at 0 to keep its shape.')
  if config.distill.alpha_mlm and not scfg.with_mlm_head:
    raise ConfigError(f'Teacher {config.teacher.path!r} has no MLM head, so neither has the student: '
                      'set distill.alpha_mlm=0 (distil hidden states / attentions instead).')
  if tcfg is not None and config.distill.alpha_cos and tcfg.hidden_size != scfg.hidden_size:
    raise ConfigError(f'distill.alpha_cos needs equal hidden sizes (teacher {tcfg.hidden_size}, '
                      f'student {scfg.hidden_size}); set distill.alpha_cos=0.')


def _resolve_objective(config, obj: Objective, scfg, tcfg) -> tuple[Objective, Projection | None]:
  """`obj` with its layer map resolved for these depths, and the projection shape."""
  if obj.inter is None:
    return obj, None
  try:
    layer_map = intermediate.resolve_layer_map(scfg.num_hidden_layers, tcfg.num_hidden_layers,
                                               list(config.distill.layer_map) or None)
  except ValueError as e:
    raise ConfigError(f'distill.layer_map: {e}') from e
  iw = obj.inter.weights
  projection = None
  if (iw.alpha_emb or iw.alpha_hidden) and scfg.hidden_size != tcfg.hidden_size:
    projection = Projection(scfg.hidden_size, tcfg.hidden_size)
  return obj.with_layer_map(layer_map), projection


def build_run(config, workdir: str) -> Run:
  """Validates `config`, then builds models, params, mesh and data for the loop.

  Order: `validate(config)` (no I/O), tokenizer and models (then the checks that
  need them), student init, data. Writes only the synthetic corpus (with
  `data.synthetic`) under `workdir` and the token cache under `data.cache_dir`.

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
  tcfg, tparams = load_teacher(config, obj, vocab_size, num_labels)
  if tcfg is not None:
    tcfg = dataclasses.replace(tcfg, dtype=_dtype(config.dtype), remat=config.remat)
  pcfg, pparams = load_pretrained_student(config, num_labels)
  scfg = student_config(config, tcfg, vocab_size, num_labels, pcfg)
  _check_loaded(config, tok_path, vocab_size, tcfg, scfg, pcfg)
  obj, projection = _resolve_objective(config, obj, scfg, tcfg)
  sparams = init_student(config, scfg, tcfg, tparams, (pcfg, pparams))
  proj_params = None
  if projection is not None:
    proj_params = jax.device_get(intermediate.init_projection_params(
        jax.random.PRNGKey(config.seed + 3), *projection))

  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes)
  rules = sharding.rules_tuple(config.mesh.logical_axis_rules)
  t_rules = sharding.rules_tuple(config.teacher.logical_axis_rules or rules)

  packed = None
  if task is None:
    train_batches, eval_batches, packed = _mlm_batches(config, tokenizer, scfg, train_files,
                                                       eval_files, mesh, rules)
  else:
    train_batches, eval_batches = _task_batches(config, task, tokenizer, train_files, eval_files,
                                                mesh, rules)

  strip = lambda c: None if c is None else {k: v for k, v in dataclasses.asdict(c).items()
                                            if k not in ('dtype', 'remat')}
  tokenizer_fp = hashlib.sha1(' '.join(sorted(tokenizer.get_vocab())).encode()).hexdigest()[:16]
  if obj.offline:
    features, targets = _open_teacher_cache(config, tparams, packed, tokenizer_fp, obj.inter,
                                            tcfg.num_hidden_layers, train_batches)
    train_batches = functools.partial(train_batches, row_features=features)
  else:
    targets = 'online' if tcfg is not None else None
  fingerprint = {
      'student_config': strip(scfg), 'teacher_config': strip(tcfg),
      'global_batch_size': d.global_batch_size, 'max_seq_length': d.max_seq_length,
      'seed': config.seed,
      'train_data': _files_id(train_files) + ([[d.dataset, d.dataset_split, d.text_column]]
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
