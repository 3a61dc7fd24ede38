"""The transformers (torch) model of an exported directory, loaded by its architecture.

One loader for everything that reads an export back: `hf_export`'s verification, the ONNX export,
and the scripts and benchmarks. The Auto class follows `config.architectures`, so a
`*ForSequenceClassification`, `*ForMaskedLM` or bare-encoder directory loads as itself, and any
missing, unexpected or mismatched tensor is an error rather than a silently random weight.

A head-pruned export (`config.pruned_heads`, `model/hf_conversion.py`) loads in transformers as
the unpruned model with zero heads; `load_torch_model` then removes those heads from the torch
modules (`remove_pruned_heads`, with transformers' own `prune_linear_layer`), what transformers
< 5 did on load, so torch, ONNX and the benchmarks run the smaller model.
"""

import os

import torch

from flaxdistil.model import hf_conversion


def _attention_modules(model):
  """Per encoder layer `(attention, [query, key, value] attribute names, output owner, output
  attribute name, head-count attribute name)` of a BERT or DistilBERT transformers model."""
  base = model.base_model
  if model.config.model_type == 'bert':
    return [(layer.attention.self, ('query', 'key', 'value'), layer.attention.output, 'dense',
             'num_attention_heads') for layer in base.encoder.layer]
  return [(layer.attention, ('q_lin', 'k_lin', 'v_lin'), layer.attention, 'out_lin', 'n_heads')
          for layer in base.transformer.layer]


def remove_pruned_heads(model) -> int:
  """Removes the heads `model.config.pruned_heads` names from the torch modules, in place.

  Head h is rows `[h * d, (h + 1) * d)` of the query, key and value Linear layers and the same
  input columns of the attention output Linear (d = head size); transformers' attention reshapes
  with `-1` heads, so the smaller layers run unchanged. The removed heads must be zero (as
  `hf_conversion` writes them): removing them then changes no output.

  Args:
    model: a BERT / DistilBERT transformers model whose config has `pruned_heads`
      (`{layer: [heads]}`, keys int or str), loaded in the unpruned layout.

  Returns:
    The number of heads removed (0 when the config names none).

  Raises:
    ValueError: a pruned head whose weights are not zero (the checkpoint was not written
      pruned), or a layer index out of range.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.pytorch_utils import prune_linear_layer  # pylint: disable=g-import-not-at-top
  pruned = {int(k): sorted(int(h) for h in v)
            for k, v in (getattr(model.config, 'pruned_heads', None) or {}).items() if v}
  layers = _attention_modules(model)
  if any(not 0 <= i < len(layers) for i in pruned):
    raise ValueError(f'pruned_heads {pruned} names layers outside 0..{len(layers) - 1}.')
  full = (model.config.num_attention_heads if model.config.model_type == 'bert'
          else model.config.n_heads)
  removed = 0
  for i, heads in sorted(pruned.items()):
    att, qkv, owner, out_name, count_name = layers[i]
    n = getattr(att, count_name)
    if n != full:
      continue  # removed by an earlier call
    d = getattr(att, qkv[0]).out_features // n
    drop = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
    keep = torch.tensor([c for c in range(n * d) if c not in set(drop.tolist())], dtype=torch.long)
    zero = all(not getattr(att, name).weight[drop].any() and not getattr(att, name).bias[drop].any()
               for name in qkv) and not getattr(owner, out_name).weight[:, drop].any()
    if not zero:
      raise ValueError(f'config.pruned_heads lists heads {heads} of layer {i}, but their weights '
                       'are not zero; the checkpoint was not exported pruned.')
    for name in qkv:
      setattr(att, name, prune_linear_layer(getattr(att, name), keep, dim=0))
    setattr(owner, out_name, prune_linear_layer(getattr(owner, out_name), keep, dim=1))
    setattr(att, count_name, n - len(heads))
    if hasattr(att, 'all_head_size'):
      att.all_head_size = (n - len(heads)) * d
    if hasattr(att, 'dim') and model.config.model_type == 'distilbert':
      att.dim = (n - len(heads)) * d
    removed += len(heads)
  return removed


def load_torch_model(hf_dir: str, remove_pruned: bool = True):
  """`(model, output_name)`: the float32 eval-mode transformers model in `hf_dir`.

  The auto class follows `config.architectures`: `*ForSequenceClassification`
  (output `logits: [B, num_labels]`), `*ForMaskedLM` (`logits: [B, T, vocab]`),
  else the bare encoder (`last_hidden_state: [B, T, hidden]`).

  Args:
    hf_dir: a Hugging Face BERT / DistilBERT directory (config.json + weights).
    remove_pruned: remove the zero heads of `config.pruned_heads` from the loaded model
      (`remove_pruned_heads`); False returns it as plain `from_pretrained` gives it.

  Returns:
    `(model, output_name)`: the torch model in eval mode, and the attribute of its output
    to read (`'logits'` or `'last_hidden_state'`).

  Raises:
    CorruptFileError: `hf_dir` has a `SHA256SUMS` that a file fails
      (`hf_conversion.verify_model_dir`).
    FileNotFoundError: `hf_dir` or its config.json is missing.
    ValueError: config.json is not a BERT / DistilBERT config, the weights do
      not load cleanly (missing / unexpected tensors), or pruned heads are not zero.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f'{hf_dir}: no such directory; pass a directory written by '
                            '`python -m flaxdistil.export` (or any HF BERT/DistilBERT dir).')
  if not os.path.isfile(os.path.join(hf_dir, 'config.json')):
    raise FileNotFoundError(f'{hf_dir} has no config.json, so it is not a Hugging Face model '
                            'directory; export the run first with `python -m flaxdistil.export`.')
  hf_conversion.verify_model_dir(hf_dir)
  config = transformers.AutoConfig.from_pretrained(hf_dir)
  if config.model_type not in ('bert', 'distilbert'):
    raise ValueError(f'{hf_dir}: model_type {config.model_type!r}; only BERT and DistilBERT '
                     'exports are supported.')
  arch = ' '.join(config.architectures or ())
  if 'ForSequenceClassification' in arch:
    auto, output = transformers.AutoModelForSequenceClassification, 'logits'
  elif 'ForMaskedLM' in arch:
    auto, output = transformers.AutoModelForMaskedLM, 'logits'
  else:
    auto, output = transformers.AutoModel, 'last_hidden_state'
  model, info = auto.from_pretrained(hf_dir, output_loading_info=True, dtype=torch.float32)
  problems = {k: sorted(v) for k, v in info.items() if v}
  if problems:
    raise ValueError(f'{hf_dir}: transformers reported loading problems {problems}; the '
                     'weights do not match config.json.')
  if remove_pruned:
    try:
      remove_pruned_heads(model)
    except ValueError as e:
      raise ValueError(f'{hf_dir}: {e}') from e
  return model.eval(), output
