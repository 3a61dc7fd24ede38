r"""Where the time of a traced step goes: a small summary of a `jax.profiler` perfetto trace.

`distill_step.py --profile_dir DIR` traces a few steps with
`jax.profiler.trace(DIR, create_perfetto_trace=True)`, which writes
`DIR/plugins/profile/<run>/perfetto_trace.json.gz` (Chrome trace-event JSON) beside the
`.xplane.pb` that TensorBoard's / XProf's profile plugin opens. This module reads the former with
the standard library only (the GPU machine has no profile plugin) and reports, per trace line
(a process/thread pair: a GPU stream, the "XLA Ops" line, a host thread), the busiest lines'
total time and their top events by summed duration, plus, for device lines, the time by kind of
kernel (matmul, attention, fusion, copy, collective, other) by name patterns.

  python benchmarks/trace_summary.py DIR [--top 15]
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re

# Kernel / HLO op name patterns, first match wins (lower-cased names).
KINDS = (('attention', re.compile(r'fmha|flash|cudnn|attention|sdpa')),
         ('matmul', re.compile(r'gemm|xmma|cutlass|cublas|nvjet|wgmma|\bdot|matmul|convolution')),
         ('collective', re.compile(r'nccl|all-reduce|all-gather|reduce-scatter|all-to-all')),
         ('copy', re.compile(r'memcpy|memset|copy|transpose')),
         ('fusion', re.compile(r'fusion|loop_|input_|reduce|triton|scatter|gather|elementwise')))


def find_trace(profile_dir: str) -> str | None:
  """The newest `perfetto_trace.json.gz` under `profile_dir`, or None."""
  found = glob.glob(os.path.join(profile_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  return max(found, key=os.path.getmtime) if found else None


def kind(name: str) -> str:
  """The kind of a kernel or op name (`KINDS`), 'other' if none matches."""
  low = name.lower()
  return next((k for k, pattern in KINDS if pattern.search(low)), 'other')


def summarise(path: str, top: int = 15, lines: int = 6) -> dict:
  """Summary of a Chrome trace-event file (`.json` or `.json.gz`).

  Args:
    path: the trace file.
    top: events listed per line.
    lines: the busiest trace lines listed (device lines first).

  Returns:
    `{'file', 'num_events', 'lines': [{'process', 'thread', 'device', 'busy_ms', 'events',
    'by_kind_ms' (device lines), 'top': [{'name', 'ms', 'count'}]}]}`, durations in
    milliseconds summed over the traced steps (nested events on one line count twice).

  Raises:
    OSError / ValueError: the file cannot be read or is not trace-event JSON.
  """
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  process, thread = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      process[e.get('pid')] = str(e.get('args', {}).get('name', e.get('pid')))
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      thread[(e.get('pid'), e.get('tid'))] = str(e.get('args', {}).get('name', e.get('tid')))
  per_line = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
  n = 0
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e:
      continue
    n += 1
    cell = per_line[(e.get('pid'), e.get('tid'))][str(e.get('name', '?'))]
    cell[0] += float(e['dur']) / 1e3  # trace-event durations are microseconds
    cell[1] += 1
  out = []
  for (pid, tid), names in per_line.items():
    pname = process.get(pid, str(pid))
    device = '/device:' in pname or 'gpu' in pname.lower() or 'tpu' in pname.lower()
    line = {'process': pname, 'thread': thread.get((pid, tid), str(tid)), 'device': device,
            'busy_ms': round(sum(v[0] for v in names.values()), 3),
            'events': sum(v[1] for v in names.values())}
    if device:
      by_kind = collections.Counter()
      for name, (ms, _) in names.items():
        by_kind[kind(name)] += ms
      line['by_kind_ms'] = {k: round(v, 3) for k, v in by_kind.most_common()}
    line['top'] = [{'name': name[:160], 'ms': round(ms, 3), 'count': c}
                   for name, (ms, c) in sorted(names.items(), key=lambda kv: -kv[1][0])[:top]]
    out.append(line)
  out.sort(key=lambda l: (not l['device'], -l['busy_ms']))
  return {'file': path, 'num_events': n, 'lines': out[:lines]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  p.add_argument('profile_dir', help='a --profile_dir of distill_step.py (or a trace file)')
  p.add_argument('--top', type=int, default=15)
  a = p.parse_args(argv)
  path = a.profile_dir if os.path.isfile(a.profile_dir) else find_trace(a.profile_dir)
  if path is None:
    raise SystemExit(f'no perfetto_trace.json.gz under {a.profile_dir}')
  s = summarise(path, a.top)
  print(f"{s['file']}: {s['num_events']} events")
  for line in s['lines']:
    print(f"\n{line['process']} / {line['thread']}: {line['busy_ms']:.1f} ms busy, "
          f"{line['events']} events" + (f"; by kind (ms): {line['by_kind_ms']}"
                                        if 'by_kind_ms' in line else ''))
    for t in line['top']:
      print(f"  {t['ms']:10.3f} ms  {t['count']:6d} x  {t['name']}")


if __name__ == '__main__':
  main()
