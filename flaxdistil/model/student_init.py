"""Student initialisation: teacher layers (DistilBERT), an HF checkpoint, or random.

`init_student_from_teacher` follows HF `research_projects/distillation/scripts/
extract_distilbert.py`: embeddings, evenly spread teacher layers
(`select_teacher_layers`) and the MLM head are copied into the student.
`init_student` picks the source for `student.init` and adds a fresh
classification head where the source has no matching one. Params are nested
dicts of float32 host numpy arrays laid out as documented in `bert.py`.
Errors are `ValueError`s whose message names the config key and the fix
(`training/run_models.py` re-raises them as `ConfigError`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from flaxdistil.model import bert
from flaxdistil.model import hf_conversion
from flaxdistil.model.bert import ModelConfig

INITS = ('teacher', 'random', 'pretrained')


def select_teacher_layers(num_teacher_layers: int,
                          num_student_layers: int) -> list[int]:
  """Teacher layer indices copied into the student, evenly spread.

  ``round(linspace(0, Lt - 1, Ls))`` (numpy round-half-to-even); keeps the first
  and last layer. 12 -> 6 gives [0, 2, 4, 7, 9, 11], the layers HF
  ``extract_distilbert.py`` uses for distilbert-base-uncased.

  Args:
    num_teacher_layers: Lt.
    num_student_layers: Ls.

  Returns:
    Ls distinct, increasing 0-based teacher layer indices.

  Raises:
    ValueError: num_student_layers < 1 or > num_teacher_layers.
  """
  if not 1 <= num_student_layers <= num_teacher_layers:
    raise ValueError(
        f'Cannot pick {num_student_layers} student layers from '
        f'{num_teacher_layers} teacher layers; need 1 <= student <= teacher.')
  idx = np.round(np.linspace(0, num_teacher_layers - 1, num_student_layers))
  layers = [int(i) for i in idx]
  assert len(set(layers)) == len(layers), layers
  return layers


def check_from_teacher(teacher_config: ModelConfig, student_config: ModelConfig, layers=None
                       ) -> list[int]:
  """The checks of `init_student_from_teacher` that need only the two configs.

  Args:
    teacher_config / student_config / layers: as `init_student_from_teacher`.

  Returns:
    The teacher layer indices the student's layers are copied from.

  Raises:
    ValueError: as `init_student_from_teacher` (the MLM head judged by
      `teacher_config.with_mlm_head`).
  """
  t, s = teacher_config, student_config
  if t.pruned_heads or s.pruned_heads:
    raise ValueError('Cannot initialise a student from teacher layers when heads are pruned '
                     '(teacher pruned_heads / student pruned_heads); continue training a pruned '
                     "model with student.init='pretrained', its directory as student.path and "
                     'its own student.model_type.')
  # Only shapes must agree; activation / dropout / dtype are the student's own.
  for field in ('hidden_size', 'num_attention_heads', 'intermediate_size',
                'vocab_size'):
    if getattr(t, field) != getattr(s, field):
      raise ValueError(
          f'Cannot initialise the student from the teacher: {field} differs '
          f'(teacher {getattr(t, field)}, student {getattr(s, field)}). Use '
          f"random init (student.init='random') or a student with the "
          f"teacher's width.")
  if s.max_position_embeddings > t.max_position_embeddings:
    raise ValueError(
        f'Student max_position_embeddings {s.max_position_embeddings} > teacher '
        f'{t.max_position_embeddings}; the extra positions cannot be copied.')
  if layers is None:
    layers = select_teacher_layers(t.num_hidden_layers, s.num_hidden_layers)
  layers = [int(i) for i in layers]
  if (len(layers) != s.num_hidden_layers
      or any(not 0 <= i < t.num_hidden_layers for i in layers)):
    raise ValueError(
        f'layers={layers} must list {s.num_hidden_layers} teacher layer '
        f'indices in [0, {t.num_hidden_layers}).')
  if s.with_mlm_head and not t.with_mlm_head:
    raise ValueError('The student has an MLM head but the teacher params have '
                     'none; load the teacher with its MLM head.')
  if s.has_token_types and (not t.has_token_types or t.type_vocab_size != s.type_vocab_size):
    raise ValueError("A 'bert' student needs the teacher's token-type "
                     "embeddings (same type_vocab_size); use 'distilbert'.")
  if s.num_labels and t.num_labels != s.num_labels:
    raise ValueError(f'The student has {s.num_labels} labels but the teacher '
                     f'{t.num_labels}; distil from a teacher fine-tuned on the task.')
  return layers


def init_student_from_teacher(teacher_params, teacher_config: ModelConfig,
                              student_config: ModelConfig, layers=None):
  """DistilBERT-style student initialisation from teacher weights.

  Copies word + position embeddings and the embedding LayerNorm (token-type
  embeddings only if the student is also 'bert'; HF extract_distilbert drops
  them), teacher layers ``layers`` (default ``select_teacher_layers``) into
  student layers 0..Ls-1, and the MLM head if the student has one. If the
  student has fewer positions, the first rows of the position table are kept.
  A classification student (``num_labels > 0``) copies the teacher's
  ``classifier_head`` (BERT pooler -> DistilBERT ``pre_classifier``).

  Args:
    teacher_params: the teacher's params (boxed or unboxed, device or host).
    teacher_config: the teacher's config.
    student_config: the student's config (its depth, head and positions decide
      what is copied).
    layers: Ls 0-based teacher layer indices, or None = ``select_teacher_layers``.

  Returns:
    Student params (nested dict of float32 numpy arrays, copies), same
    structure as ``bert.init_params(student_config, ...)``.

  Raises:
    ValueError: width mismatch (hidden_size / num_attention_heads /
      intermediate_size / vocab_size) with a hint to use random init, more
      student than teacher positions, bad ``layers``, an MLM head the teacher
      lacks, a 'bert' student whose teacher has no (or other) token types,
      a different ``num_labels``, or a teacher or student with pruned heads.
  """
  t, s = teacher_config, student_config
  layers = check_from_teacher(t, s, layers)
  if s.with_mlm_head and 'mlm_head' not in teacher_params:
    raise ValueError('The student has an MLM head but the teacher params have '
                     'none; load the teacher with its MLM head.')
  tp = bert.unbox(teacher_params)
  # Host numpy copies (like load_hf_model): the caller places/shards them.
  copy = lambda tree: jax.tree_util.tree_map(
      lambda x: np.array(x, dtype=np.float32), tree)
  emb = tp['embeddings']
  student_emb = {
      'word_embeddings': copy(emb['word_embeddings']),
      'position_embeddings': {'embedding': np.array(
          emb['position_embeddings']['embedding'][:s.max_position_embeddings],
          dtype=np.float32)},
      'LayerNorm': copy(emb['LayerNorm']),
  }
  if s.has_token_types:
    if not t.has_token_types or t.type_vocab_size != s.type_vocab_size:
      raise ValueError("A 'bert' student needs the teacher's token-type "
                       "embeddings (same type_vocab_size); use 'distilbert'.")
    student_emb['token_type_embeddings'] = copy(emb['token_type_embeddings'])
  out = {
      'embeddings': student_emb,
      'encoder': {f'layer_{j}': copy(tp['encoder'][f'layer_{i}'])
                  for j, i in enumerate(layers)},
  }
  if s.with_mlm_head:
    out['mlm_head'] = copy(tp['mlm_head'])
  if s.num_labels:
    if t.num_labels != s.num_labels:
      raise ValueError(f'The student has {s.num_labels} labels but the teacher '
                       f'{t.num_labels}; distil from a teacher fine-tuned on the task.')
    # BERT pooler (tanh) -> DistilBERT pre_classifier (ReLU): a warm start, not an identity.
    out['classifier_head'] = copy(tp['classifier_head'])
  return out


def same_type(pretrained: ModelConfig | None, student) -> bool:
  """True if `pretrained` is a config with the student's `model_type`.

  Args:
    pretrained: the `student.path` checkpoint's config, or None.
    student: anything with a `model_type` (a `ModelConfig` or the `student` config group).

  Returns:
    False for None or a different model type.
  """
  return pretrained is not None and pretrained.model_type == student.model_type


def with_head(params, scfg: ModelConfig, seed: int):
  """Adds a freshly initialised classification head when `params` lack a matching one.

  Args:
    params: unboxed student params, with or without `classifier_head`.
    scfg: the student's config; `num_labels == 0` returns `params` unchanged.
    seed: the run's seed; the new head is drawn from `PRNGKey(seed + 4)`.

  Returns:
    `params` itself if it needs no head (or its head has the config's shapes),
    else a new dict whose `classifier_head` is the fresh host-numpy head.
  """
  if not scfg.num_labels:
    return params
  want = bert.unbox(bert.abstract_params(scfg))['classifier_head']
  head = params.get('classifier_head')
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  if head is None or shapes(head) != shapes(want):
    fresh = jax.device_get(bert.init_params(scfg, jax.random.PRNGKey(seed + 4)))
    params = dict(params, classifier_head=fresh['classifier_head'])
  return params


def load_pretrained_student(path: str, student_model_type: str, num_labels: int,
                            weights: bool = True):
  """Loads the HF checkpoint `student.path` for `student.init='pretrained'`.

  Args:
    path: checkpoint directory or hub name (`hf_conversion.load_hf_model`).
    student_model_type: `student.model_type`, 'bert' or 'distilbert'.
    num_labels: > 0 for a classification student, which is loaded without MLM
      head (an MLM head is otherwise kept if the checkpoint has one).
    weights: False reads config.json only (`hf_conversion.read_hf_config`) and returns no
      params: the shape of the student for an ahead-of-time compile.

  Returns:
    `(ModelConfig, params)` of the checkpoint, params float32 host numpy (None when
    `weights=False`).

  Raises:
    ValueError: the checkpoint cannot be loaded (the loader's FileNotFoundError,
      ValueError or OSError, message prefixed with `student.path`), or it is a
      DistilBERT while the student is a 'bert'.
  """
  head = False if num_labels else None
  try:
    if weights:
      pcfg, params = hf_conversion.load_hf_model(path, with_mlm_head=head)
    else:
      pcfg, params = hf_conversion.read_hf_config(path, with_mlm_head=head), None
  except (FileNotFoundError, ValueError, OSError) as e:
    raise ValueError(f'Cannot load student.path {path!r}: {e}') from e
  if pcfg.model_type == 'distilbert' and student_model_type == 'bert':
    raise ValueError(f'student.path {path!r} is a DistilBERT model; set '
                     'student.model_type="distilbert".')
  return pcfg, params


def check_init(init: str, scfg: ModelConfig, *, teacher: ModelConfig | None = None,
               pretrained: ModelConfig | None = None, layers=None) -> None:
  """What `init_student` checks before it reads any weight: the configs can make this student.

  Args:
    init / scfg / layers: as `init_student`.
    teacher / pretrained: the configs of `init_student`'s `teacher` / `pretrained` (or None).

  Raises:
    ValueError: as `init_student`.
  """
  tcfg = teacher
  if init == 'pretrained' and not same_type(pretrained, scfg):
    tcfg, init = pretrained, 'teacher'  # a BERT checkpoint for a DistilBERT student
  if init == 'teacher':
    if tcfg is None:
      raise ValueError('student.init="teacher" needs teacher.path.')
    body_cfg = scfg if scfg.num_labels == tcfg.num_labels else dataclasses.replace(scfg,
                                                                                   num_labels=0)
    try:
      check_from_teacher(tcfg, body_cfg, layers or None)
    except ValueError as e:
      raise ValueError(f'student.init="teacher": {e}') from e
  elif init not in ('pretrained', 'random'):
    raise ValueError(f'student.init={init!r}: use "teacher", "random" or "pretrained".')


def init_student(init: str, scfg: ModelConfig, seed: int, *, teacher=(None, None),
                 pretrained=(None, None), layers=None):
  """Initialises the student's params from the source `init` names.

  Args:
    init: 'teacher' (DistilBERT-style, from `teacher`), 'pretrained' (from
      `pretrained`; a BERT checkpoint for a DistilBERT student is used the
      teacher way) or 'random' (`PRNGKey(seed + 2)`).
    scfg: the student's config.
    seed: the run's seed.
    teacher / pretrained: `(ModelConfig, params)` or `(None, None)`.
    layers: teacher layer indices for init='teacher' (None or empty =
      `select_teacher_layers`).

  A classification student whose source has no matching head gets a random one
  (`with_head`).

  Returns:
    The student's params: float32 host numpy, laid out as `bert.init_params(scfg)`.

  Raises:
    ValueError: unknown `init`, init='teacher' without a teacher (also
      init='pretrained' without a checkpoint, which takes the teacher path), or
      a student the source cannot initialise (message starts 'student.init=...').
  """
  (tcfg, tparams), (pcfg, pretrained_params) = teacher, pretrained
  check_init(init, scfg, teacher=tcfg, pretrained=pcfg, layers=layers)
  if init == 'pretrained' and not same_type(pcfg, scfg):
    # A BERT checkpoint (e.g. the pretrained, not fine-tuned, teacher) initialises a DistilBERT
    # student the DistilBERT way: student.layers of it.
    tcfg, tparams, init = pcfg, pretrained_params, 'teacher'
  if init == 'teacher':
    head_ok = scfg.num_labels == tcfg.num_labels
    body_cfg = scfg if head_ok else dataclasses.replace(scfg, num_labels=0)
    try:
      params = init_student_from_teacher(tparams, tcfg, body_cfg, layers=layers or None)
    except ValueError as e:
      raise ValueError(f'student.init="teacher": {e}') from e
    return with_head(params, scfg, seed)
  if init == 'pretrained':
    params = dict(pretrained_params)
    if not scfg.num_labels:
      params.pop('classifier_head', None)
    return with_head(params, scfg, seed)
  if init == 'random':
    return jax.device_get(bert.init_params(scfg, jax.random.PRNGKey(seed + 2)))
  raise ValueError(f'student.init={init!r}: use "teacher", "random" or "pretrained".')
