r"""The README/docs table of `python -m flaxdistil.train_compile` reports (their `--json_out`).

  python scripts/compile_table.py runs/compile/*.json > table.md

One row per report: target, mesh, microbatch per device x microbatches, memory options, per-chip
HBM (XLA's memory analysis, the sum of its kinds) against the chip, fits, the roofline step-time
estimate, tokens/s per chip, MFU, hours for the config's `num_train_steps`, and the compile time
(wall, and CPU seconds where recorded). A `--search` report adds its best row. Every time and rate
is the compiler-based estimate of `training/aot.py`, not a measurement.
"""

import json
import sys

GIB = 1024 ** 3


def _mesh(shape: dict) -> str:
  used = [f'{k} {v}' for k, v in shape.items() if v > 1]
  return ' x '.join(used) or 'one device'


def row(report: dict) -> str:
  """The markdown row of one compile report (a `--search` report: its best row's compile)."""
  if 'rows' in report:  # --search: the best row carries the estimate; its memory total only
    best = report['best']
    if best is None:
      return f"| {report['target']['name']} (search) | nothing fits | | | | | | | | | |"
    est = best['estimate']
    return (f"| {report['target']['name']} (search pick) | {best['layout']} | "
            f"{best['microbatch_per_device']} x {best['num_microbatches']} | {best['variant']} | "
            f"{best['memory_total'] / GIB:.2f} | yes | {est['step_time_s'] * 1e3:,.0f} | "
            f"{est['tokens_per_s_per_chip']:,.0f} | {est['mfu'] * 100:.1f}% | "
            f"{est['run_hours']:.1f} | {sum(r['compiles'] for r in report['rows'])} compiles, "
            f"{sum(r['compile_seconds'] for r in report['rows']):,.0f} s |")
  c, m, est = report['config'], report['memory'], report.get('estimate')
  options = ', '.join(x for x in (
      f"vocab chunks of {c['vocab_chunk_size']}" if c['vocab_chunk_size'] else '',
      'remat' if c['remat'] else '', 'scan' if c.get('scan_layers') else '',
      'offline' if c.get('offline') else '') if x) or 'dense'
  hbm = f"{m['total'] / GIB:.2f}" + (f" / {m['hbm_capacity'] / GIB:.0f}" if m['hbm_capacity']
                                     else '')
  cpu = report.get('compile_cpu_seconds')
  compile_s = f"{report['compile_seconds']:,.0f} s" + (f' ({cpu:,.0f} s CPU)' if cpu else '')
  head = (f"| {report['target']['name']} | {_mesh(c['mesh_shape'])} | "
          f"{c['microbatch_per_device']} x {c['num_microbatches']} | {options} | {hbm} | "
          f"{'yes' if report['fits'] else 'no'} | ")
  if report['fits'] and est:
    return (head + f"{est['step_time_s'] * 1e3:,.0f} | {est['tokens_per_s_per_chip']:,.0f} | "
            f"{est['mfu'] * 100:.1f}% | {est['run_hours']:.1f} | {compile_s} |")
  return head + f"| | | | {compile_s} |"


def table(reports: list[dict]) -> str:
  """The markdown table of `reports` (header first)."""
  lines = ['| target | mesh | microbatch/device x microbatches | options | HBM/chip GiB (sum of '
           'kinds / chip) | fits | est. step ms | est. tokens/s/chip | est. MFU | est. run h '
           '(num_train_steps) | compile |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  return '\n'.join(lines + [row(r) for r in reports])


def main(paths: list[str]) -> None:
  reports = []
  for p in paths:
    with open(p, encoding='utf-8') as f:
      reports.append(json.load(f))
  print(table(reports))


if __name__ == '__main__':
  main(sys.argv[1:])
