"""Command lines: flags of main / export / onnx_export coexist, --help, console errors offline."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', HF_HUB_OFFLINE='1')
GROUPS = ('teacher', 'student', 'distill', 'data', 'optim', 'mesh', 'checkpoint')


def _run(*args, timeout=180):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


def test_main_export_and_onnx_export_import_in_one_process():
  # main defines --workdir; export used to define it at import too (absl DuplicateFlagError).
  r = _run('-c', 'import flaxdistil.main, flaxdistil.export, flaxdistil.onnx_export\n'
                 'from absl import flags\n'
                 'flags.FLAGS(["prog", "--workdir=/tmp/w", "--config=configs/tiny.py"])\n'
                 'print(flags.FLAGS.workdir, flags.FLAGS.config.num_train_steps)')
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ['/tmp/w', '20']


def test_export_cli_flags_and_errors():
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
