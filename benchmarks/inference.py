r"""CPU inference speed of teachers and exported students: torch, onnxruntime, onnxruntime int8.

For every model: parameters, MB on disk (safetensors fp32, ONNX fp32, ONNX int8),
batch-1 latency (p50 / p95 ms over --latency_runs calls after --warmup) and
batch-32 throughput (sequences/s over --throughput_batches batches) at seq 128,
in transformers torch fp32 eager (`torch.inference_mode`, all cores), onnxruntime
fp32 and onnxruntime int8 (`flaxdistil.export.onnx_export`: `torch.onnx.export(dynamo=True)`
+ `quantize_dynamic`). Inputs are random token ids, every position real (no padding).

`--random_shapes bert-base,distilbert-6` adds random-weight models with the
paper's shapes (bert-base-uncased 12 x 768 and DistilBERT 6 x 768, vocab 30522,
sequence-classification heads with 2 labels, as the paper's STS-B CPU timing),
to check DistilBERT's "40% smaller, 60% faster" side by side. Every model is
also compared with the --reference model (default: the first one): params
ratio and speedup per backend.

`--prune_fractions 0.25,0.5,0.75` adds, for every random shape, structurally pruned copies
(`flaxdistil.model.pruning`): that fraction of the heads of every layer (the first ones: with
random weights which heads does not matter for speed) and of the FFN neurons, exported and
verified as `python -m flaxdistil.prune` exports (zero heads, removed again on load by
`torch_models.load_torch_model`, so torch and ONNX run the smaller layers). A pruned student of
`python -m flaxdistil.prune` is benchmarked with --models OUT/recovered_hf.

  # full run, idle machine (~5-10 min on 2 cores; ONNX exports are cached in --work_dir):
  python benchmarks/inference.py --random_shapes bert-base,distilbert-6 \
      --models ../shared/models/bert-mini-wiki-teacher exported/wiki_b exported/mrpc_teacher \
      --json_out benchmarks/inference_cpu.json
  # smoke run:
  python benchmarks/inference.py --models ../shared/models/bert-mini-wiki-teacher \
      --latency_runs 3 --throughput_batches 1 --warmup 1
  # head + FFN pruning of bert-base at 0/25/50/75%:
  python benchmarks/inference.py --random_shapes bert-base --prune_fractions 0.25,0.5,0.75

A model directory's ONNX files are read from `<dir>/onnx/` when present
(`python -m flaxdistil.export.onnx_export --hf DIR`), else exported into --work_dir.
"""

import argparse
import json
import os
import time

import numpy as np

# name -> (transformers config class name, kwargs); vocab 30522 and 512 positions for both.
RANDOM_SHAPES = {
    'bert-base': ('BertConfig', dict(hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072)),
    'distilbert-6': ('DistilBertConfig', dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072)),
}
BACKENDS = ('torch', 'onnxruntime', 'onnxruntime_int8')


def summarize(seconds) -> dict:
  """`{'p50_ms', 'p95_ms', 'mean_ms'}` of per-call wall times in seconds (linear percentiles)."""
  ms = np.asarray(seconds, np.float64) * 1e3
  return {'p50_ms': float(np.percentile(ms, 50)), 'p95_ms': float(np.percentile(ms, 95)),
          'mean_ms': float(ms.mean())}


def throughput(batch_size: int, seconds) -> float:
  """Sequences per second over timed batches of `batch_size` (total sequences / total time)."""
  return batch_size * len(seconds) / float(np.sum(seconds))


def time_calls(fn, n: int, warmup: int) -> list[float]:
  """Wall time in seconds of `n` calls of `fn()` after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def model_names(dirs: list[str]) -> list[str]:
  """A table name per model dir: its basename, or as many trailing path parts as tell it apart.

  `runs/prune/a_p0.5/recovered_hf` and `runs/prune/a_p0.75/recovered_hf` become
  `a_p0.5/recovered_hf` and `a_p0.75/recovered_hf`; a dir given twice keeps its full path.
  """
  parts = [os.path.abspath(d).strip(os.sep).split(os.sep) for d in dirs]
  names = []
  for p in parts:
    k = 1
    while k < len(p) and sum(q[-k:] == p[-k:] for q in parts) > 1:
      k += 1
    names.append('/'.join(p[-k:]))
  return names


def make_random_model(name: str, root: str) -> str:
  """Saves a random-weight `*ForSequenceClassification` with `RANDOM_SHAPES[name]` under root."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if name not in RANDOM_SHAPES:
    raise ValueError(f'--random_shapes {name!r}: choose from {sorted(RANDOM_SHAPES)}.')
  path = os.path.join(root, f'random-{name}')
  if os.path.isfile(os.path.join(path, 'config.json')):
    return path
  cls_name, kw = RANDOM_SHAPES[name]
  config = getattr(transformers, cls_name)(vocab_size=30522, max_position_embeddings=512,
                                           num_labels=2, **kw)
  torch.manual_seed(0)
  transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
  return path


def make_pruned_random_model(name: str, fraction: float, root: str) -> str:
  """`make_random_model(name)` with `fraction` of every layer's heads and FFN neurons removed.

  The first `round(fraction * heads)` heads of each layer and the FFN neurons past
  `round((1 - fraction) * intermediate_size)` go (`pruning.prune`); the result is written with
  `hf_export.export_hf` (verified against Flax) to `<root>/random-<name>-pruned<percent>`.

  Returns:
    The directory (reused when it exists).
  """
  from flaxdistil.export import hf_export  # pylint: disable=g-import-not-at-top
  from flaxdistil.model import hf_conversion  # pylint: disable=g-import-not-at-top
  from flaxdistil.model import pruning  # pylint: disable=g-import-not-at-top
  path = os.path.join(root, f'random-{name}-pruned{round(fraction * 100)}')
  if os.path.isfile(os.path.join(path, 'config.json')):
    return path
  cfg, params = hf_conversion.load_hf_model(make_random_model(name, root))
  layers = cfg.num_hidden_layers
  heads = [tuple(range(round(fraction * cfg.num_attention_heads)))] * layers
  keep = [np.arange(max(1, round((1 - fraction) * cfg.intermediate_size)))] * layers
  pcfg, pparams = pruning.prune(params, cfg, heads, keep)
  hf_export.export_hf(pparams, pcfg, path)
  return path


def onnx_paths(hf_dir: str, work_dir: str) -> tuple[str, str]:
  """(fp32, int8) ONNX files of `hf_dir`: `<hf_dir>/onnx/` if there, else exported to work_dir."""
  from flaxdistil.export import onnx_export  # pylint: disable=g-import-not-at-top
  cached = os.path.join(work_dir, 'onnx-' + os.path.abspath(hf_dir).strip('/').replace('/', '_'))
  for d in (os.path.join(hf_dir, 'onnx'), cached):
    fp32, int8 = os.path.join(d, onnx_export.ONNX_FILE), os.path.join(d, onnx_export.INT8_FILE)
    if os.path.isfile(fp32) and os.path.isfile(int8):
      return fp32, int8
  print(f'  exporting ONNX of {hf_dir} into {cached} ...', flush=True)
  report = onnx_export.export_onnx(hf_dir, cached, overwrite=True)
  return report['onnx'], report['int8']


def bench_model(name: str, hf_dir: str, args) -> dict:
  """One row: params, sizes and per-backend b=1 latency / b=32 throughput."""
  import torch  # pylint: disable=g-import-not-at-top

  from flaxdistil.export import onnx_export  # pylint: disable=g-import-not-at-top
  model, output = onnx_export.load_torch_model(hf_dir)
  fp32, int8 = onnx_paths(hf_dir, args.work_dir)
  names = onnx_export.input_names(model.config)
  rng = np.random.default_rng(0)

  def feeds(batch):  # int64 [batch, seq_len], no padding; token types 0
    ids = rng.integers(1000, model.config.vocab_size, (batch, args.seq_len))
    f = {'input_ids': ids, 'attention_mask': np.ones_like(ids)}
    if 'token_type_ids' in names:
      f['token_type_ids'] = np.zeros_like(ids)
    return f

  one, many = feeds(1), feeds(args.batch_size)
  row = {'model': name, 'path': hf_dir, 'class': type(model).__name__,
         'params': sum(p.numel() for p in model.parameters()),
         'fp32_mb': onnx_export.weights_bytes(hf_dir) / 1e6, 'onnx_mb': os.path.getsize(fp32) / 1e6,
         'int8_mb': os.path.getsize(int8) / 1e6}
  runners = {'torch': None, 'onnxruntime': onnx_export.ort_session(fp32, args.threads),
             'onnxruntime_int8': onnx_export.ort_session(int8, args.threads)}
  for backend, session in runners.items():
    if session is None:
      t_feeds = lambda f: {k: torch.from_numpy(v) for k, v in f.items()}
      one_t, many_t = t_feeds(one), t_feeds(many)

      def run(f, _m=model):
        with torch.inference_mode():
          return _m(**f)

      call_one, call_many = (lambda: run(one_t)), (lambda: run(many_t))
    else:
      call_one = lambda s=session: s.run([output], one)
      call_many = lambda s=session: s.run([output], many)
    print(f'  {name}: {backend} ...', flush=True)
    lat = summarize(time_calls(call_one, args.latency_runs, args.warmup))
    thr = throughput(args.batch_size, time_calls(call_many, args.throughput_batches,
                                                 min(args.warmup, 1)))
    row[backend] = dict(lat, seq_per_s=thr)
  return row


def markdown(rows: list[dict], reference: str, args) -> str:
  """Results table, then ratios against `reference` and int8 / fp32 onnxruntime."""
  b = args.batch_size
  out = [f'seq {args.seq_len}; latency batch 1 (p50 / p95 ms over {args.latency_runs} calls); '
         f'throughput batch {b} (sequences/s over {args.throughput_batches} batches)', '',
         '| model | params (M) | MB fp32 / ONNX / int8 | torch b=1 ms | ORT b=1 ms | '
         f'ORT int8 b=1 ms | torch b={b} seq/s | ORT b={b} seq/s | ORT int8 b={b} seq/s |',
         '|---|---|---|---|---|---|---|---|---|']
  lat = lambda r: f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f}"
  for r in rows:
    out.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['fp32_mb']:.1f} / "
               f"{r['onnx_mb']:.1f} / {r['int8_mb']:.1f} | "
               + ' | '.join(lat(r[k]) for k in BACKENDS) + ' | '
               + ' | '.join(f"{r[k]['seq_per_s']:.1f}" for k in BACKENDS) + ' |')
  ref = next(r for r in rows if r['model'] == reference)
  out += ['', f'Relative to {reference} (params ratio; speedup = reference p50 / model p50, '
          'model seq/s / reference seq/s); int8 = ORT int8 vs ORT fp32 of the same model:', '',
          '| model | params | b=1 speedup torch / ORT / ORT int8 | '
          f'b={b} speedup torch / ORT / ORT int8 | int8 vs fp32 ORT b=1 / b={b} |',
          '|---|---|---|---|---|']
  for r in rows:
    s1 = ' / '.join(f"{ref[k]['p50_ms'] / r[k]['p50_ms']:.2f}x" for k in BACKENDS)
    s32 = ' / '.join(f"{r[k]['seq_per_s'] / ref[k]['seq_per_s']:.2f}x" for k in BACKENDS)
    q = (f"{r['onnxruntime']['p50_ms'] / r['onnxruntime_int8']['p50_ms']:.2f}x / "
         f"{r['onnxruntime_int8']['seq_per_s'] / r['onnxruntime']['seq_per_s']:.2f}x")
    out.append(f"| {r['model']} | {r['params'] / ref['params']:.2f} | {s1} | {s32} | {q} |")
  return '\n'.join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--models', nargs='*', default=[], help='HF model directories')
  ap.add_argument('--random_shapes', default='', help='comma list of ' + ','.join(RANDOM_SHAPES))
  ap.add_argument('--prune_fractions', default='', help='comma list of fractions in (0, 1): '
                  'pruned copies (heads + FFN) of every --random_shapes model')
  ap.add_argument('--reference', default='', help='model name for ratios; default: the first')
  ap.add_argument('--seq_len', type=int, default=128)
  ap.add_argument('--batch_size', type=int, default=32, help='throughput batch')
  ap.add_argument('--latency_runs', type=int, default=50)
  ap.add_argument('--throughput_batches', type=int, default=5)
  ap.add_argument('--warmup', type=int, default=5)
  ap.add_argument('--threads', type=int, default=os.cpu_count(), help='torch and ORT intra-op')
  ap.add_argument('--work_dir', default='/tmp/flaxdistil_bench_inference',
                  help='random-shape models and ONNX exports of dirs without onnx/ (reused)')
  ap.add_argument('--json_out', default='')
  args = ap.parse_args(argv)
  import onnxruntime  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  os.makedirs(args.work_dir, exist_ok=True)
  fractions = [float(f) for f in filter(None, args.prune_fractions.split(','))]
  models = []
  for n in filter(None, args.random_shapes.split(',')):
    models.append((n, make_random_model(n, args.work_dir)))
    models += [(f'{n}-pruned{round(f * 100)}', make_pruned_random_model(n, f, args.work_dir))
               for f in fractions]
  models += list(zip(model_names(args.models), args.models))
  if not models:
    ap.error('give --models DIR [DIR ...] and/or --random_shapes.')
  for _, d in models:
    if not os.path.isfile(os.path.join(d, 'config.json')):
      ap.error(f'{d} is not a Hugging Face model directory (no config.json).')
  load_before = os.getloadavg()
  rows = []
  for name, d in models:
    print(f'benchmarking {name} ({d})', flush=True)
    rows.append(bench_model(name, d, args))
  reference = args.reference or rows[0]['model']
  table = markdown(rows, reference, args)
  print(f'\ntorch {torch.__version__} ({args.threads} threads), onnxruntime '
        f'{onnxruntime.__version__}, transformers {transformers.__version__}; load average '
        f'before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n')
  print(table)
  if args.json_out:
    with open(args.json_out + '.tmp', 'w') as f:
      json.dump({'args': vars(args), 'torch': torch.__version__,
                 'onnxruntime': onnxruntime.__version__, 'transformers': transformers.__version__,
                 'cpu_count': os.cpu_count(), 'loadavg_before': load_before,
                 'loadavg_after': os.getloadavg(), 'rows': rows}, f, indent=1)
    os.replace(args.json_out + '.tmp', args.json_out)


if __name__ == '__main__':
  main()
