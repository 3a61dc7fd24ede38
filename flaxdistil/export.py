r"""Orbax checkpoint -> verified Hugging Face PyTorch directory.

  python -m flaxdistil.export --workdir DIR [--step N] --out OUT_DIR [--dtype float32]

Restores the student of step N (default: the newest) onto one CPU host (also
for checkpoints written by a sharded multi-device run), writes
`DistilBertForMaskedLM` files (`DistilBertForSequenceClassification` for a
GLUE run, `Bert*` for a fine-tuned BERT teacher: `config.json`,
`model.safetensors`, tokenizer, model card) and, before reporting success,
runs the torch model and the Flax student on the same padded batch and checks
that logits agree (`export_hf`). Nothing is left in OUT_DIR on failure.
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from flaxdistil import checkpointing
from flaxdistil import hf_conversion
from flaxdistil import input_pipeline
from flaxdistil import intermediate
from flaxdistil import models
from flaxdistil.models import ModelConfig
from flaxdistil import sharding

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir (holds checkpoints/ and config.json).')
flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest readable one.')
flags.DEFINE_string('out', None, 'Output directory (must not exist unless --overwrite).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Dtype of the written weights.')
flags.DEFINE_bool('overwrite', False, 'Replace an existing --out directory.')


_TORCH_DTYPES = ('float32', 'bfloat16', 'float16')


def _verify_export(model_dir: str, params, config: ModelConfig, dtype: str,
                   atol: float) -> float:
  """Loads ``model_dir`` with transformers and compares logits to Flax."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if config.num_labels:
    auto, suffix = transformers.AutoModelForSequenceClassification, 'ForSequenceClassification'
  elif config.with_mlm_head:
    auto, suffix = transformers.AutoModelForMaskedLM, 'ForMaskedLM'
  else:  # encoder only (e.g. a MiniLM-style sentence-embedding student)
    auto, suffix = transformers.AutoModel, 'Model'
  model, info = auto.from_pretrained(model_dir, output_loading_info=True, dtype=torch.float32)
  problems = {k: sorted(v) for k, v in info.items() if v}
  if problems:
    raise ValueError(f'Export verification failed: transformers reported '
                     f'loading problems {problems}.')
  want_cls = ('Bert' if config.model_type == 'bert' else 'DistilBert') + suffix
  if type(model).__name__ != want_cls:
    raise ValueError(f'Export verification failed: loaded as '
                     f'{type(model).__name__}, expected {want_cls}.')
  model.eval()
  # Fixed batch [2, T]: odd T, second row padded after (T + 1) // 2 tokens.
  t = min(13, config.max_position_embeddings)
  ids = np.random.default_rng(1234).integers(0, config.vocab_size, (2, t))
  mask = np.ones((2, t), np.int32)
  mask[1, (t + 1) // 2:] = 0
  ids = np.where(mask == 1, ids, config.pad_token_id).astype(np.int32)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long())
  ref = (ref.logits if config.num_labels or config.with_mlm_head else ref.last_hidden_state).numpy()
  # Compare against the weights as actually stored (rounded to `dtype`).
  stored = jax.tree_util.tree_map(
      lambda x: jnp.asarray(x, jnp.float32).astype(dtype).astype(jnp.float32),
      models.unbox(params))
  flax_cfg = dataclasses.replace(config, dtype=jnp.float32, remat=False)
  out = models.MaskedLM(flax_cfg).apply({'params': stored}, ids, mask)
  if config.num_labels:  # [2, num_labels]
    max_diff = float(np.abs(np.asarray(out.class_logits) - ref).max())
  else:  # [2, T, vocab] logits or [2, T, hidden] last hidden states, real tokens only
    ours = out.logits if config.with_mlm_head else out.hidden_states[-1]
    max_diff = float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())
  if not np.isfinite(max_diff) or max_diff > atol:
    raise ValueError(
        f'Export verification failed: max |logits(torch) - logits(flax)| = '
        f'{max_diff:.3g} > atol {atol:g}. Nothing was written.')
  return max_diff


def export_hf(params, config: ModelConfig, out_dir: str, *,
              tokenizer_path: str | None = None, model_card: str | None = None,
              dtype: str = 'float32', verify: bool = True, atol: float = 1e-4,
              overwrite: bool = False, id2label: dict | None = None) -> dict:
  """Writes a transformers ``*ForMaskedLM`` directory atomically.

  A model with ``config.num_labels > 0`` is written (and verified) as
  ``*ForSequenceClassification`` with ``id2label`` label names, the labels
  ``pipeline("text-classification")`` returns; one with neither head as the
  bare encoder (``DistilBertModel``, last hidden states compared).

  Writes config.json, model.safetensors (tensors in ``dtype``), tokenizer files
  (``AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained``) and
  README.md (``model_card`` text, skipped if None) into a temporary directory
  beside ``out_dir``. If ``verify``, loads it with
  ``AutoModelForMaskedLM.from_pretrained(output_loading_info=True)`` (no
  missing/unexpected/mismatched keys allowed) and compares float32 logits on a
  fixed padded batch with the Flax model (max abs diff over real tokens <=
  ``atol``). Only then is the directory renamed to ``out_dir``; on any failure
  the temporary directory is deleted and nothing is left behind.

  Params must be host-local / fully addressable (gather sharded params first).

  Returns:
    {'path': absolute out_dir, 'max_abs_diff': float or None if not verified}.

  Raises:
    FileExistsError: out_dir exists and overwrite=False.
    ValueError: unknown dtype, tokenizer larger than vocab_size,
      or verification failure.
    FileNotFoundError / ValueError: tokenizer_path cannot be loaded.
  """
  if dtype not in _TORCH_DTYPES:
    raise ValueError(f'dtype must be one of {_TORCH_DTYPES}, got {dtype!r}.')
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(out_dir) and (not overwrite or not os.path.isdir(out_dir)):
    raise FileExistsError(f'{out_dir} already exists; pass overwrite=True (only '
                          f'for a directory) or choose another directory.')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    hf_config = hf_conversion.config_to_hf(config, id2label)
    hf_config.dtype = dtype
    hf_config.save_pretrained(tmp)
    tdtype = getattr(torch, dtype)
    tensors = {k: torch.from_numpy(np.array(v)).to(tdtype).contiguous()
               for k, v in hf_conversion.params_to_hf_state_dict(params, config).items()}
    save_file(tensors, os.path.join(tmp, 'model.safetensors'),
              metadata={'format': 'pt'})
    if tokenizer_path is not None:
      _save_tokenizer(tokenizer_path, tmp, config)
    if model_card is not None:
      with open(os.path.join(tmp, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(model_card)
    max_diff = _verify_export(tmp, params, config, dtype, atol) if verify else None
    _move_into_place(tmp, out_dir, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {'path': out_dir, 'max_abs_diff': max_diff}


def _save_tokenizer(tokenizer_path: str, target: str, config: ModelConfig):
  """Saves the training tokenizer into `target` and checks it reloads complete.

  `input_pipeline.load_tokenizer` handles bare BERT tokenizer folders that
  transformers v5's AutoTokenizer loads without [MASK]/[PAD]/...; the saved
  copy must reload through AutoTokenizer with the same special tokens, or
  `pipeline("fill-mask")` fails for users.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    tok = input_pipeline.load_tokenizer(tokenizer_path)
  except (OSError, ValueError) as e:
    raise ValueError(f'Could not load tokenizer from {tokenizer_path!r} ({e}); pass a directory '
                     'with tokenizer files (vocab.txt / tokenizer.json).') from e
  if len(tok) > config.vocab_size:
    raise ValueError(
        f'Tokenizer {tokenizer_path!r} has {len(tok)} tokens but the model '
        f'vocab_size is {config.vocab_size}; use the tokenizer the model was '
        f'trained with.')
  if tok.model_max_length > config.max_position_embeddings:  # bare dirs leave it at 1e30
    tok.model_max_length = config.max_position_embeddings
  tok.save_pretrained(target)
  names = ('cls_token_id', 'sep_token_id', 'pad_token_id', 'mask_token_id', 'unk_token_id')
  back = transformers.AutoTokenizer.from_pretrained(target)
  if [getattr(back, n) for n in names] != [getattr(tok, n) for n in names]:
    raise ValueError(f'Export verification failed: the saved tokenizer reloads with special '
                     f'tokens {[getattr(back, n) for n in names]} instead of '
                     f'{[getattr(tok, n) for n in names]}.')


def _move_into_place(tmp: str, out_dir: str, overwrite: bool):
  """Renames tmp -> out_dir; an existing out_dir is swapped out, not merged."""
  if not os.path.exists(out_dir):
    os.rename(tmp, out_dir)
    return
  if not overwrite:
    raise FileExistsError(f'{out_dir} appeared during export; not replacing it.')
  backup = tmp + '.old'  # unique: tmp came from mkdtemp
  os.rename(out_dir, backup)
  try:
    os.rename(tmp, out_dir)
  except BaseException:
    os.rename(backup, out_dir)
    raise
  shutil.rmtree(backup, ignore_errors=True)


def _model_card(meta: dict, step: int, cfg: models.ModelConfig) -> str:
  info, ev = meta.get('info', {}), meta.get('eval', {}) or {}
  arch = 'BERT' if cfg.model_type == 'bert' else 'DistilBERT'
  tag = ('text-classification' if cfg.num_labels else
         'fill-mask' if cfg.with_mlm_head else 'feature-extraction')
  lines = [
      '---', 'library_name: transformers', f'pipeline_tag: {tag}',
      'tags: [distilbert, distillation, flaxdistil]', '---',
      f'# {arch} {"classifier" if cfg.num_labels else "student"} trained with flaxdistil', '',
      f'- Architecture: {arch}, {cfg.num_hidden_layers} layers x {cfg.hidden_size} hidden, '
      f'{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}.',
      f'- Teacher: `{info.get("teacher")}`; student init: `{info.get("student_init")}`.',
      f'- Objective: {json.dumps(info.get("distill", {}))}.',
      f'- Training data: {", ".join(os.path.basename(f) for f in info.get("train_files", []))}.',
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


def _restore_student(workdir: str, step: int | None, with_projection: bool):
  """`(ModelConfig, {'params', 'step'[, 'proj']}, meta)` restored onto one device."""
  meta = checkpointing.read_meta(workdir, step)
  if meta is None:
    root = checkpointing.checkpoint_dir(workdir)
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
    raise FileNotFoundError(f'no checkpoint{"" if step is None else f" for step {step}"} in {root}; '
                            f'available steps: {steps}.')
  scfg = models.ModelConfig(**meta['fingerprint']['student_config'])
  mesh = sharding.create_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'), devices=jax.devices()[:1])
  boxed = models.abstract_params(scfg)
  p_shard = sharding.param_shardings(boxed, mesh, sharding.DEFAULT_LOGICAL_AXIS_RULES)
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  item = {'params': checkpointing.abstract_like(nn.meta.unbox(boxed), p_shard),
          'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=one)}
  projection = meta['fingerprint'].get('projection')
  if with_projection and projection:
    boxed_proj = intermediate.abstract_projection_params(*projection)
    item['proj'] = checkpointing.abstract_like(
        nn.meta.unbox(boxed_proj),
        sharding.param_shardings(boxed_proj, mesh, sharding.DEFAULT_LOGICAL_AXIS_RULES))
  manager = checkpointing.make_manager(workdir, read_only=True, async_save=False)
  restored = checkpointing.restore_latest(manager, item, step=step, partial=True)
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {checkpointing.checkpoint_dir(workdir)}.')
  state, meta = restored
  return scfg, jax.device_get(state), meta


def load_student(workdir: str, step: int | None = None):
  """Restores `(ModelConfig, params, meta, step)` of the student onto one device.

  Only the student's params (and the step) are read, so this works whatever
  the optimizer state or mesh of the run that wrote the checkpoint.

  Raises:
    FileNotFoundError: no checkpoint in `workdir`, or `step` absent.
  """
  scfg, state, meta = _restore_student(workdir, step, with_projection=False)
  return scfg, state['params'], meta, int(state['step'])


def load_student_with_projection(workdir: str, step: int | None = None):
  """`load_student` plus the TinyBERT projections: `(ModelConfig, params, proj, meta, step)`.

  `proj` is `{'embedding': W_e, 'hidden': W_h}` (`intermediate.init_projection_params`
  layout) for a run that trained a student narrower than its teacher, else None.
  """
  scfg, state, meta = _restore_student(workdir, step, with_projection=True)
  return scfg, state['params'], state.get('proj'), meta, int(state['step'])


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = 'float32',
           overwrite: bool = False) -> dict:
  """Exports and verifies; returns `hf_conversion.export_hf`'s report plus `step`."""
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f'--out {out} already exists; choose a new directory or pass --overwrite.')
  scfg, params, meta, step = load_student(workdir, step)
  info = meta.get('info', {})
  report = export_hf(
      params, scfg, out, tokenizer_path=info.get('tokenizer'),
      model_card=_model_card(meta, step, scfg), dtype=dtype, overwrite=overwrite,
      id2label=info.get('id2label'))
  report['step'] = step
  return report


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('--workdir and --out are required.')
  try:
    report = export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                    overwrite=FLAGS.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  logging.info('export report: %s', report)
  print(json.dumps(report, default=str))


if __name__ == '__main__':
  app.run(main)
