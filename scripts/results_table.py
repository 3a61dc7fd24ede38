"""Prints README's results table from the `summary.json` of finished workdirs.

  python scripts/results_table.py runs/wiki_ablation/a_distil runs/wiki_ablation/b_... ...
"""

import json
import os
import sys


def main(workdirs):
  rows = []
  teacher = None
  for wd in workdirs:
    with open(os.path.join(wd, 'summary.json')) as f:
      s = json.load(f)
    teacher = teacher or (s.get('teacher') or None)
    st = s['student']
    tps = s.get('train_tokens_per_sec')
    rows.append((os.path.basename(wd.rstrip('/')), st['accuracy'], st['perplexity'],
                 st.get('agreement'), s['step'], tps))
  print('| model | masked-token acc | perplexity | top-1 agreement w/ teacher | steps | train tokens/s |')
  print('|---|---|---|---|---|---|')
  if teacher:
    print(f"| teacher | {teacher['accuracy']:.4f} | {teacher['perplexity']:.1f} | - | - | - |")
  for name, acc, ppl, agree, steps, tps in rows:
    agree = '-' if agree is None else f'{agree:.4f}'
    tps = '-' if tps is None else f'{tps:.0f}'
    print(f'| {name} | {acc:.4f} | {ppl:.1f} | {agree} | {steps} | {tps} |')


if __name__ == '__main__':
  main(sys.argv[1:])
