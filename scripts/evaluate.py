"""Held-out masked-token metrics of trained students (and their teacher) on any text file.

  python scripts/evaluate.py --files ../shared/data/wikipedia-en-2018/test.txt \
      --teacher ../shared/models/bert-mini-wiki-teacher \
      runs/wiki_ablation/a_distil runs/wiki_ablation/b_mlm_teacher_init ...

Every model is scored on the same packed sequences with the same fixed masking (seed), so the
numbers are paired; prints a markdown table with masked-token accuracy (± binomial standard
error), loss, perplexity and top-1 agreement with the teacher.
"""

import argparse
import json
import math
import os

from flaxdistil.training import checkpointing


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
  args = ap.parse_args()
  import jax

  from flaxdistil.data import input_pipeline
  from flaxdistil.data import tokenization
  from flaxdistil.model import bert
  from flaxdistil.model import hf_conversion
  from flaxdistil.training import evaluation

  tok = tokenization.load_tokenizer(args.tokenizer or args.teacher)
  packed = input_pipeline.load_packed(args.files, tok, args.max_seq_length,
                                      cache_dir=args.cache_dir or None)
  batches = input_pipeline.eval_batches(
      packed, args.batch_size, args.seed, args.num_sequences or None,
      mask_token_id=tok.mask_token_id, vocab_size=len(tok),
      special_token_ids=sorted(set(tok.all_special_ids)))
  tcfg, tparams = hf_conversion.load_hf_model(args.teacher)
  score = lambda cfg, params, ref=None: evaluation.evaluate(
      jax.jit(evaluation.make_eval_step(bert.MaskedLM(cfg), 4 * args.max_seq_length // 10)),
      params, batches, ref)
  teacher = score(tcfg, tparams)
  rows = [('teacher', teacher)]
  for wd in args.workdirs:
    scfg, params, _, step = checkpointing.load_student(wd)
    rows.append((f'{os.path.basename(wd.rstrip("/"))} (step {step})',
                 score(scfg, params, teacher['_top1'])))
  print(f'{len(packed) if not args.num_sequences else args.num_sequences} sequences of '
        f'{args.max_seq_length} from {[os.path.basename(f) for f in args.files]}, '
        f'{teacher["num_tokens"]} masked tokens (seed {args.seed})\n')
  print('| model | masked-token acc | loss (nats) | perplexity | top-1 agreement w/ teacher |')
  print('|---|---|---|---|---|')
  out = {}
  for name, r in rows:
    se = math.sqrt(r['accuracy'] * (1 - r['accuracy']) / max(r['num_tokens'], 1))
    agree = f"{r['agreement']:.4f}" if 'agreement' in r else '-'
    print(f"| {name} | {r['accuracy']:.4f} ± {se:.4f} | {r['loss']:.4f} | {r['perplexity']:.1f} "
          f"| {agree} |")
    out[name] = {k: v for k, v in r.items() if not k.startswith('_')}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
