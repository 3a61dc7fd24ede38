"""Benchmark: corpus preprocessing at scale (issue 12). Prints a markdown table and JSON lines.

Corpora are built in a temp dir by concatenating N copies of the Wikipedia train text (52 MB; a
blank line between copies), so "10x" = 520 MB and "36x" = 1.87 GB of text with repeated content
(tokenisation cost is the same as for distinct text). For each size and process count, one
preprocessing (`corpus.build_token_shards`, cold cache) runs in a fresh subprocess that reports
wall time, tokens/s and peak RSS: its own (getrusage; with 1 process the tokenisation runs there)
and the largest worker's (VmHWM recorded by each worker in its shard's json). Then, on the
cache hit: time to open the packed corpus, to the first global batch at step 0, and to the first
batch when resuming at a late step; the disk size of the cache; and for `--train_step_sizes` the
wall time of a whole 1-step `configs/wiki_mini.py` training run on that cache hit. `--old` also runs the
pre-issue-12 in-memory `load_packed_dataset` (taken from git, commit OLD_COMMIT) on the 1x corpus.
Tokenisation runs one Rust thread per process (TOKENIZERS_PARALLELISM=false) so 1 vs 2 processes
measures the process-level scaling; the old path runs as it did (Rust threads on).

  python benchmarks/input_pipeline.py                           # sizes 1,10,36; ~10 min idle
  python benchmarks/input_pipeline.py --sizes 1 --serial_sizes 1  # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from flaxdistil.data import documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
OLD_COMMIT = 'dac76e0'  # last commit with the in-memory packing (one .npy per corpus)


def _rss_mb(who) -> float:
  return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def _child(args) -> None:
  """Runs one measurement in this (fresh) process; prints one JSON object."""
  import numpy as np

  from flaxdistil.data import corpus
  from flaxdistil.data import input_pipeline as ip
  from flaxdistil.data import tokenization
  tok = tokenization.load_tokenizer(args.tokenizer)
  out = {}
  if args.child == 'build':
    t0 = time.perf_counter()
    units = documents.file_units([args.corpus])
    directory = corpus.build_token_shards(units, tok, args.cache, num_proc=args.num_proc)
    out['wall_s'] = time.perf_counter() - t0
    manifest = json.load(open(os.path.join(directory, 'manifest.json')))
    out.update(tokens=manifest['num_tokens'], documents=manifest['num_documents'],
               shards=len(manifest['shards']), directory=directory,
               worker_peak_mb=max(s['peak_rss_mb'] or 0 for s in manifest['shards']))
  elif args.child == 'old':
    import importlib.util
    src = subprocess.run(['git', '-C', ROOT, 'show', f'{OLD_COMMIT}:flaxdistil/input_pipeline.py'],
                         check=True, capture_output=True, text=True).stdout
    path = os.path.join(args.cache, 'old_input_pipeline.py')
    with open(path, 'w') as f:
      f.write(src)
    spec = importlib.util.spec_from_file_location('old_input_pipeline', path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    t0 = time.perf_counter()
    packed = old.load_packed_dataset([args.corpus], tok, 128, cache_dir=args.cache)
    out['wall_s'] = time.perf_counter() - t0
    out['tokens'] = int(np.count_nonzero(packed[:, 1:-1] != tok.pad_token_id))  # incl. doc [SEP]s
    out['bytes'] = sum(os.path.getsize(os.path.join(args.cache, f)) for f in os.listdir(args.cache)
                       if f.endswith('.npy'))
    t0 = time.perf_counter()
    packed = np.load(os.path.join(args.cache, [f for f in os.listdir(args.cache)
                                               if f.endswith('.npy')][0]))
    out['hit_open_s'] = time.perf_counter() - t0
  else:  # 'hit': cache hit, first batch at step 0 and at a late step
    t0 = time.perf_counter()
    packed = ip.load_packed([args.corpus], tok, 128, cache_dir=args.cache)
    out['open_s'] = time.perf_counter() - t0
    kw = dict(global_batch_size=args.batch, seed=0, mask_token_id=tok.mask_token_id,
              vocab_size=len(tok), special_token_ids=tok.all_special_ids, prefetch=0)
    for name, step in (('first_batch_s', 0), ('resume_batch_s', args.resume_step)):
      t0 = time.perf_counter()
      it = ip.BatchIterator(packed, start_step=step, **kw)
      next(it)
      out[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
      next(it)
    out['batch_s'] = (time.perf_counter() - t0) / 10
    out.update(rows=len(packed), epoch_at_resume=args.resume_step * args.batch // len(packed))
  out['rss_self_mb'] = _rss_mb(resource.RUSAGE_SELF)
  print('RESULT ' + json.dumps(out), flush=True)


def _run_child(kind, args, **extra) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--child', kind, '--tokenizer', args.tokenizer,
         '--batch', str(args.batch), '--resume_step', str(args.resume_step)]
  for k, v in extra.items():
    cmd += [f'--{k}', str(v)]
  env = dict(os.environ, HF_HUB_OFFLINE='1')
  if kind != 'old':
    env['TOKENIZERS_PARALLELISM'] = 'false'
  r = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if r.returncode:
    raise RuntimeError(f'{kind} {extra} failed:\n{r.stderr[-3000:]}')
  return json.loads([l for l in r.stdout.splitlines() if l.startswith('RESULT ')][-1][7:])


def _first_train_step(corpus_path, cache, workdir) -> float:
  """Wall seconds of a whole 1-step `configs/wiki_mini.py` run on a cache hit (process start,
  teacher load, data open, jit compile, one step, final checkpoint)."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, '-m', 'flaxdistil.main', '--config', 'configs/wiki_mini.py',
         '--workdir', workdir, f'--config.data.train_files=("{corpus_path}",)',
         '--config.data.eval_files=()', f'--config.data.cache_dir={cache}',
         '--config.num_train_steps=1', '--config.eval_every_steps=0',
         '--config.checkpoint.async_save=False']
  t0 = time.perf_counter()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, HF_HUB_OFFLINE='1'))
  if r.returncode:
    raise RuntimeError(f'train step run failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}')
  shutil.rmtree(workdir, ignore_errors=True)
  return time.perf_counter() - t0


def _du(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _make_corpus(src, copies, directory) -> str:
  path = os.path.join(directory, f'corpus_{copies}x.txt')
  if not os.path.exists(path):
    with open(path, 'wb') as out, open(src, 'rb') as f:
      data = f.read()
      for _ in range(copies):
        out.write(data)
        out.write(b'\n\n')  # keeps the last document of a copy apart from the next copy's first
  return path


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--train_file', default=os.path.join(SHARED, 'data/wikipedia-en-2018/train.txt'))
  ap.add_argument('--tokenizer', default=os.path.join(SHARED, 'models/tokenizer-bert-base-uncased'))
  ap.add_argument('--sizes', default='1,10,36',
                  help='corpus sizes in copies of --train_file (36x = 1.87 GB)')
  ap.add_argument('--procs', default='1,2', help='process counts to run')
  ap.add_argument('--serial_sizes', default='1', help='sizes also run with 1 process (slow)')
  ap.add_argument('--old', type=int, default=1, help='also run the old in-memory path on 1x')
  ap.add_argument('--train_step_sizes', default='36',
                  help='sizes whose cache hit is also timed through a 1-step wiki_mini run')
  ap.add_argument('--batch', type=int, default=4096, help='global batch (sequences of 128)')
  ap.add_argument('--resume_step', type=int, default=10 ** 6)
  ap.add_argument('--tmp', default='', help='scratch dir (default: a new temp dir, removed)')
  ap.add_argument('--out', default='', help='also write the results as JSON here')
  ap.add_argument('--child', default='', help=argparse.SUPPRESS)
  ap.add_argument('--corpus', default='', help=argparse.SUPPRESS)
  ap.add_argument('--cache', default='', help=argparse.SUPPRESS)
  ap.add_argument('--num_proc', type=int, default=1, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    return _child(args)
  tmp = args.tmp or tempfile.mkdtemp(prefix='flaxdistil_bench_')
  os.makedirs(tmp, exist_ok=True)
  sizes = [int(s) for s in args.sizes.split(',')]
  procs = [int(p) for p in args.procs.split(',')]
  serial = {int(s) for s in args.serial_sizes.split(',') if s}
  train_sizes = {int(s) for s in args.train_step_sizes.split(',') if s}
  text_mb = os.path.getsize(args.train_file) / 1e6
  results = []
  try:
    if args.old:
      corpus_path = _make_corpus(args.train_file, 1, tmp)
      cache = os.path.join(tmp, 'old_cache')
      os.makedirs(cache, exist_ok=True)
      r = _run_child('old', args, corpus=corpus_path, cache=cache)
      r.update(path='old in-memory', size=1, text_mb=text_mb, num_proc='threads')
      results.append(r)
      print(json.dumps(r), flush=True)
      shutil.rmtree(cache)
    for size in sizes:
      corpus_path = _make_corpus(args.train_file, size, tmp)
      for p in procs:
        if p == 1 and size not in serial:
          continue
        cache = os.path.join(tmp, f'cache_{size}x_{p}p')
        r = _run_child('build', args, corpus=corpus_path, cache=cache, num_proc=p)
        r.update(path='sharded', size=size, text_mb=os.path.getsize(corpus_path) / 1e6, num_proc=p,
                 bytes=_du(r.pop('directory')))
        r.update(_prefix(_run_child('hit', args, corpus=corpus_path, cache=cache), 'hit_'))
        if size in train_sizes and p == procs[-1]:
          r['hit_train_step_s'] = _first_train_step(corpus_path, cache, os.path.join(tmp, 'run'))
        results.append(r)
        print(json.dumps(r), flush=True)
        shutil.rmtree(cache)
      os.remove(corpus_path)
  finally:
    if not args.tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  _table(results)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)


def _prefix(d, p):
  return {p + k: v for k, v in d.items()}


def _table(results):
  print('\n| path | text | procs | wall s | tokens/s | peak RSS MB (main / workers) | disk MB | '
        'open on hit s | first batch s | resume at step 10^6 s | batch s | 1-step run s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  base = {}
  for r in results:
    tps = r['tokens'] / r['wall_s']
    key = (r['path'], r['size'])
    if r['num_proc'] == 1:
      base[key] = tps
    speed = f' (x{tps / base[key]:.2f})' if r['num_proc'] != 1 and key in base else ''
    hit = lambda k, f='{:.2f}': f.format(r[k]) if k in r else '-'
    workers = f"{r['worker_peak_mb']:.0f}" if r['num_proc'] not in (1, 'threads') else '-'
    print(f"| {r['path']} | {r['text_mb']:.0f} MB | {r['num_proc']} | {r['wall_s']:.1f} | "
          f"{tps / 1e6:.2f} M{speed} | {r['rss_self_mb']:.0f} / {workers} | "
          f"{r['bytes'] / 1e6:.0f} | {hit('hit_open_s', '{:.2f}') if 'hit_open_s' in r else '-'} | "
          f"{hit('hit_first_batch_s')} | "
          f"{hit('hit_resume_batch_s')}{' (epoch %d)' % r['hit_epoch_at_resume'] if 'hit_resume_batch_s' in r else ''} | "
          f"{hit('hit_batch_s', '{:.3f}')} | {hit('hit_train_step_s', '{:.1f}')} |")


if __name__ == '__main__':
  main()
