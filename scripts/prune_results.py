"""The pruning table of docs/results.md from `python -m flaxdistil.prune` output directories.

  python scripts/prune_results.py runs/prune/a_p0 runs/prune/a_p0.25 runs/prune/a_p0.5 ...

Per directory (its `prune_report.json`): the fractions, heads per layer, FFN width, parameters,
and the held-out metrics of the run's eval set (masked-token accuracy, perplexity, top-1 agreement
with the teacher; dev accuracy / F1 for a GLUE run) of the pruned student before and after the
recovery distillation. The test-set numbers come from `scripts/evaluate.py` on `<dir>/pruned`
and `<dir>/recovery`.
"""

import json
import os
import sys


def _metrics(m: dict) -> str:
  if not m:
    return '- | - | -'
  if 'f1' in m:
    return f"{m['accuracy']:.4f} | F1 {m['f1']:.4f} | {m.get('agreement', float('nan')):.3f}"
  return f"{m['accuracy']:.4f} | {m['perplexity']:.1f} | {m.get('agreement', float('nan')):.3f}"


def table(reports: list[dict]) -> str:
  """Markdown table of `prune_report.json` contents, one row per report."""
  out = ['| heads / FFN pruned | heads per layer | FFN width | params (M) | before recovery: acc | '
         'ppl | agreement | after: acc | ppl | agreement | recovery steps |',
         '|---|---|---|---|---|---|---|---|---|---|---|']
  if reports:
    src = reports[0]['eval']['source']
    out.insert(2, f"| source (step {reports[0]['source']['step']}) | - | "
                  f"{reports[0]['intermediate_size']['before']} | "
                  f"{reports[0]['params']['before'] / 1e6:.2f} | {_metrics(src)} | - | - | - | - |")
  for r in reports:
    f = r['fractions']
    out.append(f"| {f['heads']:.0%} / {f['ffn']:.0%} | {r['heads_per_layer']} | "
               f"{r['intermediate_size']['after']} | {r['params']['after'] / 1e6:.2f} | "
               f"{_metrics(r['eval']['pruned'])} | {_metrics(r['eval'].get('recovered', {}))} | "
               f"{r.get('recovery', {}).get('steps', 0)} |")
  return '\n'.join(out)


def main(dirs):
  reports = []
  for d in dirs:
    with open(os.path.join(d, 'prune_report.json')) as f:
      reports.append(json.load(f))
  print(table(reports))


if __name__ == '__main__':
  main(sys.argv[1:])
