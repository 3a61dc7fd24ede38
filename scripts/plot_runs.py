r"""Several runs side by side: one figure, one line per workdir (ablations, offline vs online).

  python scripts/plot_runs.py --out docs/img/ablation.png runs/wiki_ablation/a_distil \
      runs/wiki_ablation/b_mlm_only runs/wiki_ablation/c_random_init
  python scripts/plot_runs.py --out offline_vs_online.png runs/online runs/offline:k64 ...

Each WORKDIR[:LABEL] is read from its metrics.jsonl (LABEL defaults to the workdir's name). The
panels are those of every run's curves.png (`flaxdistil/training/plots.py`): the total train loss
of each run, each held-out metric (the teacher's value dashed, where scored) and train tokens/s.
"""

import argparse
import os
import sys

from flaxdistil.training import plots


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('workdirs', nargs='+', help='WORKDIR or WORKDIR:LABEL')
  ap.add_argument('--out', required=True, help='the PNG to write')
  ap.add_argument('--title', default='')
  args = ap.parse_args()
  runs = {}
  for spec in args.workdirs:
    wd, _, label = spec.partition(':')
    records = plots.read_metrics(wd)
    if not records:
      sys.exit(f'error: no metrics.jsonl records in {wd!r}; pass training workdirs.')
    runs[label or os.path.basename(os.path.normpath(wd))] = records
  plots.draw(plots.panels(runs), args.out, title=args.title)
  print(args.out)


if __name__ == '__main__':
  main()
