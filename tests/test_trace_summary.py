"""benchmarks/trace_summary.py: device lines first, device time by kernel kind, top events."""

import gzip
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import trace_summary  # pylint: disable=g-import-not-at-top,wrong-import-position


def _trace(path):
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 7, 'args': {'name': 'Stream #13'}},
          {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}}]
  ev = lambda pid, tid, name, dur: {'ph': 'X', 'pid': pid, 'tid': tid, 'name': name, 'ts': 0,
                                    'dur': dur}
  events = meta + [ev(1, 7, 'sm90_xmma_gemm_bf16bf16_bf16f32', 3000),
                   ev(1, 7, 'sm90_xmma_gemm_bf16bf16_bf16f32', 1000),
                   ev(1, 7, 'cudnn_generated_fort_native_sdpa_sm90', 500),
                   ev(1, 7, 'loop_add_fusion', 250), ev(1, 7, 'MemcpyD2D', 100),
                   ev(1, 7, 'mystery_kernel', 50),
                   ev(2, 3, 'PjitFunction(step)', 90000),
                   {'ph': 'i', 'pid': 2, 'tid': 3, 'name': 'instant'}]  # no duration: ignored
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)


def test_device_lines_first_with_kinds_and_top_events(tmp_path):
  run = tmp_path / 'plugins' / 'profile' / '2026_01_01'
  run.mkdir(parents=True)
  _trace(run / 'perfetto_trace.json.gz')
  path = trace_summary.find_trace(str(tmp_path))
  assert path == str(run / 'perfetto_trace.json.gz')
  s = trace_summary.summarise(path, top=2)
  assert s['num_events'] == 7
  gpu, host = s['lines']
  assert (gpu['process'], gpu['thread'], gpu['device'], gpu['events']) == (
      '/device:GPU:0', 'Stream #13', True, 6)
  assert gpu['busy_ms'] == 4.9  # durations are microseconds
  assert gpu['by_kind_ms'] == {'matmul': 4.0, 'attention': 0.5, 'fusion': 0.25, 'copy': 0.1,
                               'other': 0.05}
  assert gpu['top'] == [{'name': 'sm90_xmma_gemm_bf16bf16_bf16f32', 'ms': 4.0, 'count': 2},
                        {'name': 'cudnn_generated_fort_native_sdpa_sm90', 'ms': 0.5, 'count': 1}]
  assert not host['device'] and 'by_kind_ms' not in host and host['busy_ms'] == 90.0
  assert trace_summary.find_trace(str(tmp_path / 'plugins' / 'none')) is None
