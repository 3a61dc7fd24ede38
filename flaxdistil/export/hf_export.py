"""Flax student -> verified Hugging Face PyTorch directory (`export_hf`), and a run's export.

`export(workdir, out)` restores the student of a checkpoint onto one host (also one written by a
sharded multi-device run, `checkpointing.load_student`) and writes `DistilBertForMaskedLM` files
(`DistilBertForSequenceClassification` for a GLUE run, `Bert*` for a fine-tuned BERT teacher, the
bare `DistilBertModel` for a head-less student): `config.json`, `model.safetensors`, tokenizer and
model card. Before reporting success it runs the torch model and the Flax student on the same
padded batch and checks that their outputs agree; nothing is left in `out` on failure
(`storage.atomic.atomic_directory`). With `onnx=True` it then writes `out/onnx/model.onnx` (fp32)
and `model_quantized.onnx` (int8), verified by `onnx_export.export_onnx`. The command line is
`python -m flaxdistil.export` (`export/__main__.py`).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from flaxdistil.data import tokenization
from flaxdistil.export import model_card
from flaxdistil.export import onnx_export
from flaxdistil.export.torch_models import load_torch_model
from flaxdistil.export.torch_models import remove_pruned_heads
from flaxdistil.model import bert
from flaxdistil.model import hf_conversion
from flaxdistil.model.bert import ModelConfig
from flaxdistil.storage import atomic
from flaxdistil.storage import integrity
from flaxdistil.storage import space
from flaxdistil.training import checkpointing

_TORCH_DTYPES = ('float32', 'bfloat16', 'float16')


def _verify_export(model_dir: str, params, config: ModelConfig, dtype: str,
                   atol: float) -> float:
  """Loads `model_dir` with transformers and compares its outputs to Flax.

  A head-pruned model is compared twice: as `from_pretrained` loads it (zero heads) and with
  those heads removed (`torch_models.remove_pruned_heads`, what the ONNX export runs).

  Returns:
    max |logits(torch) - logits(flax)| over real tokens (last hidden states for
    an encoder), float32; the larger of the two comparisons of a pruned model.

  Raises:
    ValueError: loading problems, the wrong class, or a difference above `atol`.
  """
  try:
    model, _ = load_torch_model(model_dir, remove_pruned=False)
  except ValueError as e:
    raise ValueError(f'Export verification failed: {e}') from e
  max_diff = _compare_with_flax(model, params, config, dtype, atol)
  if config.pruned_heads:
    try:
      remove_pruned_heads(model)
    except ValueError as e:
      raise ValueError(f'Export verification failed: {e}') from e
    max_diff = max(max_diff, _compare_with_flax(model, params, config, dtype, atol))
  return max_diff


def _compare_with_flax(model, params, config: ModelConfig, dtype: str, atol: float) -> float:
  """max |torch - Flax| of the loaded `model` on the fixed padded batch; raises above `atol`."""
  import torch  # pylint: disable=g-import-not-at-top
  suffix = ('ForSequenceClassification' if config.num_labels else
            'ForMaskedLM' if config.with_mlm_head else 'Model')  # encoder only (MiniLM-style)
  want_cls = ('Bert' if config.model_type == 'bert' else 'DistilBert') + suffix
  if type(model).__name__ != want_cls:
    raise ValueError(f'Export verification failed: loaded as '
                     f'{type(model).__name__}, expected {want_cls}.')
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
      bert.unbox(params))
  flax_cfg = dataclasses.replace(config, dtype=jnp.float32, remat=False,
                                 attention_implementation=None, scan_layers=False)
  out = bert.MaskedLM(flax_cfg).apply({'params': stored}, ids, mask)
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
  (``AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained``),
  README.md (``model_card`` text, skipped if None) and ``SHA256SUMS`` over all
  of them (``sha256sum -c`` format; every loader of ours checks it,
  ``hf_conversion.verify_model_dir``) into a temporary directory
  beside ``out_dir`` (published 0644 files, 0755 directories). If ``verify``,
  loads it with ``torch_models.load_torch_model`` (the Auto class of
  ``config.architectures``, ``output_loading_info=True``: no
  missing/unexpected/mismatched keys allowed) and compares float32 outputs on a
  fixed padded batch of 2 rows with the Flax model (max abs diff <= ``atol``,
  over real tokens; class logits per row). Only then is the directory renamed
  to ``out_dir``; on any failure the temporary directory is deleted and
  nothing is left behind.

  Params must be host-local / fully addressable (gather sharded params first).

  Args:
    params: the model's params (host numpy or fully addressable arrays).
    config: its `bert.ModelConfig`.
    out_dir: the directory to create.
    tokenizer_path: the training tokenizer (directory or hub name); None writes none.
    model_card: README.md text (`model_card.model_card`); None writes none.
    dtype: dtype of the stored tensors: 'float32', 'bfloat16' or 'float16'.
    verify: reload and compare with the Flax model before publishing.
    atol: the largest allowed max |torch - Flax| (logits, or last hidden states).
    overwrite: replace an existing `out_dir` (swapped, not merged).
    id2label: `{index: label name}` of a classifier (`setup.Run.info['id2label']`), or None.

  Returns:
    {'path': absolute out_dir, 'max_abs_diff': float or None if not verified}.

  Raises:
    FileExistsError: out_dir exists and overwrite=False, or it is a file.
    DiskFullError: no space for the files (nothing is left behind; the message names the
      directory and about how much the export needs).
    ValueError: unknown dtype, tokenizer_path cannot be loaded, tokenizer larger
      than vocab_size or reloading with other special tokens, or verification failure.
  """
  if dtype not in _TORCH_DTYPES:
    raise ValueError(f'dtype must be one of {_TORCH_DTYPES}, got {dtype!r}.')
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  out_dir = atomic.check_writable_target(out_dir, overwrite)
  itemsize = np.dtype(np.float32).itemsize // (1 if dtype == 'float32' else 2)
  needed = sum(np.size(x) for x in jax.tree_util.tree_leaves(params)) * itemsize + (4 << 20)
  with space.reporting_disk_full(os.path.dirname(out_dir), f'the export {out_dir}', needed,
                                 'run the export again: nothing was left in the output directory.'
                                 ), atomic.atomic_directory(out_dir, overwrite) as tmp:
    hf_config = hf_conversion.config_to_hf(config, id2label)
    hf_config.dtype = dtype
    hf_config.save_pretrained(tmp)
    tdtype = getattr(torch, dtype)
    tensors = {k: torch.from_numpy(np.array(v)).to(tdtype).contiguous()
               for k, v in hf_conversion.params_to_hf_state_dict(params, config).items()}
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    if tokenizer_path is not None:
      _save_tokenizer(tokenizer_path, tmp, config)
    if model_card is not None:
      with open(os.path.join(tmp, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(model_card)
    integrity.write_sums(tmp)  # before the check, which then reads the files through them
    max_diff = _verify_export(tmp, params, config, dtype, atol) if verify else None
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
    CorruptFileError: the checkpoint fails its `SHA256SUMS` (`checkpointing.verify_step`).
    DiskFullError: no space for the HF or the ONNX files (the message names the directory).
    ValueError: an unknown `dtype`, an unloadable tokenizer, or verification of the HF or the
      ONNX export failed.
    RuntimeError: checkpoints exist but none can be read, or the ONNX exporter failed. An
      ONNX-step error keeps its type and names the verified HF directory.
  """
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f'--out {out} already exists; choose a new directory or pass --overwrite.')
  scfg, params, meta, step = checkpointing.load_student(workdir, step)
  info = meta.get('info', {})
  report = export_hf(
      params, scfg, out, tokenizer_path=info.get('tokenizer'),
      model_card=model_card.model_card(meta, step, scfg), dtype=dtype, overwrite=overwrite,
      id2label=info.get('id2label'))
  report['step'] = step
  if onnx:
    try:
      report['onnx'] = onnx_export.export_onnx(report['path'])
    except space.DiskFullError as e:
      raise space.DiskFullError(
          f'{e} (the verified HF export is in place at {report["path"]}; retry the ONNX step '
          f'alone with `python -m flaxdistil.export.onnx_export --hf {report["path"]}`)',
          e.directory, e.needed, e.free) from e
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
      msg = (f'{e} (the verified HF export is in place at {report["path"]}; retry the ONNX '
             f'step alone with `python -m flaxdistil.export.onnx_export --hf {report["path"]}`)')
      try:  # keep the type (callers and the CLI tell errors apart by it) ...
        error = type(e)(msg)
      except Exception:  # pylint: disable=broad-except  ... unless its constructor differs
        error = RuntimeError(msg)
      raise error from e
  return report
