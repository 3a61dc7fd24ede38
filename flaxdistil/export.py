r"""Orbax checkpoint -> verified Hugging Face PyTorch directory (library and CLI).

  python -m flaxdistil.export --workdir DIR [--step N] --out OUT_DIR [--dtype float32] [--onnx]

Restores the student of step N (default: the newest) onto one CPU host (also
for checkpoints written by a sharded multi-device run), writes
`DistilBertForMaskedLM` files (`DistilBertForSequenceClassification` for a
GLUE run, `Bert*` for a fine-tuned BERT teacher: `config.json`,
`model.safetensors`, tokenizer, model card) and, before reporting success,
runs the torch model and the Flax student on the same padded batch and checks
that logits agree (`export_hf`). Nothing is left in OUT_DIR on failure.
`--onnx` then also writes `OUT_DIR/onnx/model.onnx` (fp32) and
`model_quantized.onnx` (int8), verified by `onnx_export.export_onnx`.

Importing this module defines no absl flags (they are defined only when it runs
as the CLI), so it can be imported next to `flaxdistil.main`, which defines
`--workdir` too.
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from flaxdistil import checkpointing
from flaxdistil import console
from flaxdistil import hf_conversion
from flaxdistil import intermediate
from flaxdistil import models
from flaxdistil.models import ModelConfig
from flaxdistil import sharding
from flaxdistil import tokenization

FLAGS = flags.FLAGS

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
  beside ``out_dir`` (published 0644 files, 0755 directories). If ``verify``,
  loads it with ``AutoModelForMaskedLM.from_pretrained(output_loading_info=True)`` (no
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
    move_into_place(tmp, out_dir, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {'path': out_dir, 'max_abs_diff': max_diff}


def _save_tokenizer(tokenizer_path: str, target: str, config: ModelConfig):
  """Saves the training tokenizer into `target` and checks it reloads complete.

  `tokenization.load_tokenizer` handles bare BERT tokenizer folders that
  transformers v5's AutoTokenizer loads without [MASK]/[PAD]/...; the saved
  copy must reload through AutoTokenizer with the same special tokens, or
  `pipeline("fill-mask")` fails for users.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    tok = tokenization.load_tokenizer(tokenizer_path)
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


FILE_MODE, DIR_MODE = 0o644, 0o755


def make_readable(root: str):
  """chmods `root` and everything under it to 0755 (directories) / 0644 (files).

  Exports are built in a `tempfile.mkdtemp` directory (0700) and some writers
  (safetensors' atomic temp file) create 0600 files; an export is meant to be
  shared (served, uploaded, read by another user's job), so it is published
  world-readable regardless of the umask of the process that wrote it.
  """
  os.chmod(root, DIR_MODE)
  for parent, dirs, files in os.walk(root):
    for d in dirs:
      os.chmod(os.path.join(parent, d), DIR_MODE)
    for f in files:
      os.chmod(os.path.join(parent, f), FILE_MODE)


def move_into_place(tmp: str, out_dir: str, overwrite: bool):
  """Makes `tmp` readable (`make_readable`) and renames it to `out_dir`.

  An existing `out_dir` is swapped out (renamed aside, then deleted), never
  merged, so readers see either the old or the new directory.

  Raises:
    FileExistsError: `out_dir` exists and not `overwrite`.
  """
  make_readable(tmp)
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
  if not (hf_conversion.looks_like_local_path(path)
          or os.path.exists(expanded)):
    return path  # a hub name
  if os.path.isabs(expanded):
    return os.path.normpath(expanded)
  tail = [c for c in os.path.normpath(expanded).split(os.sep) if c not in ('.', '..')]
  for a in known_abs:
    if a and os.path.isabs(a) and tail and os.path.normpath(a).split(os.sep)[-len(tail):] == tail:
      return os.path.normpath(a)
  return os.path.abspath(expanded)


def _model_card(meta: dict, step: int, cfg: models.ModelConfig) -> str:
  """README.md text (Hub model card) for a restored run: architecture, teacher, data, metrics.

  Local paths (teacher, training files, dataset directory) are written
  absolute, hub names as given (`_card_path`).
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
           overwrite: bool = False, onnx: bool = False) -> dict:
  """Restores the run in `workdir`, writes and verifies the HF directory `out`.

  Args:
    workdir: training workdir (`checkpoints/`).
    out: output directory (must not exist unless `overwrite`).
    step: checkpoint step; None = the newest readable one.
    dtype: dtype of the stored weights, 'float32' or 'bfloat16'.
    overwrite: replace an existing `out` (swapped, not merged).
    onnx: after the verified HF export, also write `out/onnx/model.onnx` (fp32)
      and `model_quantized.onnx` (int8) with `onnx_export.export_onnx`, which
      verifies onnxruntime against torch and Flax. The HF directory is already
      in place when this runs: an ONNX failure leaves it (verified) and raises.

  Returns:
    `export_hf`'s report (`path`, `max_abs_diff`) plus `step` and, with `onnx`,
    `onnx`: `export_onnx`'s report.

  Raises:
    FileNotFoundError: no checkpoint (for `step`) in `workdir`.
    FileExistsError: `out` exists and not `overwrite`.
    ValueError: verification of the HF or the ONNX export failed.
  """
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f'--out {out} already exists; choose a new directory or pass --overwrite.')
  scfg, params, meta, step = load_student(workdir, step)
  info = meta.get('info', {})
  report = export_hf(
      params, scfg, out, tokenizer_path=info.get('tokenizer'),
      model_card=_model_card(meta, step, scfg), dtype=dtype, overwrite=overwrite,
      id2label=info.get('id2label'))
  report['step'] = step
  if onnx:
    from flaxdistil import onnx_export  # pylint: disable=g-import-not-at-top
    try:
      report['onnx'] = onnx_export.export_onnx(report['path'])
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
      msg = (f'{e} (the verified HF export is in place at {report["path"]}; retry the ONNX '
             f'step alone with `python -m flaxdistil.onnx_export --hf {report["path"]}`)')
      try:  # keep the type (callers and the CLI tell errors apart by it) ...
        error = type(e)(msg)
      except Exception:  # pylint: disable=broad-except  ... unless its constructor differs
        error = RuntimeError(msg)
      raise error from e
  return report


def _define_flags():
  """The CLI's flags; defined only when this module runs as `__main__`.

  `flaxdistil.main` defines `--workdir` too, and absl refuses a second
  definition in one process, so importing the library must not define flags.
  """
  flags.DEFINE_string('workdir', None, 'Training workdir (holds checkpoints/ and config.json).')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest readable one.')
  flags.DEFINE_string('out', None, 'Output directory (must not exist unless --overwrite).')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Dtype of the written weights.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out directory.')
  flags.DEFINE_bool('onnx', False, 'Also write OUT/onnx/model.onnx (fp32) and '
                    'model_quantized.onnx (int8), verified with onnxruntime against torch and Flax.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('--workdir and --out are required.')
  console.quiet_libraries()
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of the checks
  try:
    report = export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                    overwrite=FLAGS.overwrite, onnx=FLAGS.onnx)
  except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(report, default=str))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
