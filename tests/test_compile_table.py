"""scripts/compile_table.py: one row per train_compile report; a search report gives its pick."""

import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import compile_table  # pylint: disable=g-import-not-at-top,wrong-import-position

GIB = 2 ** 30
EST = {'step_time_s': 0.5, 'tokens_per_s_per_chip': 131072.0, 'mfu': 0.25, 'run_hours': 13.9}


def _report(fits=True, **config):
  c = {'mesh_shape': {'data': 8, 'fsdp': 1, 'tensor': 1}, 'microbatch_per_device': 8,
       'num_microbatches': 64, 'vocab_chunk_size': 0, 'remat': False, 'scan_layers': True,
       'offline': False, **config}
  return {'target': {'name': 'v5e-8'}, 'config': c, 'fits': fits, 'compile_seconds': 120.4,
          'compile_cpu_seconds': 100.0,
          'memory': {'total': 3 * GIB, 'hbm_capacity': 16 * GIB},
          'estimate': EST if fits else None}


def test_rows_of_fitting_and_oversized_steps():
  lines = compile_table.table([_report(), _report(fits=False, remat=True,
                                                  vocab_chunk_size=16)]).splitlines()
  assert lines[2] == ('| v5e-8 | data 8 | 8 x 64 | scan | 3.00 / 16 | yes | 500 | 131,072 | '
                      '25.0% | 13.9 | 120 s (100 s CPU) |')
  assert lines[3].startswith('| v5e-8 | data 8 | 8 x 64 | vocab chunks of 16, remat, scan | '
                             '3.00 / 16 | no |')
  assert all(line.count('|') == 12 for line in lines)


def test_a_search_report_gives_its_best_row_and_its_compiles():
  best = {'layout': 'fsdp', 'microbatch_per_device': 64, 'num_microbatches': 8,
          'variant': 'chunk 16', 'memory_total': 9.5 * GIB, 'estimate': EST, 'compiles': 4,
          'compile_seconds': 600.0}
  rep = {'target': {'name': 'v5e-8'}, 'rows': [best, dict(best, compiles=3)], 'best': best}
  assert compile_table.row(rep) == ('| v5e-8 (search pick) | fsdp | 64 x 8 | chunk 16 | 9.50 | '
                                    'yes | 500 | 131,072 | 25.0% | 13.9 | 7 compiles, '
                                    '1,200 s |')
  assert 'nothing fits' in compile_table.row(dict(rep, best=None))
