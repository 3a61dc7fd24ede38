r"""Sentence-embedding report of distilled students vs. their (sentence-transformers) teacher.

  python scripts/embedding_report.py \
      --teacher "$(python -c 'import configs.minilm_wiki as m; print(m.minilm_teacher_dir())')" \
      --json_out runs/minilm/embedding_report.json runs/minilm/l3_h384 runs/minilm/l3_h192

Rows: the teacher, every student WORKDIR (newest checkpoint) and an untrained student (random init,
PRNGKey(0), shape of the first student as wide as the teacher, else of the first WORKDIR). The
sentence embedding is the attention-mask-weighted mean of last-layer hidden states, as
all-MiniLM-L6-v2 (sentence-transformers) defines it: [B, T, H] -> [B, H]. Columns:

  cos         mean cosine(teacher embedding, model embedding) over held-out Wikipedia sentences
              (first --num_sentences sentences of 5..60 words of test.txt). A student narrower than
              the teacher is mapped to the teacher's width by its learned TinyBERT projection W_h
              (`state['proj']['hidden']` in the checkpoint); W_h is affine, so projecting the pooled
              vector equals pooling the projected tokens. No projection -> NaN for other widths.
  sst2_probe  SST-2 dev accuracy (872) of a logistic-regression probe (StandardScaler, C=1,
              lbfgs) on the model's own frozen embeddings (no W_h: the exported student has none)
              of --probe_train SST-2 train sentences (0 = all 67,349; subsample with seed 0).
  sent/s      encoding throughput on SST-2 dev: pre-tokenized, length-sorted batches of
              --batch_size padded to a multiple of 8 tokens, second pass (the first compiles),
              wall clock until `block_until_ready`. Tokenization is excluded.

Prints a markdown table; --json_out also writes the rows and settings as JSON. Cost: every model
encodes all --probe_train sentences; the full report (67,349) took 7 min on 2 idle CPU cores
(teacher 3 min, each 3 x 384 student 1.5 min, the 3 x 192 one 40 s) and about twice that beside a
training run; --probe_train 20000 takes about 3 min.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import time

os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import numpy as np  # pylint: disable=g-import-not-at-top

from flaxdistil.training import checkpointing

_BUCKET = 8         # pad lengths up to a multiple of this: few shapes (<= 16), little padding
_MAX_LEN = 128      # the students' training length
_SENT_SPLIT = re.compile(r'(?<=[.!?])\s+(?=["\'(\[]?[A-Z0-9])')


# ----------------------------------------------------------------------------------------- data
def wiki_sentences(path: str, n: int, min_words: int = 5, max_words: int = 60) -> list[str]:
  """First `n` sentences with min..max words; lines are paragraphs, blank lines end documents."""
  out = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      for s in _SENT_SPLIT.split(line.strip()):
        if min_words <= len(s.split()) <= max_words:
          out.append(s)
          if len(out) == n:
            return out
  return out


def read_sst2(path: str) -> tuple[list[str], np.ndarray]:
  """GLUE SST-2 tsv (header `sentence\tlabel`) -> (sentences, int labels [N])."""
  from flaxdistil.data import glue  # pylint: disable=g-import-not-at-top
  sentences, _, labels = glue.read_tsv(path, glue.TASKS['sst2'])
  return sentences, labels


def tokenize(tok, texts: list[str]) -> list[list[int]]:
  return tok(texts, truncation=True, max_length=_MAX_LEN)['input_ids']


def batches(ids: list[list[int]], batch_size: int, pad_id: int):
  """Yields (row indices, ids [B, T], mask [B, T]) over length-sorted rows.

  B is always `batch_size` (the last batch is filled with all-padding rows) and T a multiple of
  _BUCKET, so each model compiles at most _MAX_LEN / _BUCKET shapes for the whole report.
  """
  order = np.argsort([len(x) for x in ids], kind='stable')
  for s in range(0, len(order), batch_size):
    idx = order[s:s + batch_size]
    t = -(-max(len(ids[i]) for i in idx) // _BUCKET) * _BUCKET
    arr = np.full((batch_size, t), pad_id, np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    for r, i in enumerate(idx):
      arr[r, :len(ids[i])] = ids[i]
      mask[r, :len(ids[i])] = 1
    yield idx, arr, mask


# ----------------------------------------------------------------------------------------- models
def make_encoder(cfg, params):
  """(ids [B, T], mask [B, T]) -> pooled [B, H] (device array), one jit per model.

  Heads are dropped (only embeddings + encoder are needed); params are a jit argument, not a
  closure, so they are not baked into every compiled shape as constants.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from flaxdistil.model import bert  # pylint: disable=g-import-not-at-top
  from flaxdistil.training import evaluation  # pylint: disable=g-import-not-at-top
  model = bert.MaskedLM(dataclasses.replace(cfg, with_mlm_head=False, num_labels=0))
  params = {k: v for k, v in params.items() if k in ('embeddings', 'encoder')}

  @jax.jit
  def encode(p, ids, mask):
    h = model.apply({'params': p}, ids, mask).hidden_states[-1]  # [B, T, H]
    return evaluation.mean_pool(h, mask)                          # [B, H]

  return lambda ids, mask: encode(params, ids, mask)


def embed(encoder, ids: list[list[int]], batch_size: int, pad_id: int) -> np.ndarray:
  """Pooled embeddings [N, H] float32 in the original row order."""
  out, rows = [], []
  for idx, arr, mask in batches(ids, batch_size, pad_id):
    out.append(encoder(arr, mask)[:len(idx)])
    rows.append(idx)
  emb = np.asarray(np.concatenate([np.asarray(o) for o in out]), np.float32)
  res = np.empty_like(emb)
  res[np.concatenate(rows)] = emb
  return res


def load_run(workdir: str):
  """Newest checkpoint of a run -> (ModelConfig, params, proj or None, step), on one device."""
  scfg, params, proj, _, step = checkpointing.load_student_with_projection(workdir)
  return scfg, params, proj, step


def project(pooled: np.ndarray, proj_hidden, teacher_hidden: int) -> np.ndarray:
  """[N, Hs] -> [N, Ht] through W_h (affine, so it commutes with mean pooling)."""
  from flaxdistil.objectives import intermediate  # pylint: disable=g-import-not-at-top
  return np.asarray(intermediate.HiddenProjection(teacher_hidden).apply(
      {'params': proj_hidden}, pooled), np.float32)


# ----------------------------------------------------------------------------------------- metrics
def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over rows of cosine(a_i, b_i); a, b [N, H]."""
  num = np.sum(a * b, axis=1)
  den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  return float(np.mean(num / np.maximum(den, 1e-12)))


def probe_accuracy(x_train, y_train, x_dev, y_dev) -> float:
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
  clf.fit(x_train, y_train)
  return float(clf.score(x_dev, y_dev))


def throughput(encoder, ids, batch_size: int, pad_id: int) -> float:
  """Sentences/s of a second full pass (the first compiles every bucket shape)."""
  import jax  # pylint: disable=g-import-not-at-top
  data = list(batches(ids, batch_size, pad_id))
  for _, arr, mask in data:
    jax.block_until_ready(encoder(arr, mask))
  t0 = time.perf_counter()
  outs = [encoder(arr, mask) for _, arr, mask in data]
  jax.block_until_ready(outs)
  return len(ids) / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------- report
def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('workdirs', nargs='+', help='student run workdirs (newest checkpoint each)')
  ap.add_argument('--teacher', required=True, help='HF teacher dir (also the tokenizer)')
  ap.add_argument('--sst2', default='../shared/data/glue/SST-2')
  ap.add_argument('--wiki_test', default='../shared/data/wikipedia-en-2018/test.txt')
  ap.add_argument('--num_sentences', type=int, default=2000)
  ap.add_argument('--probe_train', type=int, default=0,
                  help='SST-2 train sentences for the probe (0 = all 67,349)')
  ap.add_argument('--batch_size', type=int, default=128)
  ap.add_argument('--json_out', default='')
  args = ap.parse_args()
  import jax  # pylint: disable=g-import-not-at-top

  from flaxdistil.data import tokenization
  from flaxdistil.model import bert
  from flaxdistil.model import hf_conversion  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  tok = tokenization.load_tokenizer(args.teacher)
  pad = tok.pad_token_id
  wiki = tokenize(tok, wiki_sentences(args.wiki_test, args.num_sentences))
  tr_text, tr_y = read_sst2(os.path.join(args.sst2, 'train.tsv'))
  dev_text, dev_y = read_sst2(os.path.join(args.sst2, 'dev.tsv'))
  n_train = len(tr_text)
  if 0 < args.probe_train < len(tr_text):
    keep = np.sort(np.random.default_rng(0).choice(len(tr_text), args.probe_train, replace=False))
    tr_text, tr_y = [tr_text[i] for i in keep], tr_y[keep]
  train_ids, dev_ids = tokenize(tok, tr_text), tokenize(tok, dev_text)

  tcfg, tparams = hf_conversion.load_hf_model(args.teacher, with_mlm_head=False)
  runs = [('teacher', tcfg, tparams, None, None)]
  for wd in args.workdirs:
    scfg, params, proj, step = load_run(wd)
    runs.append((os.path.normpath(wd), scfg, params, proj, step))
  students = [r[1] for r in runs[1:]]
  ucfg = next((c for c in students if c.hidden_size == tcfg.hidden_size), students[0])
  runs.append(('untrained (random init)', ucfg, bert.init_params(ucfg, jax.random.PRNGKey(0)),
               None, 0))

  rows, t_wiki = [], None
  for name, cfg, params, proj, step in runs:
    t0 = time.perf_counter()
    enc = make_encoder(cfg, params)
    e_wiki = embed(enc, wiki, args.batch_size, pad)             # [N, H]
    if t_wiki is None:
      t_wiki = e_wiki                                           # the teacher comes first
    if proj is not None:
      e_wiki = project(e_wiki, proj['hidden'], tcfg.hidden_size)
    cos = mean_cosine(t_wiki, e_wiki) if e_wiki.shape[1] == tcfg.hidden_size else float('nan')
    acc = probe_accuracy(embed(enc, train_ids, args.batch_size, pad), tr_y,
                         embed(enc, dev_ids, args.batch_size, pad), dev_y)
    sps = throughput(enc, dev_ids, args.batch_size, pad)
    rows.append({'model': name, 'step': step, 'layers': cfg.num_hidden_layers,
                 'hidden': cfg.hidden_size, 'params': bert.count_params(params),
                 'projection': proj is not None, 'cos': cos, 'sst2_probe_acc': acc,
                 'sent_per_s': sps, 'seconds': time.perf_counter() - t0})
    print(f'{name}: cos={cos:.4f} sst2={acc:.4f} {sps:.0f} sent/s '
          f'({rows[-1]["seconds"]:.0f}s)', file=sys.stderr, flush=True)

  settings = {'teacher': args.teacher, 'wiki_sentences': len(wiki), 'probe_train': len(tr_y),
              'sst2_dev': len(dev_y), 'batch_size': args.batch_size, 'bucket': _BUCKET,
              'max_len': _MAX_LEN, 'total_seconds': time.perf_counter() - t_start}
  print(f'\nMean-pooled sentence embeddings. cos: mean cosine to the teacher on {len(wiki)} '
        f'held-out Wikipedia sentences (narrow students through W_h). SST-2 probe: logistic '
        f'regression on {len(tr_y)} of {n_train} train sentences (seed 0), dev accuracy '
        f'({len(dev_y)}). params: the student model without W_h. sent/s: SST-2 dev, batch '
        f'{args.batch_size}, {os.cpu_count()} cores, {jax.default_backend()}.\n')
  print('| model | step | layers x hidden | params | cos | SST-2 probe acc | sent/s |')
  print('|---|---:|---|---:|---:|---:|---:|')
  for r in rows:
    step = '' if r['step'] is None else r['step']
    print(f'| {r["model"]} | {step} | {r["layers"]} x {r["hidden"]}'
          f'{" (+W_h)" if r["projection"] else ""} | {r["params"] / 1e6:.1f}M | {r["cos"]:.4f} | '
          f'{r["sst2_probe_acc"]:.4f} | {r["sent_per_s"]:.0f} |')
  if args.json_out:
    with open(args.json_out, 'w') as f:
      clean = [{k: None if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()}
               for r in rows]                                   # NaN is not JSON
      json.dump({'settings': settings, 'rows': clean}, f, indent=1)
  print(f'\n({settings["total_seconds"]:.0f} s)', file=sys.stderr)


if __name__ == '__main__':
  main()
