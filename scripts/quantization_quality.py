r"""Quality of an exported model in fp32 and int8: torch, onnxruntime, onnxruntime int8, torch int8.

  # masked LM (the README's held-out protocol: first 512 packed valid sequences, seed 0)
  python scripts/quantization_quality.py --hf exported/wiki_b --task mlm \
      --files ../shared/data/wikipedia-en-2018/valid.txt --num_sequences 512
  # GLUE classifier on its dev set
  python scripts/quantization_quality.py --hf exported/sst2_teacher --task sst2 \
      --tsv ../shared/data/glue/SST-2/dev.tsv --max_seq_length 64

Scores the same inputs with four forms of one exported model: transformers torch fp32 (the
reference; `export_hf` verified it against Flax), onnxruntime fp32 and int8
(`--onnx_dir`, default `<hf>/onnx/`, written by `python -m flaxdistil.export.onnx_export --hf DIR` if missing) and torch
dynamic int8 (`torch.ao.quantization.quantize_dynamic` on every `nn.Linear`, qint8 weights).
MLM: masked-token accuracy, loss, perplexity (the data and fixed masking of
`scripts/evaluate.py`); GLUE: accuracy and F1 of label 1. Both: top-1 agreement with torch
fp32 and the change of the main metric against it. Prints a markdown table and one JSON line.
"""

import argparse
import json
import math
import os
import sys

import numpy as np


def torch_int8(model):
  """torch dynamic quantization: qint8 weights of every nn.Linear, fp32 activations."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def mlm_batches(args, tokenizer):
  """`scripts/evaluate.py`'s fixed masked batches, `{input_ids, attention_mask, labels}` int32."""
  from flaxdistil.data import input_pipeline  # pylint: disable=g-import-not-at-top
  packed = input_pipeline.load_packed_dataset(args.files, tokenizer, args.max_seq_length,
                                              cache_dir=args.cache_dir)
  return input_pipeline.eval_batches(
      packed, args.batch_size, args.seed, args.num_sequences or None,
      mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
      special_token_ids=sorted(set(tokenizer.all_special_ids)))


def glue_batches(args, tokenizer):
  """Dev-set batches `{input_ids, attention_mask, token_type_ids, labels}` (labels -100 = fill)."""
  from flaxdistil.data import glue  # pylint: disable=g-import-not-at-top
  split = glue.load_split(args.tsv, glue.get_task(args.task), tokenizer, args.max_seq_length)
  return glue.eval_batches(split, args.batch_size)


def mlm_sums(logits: np.ndarray, batch: dict, reference: np.ndarray) -> np.ndarray:
  """`[nll, correct, agree, count]` over masked positions of one batch.

  `logits: [B, T, vocab] float32`; NLL and accuracy are `losses.mlm_cross_entropy` /
  `losses.accuracy`; agreement compares the top-1 with `reference: [B, T]` (fp32 top-1).
  """
  from flaxdistil.objectives import losses  # pylint: disable=g-import-not-at-top
  masked = batch['labels'] != losses.IGNORE_INDEX
  logits, labels = logits[masked], batch['labels'][masked]  # [N, vocab], [N]: ~15% of tokens
  nll, count = losses.mlm_cross_entropy(logits, labels)
  correct, _ = losses.accuracy(logits, labels)
  agree = np.sum(logits.argmax(-1) == reference[masked])
  return np.array([float(nll), float(correct), float(agree), float(count)])


def mlm_metrics(sums: np.ndarray) -> dict:
  """Masked-token accuracy, loss (nats), perplexity, agreement from summed `mlm_sums`."""
  loss = sums[0] / sums[3]
  return {'accuracy': sums[1] / sums[3], 'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
          'agreement': sums[2] / sums[3], 'num_tokens': int(sums[3])}


def glue_sums(logits: np.ndarray, batch: dict, reference: np.ndarray) -> np.ndarray:
  """`[correct, tp, fp, fn, agree, count]` over the real (labelled) rows of one batch.

  `logits: [B, num_labels] float32`, `reference: [B]` fp32 predictions; F1 is of label 1.
  """
  from flaxdistil.data import glue  # pylint: disable=g-import-not-at-top
  keep = batch['labels'] != glue.IGNORE_INDEX
  pred, ref, labels = logits.argmax(-1)[keep], reference[keep], batch['labels'][keep]
  return np.array([np.sum(pred == labels), np.sum((pred == 1) & (labels == 1)),
                   np.sum((pred == 1) & (labels != 1)), np.sum((pred != 1) & (labels == 1)),
                   np.sum(pred == ref), keep.sum()], np.float64)


def glue_metrics(sums: np.ndarray) -> dict:
  """Accuracy, F1 of label 1 (`glue.f1_from_counts`), agreement from summed `glue_sums`."""
  from flaxdistil.data import glue  # pylint: disable=g-import-not-at-top
  correct, tp, fp, fn, agree, count = sums
  return {'accuracy': correct / count, 'f1': glue.f1_from_counts(tp, fp, fn),
          'agreement': agree / count, 'num_examples': int(count)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--hf', required=True, help='exported transformers directory')
  ap.add_argument('--onnx_dir', default='', help='default <hf>/onnx (exported there if missing)')
  ap.add_argument('--task', required=True, choices=['mlm', 'sst2', 'mrpc'])
  ap.add_argument('--files', nargs='+', help='mlm: text files (held-out)')
  ap.add_argument('--tsv', help='sst2/mrpc: labelled dev.tsv')
  ap.add_argument('--max_seq_length', type=int, default=128)
  ap.add_argument('--num_sequences', type=int, default=512, help='mlm: 0 = all packed sequences')
  ap.add_argument('--batch_size', type=int, default=16)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--cache_dir', default='runs/data_cache')
  ap.add_argument('--json_out', default='')
  args = ap.parse_args()
  if (args.task == 'mlm') != bool(args.files) or (args.task != 'mlm') != bool(args.tsv):
    ap.error('--task mlm needs --files; --task sst2/mrpc needs --tsv.')
  from flaxdistil.data import tokenization  # pylint: disable=g-import-not-at-top
  from flaxdistil.export import onnx_export  # pylint: disable=g-import-not-at-top

  model, output = onnx_export.load_torch_model(args.hf)
  onnx_dir = args.onnx_dir or os.path.join(args.hf, 'onnx')
  if not os.path.isfile(os.path.join(onnx_dir, onnx_export.INT8_FILE)):
    print(json.dumps(onnx_export.export_onnx(args.hf, onnx_dir, overwrite=True)))
  tokenizer = tokenization.load_tokenizer(args.hf)
  batches = (mlm_batches if args.task == 'mlm' else glue_batches)(args, tokenizer)
  names = onnx_export.input_names(model.config)

  def feeds(b):  # int64 graph inputs; token types 0 for unpaired text
    return {n: np.asarray(b.get(n, np.zeros_like(b['input_ids'])), np.int64) for n in names}

  sessions = {k: onnx_export.ort_session(os.path.join(onnx_dir, f))
              for k, f in (('onnxruntime fp32', onnx_export.ONNX_FILE),
                           ('onnxruntime int8', onnx_export.INT8_FILE))}
  runners = {'torch fp32': lambda f: onnx_export.torch_outputs(model, output, f)}
  runners.update({k: (lambda f, s=s: s.run([output], f)[0]) for k, s in sessions.items()})
  q_model = torch_int8(model)
  runners['torch int8 (dynamic)'] = lambda f: onnx_export.torch_outputs(q_model, output, f)
  sums_fn, metric_fn = (mlm_sums, mlm_metrics) if args.task == 'mlm' else (glue_sums, glue_metrics)
  results, reference = {}, []  # reference: torch fp32 top-1 per batch (the first runner)
  for name, run in runners.items():
    print(f'scoring {name} ...', file=sys.stderr, flush=True)
    sums = 0
    for i, b in enumerate(batches):  # one batch of logits in memory at a time
      logits = run(feeds(b))
      if len(reference) < len(batches):
        reference.append(logits.argmax(-1))
      sums = sums + sums_fn(logits, b, reference[i])
    results[name] = metric_fn(sums)

  main_key = 'accuracy'
  base = results['torch fp32'][main_key]
  size = {'torch fp32': onnx_export.weights_bytes(args.hf),
          'onnxruntime fp32': os.path.getsize(os.path.join(onnx_dir, onnx_export.ONNX_FILE)),
          'onnxruntime int8': os.path.getsize(os.path.join(onnx_dir, onnx_export.INT8_FILE))}
  if args.task == 'mlm':
    n = results['torch fp32']['num_tokens']
    print(f'{os.path.basename(args.hf.rstrip("/"))}: {n} masked tokens of the first '
          f'{args.num_sequences or "all"} packed {args.max_seq_length}-token sequences of '
          f'{[os.path.basename(f) for f in args.files]} (seed {args.seed})\n')
    print('| form | MB | masked-token acc | Δ acc (points) | loss (nats) | perplexity | '
          'top-1 agreement w/ fp32 |')
    print('|---|---|---|---|---|---|---|')
    for k, r in results.items():
      mb = f'{size[k] / 1e6:.1f}' if k in size else '-'
      print(f"| {k} | {mb} | {r['accuracy']:.4f} | {100 * (r['accuracy'] - base):+.2f} | "
            f"{r['loss']:.4f} | {r['perplexity']:.2f} | {r['agreement']:.4f} |")
  else:
    print(f'{os.path.basename(args.hf.rstrip("/"))}: {args.task} dev, '
          f'{results["torch fp32"]["num_examples"]} examples, max_seq_length '
          f'{args.max_seq_length}\n')
    print('| form | MB | dev acc | Δ acc (points) | dev F1 | Δ F1 (points) | '
          'agreement w/ fp32 |')
    print('|---|---|---|---|---|---|---|')
    base_f1 = results['torch fp32']['f1']
    for k, r in results.items():
      mb = f'{size[k] / 1e6:.1f}' if k in size else '-'
      print(f"| {k} | {mb} | {r['accuracy']:.4f} | {100 * (r['accuracy'] - base):+.2f} | "
            f"{r['f1']:.4f} | {100 * (r['f1'] - base_f1):+.2f} | {r['agreement']:.4f} |")
  report = {'hf': args.hf, 'task': args.task, 'results': results,
            'bytes': size}
  print(json.dumps(report))
  if args.json_out:
    with open(args.json_out + '.tmp', 'w') as f:
      json.dump(report, f, indent=1)
    os.replace(args.json_out + '.tmp', args.json_out)


if __name__ == '__main__':
  main()
