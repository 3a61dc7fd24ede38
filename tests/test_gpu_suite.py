"""benchmarks/gpu_suite.py: the CPU dry run of the GPU job writes every step's fields, finite; a
step past its budget is killed and the rest still run; wheels install where the steps import
them; the benchmarks import neither datasets nor tensorboardX (absent on the GPU machine)."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import ROOT
from conftest import subprocess_env

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import gpu_suite  # pylint: disable=g-import-not-at-top,wrong-import-position

SUITE = os.path.join(ROOT, 'benchmarks', 'gpu_suite.py')
STEPS = [name for name, _, _ in gpu_suite.plan(gpu_suite.DRY)]
NO_GPU = 'cudnn attention needs an NVIDIA GPU (backend here: cpu)'


def _numbers(tree, path=''):
  """(path, value) of every int/float leaf."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _numbers(v, f'{path}.{k}')
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _numbers(v, f'{path}[{i}]')
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, tree


def _finite_positive(r, *keys):
  for k in keys:
    assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (k, r[k])


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
  """One dry run of the whole plan: (returncode, gpu_suite.json, out dir)."""
  base = tmp_path_factory.mktemp('gpu_suite')
  out = base / 'out'
  env = subprocess_env(1, JAX_COMPILATION_CACHE_DIR=str(base / 'jax_cache'))
  p = subprocess.run([sys.executable, SUITE, '--dry_run', '--out', str(out), '--wheels', '',
                      '--work_dir', str(base / 'work')], env=env, cwd=ROOT, capture_output=True,
                     text=True, timeout=3600)
  assert (out / 'gpu_suite.json').exists(), p.stdout[-4000:] + p.stderr[-4000:]
  return p.returncode, json.loads((out / 'gpu_suite.json').read_text()), out, p.stdout


@pytest.mark.slow
def test_dry_run_every_step_ok_with_finite_fields(dry_run):
  rc, res, out, stdout = dry_run
  assert rc == 0, stdout[-4000:]
  assert res['suite']['mode'] == 'dry_run' and res['suite']['complete']
  assert res['suite']['failed_steps'] == []
  assert list(res['steps']) == STEPS
  issue19 = importlib.util.find_spec('flaxdistil.train_compile') is not None
  for name in STEPS:
    step = res['steps'][name]
    if name == 'compile_check' and not issue19:
      assert step['status'] == 'skipped' and 'train_compile does not exist' in step['reason']
      continue
    assert step['status'] == 'ok', (name, step.get('output_tail'))
    if name == 'compile_check':  # train_compile's own report
      assert step['returncode'] == 0 and step['result']['fits'] is True
      continue
    assert step['result']['complete'] and step['returncode'] == 0
  for path, x in _numbers(res):
    assert math.isfinite(x), path

  env = res['steps']['env']['result']
  assert env['platform'] == 'cpu' and env['versions']['jax']
  _finite_positive(env['bf16_matmul'], 'tflops')

  b64 = res['steps']['distill_b64']['result']
  variants = [(v['vocab_chunk_size'], v['attention_implementation'], v['status'])
              for v in b64['jax_runs']]
  assert variants == [(0, None, 'ok'), (8, None, 'ok'), (0, 'cudnn', 'skipped'),
                      (8, 'cudnn', 'skipped')]
  assert [v.get('reason') for v in b64['jax_runs'][2:]] == [NO_GPU, NO_GPU]
  for v in b64['jax_runs'][:2] + res['steps']['distill_b256']['result']['jax_runs']:
    _finite_positive(v, 'tokens_per_s', 'mfu', 'step_time_s', 'peak_memory_bytes',
                     'hours_per_billion_tokens', 'loss')
    assert v['finite'] and v['status'] == 'ok'
  for r in (b64, res['steps']['distill_b256']['result']):
    assert r['args']['dtype'] == 'bfloat16'
    assert r['torch']['status'] == 'ok'
    _finite_positive(r['torch'], 'tokens_per_s', 'mfu', 'peak_memory_bytes')
    assert all(q > 0 for q in r['jax_runs_over_torch_tokens_per_s'] if q is not None)
  # the same loss whether the vocabulary terms are chunked or not (same step, same batch)
  assert b64['jax_runs'][0]['loss'] == pytest.approx(b64['jax_runs'][1]['loss'], rel=2e-2)

  profile = res['steps']['distill_b64']['profile']
  assert profile['status'] == 'ok' and profile['summary']['num_events'] > 0
  assert (out / profile['file']).stat().st_size == profile['bytes']

  for name in ('offline_b64', 'offline_b256'):
    r = res['steps'][name]['result']['results']
    assert set(r) == {'online', 'offline_k64'}
    for v in r.values():
      _finite_positive(v, 'tokens_per_s', 'step_time_s', 'vs_online')

  recipe = res['steps']['recipe_4096']
  assert recipe['choice']['microbatch'] == 16  # the larger dry step batch ran, so it fits
  (run,) = recipe['result']['jax_runs']
  assert recipe['result']['args']['batch_size'] == 32
  assert recipe['result']['args']['num_microbatches'] == 2
  _finite_positive(run, 'step_time_s', 'tokens_per_s', 'hours_per_billion_tokens')

  parity = res['steps']['attention_parity']['result']['implementations']
  assert parity['cudnn'] == {'status': 'skipped', 'reason': NO_GPU}
  for impl in ('default', 'xla'):
    assert parity[impl]['within_tolerance'], parity[impl]
    _finite_positive(parity[impl], 'forward_ms', 'tokens_per_s')


@pytest.mark.slow
def test_dry_run_outputs_fit_what_the_device_tool_returns(dry_run):
  _, res, out, _ = dry_run
  files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
  assert sorted(os.path.relpath(f, out) for f in files) == [
      'gpu_suite.json', 'gpu_suite.log', 'gpu_table.md', 'profile_distill_b64.tar.gz']
  assert all(os.path.getsize(f) <= 16 * 1024 ** 2 for f in files)
  table = (out / 'gpu_table.md').read_text()
  for label in ('distill_b64 (batch 8)', 'distill_b256 (batch 16)',
                'recipe_4096 (batch 32, 2 microbatches)', 'offline_b64:',
                'attention forward (2 × 64, batch 4 × 32, bfloat16)'):
    assert label in table, table
  assert 'not run' not in table
  log = (out / 'gpu_suite.log').read_text()
  assert all(f'[{name}]' in log for name in STEPS)


def test_a_step_past_its_budget_is_killed_and_the_next_runs(tmp_path, monkeypatch):
  monkeypatch.setattr(gpu_suite, 'DRY', gpu_suite.dataclasses.replace(
      gpu_suite.DRY, timeouts={**{n: 60 for n in STEPS}, 'compile_check': 2, 'wheels': 60}))
  report = tmp_path / 'work' / 'compile_check.json'
  hang = f'{sys.executable} -c "import time; time.sleep(120)"'
  rc = gpu_suite.main(['--dry_run', '--out', str(tmp_path / 'out'), '--wheels', '',
                       '--work_dir', str(tmp_path / 'work'), '--only', 'compile_check',
                       '--compile_check_cmd', hang])
  res = json.loads((tmp_path / 'out' / 'gpu_suite.json').read_text())
  step = res['steps']['compile_check']
  assert rc == 1 and step['status'] == 'timeout' and step['timed_out']
  assert step['seconds'] < 30 and res['suite']['failed_steps'] == ['compile_check']
  assert res['steps']['env'] == {'what': res['steps']['env']['what'], 'status': 'skipped',
                                 'reason': '--only/--skip'}
  # a compile-only report of another tool: its estimates are picked out for the table
  write = (f'{sys.executable} -c "import json; json.dump({{\'hbm\': {{\'total_gib\': 3.5}}, '
           f'\'estimated_step_time_s\': 0.8}}, open(\'{report}\', \'w\'))"')
  rc = gpu_suite.main(['--dry_run', '--out', str(tmp_path / 'out2'), '--wheels', '',
                       '--work_dir', str(tmp_path / 'work'), '--only', 'compile_check',
                       '--compile_check_cmd', write])
  res = json.loads((tmp_path / 'out2' / 'gpu_suite.json').read_text())
  assert rc == 0 and res['steps']['compile_check']['status'] == 'ok'
  assert res['summary']['compile_check']['estimates'] == {'estimated_step_time_s': 0.8}
  assert 'estimated_step_time_s' in (tmp_path / 'out2' / 'gpu_table.md').read_text()


def test_sigterm_to_the_suite_kills_the_running_step_and_keeps_the_results(tmp_path):
  # The device tool ends a job at its timeout: no step may outlive the suite on the GPU.
  pid_file = tmp_path / 'step.pid'
  hang = (f'{sys.executable} -c "import os, time; '
          f'open(\'{pid_file}\', \'w\').write(str(os.getpid())); time.sleep(300)"')
  suite = subprocess.Popen([sys.executable, SUITE, '--dry_run', '--out', str(tmp_path / 'out'),
                            '--wheels', '', '--work_dir', str(tmp_path / 'work'),
                            '--only', 'compile_check', '--compile_check_cmd', hang],
                           cwd=ROOT, env=subprocess_env(1), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
    time.sleep(0.2)
  step_pid = int(pid_file.read_text())
  suite.send_signal(signal.SIGTERM)
  assert suite.wait(timeout=60) == 1
  res = json.loads((tmp_path / 'out' / 'gpu_suite.json').read_text())
  assert res['suite']['interrupted'] == 'SIGTERM' and not res['suite']['complete']
  assert res['steps']['compile_check']['status'] == 'interrupted'
  with pytest.raises(ProcessLookupError):
    os.kill(step_pid, 0)


def _wheel(path, name='gpu_suite_probe', version='0.1'):
  """A minimal pure-Python wheel whose module says where it was imported from."""
  dist = f'{name}-{version}.dist-info'
  files = {f'{name}.py': 'import os\nWHERE = os.path.dirname(__file__)\n',
           f'{dist}/METADATA': f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n',
           f'{dist}/WHEEL': 'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n'
                            'Tag: py3-none-any\n'}
  files[f'{dist}/RECORD'] = ''.join(f'{f},,\n' for f in files) + f'{dist}/RECORD,,\n'
  whl = path / f'{name}-{version}-py3-none-any.whl'
  with zipfile.ZipFile(whl, 'w') as z:
    for f, text in files.items():
      z.writestr(f, text)
  return whl


def test_wheels_install_without_an_index_where_the_steps_import_them(tmp_path):
  wheels = tmp_path / 'wheels'
  wheels.mkdir()
  _wheel(wheels)
  args = gpu_suite.parse_args(['--out', str(tmp_path / 'out'), '--wheels', str(wheels)])
  ctx = gpu_suite.Ctx(args=args, shapes=gpu_suite.DRY, work=str(tmp_path), results={})
  r = gpu_suite.install_wheels(ctx, lambda line: None)
  assert r['status'] == 'ok' and r['wheels'] == ['gpu_suite_probe-0.1-py3-none-any.whl']
  assert '--no-index' in r['argv'] and '--no-deps' in r['argv']
  env = gpu_suite.child_env(r['site'])
  where = subprocess.run([sys.executable, '-c', 'import gpu_suite_probe as m; print(m.WHERE)'],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
  assert where == r['site']
  assert gpu_suite.install_wheels(
      gpu_suite.Ctx(gpu_suite.parse_args(['--out', 'x', '--wheels', str(tmp_path / 'none')]),
                    gpu_suite.DRY, str(tmp_path), {}), print)['status'] == 'skipped'


def test_recipe_takes_the_largest_batch_that_ran_and_its_fastest_variant():
  def distill(*runs):
    return {'result': {'jax_runs': [dict(zip(('vocab_chunk_size', 'attention_implementation',
                                              'status', 'tokens_per_s'), r)) for r in runs]}}
  ctx = gpu_suite.Ctx(None, gpu_suite.GPU, '', {'steps': {
      'distill_b64': distill((0, None, 'ok', 10.0), (0, 'cudnn', 'ok', 30.0)),
      'distill_b256': distill((0, None, 'ok', 20.0), (32, None, 'ok', 25.0))}})
  c = gpu_suite.recipe_choice(ctx)
  assert (c['microbatch'], c['vocab_chunk_size'], c['attention_implementation']) == (256, 32, None)
  ctx.results['steps']['distill_b256'] = distill((0, None, 'failed', None))  # out of memory
  c = gpu_suite.recipe_choice(ctx)
  assert (c['microbatch'], c['vocab_chunk_size'], c['attention_implementation']) == (64, 0, 'cudnn')


def test_benchmarks_import_neither_datasets_nor_tensorboardx():
  # The GPU machine has no datasets, tensorboardX or ml-collections (the one wheel shipped);
  # torch and transformers are imported only inside the PyTorch step.
  code = ('import sys\n'
          'for m in ("datasets", "tensorboardX", "torch", "transformers"):\n'
          '  sys.modules[m] = None  # import raises ImportError\n'
          'sys.path[:0] = ["benchmarks", "."]\n'
          'import distill_step, offline_step, attention_parity, gpu_suite, trace_summary\n'
          'print("ml_collections" in sys.modules)\n')
  p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=subprocess_env(1),
                     capture_output=True, text=True)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.split('\n')[-2] == 'True'  # configs/distilbert.py: the wheel that is shipped
  fetch = open(os.path.join(ROOT, 'benchmarks', 'fetch_gpu_wheels.sh'), encoding='utf-8').read()
  assert 'ml-collections==' in fetch
