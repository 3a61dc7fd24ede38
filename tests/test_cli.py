"""Command lines: flags of main / export / onnx_export coexist, --help, console errors offline;
what they share (flaxdistil/cli.py): multi-host detection and the hub-name fix."""

import subprocess
import sys

import pytest

from flaxdistil import cli

from conftest import ROOT
from conftest import subprocess_env
from conftest import tiny_config

ENV = subprocess_env(1, HF_HUB_OFFLINE='1')  # the commands only start (or fail): 1 device
GROUPS = ('teacher', 'student', 'distill', 'data', 'optim', 'mesh', 'checkpoint')


def _run(*args, timeout=180):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.slow
def test_main_export_and_onnx_export_import_in_one_process():
  # main defines --workdir; export used to define it at import too (absl DuplicateFlagError).
  r = _run('-c', 'import flaxdistil.main, flaxdistil.export, flaxdistil.export.onnx_export\n'
                 'from absl import flags\n'
                 'flags.FLAGS(["prog", "--workdir=/tmp/w", "--config=configs/tiny.py"])\n'
                 'print(flags.FLAGS.workdir, flags.FLAGS.config.num_train_steps)')
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ['/tmp/w', '20']


@pytest.mark.slow
def test_export_cli_flags_and_errors():  # fast tier: the export command line itself
  r = _run('-m', 'flaxdistil.export', '--helpshort')
  for flag in ('--workdir', '--out', '--step', '--dtype', '--overwrite', '--onnx'):
    assert flag in r.stdout + r.stderr, flag
  r = _run('-m', 'flaxdistil.export', '--workdir', '/nonexistent/run', '--out', '/tmp/never')
  assert r.returncode == 2 and r.stderr.count('error:') == 1 and 'no checkpoint' in r.stderr


def test_main_help_lists_every_config_group():
  r = _run('-m', 'flaxdistil.main', '--help')
  lines = (r.stdout + r.stderr).splitlines()
  for group in GROUPS:  # one line per group, the name first
    assert sum(line.split()[:1] == [group] for line in lines) == 1, group


@pytest.mark.slow
def test_hub_name_offline_names_teacher_path_once_and_no_tpu_noise(tmp_path):
  # 'org/name' is refused by setup before the hub is tried; 'name' reaches hf_conversion.
  for name in ('fakeorg/fake-bert-h13', 'fake-bert-h13'):
    r = _run('-m', 'flaxdistil.main', '--config', 'configs/tiny.py', '--workdir',
             str(tmp_path / 'w'), f'--config.teacher.path={name}')
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count(f"'{name}'") >= 1 and r.stderr.count('error:') == 1
    fix = r.stderr.lower()
    assert fix.count('set --config.teacher.path') == 1, r.stderr  # the fix, stated once
    assert 'local directory with config.json and weights' in fix and 'offline' in fix
    assert 'Unable to initialize backend' not in r.stderr


# ----------------------------------------------------------------------------- flaxdistil/cli.py

@pytest.mark.parametrize('environ, multihost', [
    ({}, False),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, False),      # a single-host TPU VM
    ({'TPU_WORKER_HOSTNAMES': 'host-0,host-1'}, True),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, True),
    ({'SLURM_NTASKS': '4'}, True),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, True),
    ({'JAX_COORDINATOR_ADDRESS': ''}, False),            # set but empty
    ({'CUDA_VISIBLE_DEVICES': '0,1'}, False),            # several devices, one process
    ({'SLURM_NTASKS': '1'}, False),                      # a one-task SLURM job
    ({'OMPI_COMM_WORLD_SIZE': '1'}, False),
    ({'TPU_WORKER_HOSTNAMES': '10.0.0.5'}, False),       # a one-worker slice by address
    ({'TPU_WORKER_HOSTNAMES': '', 'SLURM_NTASKS': '2'}, True),  # empty: no say, SLURM decides
])
def test_multihost_detected(environ, multihost):
  assert cli.multihost_detected(environ) is multihost


def test_hub_hint_names_the_key_and_is_empty_for_unrelated_errors(monkeypatch):
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  cfg = tiny_config(**{'teacher.path': 'fake-bert', 'teacher.random_init': False})
  try:
    try:
      raise ConnectionError('Name or service not known')
    except ConnectionError as e:
      raise ValueError("could not fetch 'fake-bert'") from e
  except ValueError as e:
    unreachable = e
  hint = cli.hub_hint(cfg, unreachable)
  assert hint == ("teacher.path='fake-bert' is a Hugging Face Hub name and the Hub is unreachable: "
                  'set --config.teacher.path to a local directory with config.json and weights '
                  '(model.safetensors or pytorch_model.bin).')
  # Unrelated errors, errors that already name the fix, local paths and other values: no hint.
  assert cli.hub_hint(cfg, ValueError('data.global_batch_size=12 is not divisible')) == ''
  assert cli.hub_hint(cfg, ConnectionError("'fake-bert': set --config.teacher.path")) == ''
  assert cli.hub_hint(cfg, ConnectionError("could not fetch 'other-bert'")) == ''
  local = tiny_config(**{'teacher.path': './fake-bert', 'teacher.random_init': False})
  assert cli.hub_hint(local, ConnectionError("could not fetch './fake-bert'")) == ''
  # Offline, a missing 'org/name' directory is the hub name it may be; here data.tokenizer's.
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  tok = tiny_config(**{'data.tokenizer': 'org/tok'})
  hint = cli.hub_hint(tok, FileNotFoundError("data.tokenizer 'org/tok' does not exist"))
  assert hint.startswith("data.tokenizer='org/tok' is a Hugging Face Hub name and the Hub is "
                         'offline (HF_HUB_OFFLINE=1): set --config.data.tokenizer')
  assert hint.endswith('tokenizer.json or vocab.txt.')
  assert cli.hub_hint(tok, ValueError("data.tokenizer 'org/tok' has no [MASK] token")) == ''
