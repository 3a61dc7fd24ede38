"""Held-out masked-token metrics of trained students (and their teacher) on any text file.

  python scripts/evaluate.py --files ../shared/data/wikipedia-en-2018/test.txt \
      --teacher ../shared/models/bert-mini-wiki-teacher \
      runs/wiki_ablation/a_distil runs/wiki_ablation/b_mlm_teacher_init ...

Every model is scored on the same packed sequences with the same fixed masking (seed), so the
numbers are paired; prints a markdown table with masked-token accuracy (± binomial standard
error), loss, perplexity, top-1 agreement with the teacher and each student's accuracy minus the
first student's (± the paired standard error of that difference over the same masked tokens).
`--json_out` writes the same numbers and each model's workdir (`scripts/ablation_table.py`).
"""

import argparse
import json
import math
import os

import numpy as np

from flaxdistil.storage import atomic
from flaxdistil.training import checkpointing


def paired_difference(correct: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
  """`(mean, standard error)` of `correct - reference`, per-token 0/1 vectors of equal length.

  The paired standard error `std(d, ddof=1) / sqrt(n)` of `d = correct - reference`: two models
  scored on the same tokens differ by much less noise than two independent binomial s.e.s.
  """
  d = np.asarray(correct, np.float64) - np.asarray(reference, np.float64)
  if d.size < 2:
    return float(d.mean()) if d.size else 0.0, float('nan')
  return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('workdirs', nargs='+')
  ap.add_argument('--files', nargs='+', required=True)
  ap.add_argument('--teacher', required=True, help='HF teacher dir (also gives the tokenizer)')
  ap.add_argument('--tokenizer', default='', help='default: the teacher dir')
  ap.add_argument('--max_seq_length', type=int, default=128)
  ap.add_argument('--num_sequences', type=int, default=0, help='0 = all packed sequences')
  ap.add_argument('--batch_size', type=int, default=64)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--cache_dir', default='', help='token cache (default: $FLAXDISTIL_CACHE or '
                  '~/.cache/flaxdistil)')
  ap.add_argument('--json_out', default='', help='also write the metrics (+ workdirs) as JSON')
  args = ap.parse_args()
  import jax

  from flaxdistil.data import input_pipeline
  from flaxdistil.data import tokenization
  from flaxdistil.model import bert
  from flaxdistil.model import hf_conversion
  from flaxdistil.objectives import IGNORE_INDEX
  from flaxdistil.objectives import positions
  from flaxdistil.training import evaluation

  tok = tokenization.load_tokenizer(args.tokenizer or args.teacher)
  packed = input_pipeline.load_packed(args.files, tok, args.max_seq_length,
                                      cache_dir=args.cache_dir or None)
  batches = input_pipeline.eval_batches(
      packed, args.batch_size, args.seed, args.num_sequences or None,
      mask_token_id=tok.mask_token_id, vocab_size=len(tok),
      special_token_ids=sorted(set(tok.all_special_ids)))
  max_pred = 4 * args.max_seq_length // 10
  # [masked tokens] labels at the positions the eval step scores (its restrict_to_masked)
  labels = [np.asarray(positions.restrict_to_masked(b, max_pred)['labels']) for b in batches]
  tcfg, tparams = hf_conversion.load_hf_model(args.teacher)
  score = lambda cfg, params, ref=None: evaluation.evaluate(
      jax.jit(evaluation.make_eval_step(bert.MaskedLM(cfg), max_pred)), params, batches, ref)
  correct = lambda r: np.concatenate([  # [masked tokens] 1.0 where top-1 = label
      (np.asarray(p) == l)[l != IGNORE_INDEX] for p, l in zip(r['_top1'], labels)])
  teacher = score(tcfg, tparams)
  rows = [('teacher', args.teacher, teacher)]
  for wd in args.workdirs:
    scfg, params, _, step = checkpointing.load_student(wd)
    rows.append((f'{os.path.basename(wd.rstrip("/"))} (step {step})', wd,
                 score(scfg, params, teacher['_top1'])))
  hits = {name: correct(r) for name, _, r in rows}
  if any(len(h) != teacher['num_tokens'] for h in hits.values()):
    raise RuntimeError('per-token correctness does not cover the scored masked tokens')
  ref = rows[1][0] if len(rows) > 1 else None
  print(f'{len(packed) if not args.num_sequences else args.num_sequences} sequences of '
        f'{args.max_seq_length} from {[os.path.basename(f) for f in args.files]}, '
        f'{teacher["num_tokens"]} masked tokens (seed {args.seed})\n')
  print('| model | masked-token acc | loss (nats) | perplexity | top-1 agreement w/ teacher | '
        f'acc − {ref or "-"} (paired s.e.) |')
  print('|---|---|---|---|---|---|')
  out = {}
  for i, (name, wd, r) in enumerate(rows):
    m = {k: v for k, v in r.items() if not k.startswith('_')}
    m['se'] = math.sqrt(r['accuracy'] * (1 - r['accuracy']) / max(r['num_tokens'], 1))
    if i:  # this student's accuracy minus every other student's, paired over the same tokens
      m['paired_acc'] = {o: dict(zip(('diff', 'se'), paired_difference(hits[name], hits[o])))
                         for o, _, _ in rows[1:] if o != name}
    diff = '-'
    if i >= 2:
      m['acc_diff'], m['acc_diff_se'] = m['paired_acc'][ref]['diff'], m['paired_acc'][ref]['se']
      diff = f"{m['acc_diff']:+.4f} ± {m['acc_diff_se']:.4f}"
    agree = f"{r['agreement']:.4f}" if 'agreement' in r else '-'
    print(f"| {name} | {r['accuracy']:.4f} ± {m['se']:.4f} | {r['loss']:.4f} | "
          f"{r['perplexity']:.1f} | {agree} | {diff} |")
    out[name] = dict(m, workdir=wd)
  print(json.dumps(out))
  if args.json_out:
    atomic.write_json(args.json_out, {
        'files': args.files, 'num_sequences': args.num_sequences, 'seed': args.seed,
        'max_seq_length': args.max_seq_length, 'num_masked_tokens': teacher['num_tokens'],
        'models': out})


if __name__ == '__main__':
  main()
