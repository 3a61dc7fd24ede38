"""The transformers (torch) model of an exported directory, loaded by its architecture.

One loader for everything that reads an export back: `hf_export`'s verification, the ONNX export,
and the scripts and benchmarks. The Auto class follows `config.architectures`, so a
`*ForSequenceClassification`, `*ForMaskedLM` or bare-encoder directory loads as itself, and any
missing, unexpected or mismatched tensor is an error rather than a silently random weight.
"""

import os

import torch

from flaxdistil.model import hf_conversion


def load_torch_model(hf_dir: str):
  """`(model, output_name)`: the float32 eval-mode transformers model in `hf_dir`.

  The auto class follows `config.architectures`: `*ForSequenceClassification`
  (output `logits: [B, num_labels]`), `*ForMaskedLM` (`logits: [B, T, vocab]`),
  else the bare encoder (`last_hidden_state: [B, T, hidden]`).

  Args:
    hf_dir: a Hugging Face BERT / DistilBERT directory (config.json + weights).

  Returns:
    `(model, output_name)`: the torch model in eval mode, and the attribute of its output
    to read (`'logits'` or `'last_hidden_state'`).

  Raises:
    CorruptFileError: `hf_dir` has a `SHA256SUMS` that a file fails
      (`hf_conversion.verify_model_dir`).
    FileNotFoundError: `hf_dir` or its config.json is missing.
    ValueError: config.json is not a BERT / DistilBERT config, or the weights do
      not load cleanly (missing / unexpected tensors).
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
  return model.eval(), output
