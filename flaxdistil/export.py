r"""Orbax checkpoint -> verified Hugging Face PyTorch directory.

  python -m flaxdistil.export --workdir DIR [--step N] --out OUT_DIR [--dtype float32]

Restores the student of step N (default: the newest) onto one CPU host (also
for checkpoints written by a sharded multi-device run), writes
`DistilBertForMaskedLM` files (`config.json`, `model.safetensors`, tokenizer,
model card) and, before reporting success, runs the torch model and the Flax
student on the same padded batch and checks that logits agree
(`hf_conversion.export_hf`). Nothing is left in OUT_DIR on failure.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from flaxdistil import checkpointing
from flaxdistil import hf_conversion
from flaxdistil import models
from flaxdistil import sharding
from flaxdistil import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir (holds checkpoints/ and config.json).')
flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest readable one.')
flags.DEFINE_string('out', None, 'Output directory (must not exist unless --overwrite).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Dtype of the written weights.')
flags.DEFINE_bool('overwrite', False, 'Replace an existing --out directory.')


def _model_card(meta: dict, step: int, cfg: models.ModelConfig) -> str:
  info, ev = meta.get('info', {}), meta.get('eval', {}) or {}
  lines = [
      '---', 'library_name: transformers', 'pipeline_tag: fill-mask', 'tags: [distilbert, distillation, flaxdistil]', '---',
      '# DistilBERT student distilled with flaxdistil', '',
      f'- Architecture: DistilBERT, {cfg.num_hidden_layers} layers x {cfg.hidden_size} hidden, '
      f'{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}.',
      f'- Teacher: `{info.get("teacher")}`; student init: `{info.get("student_init")}`.',
      f'- Objective: {json.dumps(info.get("distill", {}))}.',
      f'- Training data: {", ".join(os.path.basename(f) for f in info.get("train_files", []))}.',
      f'- Steps: {step} (global batch {meta.get("fingerprint", {}).get("global_batch_size")} x '
      f'{meta.get("fingerprint", {}).get("max_seq_length")} tokens).',
  ]
  if ev:
    lines.append(f'- Held-out masked-token accuracy {ev.get("accuracy", float("nan")):.4f}, '
                 f'perplexity {ev.get("perplexity", float("nan")):.2f} '
                 f'({ev.get("num_tokens")} masked tokens).')
  return '\n'.join(lines) + '\n'


def load_student(workdir: str, step: int | None = None):
  """Restores `(ModelConfig, params, meta, step)` of the student onto one device.

  Raises:
    FileNotFoundError: no config.json / checkpoint in `workdir`, or `step` absent.
  """
  cfg_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f'{cfg_path} not found: --workdir must be a flaxdistil training workdir.')
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  meta = checkpointing.read_meta(workdir, step)
  if meta is None:
    root = checkpointing.checkpoint_dir(workdir)
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
    raise FileNotFoundError(f'no checkpoint{"" if step is None else f" for step {step}"} in {root}; '
                            f'available steps: {steps}.')
  scfg = models.ModelConfig(**meta["fingerprint"]["student_config"])
  tx, _ = train.make_optimizer(config.optim, config.num_train_steps)
  mesh = sharding.create_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'), devices=jax.devices()[:1])
  _, abstract = train.state_layout(scfg, tx, mesh, sharding.rules_tuple(config.mesh.logical_axis_rules))
  manager = checkpointing.make_manager(workdir, read_only=True, async_save=False)
  restored = checkpointing.restore_latest(manager, abstract, step=step)
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {checkpointing.checkpoint_dir(workdir)}.')
  state, meta = restored
  return scfg, jax.device_get(state['params']), meta, int(state['step'])


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = 'float32',
           overwrite: bool = False) -> dict:
  """Exports and verifies; returns `hf_conversion.export_hf`'s report plus `step`."""
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f'--out {out} already exists; choose a new directory or pass --overwrite.')
  scfg, params, meta, step = load_student(workdir, step)
  report = hf_conversion.export_hf(
      params, scfg, out, tokenizer_path=meta.get('info', {}).get('tokenizer'),
      model_card=_model_card(meta, step, scfg), dtype=dtype, overwrite=overwrite)
  report['step'] = step
  return report


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('--workdir and --out are required.')
  try:
    report = export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                    overwrite=FLAGS.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  logging.info('export report: %s', report)
  print(json.dumps(report, default=str))


if __name__ == '__main__':
  app.run(main)
