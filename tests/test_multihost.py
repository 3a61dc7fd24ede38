"""Two real processes (loopback coordinator, 2 CPU devices each) == one process with 4 devices;
SIGTERM on one host stops both; a killed process stops the other in bounded time, naming it."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from flaxdistil.training import checkpointing

from conftest import ROOT
from conftest import subprocess_env


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices):
  return subprocess_env(devices, JAX_PLATFORMS='cpu')


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  """One uninterrupted 2-process run of LOST (16 steps): (workdir, [out of process 0, 1])."""
  wd = tmp_path_factory.mktemp('two') / 'multi'
  return wd, _finish(_launch(wd, _free_port()))


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(tmp_path, two_processes):
  wd, outs = two_processes
  single = subprocess.run(
      [sys.executable, '-m', 'flaxdistil.main', *LOST, '--workdir', str(tmp_path / 'single')],
      cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  assert 'process 0/2, 2 local / 4 global devices' in outs[0]
  # Only process 0 writes logs.
  assert os.path.exists(wd / 'metrics.jsonl')
  _, p_multi, _, step_m = checkpointing.load_student(str(wd))
  _, p_single, _, step_s = checkpointing.load_student(str(tmp_path / 'single'))
  assert step_m == step_s == 16
  import jax
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p_multi),
                          jax.tree_util.tree_leaves(p_single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_hosts_at_the_same_step(tmp_path):
  import json
  import signal
  import time
  port = _free_port()
  wd = tmp_path / 'multi'
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'flaxdistil.main', '--config', 'configs/tiny.py',
       '--config.num_train_steps=100000', '--config.eval_every_steps=0',
       '--config.log_every_steps=1', '--config.checkpoint_every_steps=100000', '--workdir', str(wd),
       f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  t0 = time.time()
  while time.time() - t0 < 300:
    if os.path.exists(wd / 'metrics.jsonl') and sum(1 for _ in open(wd / 'metrics.jsonl')) >= 3:
      break
    assert all(p.poll() is None for p in procs)
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)  # only the second host is told
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  stopped = [int(o.split('SIGTERM received: checkpoint for step ')[1].split()[0]) for o in outs]
  assert stopped[0] == stopped[1] < 100000
  last = [json.loads(l) for l in open(wd / 'metrics.jsonl')][-1]
  assert last['step'] == stopped[0]
  assert str(stopped[0]) in os.listdir(wd / 'checkpoints')


# ----------------------------------------------------------------------------- a lost process

LOST = ['--config', 'configs/tiny.py', '--config.num_train_steps=16', '--config.eval_every_steps=0',
        '--config.log_every_steps=1', '--config.checkpoint_every_steps=4',
        '--heartbeat_timeout_seconds=20']


def _launch(workdir, port):
  return [subprocess.Popen(
      [sys.executable, '-m', 'flaxdistil.main', *LOST, '--workdir', str(workdir),
       f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _finish(procs):
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _wait_for_step(workdir, step, procs):
  import json
  import time
  t0 = time.time()
  while time.time() - t0 < 600:
    path = workdir / 'metrics.jsonl'
    if path.exists() and any(json.loads(l)['step'] >= step for l in open(path) if l.strip()):
      return
    assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
    time.sleep(0.1)
  raise TimeoutError(step)


@pytest.mark.slow
def test_a_lost_process_stops_the_other_in_bounded_time_and_a_relaunch_resumes_exactly(
    tmp_path, two_processes):
  import time
  wd = tmp_path / 'w'
  procs = _launch(wd, _free_port())
  _wait_for_step(wd, 6, procs)  # past the checkpoint of step 4
  procs[1].kill()  # SIGKILL: the host is gone
  t0 = time.time()
  out = procs[0].communicate(timeout=300)[0]
  waited = time.time() - t0
  procs[1].communicate()
  assert procs[0].returncode == 7, out[-3000:]
  assert waited < 20, waited  # --heartbeat_timeout_seconds bounds the wait
  lines = [l for l in out.splitlines() if l.startswith('error: ')]
  latest = checkpointing.complete_steps(str(wd))[-1]
  assert lines == [
      f'error: lost process 1 of 2 (no heartbeat for 10 s; its host died, was preempted or lost '
      'the network). Process 0 stops now instead of waiting for it forever. fix: relaunch all 2 '
      f'processes with the same command. They resume from step {latest}, the newest complete '
      f'checkpoint in {wd}/checkpoints, and repeat the steps since.'], out[-3000:]
  outs = _finish(_launch(wd, _free_port()))  # the same command, both processes
  assert f'at step {latest}.' in outs[0].split('Resumed from')[1].splitlines()[0]
  _, got, _, step = checkpointing.load_student(str(wd))
  _, want, _, _ = checkpointing.load_student(str(two_processes[0]))  # uninterrupted
  assert step == 16
  import jax
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)  # bit for bit

  # Process 0 lost: it hosts JAX's coordination service, whose client ends process 1 at once.
  wd0 = tmp_path / 'w0'
  procs = _launch(wd0, _free_port())
  _wait_for_step(wd0, 2, procs)
  procs[0].kill()
  t0 = time.time()
  out = procs[1].communicate(timeout=300)[0]
  procs[0].communicate()
  assert procs[1].returncode != 0 and time.time() - t0 < 20, out[-3000:]
  assert ('Terminating process because the JAX distributed service detected fatal errors' in out
          or 'error: lost process 0 of 2' in out), out[-3000:]
