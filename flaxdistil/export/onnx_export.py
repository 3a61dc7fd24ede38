r"""Exported transformers directory -> verified ONNX model (+ int8 dynamic quantization).

  python -m flaxdistil.export.onnx_export --hf exported/b_mlm [--out DIR] [--no_int8] [--overwrite]
  # after the HF export of a run:
  python -m flaxdistil.export --workdir runs/wiki_b --out exported/b_mlm && \
      python -m flaxdistil.export.onnx_export --hf exported/b_mlm

Reads a directory written by `hf_export.export_hf` (or any HF BERT / DistilBERT
`*ForMaskedLM`, `*ForSequenceClassification` or bare encoder directory), exports
the transformers torch model with `torch.onnx.export(dynamo=True)` (the
maintained torch.export-based exporter; the legacy TorchScript tracer bakes the
attention-mask shape logic of transformers v5 into constants and is wrong on
padded batches), with dynamic `batch` and `sequence` axes, and checks the
onnxruntime outputs on a fixed padded batch against the torch model and against
our Flax model loaded from the same directory (max |Δ| <= `atol` for both).
Optionally writes the int8 model of `onnxruntime.quantization.quantize_dynamic`
(int8 weights of MatMul/Gather, activations quantized per call; no calibration
data) and reports its deviation.

Layout (the transformers.js / Hub convention): `<hf_dir>/onnx/model.onnx` and
`<hf_dir>/onnx/model_quantized.onnx` by default; an `--out` outside the HF
directory also gets its config.json and tokenizer files, so it is self-contained.
The directory is written atomically (temporary directory + rename): a failed
export or verification leaves nothing behind. Files are published 0644,
directories 0755. The CLI uses argparse, not absl flags, so this module can be
imported next to `flaxdistil.main` and `flaxdistil.export`.
"""

import argparse
import json
import os
import shutil
import sys
import warnings

import numpy as np
import torch

from flaxdistil.export.torch_models import load_torch_model
from flaxdistil.model import bert
from flaxdistil.model import hf_conversion
from flaxdistil.storage import atomic
from flaxdistil.storage import integrity
from flaxdistil.storage import space

ONNX_FILE = 'model.onnx'
INT8_FILE = 'model_quantized.onnx'
OPSET = 18
# Files copied next to the ONNX models when --out is outside the HF directory.
_SIDE_FILES = ('config.json', 'tokenizer.json', 'tokenizer_config.json', 'vocab.txt',
               'special_tokens_map.json')


def weights_bytes(hf_dir: str) -> int:
  """Bytes of the safetensors / pytorch_model.bin weight files in `hf_dir`.

  Returns:
    Their total size in bytes (0 when there are none).
  """
  return sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)
             if f.endswith('.safetensors') or f == 'pytorch_model.bin')


def input_names(config) -> tuple[str, ...]:
  """ONNX graph inputs, int64 `[batch, sequence]` each; DistilBERT has no token types.

  Args:
    config: the transformers config (`model_type`).

  Returns:
    `('input_ids', 'attention_mask')`, plus `'token_type_ids'` for `model_type == 'bert'`.
  """
  base = ('input_ids', 'attention_mask')
  return base + ('token_type_ids',) if config.model_type == 'bert' else base


def verification_batch(config, batch: int = 2, seq_len: int = 13, seed: int = 1234) -> dict:
  """A fixed padded batch `{name: int64 [batch, seq_len]}`; row 1 padded after half its length.

  Token types are 0 on the first half and 1 on the second (a sentence pair).

  Args:
    config: the transformers config (`vocab_size`, `pad_token_id`, `model_type`).
    batch: rows; with 1, that row is the padded one.
    seq_len: tokens per row.
    seed: of the random token ids (`np.random.default_rng`).

  Returns:
    `{'input_ids', 'attention_mask'}` (+ `'token_type_ids'` for BERT, 0 on padding), padding
    positions holding `pad_token_id`.
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, config.vocab_size, (batch, seq_len))
  mask = np.ones((batch, seq_len), np.int64)
  mask[1 % batch, (seq_len + 1) // 2:] = 0
  out = {'input_ids': np.where(mask == 1, ids, config.pad_token_id or 0).astype(np.int64),
         'attention_mask': mask}
  if config.model_type == 'bert':
    out['token_type_ids'] = (np.arange(seq_len)[None, :] >= seq_len // 2).astype(
        np.int64).repeat(batch, 0) * mask
  return out


def torch_outputs(model, output: str, feeds: dict) -> np.ndarray:
  """float32 numpy `output` of the torch model on int64 numpy `feeds`.

  Args:
    model: a transformers model (`torch_models.load_torch_model`).
    output: the output attribute to read (`'logits'` or `'last_hidden_state'`).
    feeds: `{input name: int64 [B, T]}` (`verification_batch`).

  Returns:
    The output as float32 numpy (`[B, num_labels]`, `[B, T, vocab]` or `[B, T, hidden]`).
  """
  with torch.inference_mode():
    out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
  return getattr(out, output).float().numpy()


def ort_session(path: str, num_threads: int = 0):
  """onnxruntime CPU `InferenceSession` (`num_threads` 0 = onnxruntime's default: all cores).

  Args:
    path: the `.onnx` file.
    num_threads: intra-op threads.

  Returns:
    The session on `CPUExecutionProvider`, logging errors only.

  Raises:
    CorruptFileError: `path` is listed in its directory's `SHA256SUMS` and fails it.
  """
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  directory, name = os.path.split(os.path.abspath(path))
  sums = integrity.read_sums(directory)
  if sums is not None and name in sums:  # a published export (not the one being verified)
    integrity.verify(directory, 'Export it again (python -m flaxdistil.export.onnx_export --hf '
                     'HF_DIR --overwrite).', names=[name], what='ONNX model')
  opts = ort.SessionOptions()
  opts.intra_op_num_threads = num_threads
  opts.log_severity_level = 3  # warnings about unused initializers are noise here
  return ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])


class _Forward(torch.nn.Module):
  """torch.onnx.export wants `forward(tensors) -> tensor`, not a ModelOutput of keywords."""

  def __init__(self, model, output: str):
    super().__init__()
    self.model, self.output = model, output

  def forward(self, input_ids, attention_mask, token_type_ids=None):
    """The model's `output` tensor for these inputs."""
    kw = {} if token_type_ids is None else {'token_type_ids': token_type_ids}
    return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, **kw),
                   self.output)


def _export_fp32(model, output: str, path: str, opset: int):
  names = input_names(model.config)
  # Export on a batch of 2 x 13 so neither axis is specialised to 1 (torch.export
  # treats size-1 dims as static); both dims are then symbolic.
  feeds = verification_batch(model.config)
  args = tuple(torch.from_numpy(feeds[n]) for n in names)
  batch, seq = torch.export.Dim('batch'), torch.export.Dim('sequence')
  with warnings.catch_warnings():
    # Benign for these graphs: every input shares the two named axes, and torch's own pytree
    # code uses a deprecated spelling internally.
    warnings.filterwarnings('ignore', message=r'# The axis name: .* will not be used')
    warnings.filterwarnings('ignore', message=r'`isinstance\(treespec, LeafSpec\)` is deprecated')
    program = torch.onnx.export(
        _Forward(model, output).eval(), args, input_names=list(names), output_names=[output],
        dynamic_shapes={n: {0: batch, 1: seq} for n in names}, opset_version=opset,
        dynamo=True, external_data=False, verbose=False)
  if program is None:
    raise RuntimeError('torch.onnx.export(dynamo=True) returned no program.')
  program.save(path)


def quantize_int8(src: str, dst: str):
  """int8 dynamic quantization of `src` into `dst` (onnxruntime `quantize_dynamic`).

  Weights of MatMul (and the embedding Gather) become symmetric int8
  (`QInt8`, per tensor); activations are quantized to uint8 at run time from
  their observed range (`DynamicQuantizeLinear`), so no calibration data is
  needed. Softmax, LayerNorm and GELU stay float32.

  Args:
    src: the fp32 `.onnx` file.
    dst: the int8 `.onnx` file to write.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnxruntime.quantization import QuantType  # pylint: disable=g-import-not-at-top
  from onnxruntime.quantization import quantize_dynamic  # pylint: disable=g-import-not-at-top
  model = onnx.load(src)
  # The dynamo exporter's intermediate shape annotations can contradict ONNX shape inference
  # (BertForSequenceClassification: "Inferred shape and existing shape differ ... (256) vs (2)"),
  # which the quantizer runs; they are optional, so drop them and let it re-infer.
  del model.graph.value_info[:]
  quantize_dynamic(model, dst, weight_type=QuantType.QInt8)


def flax_outputs(hf_dir: str, output: str, feeds: dict) -> np.ndarray:
  """float32 `output` of our Flax model (`hf_conversion.load_hf_model(hf_dir)`) on `feeds`.

  Args:
    hf_dir: the HF directory (config.json + weights).
    output: `'logits'` or `'last_hidden_state'` (torch's name for the same output).
    feeds: `{input name: int64 [B, T]}` (`verification_batch`).

  Returns:
    float32 numpy: `logits` is `[B, num_labels]` for a classifier and `[B, T, vocab]` for a
    masked LM; `last_hidden_state` is `[B, T, hidden]`.
  """
  config, params = hf_conversion.load_hf_model(hf_dir)
  out = bert.MaskedLM(config).apply({'params': params}, feeds['input_ids'],
                                      feeds['attention_mask'], feeds.get('token_type_ids'))
  if output == 'last_hidden_state':
    return np.asarray(out.hidden_states[-1], np.float32)
  return np.asarray(out.class_logits if config.num_labels else out.logits, np.float32)


def _compare(ref: np.ndarray, got: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
  """(max |Δ| over real tokens (rows for class logits), top-1 agreement) of float outputs."""
  if ref.ndim == 3:  # [B, T, V]: ignore padding positions
    keep = mask.astype(bool)
    ref, got = ref[keep], got[keep]
  return float(np.abs(ref - got).max()), float(np.mean(ref.argmax(-1) == got.argmax(-1)))


def export_onnx(hf_dir: str, out: str | None = None, *, quantize: bool = True,
                opset: int = OPSET, atol: float = 1e-4, overwrite: bool = False,
                check_flax: bool = True) -> dict:
  """Writes `model.onnx` (+ `model_quantized.onnx`) for the transformers model in `hf_dir`.

  Args:
    hf_dir: HF BERT / DistilBERT directory (config.json + weights).
    out: output directory; default `<hf_dir>/onnx`.
    quantize: also write the int8 dynamic-quantized model.
    opset: ONNX opset of the export.
    atol: max |logits(onnxruntime fp32) - logits(torch)| (and, with
      `check_flax`, - logits(Flax)) allowed on the verification batch (real
      tokens only).
    overwrite: replace an existing `out` directory (swapped out, not merged).
    check_flax: also compare onnxruntime with our Flax model loaded from
      `hf_dir` (`hf_conversion.load_hf_model`), the model that was trained.

  Returns:
    `{'path', 'onnx', 'onnx_bytes', 'max_abs_diff', 'max_abs_diff_flax', 'output'}`
    (`max_abs_diff_flax` None without `check_flax`; sizes in bytes) plus, with
    `quantize`, `{'int8', 'int8_bytes', 'int8_max_abs_diff', 'int8_top1_agreement'}`
    (int8 vs torch fp32 on the verification batch; report-only, the quality
    change on real data is `scripts/quantization_quality.py`'s job).

  Raises:
    FileNotFoundError: `hf_dir` missing or not a HF directory.
    FileExistsError: `out` exists and not `overwrite`.
    CorruptFileError: `hf_dir` fails its `SHA256SUMS`.
    DiskFullError: no space for the ONNX files (nothing is left behind).
    ValueError: unsupported model, weights that do not load cleanly, onnxruntime output
      differing from torch (or Flax) by more than `atol`, or a non-finite int8 output
      (nothing is written).
    RuntimeError: `torch.onnx.export` returned no program.
  """
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  out = atomic.check_writable_target(out or os.path.join(hf_dir, 'onnx'), overwrite)
  model, output = load_torch_model(hf_dir)  # checks hf_dir's SHA256SUMS first
  # fp32 graph ~ the fp32 weights, int8 ~ 1/4 of them, and the quantizer's temporary copy
  needed = int(sum(p.numel() for p in model.parameters()) * 4 * (2.5 if quantize else 1.2))
  with space.reporting_disk_full(os.path.dirname(out), f'the ONNX export {out}', needed,
                                 'run the ONNX export again: nothing was left in its output '
                                 'directory.'), atomic.atomic_directory(out, overwrite) as tmp:
    fp32 = os.path.join(tmp, ONNX_FILE)
    _export_fp32(model, output, fp32, opset)
    feeds = verification_batch(model.config)
    ref = torch_outputs(model, output, feeds)
    got = ort_session(fp32).run([output], feeds)[0]
    max_diff, _ = _compare(ref, got, feeds['attention_mask'])
    if not np.isfinite(max_diff) or max_diff > atol:
      raise ValueError(f'ONNX verification failed: max |{output}(onnxruntime) - {output}(torch)| '
                       f'= {max_diff:.3g} > atol {atol:g}. Nothing was written.')
    flax_diff = None
    if check_flax:
      flax_diff, _ = _compare(flax_outputs(hf_dir, output, feeds), got, feeds['attention_mask'])
      if not np.isfinite(flax_diff) or flax_diff > atol:
        raise ValueError(f'ONNX verification failed: max |{output}(onnxruntime) - '
                         f'{output}(flax)| = {flax_diff:.3g} > atol {atol:g}. Nothing was written.')
    report = {'path': out, 'output': output, 'max_abs_diff': max_diff,
              'max_abs_diff_flax': flax_diff,
              'onnx': os.path.join(out, ONNX_FILE), 'onnx_bytes': os.path.getsize(fp32)}
    if quantize:
      int8 = os.path.join(tmp, INT8_FILE)
      quantize_int8(fp32, int8)
      q_diff, q_agree = _compare(ref, ort_session(int8).run([output], feeds)[0],
                                 feeds['attention_mask'])
      if not np.isfinite(q_diff):
        raise ValueError('int8 verification failed: the quantized model outputs non-finite '
                         'values. Nothing was written.')
      report.update(int8=os.path.join(out, INT8_FILE), int8_bytes=os.path.getsize(int8),
                    int8_max_abs_diff=q_diff, int8_top1_agreement=q_agree)
    if os.path.dirname(out) != hf_dir:  # outside the HF dir: make it self-contained
      for name in _SIDE_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)):
          shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
    integrity.write_sums(tmp)  # checked by ort_session before a model is run
  return report


def main(argv=None):
  """The command line: exports, then prints the JSON report of `export_onnx`.

  Args:
    argv: arguments (without the program name); None reads `sys.argv`.

  Raises:
    SystemExit: code 2 when the export fails (`error: ...` on stderr; 4 when the disk is full,
      5 when the HF directory fails its `SHA256SUMS`), argparse's on bad flags.
  """
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--hf', required=True, help='transformers directory (python -m flaxdistil.export)')
  ap.add_argument('--out', default=None, help='output directory; default <hf>/onnx')
  ap.add_argument('--no_int8', action='store_true', help='skip the int8 dynamic-quantized model')
  ap.add_argument('--opset', type=int, default=OPSET)
  ap.add_argument('--atol', type=float, default=1e-4)
  ap.add_argument('--overwrite', action='store_true')
  ap.add_argument('--no_flax_check', action='store_true',
                  help='skip the onnxruntime vs Flax comparison (torch is always compared)')
  args = ap.parse_args(argv)
  try:
    report = export_onnx(args.hf, args.out, quantize=not args.no_int8, opset=args.opset,
                         atol=args.atol, overwrite=args.overwrite,
                         check_flax=not args.no_flax_check)
  except (space.DiskFullError, integrity.CorruptFileError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(e.exit_code)
  except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(report))


if __name__ == '__main__':
  main()
