"""The teacher and the student of a run: loaded or derived from the config, checked, initialised.

`build_run` (setup.py) calls these in order: `load_teacher` (a HF checkpoint, or a random-init
shape; `weights=False` reads the shape alone, for `setup.run_shapes`), `load_pretrained_student`,
`student_config` (0 in a field = the teacher's value),
`check_loaded` (the checks that need the loaded configs), `resolve_objective` (the layer map and
TinyBERT projections for these depths and widths) and `init_student` (`student_init`). Every
problem is a `ConfigError` naming the key and the fix.
"""

import os

import jax
import jax.numpy as jnp

from flaxdistil.model import bert
from flaxdistil.model import hf_conversion
from flaxdistil.model import student_init
from flaxdistil.objectives import intermediate
from flaxdistil.objectives.objective import Objective
from flaxdistil.objectives.objective import Projection
from flaxdistil.storage import hub
from flaxdistil.storage.integrity import CorruptFileError
from flaxdistil.training.errors import ConfigError


def compute_dtype(name: str):
  """The jnp dtype of `config.dtype`, the models' compute dtype.

  Args:
    name: "float32", "bfloat16" or "float16".

  Returns:
    `jnp.float32`, `jnp.bfloat16` or `jnp.float16`.

  Raises:
    ConfigError: any other name.
  """
  try:
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[name]
  except KeyError:
    raise ConfigError(f'dtype={name!r}: use "float32" or "bfloat16".') from None


def attention_implementation(config) -> str | None:
  """`bert.ModelConfig.attention_implementation` of `config.attention_implementation`.

  Returns:
    None for '' (JAX's default), else the name ('xla' or 'cudnn').

  Raises:
    ConfigError: an unknown name, or 'cudnn' without bfloat16/float16 compute or without GPUs.
  """
  name = config.attention_implementation
  if name not in ('', 'xla', 'cudnn'):
    raise ConfigError(f'attention_implementation={name!r}: use "" (JAX\'s default), "xla" or '
                      '"cudnn".')
  if name == 'cudnn':
    if config.dtype not in ('bfloat16', 'float16'):
      raise ConfigError(f'attention_implementation="cudnn" needs dtype="bfloat16" (cuDNN\'s fused '
                        f'attention takes bf16/fp16 inputs), got dtype={config.dtype!r}; set '
                        '--config.dtype=bfloat16 or attention_implementation="".')
    if jax.default_backend() != 'gpu':
      raise ConfigError(f'attention_implementation="cudnn" needs NVIDIA GPUs, but this run\'s '
                        f'devices are {jax.default_backend()}; use attention_implementation="".')
  return name or None


def teacher_loaded(config, obj: Objective) -> bool:
  """True when the run loads a teacher: a term or `student.init='teacher'` needs it, or a path."""
  # A teacher given by path is always loaded: it defines the student's default shape (so an
  # MLM-only baseline has the same architecture as the distilled student) and is evaluated
  # as the reference, even when no loss term uses it.
  return obj.uses_teacher or config.student.init == 'teacher' or bool(config.teacher.path)


NEEDS_TEACHER = ('The objective needs a teacher (alpha_ce/alpha_cos/alpha_mse > 0 or '
                  'student.init="teacher") but teacher.path is empty; set teacher.path, '
                  'or set those alphas to 0 and student.init="random" for plain MLM.')


def load_teacher(config, obj: Objective, vocab_size: int, num_labels: int = 0,
                 weights: bool = True):
  """The teacher of `teacher.path` (HF checkpoint or hub name) or of `teacher.random_init`.

  `num_labels > 0` (a GLUE task): logit terms need a teacher fine-tuned on the
  task, i.e. a `*ForSequenceClassification` checkpoint with that many labels.

  Args:
    config: the run's ConfigDict (`teacher`, `distill`, `student.init`, `seed`).
    obj: the run's `Objective` (`validate`), which says whether a teacher is needed.
    vocab_size: the tokenizer's size, the vocabulary of a random-init teacher.
    num_labels: the task's label count; 0 for MLM.
    weights: False reads only the shape (config.json, `hf_conversion.read_hf_config`, or the
      random-init shape) and returns no params: what an ahead-of-time compile needs.

  Returns:
    `(ModelConfig, params)` (host numpy float32 tree; a random-init teacher is drawn from
    `PRNGKey(seed + 1)`; None with `weights=False`), or `(None, None)` when `teacher_loaded` is
    False.

  Raises:
    ConfigError: `teacher.path` is a missing local path, cannot be loaded or holds inf/NaN
      weights, no teacher is configured, or the teacher lacks the head the objective reads
      (an MLM head for alpha_ce/alpha_mse, a `num_labels` classifier for alpha_ce on a task).
    CorruptFileError: `teacher.path` is an export that fails its `SHA256SUMS`.
  """
  t, dist = config.teacher, config.distill
  if not teacher_loaded(config, obj):
    return None, None
  if t.path:
    if not os.path.isdir(t.path) and hub.looks_like_local_path(t.path):
      raise ConfigError(f'teacher.path {t.path!r} does not exist; pass a Hugging Face BERT directory '
                        '(config.json + model.safetensors or pytorch_model.bin) or a hub name.')
    try:
      if weights:
        tcfg, tparams = hf_conversion.load_hf_model(t.path)
      else:
        tcfg, tparams = hf_conversion.read_hf_config(t.path), None
    except CorruptFileError:
      raise  # an exported teacher that fails its SHA256SUMS: named with the fix
    except (FileNotFoundError, ValueError, OSError) as e:
      raise ConfigError(f'Cannot load teacher from {t.path!r}: {e}') from e
    bad = hf_conversion.nonfinite_params(tparams) if tparams is not None else ''
    if bad:
      raise ConfigError(f'teacher.path={t.path!r} has non-finite weights ({bad}): every step would '
                        'be skipped. Use an intact teacher (re-export or re-download it).')
  elif t.random_init:
    tcfg = bert.ModelConfig(
        model_type='bert', vocab_size=vocab_size, hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings)
    tparams = jax.device_get(bert.init_params(tcfg, jax.random.PRNGKey(config.seed + 1))) if (
        weights) else None
  else:
    raise ConfigError(NEEDS_TEACHER)
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
  reference instead (`pretrained`), so fine-tuning a BERT keeps its shape; a same-type
  pretrained checkpoint also keeps its pruned heads (`pruned_heads`, `python -m flaxdistil.prune`).
  `num_labels > 0` gives a sequence-classification head and no MLM head.

  Args:
    config: the run's ConfigDict (`student`, `dtype`, `remat`, `scan_layers`,
      `attention_implementation`).
    tcfg: the teacher's config, or None.
    vocab_size: the tokenizer's size; used only when there is neither teacher nor
      pretrained student.
    num_labels: the task's label count; 0 for MLM.
    pretrained: the config of `student.path` (`load_pretrained_student`), or None.

  Returns:
    The student's `bert.ModelConfig`, in the compute dtype of `config.dtype`. Without a
    reference model the 0 fields take DistilBERT-base values (768 hidden, 6 layers, 12 heads,
    3072 intermediate, 512 positions).
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
      pruned_heads=pretrained.pruned_heads if student_init.same_type(pretrained, s) else (),
      **compute_options(config))


def compute_options(config) -> dict:
  """The `ModelConfig` fields the run sets on both models (`bert.COMPUTE_FIELDS`).

  Args:
    config: the run's ConfigDict (`dtype`, `remat`, `scan_layers`, `attention_implementation`).

  Returns:
    `{'dtype': jnp dtype, 'remat': bool, 'scan_layers': bool, 'attention_implementation': str |
    None}`.

  Raises:
    ConfigError: an unknown `dtype` (`compute_dtype`) or attention implementation
      (`attention_implementation`).
  """
  return {'dtype': compute_dtype(config.dtype), 'remat': bool(config.remat),
          'scan_layers': bool(config.get('scan_layers', False)),
          'attention_implementation': attention_implementation(config)}


def load_pretrained_student(config, num_labels: int, weights: bool = True):
  """`(ModelConfig, params)` of `student.path` for `student.init='pretrained'`, or (None, None).

  Args:
    config: the run's ConfigDict (`student` group).
    num_labels: the task's label count (> 0 loads the checkpoint without its MLM head).
    weights: False reads config.json only (params None).

  Returns:
    `(ModelConfig, host numpy params)` of the checkpoint, or `(None, None)` for another init.

  Raises:
    ConfigError: the checkpoint cannot be loaded, does not fit `student.model_type` or holds
      inf/NaN weights.
    CorruptFileError: an export that fails its `SHA256SUMS`.
  """
  s = config.student
  if s.init != 'pretrained':
    return None, None
  try:
    pcfg, pparams = student_init.load_pretrained_student(s.path, s.model_type, num_labels,
                                                         weights)
  except CorruptFileError:
    raise  # an exported student that fails its SHA256SUMS: named with the fix
  except ValueError as e:
    raise ConfigError(str(e)) from e
  bad = hf_conversion.nonfinite_params(pparams) if pparams is not None else ''
  if bad:
    raise ConfigError(f'student.path={s.path!r} has non-finite weights ({bad}); use an intact '
                      'checkpoint (re-export or re-download it).')
  return pcfg, pparams


def init_student(config, scfg, tcfg, tparams, pretrained=(None, None)):
  """Student params (numpy) for `student.init` (`student_init.init_student`).

  Args:
    config: the run's ConfigDict (`student.init`, `student.layers`, `seed`).
    scfg: the student's config (`student_config`).
    tcfg: the teacher's config, or None.
    tparams: the teacher's host params, or None.
    pretrained: `(ModelConfig, params)` of `load_pretrained_student`, or `(None, None)`.

  Returns:
    The student's float32 host numpy params, shaped like `bert.init_params(scfg)`.

  Raises:
    ConfigError: the source cannot initialise this student (names the fix).
  """
  try:
    return student_init.init_student(config.student.init, scfg, config.seed,
                                     teacher=(tcfg, tparams), pretrained=pretrained,
                                     layers=list(config.student.layers) or None)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def check_student_init(config, scfg, tcfg, pcfg) -> None:
  """`student.init` can make this student from these configs (`student_init.check_init`).

  Raises:
    ConfigError: the source cannot initialise the student (names the fix).
  """
  try:
    student_init.check_init(config.student.init, scfg, teacher=tcfg, pretrained=pcfg,
                            layers=list(config.student.layers) or None)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def check_loaded(config, tok_path, vocab_size, tcfg, scfg, pcfg) -> None:
  """The checks that need the loaded tokenizer and model configs.

  Args:
    config: the run's ConfigDict.
    tok_path: where the tokenizer came from (for the message).
    vocab_size: the tokenizer's size.
    tcfg: the teacher's config, or None.
    scfg: the student's config.
    pcfg: the config of a pretrained `student.path`, or None.

  Raises:
    ConfigError: naming the fix: a tokenizer larger than the teacher's vocabulary,
      `data.max_seq_length` above a model's max_position_embeddings, a same-type pretrained
      student resized, alpha_mlm without an MLM head, or alpha_cos with unequal hidden sizes.
  """
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


def resolve_objective(config, obj: Objective, scfg, tcfg) -> tuple[Objective, Projection | None]:
  """`obj` with its layer map resolved for these depths, and the projection shape.

  Args:
    config: the run's ConfigDict (`distill.layer_map`; empty = the default map).
    obj: the `Objective` of `validate`.
    scfg: the student's config.
    tcfg: the teacher's config (read only when `obj` has intermediate terms).

  Returns:
    `(objective, projection)`: `obj` unchanged and None without intermediate terms; else
    `obj.with_layer_map(...)` and `Projection(student_hidden, teacher_hidden)` when TinyBERT's
    embedding / hidden terms compare unequal widths, None otherwise.

  Raises:
    ConfigError: a `distill.layer_map` that does not fit these depths.
  """
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
