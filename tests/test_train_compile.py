"""`python -m flaxdistil.train_compile`: the host's devices, a TPU slice (libtpu), does-not-fit."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from conftest import subprocess_env

# The tiny config made smaller still: the command's compile time is most of these tests' time.
SMALL = ['--config', 'configs/tiny.py', '--config.student.num_hidden_layers=1',
         '--config.teacher.num_hidden_layers=2']


def _run(tmp_path, *args, env=None):
  out = tmp_path / 'report.json'
  r = subprocess.run([sys.executable, '-m', 'flaxdistil.train_compile', *args, '--json_out',
                      str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                     env=env or subprocess_env(1))
  return r, (json.loads(out.read_text()) if out.exists() else None)


def _finite(*xs):
  return all(isinstance(x, (int, float)) and x == x and abs(x) != float('inf') for x in xs)


@pytest.mark.slow
def test_compiles_for_the_hosts_cpu_devices_without_libtpu(tmp_path):
  # JAX_PLATFORMS=cpu: libtpu is never loaded; the report is the host's, with no chip figures.
  r, rep = _run(tmp_path, *SMALL, env=subprocess_env(2, JAX_PLATFORMS='cpu'))
  assert r.returncode == 0, r.stderr[-3000:]
  assert rep['fits'] and rep['target']['platform'] == 'cpu' and rep['target']['devices'] == 2
  assert rep['config']['mesh_shape'] == {'data': 2, 'fsdp': 1, 'tensor': 1}
  assert rep['memory']['total'] > 0 and rep['memory']['hbm_capacity'] is None
  assert rep['estimate'] is None and rep['loops'].count(2) == 1  # the 2 microbatches
  # The compiled program's matmuls per device are the model's share (plain data parallelism).
  f = rep['flops']
  assert f['hlo_matmul_per_chip'] == pytest.approx(f['model_per_chip'], rel=0.05)
  assert 'memory per chip' in r.stdout and 'estimate: none' in r.stdout


@pytest.mark.slow
def test_tiny_config_compiles_for_a_tpu_slice_with_finite_report(tmp_path):
  r, rep = _run(tmp_path, *SMALL, '--topology', 'v5e-4')
  assert r.returncode == 0, r.stderr[-3000:]
  t, m, f, e = rep['target'], rep['memory'], rep['flops'], rep['estimate']
  assert (t['topology'], t['chips'], t['device_kind']) == ('v5e:2x2', 4, 'TPU v5 lite')
  assert rep['fits'] and m['hbm_capacity'] == 16 * 2 ** 30 and 0 < m['total'] < m['hbm_capacity']
  assert _finite(m['argument'], m['temp'], f['model_per_step'], f['hlo_matmul_per_chip'],
                 rep['compile_seconds'], e['step_time_s'], e['tokens_per_s_per_chip'], e['mfu'],
                 e['hours_per_billion_tokens'], e['run_hours'])
  assert f['hlo_matmul_per_chip'] == pytest.approx(f['model_per_chip'], rel=0.05)
  assert 0 < e['mfu'] < 1 and e['step_time_s'] >= max(e['compute_s'], e['memory_s'])
  assert 'roofline' in e['method'] and 'not a measurement' in e['method']
  assert 'Failed to find host bounds' not in r.stderr and 'lockfile' not in r.stderr


@pytest.mark.slow
def test_oversized_config_does_not_fit_exit_3_with_hbm_figures(tmp_path):
  # 2^20 sequences in one microbatch on one v5e chip: tens of GiB of activations.
  r, rep = _run(tmp_path, *SMALL, '--topology', 'v5e-1', '--config.optim.num_microbatches=1',
                '--config.data.global_batch_size=1048576')
  assert r.returncode == 3, r.stderr[-3000:]
  assert 'does not fit on v5e-1' in r.stderr and 'GiB available' in r.stderr
  assert 'Traceback' not in r.stderr
  assert rep['fits'] is False and rep['used_bytes'] > rep['available_bytes'] > 15 * 2 ** 30
  assert 'RESOURCE_EXHAUSTED' in rep['error']


def test_bad_topology_and_config_errors_exit_2(tmp_path):
  r, _ = _run(tmp_path, *SMALL, '--topology', 'v5e-3')
  assert r.returncode == 2 and r.stderr.count('error:') == 1 and '3 chips' in r.stderr
  r, _ = _run(tmp_path, *SMALL, '--topology', 'v5e-8', '--config.data.global_batch_size=12')
  assert r.returncode == 2 and 'batch shards' in r.stderr and 'Traceback' not in r.stderr
  assert not os.path.exists(tmp_path / 'report.json')
