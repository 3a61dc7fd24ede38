"""The README.md (Hub model card) of an exported run: architecture, teacher, data, metrics.

Written from the checkpoint's metadata (`setup.Run.info`, the fingerprint and the last eval), with
local paths made absolute (the card's reader does not know the directory training ran in) and hub
names kept as given.
"""

import json
import os

from flaxdistil.model.bert import ModelConfig
from flaxdistil.storage import hub


def _card_path(path: str | None, known_abs=()) -> str | None:
  """A path for the model card: absolute for a local path, a hub name as given.

  A relative path in the run's metadata is relative to the directory training
  ran in, which the card's reader does not know. Where an absolute path that
  training resolved ends in the same components (`info['tokenizer']` is the
  training-time `abspath` of `data.tokenizer`, which defaults to
  `teacher.path`), that one is used; otherwise the path is resolved against the
  current directory.
  """
  if not path or path == 'random':
    return path
  expanded = os.path.expanduser(path)
  if not hub.looks_like_local_path(path):
    return path  # a hub name
  if os.path.isabs(expanded):
    return os.path.normpath(expanded)
  tail = [c for c in os.path.normpath(expanded).split(os.sep) if c not in ('.', '..')]
  for a in known_abs:
    if a and os.path.isabs(a) and tail and os.path.normpath(a).split(os.sep)[-len(tail):] == tail:
      return os.path.normpath(a)
  return os.path.abspath(expanded)


def model_card(meta: dict, step: int, cfg: ModelConfig) -> str:
  """README.md text (Hub model card) for a restored run: architecture, teacher, data, metrics.

  Local paths (teacher, training files, dataset directory) are written
  absolute, hub names as given (`_card_path`).

  Args:
    meta: the checkpoint's metadata (`info`, `fingerprint`, `eval`; `checkpointing.save`).
    step: the checkpoint's step.
    cfg: the student's `ModelConfig` (architecture, heads, pipeline tag).

  Returns:
    The Markdown text, YAML front matter (`library_name`, `pipeline_tag`, `tags`) first; the
    last eval line is GLUE dev accuracy (and F1) for a task run, masked-token accuracy and
    perplexity otherwise, none without eval metrics.
  """
  info, ev = meta.get('info', {}), meta.get('eval', {}) or {}
  arch = 'BERT' if cfg.model_type == 'bert' else 'DistilBERT'
  tag = ('text-classification' if cfg.num_labels else
         'fill-mask' if cfg.with_mlm_head else 'feature-extraction')
  known = (info.get('tokenizer'),)
  data = [_card_path(f) for f in info.get('train_files', []) or []]
  if info.get('dataset'):
    data.append(_card_path(info['dataset']))
  lines = [
      '---', 'library_name: transformers', f'pipeline_tag: {tag}',
      'tags: [distilbert, distillation, flaxdistil]', '---',
      f'# {arch} {"classifier" if cfg.num_labels else "student"} trained with flaxdistil', '',
      f'- Architecture: {arch}, {cfg.num_hidden_layers} layers x {cfg.hidden_size} hidden, '
      f'{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}.',
      f'- Teacher: `{_card_path(info.get("teacher"), known)}`; '
      f'student init: `{info.get("student_init")}`.',
      f'- Objective: {json.dumps(info.get("distill", {}))}.',
      f'- Training data: {", ".join(f"`{d}`" for d in data) or "synthetic"}.',
      f'- Steps: {step} (global batch {meta.get("fingerprint", {}).get("global_batch_size")} x '
      f'{meta.get("fingerprint", {}).get("max_seq_length")} tokens).',
  ]
  if ev and info.get('task'):
    lines.append(f'- GLUE {info["task"]} dev accuracy {ev.get("accuracy", float("nan")):.4f}'
                 + (f', F1 {ev["f1"]:.4f}' if 'f1' in ev else '')
                 + f' ({ev.get("num_tokens")} examples).')
  elif ev:
    lines.append(f'- Held-out masked-token accuracy {ev.get("accuracy", float("nan")):.4f}, '
                 f'perplexity {ev.get("perplexity", float("nan")):.2f} '
                 f'({ev.get("num_tokens")} masked tokens).')
  return '\n'.join(lines) + '\n'
