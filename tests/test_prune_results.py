"""scripts/prune_results.py: one row per prune_report.json, the source first."""

import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import prune_results  # pylint: disable=g-import-not-at-top,wrong-import-position


def _report(heads, acc_pruned, acc_rec):
  m = lambda acc: {'accuracy': acc, 'perplexity': 50.0, 'agreement': 0.5}
  return {'source': {'step': 400}, 'fractions': {'heads': heads, 'ffn': heads},
          'heads_per_layer': [12 - round(12 * heads)] * 3,
          'intermediate_size': {'before': 1536, 'after': round(1536 * (1 - heads))},
          'params': {'before': 17_200_000, 'after': 15_000_000},
          'eval': {'source': m(0.4), 'pruned': m(acc_pruned), 'recovered': m(acc_rec)},
          'recovery': {'steps': 100}}


def test_rows_per_fraction_after_the_source():
  lines = prune_results.table([_report(0.0, 0.4, 0.41), _report(0.5, 0.2, 0.35)]).splitlines()
  assert lines[2] == '| source (step 400) | - | 1536 | 17.20 | 0.4000 | 50.0 | 0.500 | - | - | - | - |'
  assert lines[4] == ('| 50% / 50% | [6, 6, 6] | 768 | 15.00 | 0.2000 | 50.0 | 0.500 | 0.3500 | '
                      '50.0 | 0.500 | 100 |')
  assert all(l.count('|') == 12 for l in lines)
