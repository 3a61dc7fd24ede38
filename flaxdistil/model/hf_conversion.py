"""Hugging Face (torch) BERT/DistilBERT checkpoints <-> Flax ``bert.MaskedLM``.

Config mapping (``BertConfig``/``DistilBertConfig`` <-> ``ModelConfig``), tensor
renaming (torch Linear ``weight [out, in]`` <-> Flax ``kernel [in, out]``) and
loading a checkpoint directory. DistilBERT student initialisation from
teacher layers is ``student_init``; the verified export to a transformers
directory is ``export/hf_export.py`` (``export_hf``).
Params are nested dicts of float32 arrays laid out as documented in
``bert.py``; state dicts are ``dict[str, np.ndarray]``.

Pruned heads (``ModelConfig.pruned_heads``, ``model/pruning.py``): transformers >= 5 no longer
implements HF's ``pruned_heads`` (``prune_heads`` is gone; every layer is built with
``num_attention_heads`` heads). A pruned model is therefore written in the unpruned layout with
the removed heads' query/key/value rows, biases and attention-output columns set to zero, which
computes exactly the pruned function, and ``config.json`` keeps ``pruned_heads`` (an attribute
transformers stores and ignores) for this loader, which drops those zero heads again, and for
``export/torch_models.py``, which removes them from the torch model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from flaxdistil.model import bert
from flaxdistil.model import pruning
from flaxdistil.model.bert import ModelConfig
from flaxdistil.storage import hub
from flaxdistil.storage import integrity

_SUPPORTED = ('bert', 'distilbert')
# Tensors present in common checkpoints that have no counterpart in our model:
# BertModel pooler, BertForPreTraining next-sentence head, non-trainable buffers.
_IGNORED_SUBSTRINGS = ('position_ids', 'embeddings.token_type_ids')
_IGNORED_PREFIXES = ('cls.seq_relationship.',)
_POOLER = 'pooler.'  # ignored unless the model has a classification head (BERT's first dense)


# HF config field -> ModelConfig field. BertConfig uses our names.
_BERT_FIELDS = {f: f for f in (
    'vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
    'intermediate_size', 'max_position_embeddings', 'type_vocab_size',
    'hidden_act', 'layer_norm_eps', 'hidden_dropout_prob',
    'attention_probs_dropout_prob', 'pad_token_id')}
_DISTILBERT_FIELDS = {
    'vocab_size': 'vocab_size', 'dim': 'hidden_size',
    'n_layers': 'num_hidden_layers', 'n_heads': 'num_attention_heads',
    'hidden_dim': 'intermediate_size',
    'max_position_embeddings': 'max_position_embeddings',
    'activation': 'hidden_act', 'dropout': 'hidden_dropout_prob',
    'attention_dropout': 'attention_probs_dropout_prob',
    'pad_token_id': 'pad_token_id'}


def config_from_hf(hf_config: Any, *, with_mlm_head: bool = True,
                   num_labels: int = 0) -> ModelConfig:
  """HF config (dict or ``PretrainedConfig``) -> ModelConfig.

  'bert' uses BertConfig names; 'distilbert' maps dim/n_layers/n_heads/
  hidden_dim/activation/dropout/attention_dropout (LayerNorm eps is hard-coded
  1e-12 in HF DistilBERT, and there are no token types). Fields missing from
  the dict take the HF defaults (= ModelConfig defaults). ``num_labels > 0``
  adds the sequence-classification head, whose dropout is BERT's
  ``classifier_dropout`` (None = ``hidden_dropout_prob``) or DistilBERT's
  ``seq_classif_dropout`` (default 0.2). ``pruned_heads`` (``{layer: [heads]}``) carries over.

  Args:
    hf_config: ``config.json`` contents as a dict, or a ``PretrainedConfig``.
    with_mlm_head: build the tied MLM head.
    num_labels: classification classes; 0 = no classification head.

  Returns:
    The ``ModelConfig`` (compute dtype float32, no remat).

  Raises:
    ValueError: model_type missing or not 'bert'/'distilbert' (names it), a
      BERT variant we do not implement (relative position embeddings), or a
      config ``ModelConfig`` rejects.
  """
  c = dict(hf_config.to_dict() if hasattr(hf_config, 'to_dict') else hf_config)
  model_type = c.get('model_type')
  if model_type not in _SUPPORTED:
    raise ValueError(
        f'Unsupported model_type {model_type!r}: only BERT ("bert") and '
        f'DistilBERT ("distilbert") checkpoints can be converted.')
  pos_type = c.get('position_embedding_type') or 'absolute'
  if pos_type != 'absolute':
    raise ValueError(
        f'BERT position_embedding_type {pos_type!r} is not supported; only '
        f'"absolute" position embeddings are implemented.')
  fields = _BERT_FIELDS if model_type == 'bert' else _DISTILBERT_FIELDS
  defaults = ModelConfig()
  kw = {}
  for hf_name, name in fields.items():
    value = c.get(hf_name)
    if value is None:  # absent, or null pad_token_id
      value = getattr(defaults, name)
    kw[name] = type(getattr(defaults, name))(value)
  if model_type == 'distilbert':
    kw.update(num_hidden_layers=int(c.get('n_layers', 6)), type_vocab_size=0,
              layer_norm_eps=1e-12)
    kw['classifier_dropout'] = float(c.get('seq_classif_dropout', 0.2))
  else:
    drop = c.get('classifier_dropout')
    kw['classifier_dropout'] = float(kw['hidden_dropout_prob'] if drop is None else drop)
  return ModelConfig(model_type=model_type, with_mlm_head=with_mlm_head,
                     num_labels=int(num_labels), pruned_heads=c.get('pruned_heads') or (), **kw)


def config_to_hf(config: ModelConfig, id2label: dict | None = None):
  """ModelConfig -> ``transformers.BertConfig`` / ``DistilBertConfig``.

  ``architectures`` is ``[BertForSequenceClassification]`` /
  ``[DistilBertForSequenceClassification]`` when ``config.num_labels > 0``
  (labels from ``id2label``, default ``LABEL_i``), else ``[*ForMaskedLM]`` (or
  ``[BertModel]`` / ``[DistilBertModel]`` without MLM head);
  ``tie_word_embeddings=True``; ``pruned_heads`` as ``{layer: [heads]}`` for the layers that
  have any (a record: transformers >= 5 ignores it, see the module docstring).

  Args:
    config: the model's config.
    id2label: class index -> label name for a classification model (keys may
      be strings, as in a JSON file); None = ``LABEL_0`` ... ``LABEL_{C-1}``.

  Returns:
    A ``transformers.BertConfig`` or ``transformers.DistilBertConfig``.

  Raises:
    ValueError: DistilBERT with layer_norm_eps != 1e-12 (HF hard-codes it), or
      ``id2label`` not naming exactly the labels 0..num_labels-1.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  if config.model_type == 'bert':
    cls, fields, arch = transformers.BertConfig, _BERT_FIELDS, 'Bert'
  else:
    if config.layer_norm_eps != 1e-12:
      raise ValueError(
          f'DistilBERT in transformers hard-codes layer_norm_eps=1e-12; a model '
          f'with layer_norm_eps={config.layer_norm_eps} cannot be exported as '
          f"DistilBERT. Export it as model_type 'bert' or use 1e-12.")
    cls, fields, arch = transformers.DistilBertConfig, _DISTILBERT_FIELDS, 'DistilBert'
  kw = {hf_name: getattr(config, name) for hf_name, name in fields.items()}
  if config.model_type == 'distilbert':
    kw['sinusoidal_pos_embds'] = False
  if config.num_labels:
    arch += 'ForSequenceClassification'
    id2label = {int(k): str(v) for k, v in (id2label or {}).items()} or {
        i: f'LABEL_{i}' for i in range(config.num_labels)}
    if sorted(id2label) != list(range(config.num_labels)):
      raise ValueError(f'id2label {id2label} must name labels 0..{config.num_labels - 1}.')
    kw.update(num_labels=config.num_labels, id2label=id2label,
              label2id={v: k for k, v in id2label.items()})
    kw['seq_classif_dropout' if config.model_type == 'distilbert'
       else 'classifier_dropout'] = config.classifier_dropout
  else:
    arch += 'ForMaskedLM' if config.with_mlm_head else 'Model'
  if config.pruned_heads:
    kw['pruned_heads'] = {i: list(h) for i, h in enumerate(config.pruned_heads) if h}
  return cls(**kw, tie_word_embeddings=True, architectures=[arch])


def _prefix(config: ModelConfig) -> str:
  return 'bert.' if config.model_type == 'bert' else 'distilbert.'


# (flax sub-path, BERT name, DistilBERT name, kind); kind picks the tensors.
_EMB_MAP = [
    (('word_embeddings',), 'word_embeddings', 'word_embeddings', 'emb'),
    (('position_embeddings',), 'position_embeddings', 'position_embeddings', 'emb'),
    (('token_type_embeddings',), 'token_type_embeddings', None, 'emb'),
    (('LayerNorm',), 'LayerNorm', 'LayerNorm', 'ln')]
_LAYER_MAP = [
    (('attention', 'query'), 'attention.self.query', 'attention.q_lin', 'lin'),
    (('attention', 'key'), 'attention.self.key', 'attention.k_lin', 'lin'),
    (('attention', 'value'), 'attention.self.value', 'attention.v_lin', 'lin'),
    (('attention', 'output'), 'attention.output.dense', 'attention.out_lin', 'lin'),
    (('attention_layer_norm',), 'attention.output.LayerNorm', 'sa_layer_norm', 'ln'),
    (('intermediate',), 'intermediate.dense', 'ffn.lin1', 'lin'),
    (('output',), 'output.dense', 'ffn.lin2', 'lin'),
    (('output_layer_norm',), 'output.LayerNorm', 'output_layer_norm', 'ln')]
_HEAD_MAP = [
    (('transform',), 'cls.predictions.transform.dense', 'vocab_transform', 'lin'),
    (('transform_layer_norm',), 'cls.predictions.transform.LayerNorm',
     'vocab_layer_norm', 'ln'),
    (('bias',), 'cls.predictions.bias', 'vocab_projector.bias', 'raw')]
# Sequence-classification head (BERT's pooler dense plays DistilBERT's pre_classifier).
_CLS_MAP = [
    (('pre_classifier',), 'bert.pooler.dense', 'pre_classifier', 'lin'),
    (('classifier',), 'classifier', 'classifier', 'lin')]
# kind -> (HF suffix, Flax leaf, transpose): torch Linear weight is [out, in].
_TENSORS = {'lin': (('.weight', 'kernel', True), ('.bias', 'bias', False)),
            'ln': (('.weight', 'scale', False), ('.bias', 'bias', False)),
            'emb': (('.weight', 'embedding', False),),
            'raw': (('', None, False),)}


def _name_map(config: ModelConfig):
  """List of (hf_name, flax_path, transpose, part) for every tensor the config
  has; hf_name as saved by ``*ForMaskedLM`` / ``*ForSequenceClassification``
  ``.save_pretrained`` (encoder prefixed, tied decoder omitted); part is
  'body', 'mlm' (the MLM head) or 'cls' (the classification head)."""
  bert, p, out = config.model_type == 'bert', _prefix(config), []

  def add(hf, path, kind, part):
    """Appends the tensors of `kind` at `hf` / `path`, unless `part` is a head the config lacks."""
    if (part == 'mlm' and not config.with_mlm_head) or (part == 'cls' and not config.num_labels):
      return
    for suffix, leaf, transpose in _TENSORS[kind]:
      out.append((hf + suffix, path + ((leaf,) if leaf else ()), transpose, part))
  for sub, hf_bert, hf_distil, kind in _EMB_MAP:
    if bert or hf_distil:
      add(f'{p}embeddings.{hf_bert if bert else hf_distil}',
          ('embeddings',) + sub, kind, 'body')
  for i in range(config.num_hidden_layers):
    for sub, hf_bert, hf_distil, kind in _LAYER_MAP:
      hf = (f'encoder.layer.{i}.{hf_bert}' if bert
            else f'transformer.layer.{i}.{hf_distil}')
      add(p + hf, ('encoder', f'layer_{i}') + sub, kind, 'body')
  for sub, hf_bert, hf_distil, kind in _HEAD_MAP:
    add(hf_bert if bert else hf_distil, ('mlm_head',) + sub, kind, 'mlm')
  for sub, hf_bert, hf_distil, kind in _CLS_MAP:
    add(hf_bert if bert else hf_distil, ('classifier_head',) + sub, kind, 'cls')
  return out


# Tied decoder weight and decoder-bias alias found in older checkpoints.
_DECODER = {
    'bert': ('cls.predictions.decoder.weight', 'cls.predictions.decoder.bias'),
    'distilbert': ('vocab_projector.weight', None)}


def _is_head_name(name: str) -> bool:
  return name.startswith(('cls.predictions.', 'vocab_transform.',
                          'vocab_layer_norm.', 'vocab_projector.'))


def _is_classifier_name(name: str) -> bool:
  return name.startswith(('classifier.', 'pre_classifier.'))


def _to_numpy(x) -> np.ndarray:
  if hasattr(x, 'detach'):  # torch tensor, possibly bf16 (no numpy bf16)
    import torch  # pylint: disable=g-import-not-at-top
    x = x.detach().cpu()
    if x.is_floating_point():
      x = x.to(torch.float32)
    return x.numpy()
  return np.asarray(x)


def _normalise_names(state_dict, config: ModelConfig) -> dict[str, np.ndarray]:
  """Adds the encoder prefix to unprefixed (BertModel) names, renames legacy
  LayerNorm gamma/beta, drops ignored tensors."""
  p = _prefix(config)
  out = {}
  for name, value in state_dict.items():
    if name.endswith('.gamma'):
      name = name[:-len('.gamma')] + '.weight'
    elif name.endswith('.beta'):
      name = name[:-len('.beta')] + '.bias'
    bare = name[len(p):] if name.startswith(p) else name
    if (bare.startswith(_IGNORED_PREFIXES)
        or any(s in bare for s in _IGNORED_SUBSTRINGS)
        or (bare.startswith(_POOLER) and not config.num_labels)):
      continue
    if _is_classifier_name(name) and not config.num_labels:
      continue
    if not name.startswith(p) and not _is_head_name(name) and not _is_classifier_name(name):
      name = p + name
    out[name] = value
  return out


def _fmt_names(names, limit=25) -> str:
  names = sorted(names)
  s = ', '.join(names[:limit])
  return s + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')


def params_from_hf_state_dict(state_dict, config: ModelConfig):
  """HF torch state dict -> Flax params (nested dict of float32 np.ndarray).

  Accepts ``bert.``/``distilbert.``-prefixed names (``*ForMaskedLM``) and
  unprefixed names (``BertModel``/``DistilBertModel``, e.g. MiniLM), legacy
  ``LayerNorm.gamma/beta``, and torch tensors or numpy arrays. The
  next-sentence head and ``position_ids``/``token_type_ids`` buffers are
  ignored; the pooler and ``classifier``/``pre_classifier`` tensors too unless
  ``config.num_labels > 0`` (then BERT's pooler dense becomes
  ``classifier_head/pre_classifier``). A tied decoder weight
  (``cls.predictions.decoder.weight`` / ``vocab_projector.weight``) is accepted
  if it equals the word embeddings, a ``cls.predictions.decoder.bias`` if it
  equals ``cls.predictions.bias``. With ``config.with_mlm_head=False`` head
  tensors are ignored. For a config with ``pruned_heads`` the attention tensors are in the
  unpruned layout with those heads zero (as ``params_to_hf_state_dict`` writes them); the zero
  heads are dropped.

  Args:
    state_dict: tensor name -> torch tensor or numpy array (any float dtype).
    config: the architecture the tensors must match exactly.

  Returns:
    Params laid out as ``bert.init_params(config)`` (host numpy, contiguous).

  Raises:
    ValueError: missing or unexpected tensors (lists their names), shape
      mismatches (lists them), an untied decoder weight / bias (not
      representable), or pruned heads whose weights are not zero.
  """
  if config.pruned_heads:
    dense = params_from_hf_state_dict(state_dict, dataclasses.replace(config, pruned_heads=()))
    return _drop_zero_heads(dense, config)
  sd = _normalise_names(state_dict, config)
  dec_w, dec_b = _DECODER[config.model_type]
  word = _prefix(config) + 'embeddings.word_embeddings.weight'
  if not config.with_mlm_head:
    sd = {k: v for k, v in sd.items() if not _is_head_name(k)}
  if dec_w in sd:
    w = sd.pop(dec_w)
    if word in sd and not np.array_equal(_to_numpy(w), _to_numpy(sd[word])):
      raise ValueError(
          f'{dec_w} differs from {word}: the checkpoint has an untied MLM '
          f'decoder, which this model (tied decoder) cannot represent.')
  if dec_b in sd:
    b = sd.pop(dec_b)
    if 'cls.predictions.bias' not in sd:
      sd['cls.predictions.bias'] = b
    elif not np.array_equal(_to_numpy(b), _to_numpy(sd['cls.predictions.bias'])):
      raise ValueError(f'{dec_b} differs from cls.predictions.bias; they must '
                       f'be the same (tied) tensor.')

  entries = _name_map(config)
  expected = {e[0] for e in entries}
  missing = expected - set(sd)
  unexpected = set(sd) - expected
  if missing or unexpected:
    msg = [f'Checkpoint does not match a {config.model_type} model with '
           f'{config.num_hidden_layers} layers '
           f'(with_mlm_head={config.with_mlm_head}, num_labels={config.num_labels}).']
    if missing:
      msg.append(f'Missing tensors ({len(missing)}): {_fmt_names(missing)}.')
    if unexpected:
      msg.append(f'Unexpected tensors ({len(unexpected)}): '
                 f'{_fmt_names(unexpected)}.')
    msg.append('Check that config.json matches the weights file '
               '(model_type, num_hidden_layers).')
    raise ValueError(' '.join(msg))

  params, bad_shapes = {}, []
  abstract = bert.unbox(bert.abstract_params(config))
  for hf_name, path, transpose, _ in entries:
    x = _to_numpy(sd[hf_name]).astype(np.float32)
    x = x.T if transpose else x
    want = _get(abstract, path).shape
    if x.shape != tuple(want):
      bad_shapes.append(f'{hf_name}: {x.shape} (expected {tuple(want)})')
      continue
    _set(params, path, np.ascontiguousarray(x))
  if bad_shapes:
    raise ValueError('Tensor shapes do not match the config (shapes in Flax '
                     'layout): ' + '; '.join(bad_shapes))
  return params


def _attention_columns(config: ModelConfig, heads) -> np.ndarray:
  """Columns of the unpruned `[H, num_attention_heads * head_dim]` kernels that hold `heads`."""
  d = config.head_dim
  return np.concatenate([np.arange(h * d, (h + 1) * d) for h in heads]).astype(np.int64)


def _restore_zero_heads(params, config: ModelConfig):
  """Pruned params -> the unpruned layout, the removed heads' weights zero (a new tree)."""
  out = dict(params, encoder=dict(params['encoder']))
  width = config.num_attention_heads * config.head_dim
  for i, gone in enumerate(config.pruned_heads):
    if not gone:
      continue
    cols = _attention_columns(config, pruning.kept_heads(config, i))
    att = dict(params['encoder'][f'layer_{i}']['attention'])
    for name in ('query', 'key', 'value'):
      kernel = np.zeros((config.hidden_size, width), np.float32)
      bias = np.zeros((width,), np.float32)
      kernel[:, cols] = np.asarray(att[name]['kernel'], np.float32)
      bias[cols] = np.asarray(att[name]['bias'], np.float32)
      att[name] = {'kernel': kernel, 'bias': bias}
    kernel = np.zeros((width, config.hidden_size), np.float32)
    kernel[cols] = np.asarray(att['output']['kernel'], np.float32)
    att['output'] = dict(att['output'], kernel=kernel)
    out['encoder'][f'layer_{i}'] = dict(params['encoder'][f'layer_{i}'], attention=att)
  return out


def _drop_zero_heads(dense, config: ModelConfig):
  """Unpruned-layout params -> `config`'s pruned ones, checking the dropped heads are zero."""
  nonzero = []
  for i, gone in enumerate(config.pruned_heads):
    if not gone:
      continue
    cols = _attention_columns(config, gone)
    att = dense['encoder'][f'layer_{i}']['attention']
    parts = [att[n]['kernel'][:, cols] for n in ('query', 'key', 'value')] + [
        att[n]['bias'][cols] for n in ('query', 'key', 'value')] + [att['output']['kernel'][cols]]
    if any(np.any(x != 0) for x in parts):
      nonzero.append(i)
  if nonzero:
    raise ValueError(
        f'config.json lists pruned_heads {dict(enumerate(config.pruned_heads))}, but the weights '
        f'of those heads in layers {nonzero} are not zero: the checkpoint was not written with '
        'them removed. Remove pruned_heads from config.json to load the full model.')
  # unpruned, a head's local index is its original one
  _, params = pruning.prune(dense, dataclasses.replace(config, pruned_heads=()),
                            heads=config.pruned_heads)
  return _contiguous(params)


def _contiguous(tree):
  """`tree` with every array a contiguous float32 numpy array."""
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, dtype=np.float32)


def params_to_hf_state_dict(params, config: ModelConfig) -> dict[str, np.ndarray]:
  """Flax params -> state dict named like ``*ForMaskedLM`` / ``*ForSequenceClassification``.

  Names are those ``save_pretrained`` writes (float32, contiguous; the tied
  decoder weight is omitted as transformers does). Without an MLM head the
  ``cls.predictions.*`` / ``vocab_*`` tensors are left out; with
  ``config.num_labels > 0`` the classification head is included (BERT:
  ``bert.pooler.dense.*``, ``classifier.*``; DistilBERT: ``pre_classifier.*``,
  ``classifier.*``). Pruned heads are written as zeros in the unpruned layout (module
  docstring).

  Args:
    params: boxed or unboxed params of ``config`` (device or host arrays).
    config: the architecture; decides which tensors are written.

  Returns:
    tensor name -> float32 ``np.ndarray``; Linear weights in torch's ``[out, in]``
    layout.

  Raises:
    ValueError: a parameter the config requires is missing from ``params``.
  """
  params = bert.unbox(params)
  if config.pruned_heads:
    try:
      params = _restore_zero_heads(params, config)
    except KeyError as e:
      raise ValueError(f'params has no {e}; params do not match the config.') from e
  out = {}
  for hf_name, path, transpose, _ in _name_map(config):
    try:
      x = np.asarray(_get(params, path), dtype=np.float32)
    except KeyError as e:
      raise ValueError(f'params has no {"/".join(path)} (needed for '
                       f'{hf_name}); params do not match the config.') from e
    out[hf_name] = np.ascontiguousarray(x.T if transpose else x)
  return out


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


_WEIGHT_FILES = ['config.json', '*.safetensors', '*.safetensors.index.json', 'pytorch_model.bin',
                 'pytorch_model.bin.index.json']


def _resolve_model_dir(path_or_name: str, allow_patterns=None) -> str:
  """The local directory of a model: `path_or_name` itself, or its hub snapshot (the files of
  `allow_patterns`, default config + weights)."""
  path = os.path.expanduser(path_or_name)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise ValueError(f'{path_or_name!r} is a file; pass the directory that '
                     f'contains config.json and model.safetensors.')
  if hub.looks_like_local_path(path_or_name):
    raise FileNotFoundError(
        f'Model directory {path_or_name!r} does not exist. Pass a directory '
        f'with config.json and model.safetensors (or pytorch_model.bin), or a '
        f'Hugging Face Hub name like "bert-base-uncased".')
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    return huggingface_hub.snapshot_download(path_or_name,
                                             allow_patterns=allow_patterns or _WEIGHT_FILES)
  except Exception as e:  # pylint: disable=broad-except
    # LocalEntryNotFoundError / OfflineModeIsEnabled: the name was never checked online, so
    # "check the name" would mislead; the fix is a local directory.
    if hub.hub_offline() or hub.hub_unreachable(e):
      why = hub.unreachable_reason()
      raise FileNotFoundError(
          f'{path_or_name!r} is not a local directory and could not be fetched from the '
          f'Hugging Face Hub: the hub is {why} and the name is not in the local hub cache '
          f'({type(e).__name__}: {e}). Set --config.teacher.path to a local directory with '
          f'config.json and weights (model.safetensors or pytorch_model.bin); the same for '
          f'student.path if that is the setting that named it.') from e
    raise FileNotFoundError(
        f'{path_or_name!r} is not a local directory and could not be fetched '
        f'from the Hugging Face Hub ({type(e).__name__}: {e}). Pass an existing '
        f'local model directory, or check the name and network access.') from e


def _read_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'No config.json in {model_dir!r}; it is needed to know the '
        f'architecture. Save the model with save_pretrained().')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}); re-create it with '
                     f'save_pretrained().') from e


def _load_weights_file(path: str) -> dict:
  try:
    if path.endswith('.safetensors'):
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      with safe_open(path, framework='pt') as f:
        return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}
    import torch  # pylint: disable=g-import-not-at-top
    sd = torch.load(path, map_location='cpu', weights_only=True)
    return {k: _to_numpy(v) for k, v in sd.items()}
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'Could not read weights file {path} ({type(e).__name__}: {e}). The '
        f'file is corrupt or truncated; re-download or re-export it.') from e


def _read_state_dict(model_dir: str) -> dict[str, np.ndarray]:
  for single, index in (('model.safetensors', 'model.safetensors.index.json'),
                        ('pytorch_model.bin', 'pytorch_model.bin.index.json')):
    if os.path.isfile(os.path.join(model_dir, single)):
      return _load_weights_file(os.path.join(model_dir, single))
    index_path = os.path.join(model_dir, index)
    if os.path.isfile(index_path):
      try:
        with open(index_path, encoding='utf-8') as f:
          shards = sorted(set(json.load(f)['weight_map'].values()))
      except (ValueError, KeyError) as e:
        raise ValueError(f'{index_path} is not a valid shard index ({e}).') from e
      sd = {}
      for shard in shards:
        sd.update(_load_weights_file(os.path.join(model_dir, shard)))
      return sd
  raise FileNotFoundError(
      f'No weights in {model_dir!r}: expected model.safetensors (or a '
      f'model.safetensors.index.json, or pytorch_model.bin). Found: '
      f'{sorted(os.listdir(model_dir))}.')


def read_hf_config(path_or_name: str, *, with_mlm_head: bool | None = None) -> ModelConfig:
  """The `ModelConfig` of a HF BERT/DistilBERT checkpoint from its config.json alone (no weights).

  What `load_hf_model` would return as the config, for shapes without loading the weights
  (ahead-of-time compilation): the heads are read from `architectures` instead of the tensors
  (`*ForMaskedLM` / `*ForPreTraining`: an MLM head; `*ForSequenceClassification`: a classifier
  of `len(id2label)` labels); a config.json without `architectures` is taken for a masked LM.
  A hub name fetches config.json only.

  Args:
    path_or_name: as `load_hf_model`.
    with_mlm_head: None = from `architectures`; False drops the head; True requires one.

  Returns:
    The `ModelConfig` (compute dtype float32, no remat).

  Raises:
    FileNotFoundError: the directory or config.json is missing, or the hub is unreachable.
    ValueError: as `config_from_hf`, or a head requested that `architectures` does not have.
  """
  model_dir = _resolve_model_dir(path_or_name, allow_patterns=['config.json'])
  hf_config = _read_config(model_dir)
  archs = list(hf_config.get('architectures') or [])
  has_head = not archs or any('MaskedLM' in a or 'ForPreTraining' in a for a in archs)
  if with_mlm_head is None:
    with_mlm_head = has_head
  elif with_mlm_head and not has_head:
    raise ValueError(f'{model_dir} has no MLM head (architectures={archs}); use a *ForMaskedLM '
                     'checkpoint.')
  num_labels = 0
  if any('ForSequenceClassification' in a for a in archs):
    num_labels = len(hf_config.get('id2label') or {}) or int(hf_config.get('num_labels', 2))
  return config_from_hf(hf_config, with_mlm_head=with_mlm_head, num_labels=num_labels)


def verify_model_dir(model_dir: str) -> bool:
  """Checks an exported model directory against its `SHA256SUMS` before it is loaded.

  `export/hf_export.py` writes the checksums (and `onnx_export.py` those of `onnx/`); a
  directory without them (a Hub snapshot, another tool's export) is loaded as it is.

  Args:
    model_dir: a Hugging Face model directory.

  Returns:
    True if verified, False if it has no `SHA256SUMS`.

  Raises:
    CorruptFileError: a listed file (`model.safetensors`, `config.json`, ...) is missing,
      truncated or altered; the message names it and the fix (export again).
  """
  model_dir = os.path.abspath(model_dir)
  return integrity.verify(
      model_dir, f'Export the model again (python -m flaxdistil.export --workdir RUN --out '
      f'{model_dir} --overwrite; the checkpoint it came from is not affected), or copy an intact '
      'one.', required=False, what='exported file') is not None


def nonfinite_params(params) -> str:
  """Names the float leaves of `params` holding inf/NaN, e.g. 'encoder/layer_0/... (3 of 1024)'.

  Args:
    params: a nested dict of arrays (host numpy or device).

  Returns:
    '' when every value is finite, else up to 3 leaf paths with their counts.
  """
  bad = []

  def walk(tree, path):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, path + (str(k),))
        continue
      a = np.asarray(v)
      if np.issubdtype(a.dtype, np.floating):
        n = int(a.size - np.count_nonzero(np.isfinite(a)))
        if n:
          bad.append(f'{"/".join(path + (str(k),))}: {n} of {a.size} values inf/NaN')

  walk(params, ())
  return '; '.join(bad[:3]) + (f'; and {len(bad) - 3} more' if len(bad) > 3 else '')


def load_hf_model(path_or_name: str, *, with_mlm_head: bool | None = None,
                  with_classifier: bool = True):
  """Loads a HF BERT/DistilBERT checkpoint -> (ModelConfig, float32 params).

  ``*ForSequenceClassification`` checkpoints (a ``classifier.weight``
  tensor) load with their head: ``config.num_labels`` = its rows, and
  ``params['classifier_head']`` holds pooler/pre_classifier and classifier;
  ``with_classifier=False`` drops that head.

  Args:
    path_or_name: local directory with config.json and model.safetensors /
      sharded safetensors / pytorch_model.bin; only if no such directory exists
      and the string does not look like a path, a Hub repo id (downloaded with
      ``huggingface_hub.snapshot_download``).
    with_mlm_head: None = auto (True if the checkpoint contains an MLM head);
      False drops any head; True requires one.
    with_classifier: load a ``classifier.weight`` head if there is one.

  Returns:
    ``(ModelConfig, params)``: params as ``params_from_hf_state_dict`` returns
    them (float32 host numpy).

  Raises:
    CorruptFileError: the directory has a ``SHA256SUMS`` (a flaxdistil export) that a file
      fails (``verify_model_dir``).
    FileNotFoundError: directory, config.json or weights file missing, or Hub
      download failed (offline or unreachable: the message names
      ``teacher.path`` / ``student.path`` and a local directory as the fix).
    ValueError: ``path_or_name`` is a file, config not BERT/DistilBERT or not
      valid JSON, corrupt weights file or shard index, head requested but
      absent, or tensors not matching the config.
  """
  model_dir = _resolve_model_dir(path_or_name)
  verify_model_dir(model_dir)
  hf_config = _read_config(model_dir)
  model_type = hf_config.get('model_type')
  if model_type not in _SUPPORTED:
    raise ValueError(
        f'{model_dir}: config.json has model_type {model_type!r}; only BERT '
        f'("bert") and DistilBERT ("distilbert") checkpoints are supported.')
  state_dict = _read_state_dict(model_dir)
  has_head = any(_is_head_name(k) for k in state_dict)
  if with_mlm_head is None:
    with_mlm_head = has_head
  elif with_mlm_head and not has_head:
    raise ValueError(
        f'{model_dir} has no MLM head (architectures='
        f'{hf_config.get("architectures")}); load it with with_mlm_head=False '
        f'or use a *ForMaskedLM checkpoint.')
  num_labels = 0
  if with_classifier and 'classifier.weight' in state_dict:
    num_labels = int(_to_numpy(state_dict['classifier.weight']).shape[0])
  config = config_from_hf(hf_config, with_mlm_head=with_mlm_head, num_labels=num_labels)
  return config, params_from_hf_state_dict(state_dict, config)
