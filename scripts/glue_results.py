"""Prints README's GLUE table from `scripts/glue_distill.sh` outputs.

  python scripts/glue_results.py runs/glue/sst2 runs/glue/mrpc

Per task directory: the dev metrics of `teacher`, `distill` and `finetune` (their
`summary.json`), params, train throughput, and the pipeline("text-classification")
check of each export (`<role>_check.json`: labels equal to the Flax model's).
"""

import json
import os
import sys

ROLES = (('teacher', 'teacher (BERT 4 × 256, fine-tuned)'),
         ('distill', 'student 2 × 256, distilled (soft CE + labels)'),
         ('finetune', 'student 2 × 256, fine-tuned without teacher'))


def _load(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def main(task_dirs):
  print('| task | model | dev acc | dev F1 | agreement w/ teacher | steps | pipeline labels = Flax |')
  print('|---|---|---|---|---|---|---|')
  for d in task_dirs:
    task = os.path.basename(d.rstrip('/'))
    for role, name in ROLES:
      s = _load(os.path.join(d, role, 'summary.json'))
      if s is None:
        continue
      st, chk = s['student'], _load(os.path.join(d, f'{role}_check.json'))
      agree = '-' if 'agreement' not in st else f"{st['agreement']:.3f}"
      pipe = '-' if chk is None else f"{chk['labels_equal']}/{chk['num_examples']}"
      print(f"| {task} | {name} | {st['accuracy']:.4f} | {st.get('f1', float('nan')):.4f} | "
            f"{agree} | {s['step']} | {pipe} |")


if __name__ == '__main__':
  main(sys.argv[1:])
