r"""One GPU job of the numbers flaxdistil exists for: each step in its own process and time budget.

GPU time comes in short windows (about 15 minutes a task, start-up included), so this one command
does the whole measurement in at most ~8 minutes and leaves its results in `--out` (at most a few
small files, as the device tool brings back: 8 files, 16 MiB each, two folders deep):

  gpu_suite.json        everything: metadata (GPU, driver, CUDA/cuDNN, versions, flags), each
                        step's status, time, command, output tail and full result; `summary` holds
                        the headline numbers. Rewritten after every step, so a killed job keeps
                        what it measured.
  gpu_suite.log         every line the steps printed, prefixed by the step's name.
  gpu_table.md          the README table (docs/scaling.md "Throughput benchmark"), filled.
  profile_distill_b64.tar.gz   the jax.profiler trace of 3 steps of the headline step
                        (xplane.pb for XProf / TensorBoard, perfetto_trace.json.gz for
                        ui.perfetto.dev); its summary (busiest lines, time by kernel kind, top
                        kernels) is in gpu_suite.json.

Steps, in order of value (a step whose process runs past its budget is killed, its partial JSON
kept, and the next step starts; a step that would start with too little of `--budget_s` left is
skipped):

  wheels          pip install --no-index --no-deps --target <work>/site .whl/*.whl (first of all;
                  the machine lacks ml-collections: benchmarks/fetch_gpu_wheels.sh builds .whl)
  env             versions, devices, nvidia-smi, jax.print_environment_info, XLA/JAX flags, and
                  the achieved bf16 matmul rate (8192^3) beside the datasheet peak
  distill_b64     distill_step.py bf16, bert-base -> 6 layers, seq 128, batch 64: JAX dense and
                  chunked vocab loss (vocab_chunk_size 0, 32) x attention default / cudnn, vs the
                  PyTorch step (bf16 autocast): tokens/s, MFU vs the bf16 peak, peak memory;
                  + the profile
  distill_b256    the same at batch 256 (attention default only)
  offline_b64     offline_step.py: teacher cache (top-64) vs online teacher forward, batch 64
  offline_b256    the same at batch 256
  recipe_4096     configs/distilbert.py's full step: 4096 sequences with gradient accumulation,
                  microbatch = the largest of 256/64 that ran, the fastest JAX variant there:
                  seconds per step, tokens/s, MFU and hours per billion tokens
  attention_parity  attention_parity.py: explicit vs default vs xla vs cudnn attention (logits,
                  hidden states and gradients; forward time), 4 layers x 768, padded masks
  compile_check   optional: `python -m flaxdistil.train_compile` (issue 19's compile-only check)
                  for the recipe on this GPU, its estimate beside recipe_4096's measured time;
                  skipped while that module does not exist

Launch on the GPU machine (device tool `run`, carry=['.whl'], timeout_s=540):

  python3 benchmarks/gpu_suite.py --out $OUT

CPU dry run of the same plan with tiny shapes (tests/test_gpu_suite.py runs it; cudnn variants are
reported as skipped there):

  python benchmarks/gpu_suite.py --dry_run --out /tmp/gpu_suite_dry

Only the standard library is imported here (and flaxdistil.storage.atomic, which needs no more):
what the steps need is installed by the first step.
"""

import argparse
import collections
import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (HERE, ROOT) if p not in sys.path]

import trace_summary  # noqa: E402  (the sibling module; stdlib only)

from flaxdistil.storage import atomic  # noqa: E402  (stdlib only, like this file)

GIB = 1024 ** 3
MAX_FILE_BYTES = 15 * 1024 ** 2  # the device tool returns files of at most 16 MiB
# What env records: package versions (importlib.metadata, no import) and environment variables.
PACKAGES = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'jax-cuda12-plugin', 'flax',
            'optax', 'orbax-checkpoint', 'chex', 'numpy', 'ml-collections', 'torch', 'transformers',
            'tokenizers', 'pyarrow', 'nvidia-cudnn-cu13', 'nvidia-cublas')
ENV_VARS = ('XLA_FLAGS', 'XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
            'JAX_PLATFORMS', 'JAX_COMPILATION_CACHE_DIR', 'CUDA_VISIBLE_DEVICES',
            'NVIDIA_TF32_OVERRIDE', 'TF_CPP_MIN_LOG_LEVEL', 'PYTHONPATH')


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Everything that differs between the GPU run and the CPU dry run."""
  model: tuple            # distill_step / offline_step model flags
  batches: tuple          # the two step batch sizes
  vocab_chunk: int        # the chunked variant's distill.vocab_chunk_size
  steps: tuple            # (--steps, --warmup, --repeats) of the distill / offline steps
  recipe_batch: int       # configs/distilbert.py data.global_batch_size
  recipe_steps: tuple     # (--steps, --warmup, --repeats) of the recipe step
  parity: tuple           # attention_parity flags
  matmul_n: int           # env: the square bf16 matmul timed
  budget_s: float         # default --budget_s
  timeouts: dict          # step -> seconds


GPU = Shapes(
    model=(), batches=(64, 256), vocab_chunk=32, steps=(10, 2, 2), recipe_batch=4096,
    recipe_steps=(2, 1, 1),
    parity=('--num_hidden_layers', '4', '--batch_size', '64', '--seq_len', '128'),
    matmul_n=8192, budget_s=500,
    timeouts={'wheels': 60, 'env': 60, 'distill_b64': 170, 'distill_b256': 120, 'offline_b64': 75,
              'offline_b256': 75, 'recipe_4096': 100, 'attention_parity': 75, 'compile_check': 90})
DRY = Shapes(
    model=('--hidden_size', '64', '--vocab_size', '512', '--teacher_layers', '2',
           '--student_layers', '1', '--seq_len', '32'),
    batches=(8, 16), vocab_chunk=8, steps=(2, 1, 1), recipe_batch=32, recipe_steps=(1, 1, 1),
    parity=('--hidden_size', '64', '--num_hidden_layers', '2', '--vocab_size', '512',
            '--batch_size', '4', '--seq_len', '32', '--steps', '2', '--repeats', '1'),
    matmul_n=256, budget_s=3600, timeouts=collections.defaultdict(lambda: 900))


class Skip(Exception):
  """A step that does not apply here (the reason is its message)."""


@dataclasses.dataclass
class Ctx:
  """What the steps share: arguments, shapes, directories, the results so far."""
  args: argparse.Namespace
  shapes: Shapes
  work: str
  results: dict

  def json_path(self, step: str) -> str:
    return os.path.join(self.work, f'{step}.json')

  def step_result(self, step: str) -> dict | None:
    return (self.results['steps'].get(step) or {}).get('result')


# ----------------------------------------------------------------------------- the plan

def _script(name: str) -> list[str]:
  return [sys.executable, os.path.join(HERE, name)]


def _step_flags(steps: tuple) -> list[str]:
  return ['--steps', str(steps[0]), '--warmup', str(steps[1]), '--repeats', str(steps[2])]


def plan_env(ctx: Ctx) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), '--probe_env', ctx.json_path('env'),
          '--matmul_n', str(ctx.shapes.matmul_n)]


def plan_distill(batch: int, attention: str, profile: bool):
  def plan(ctx: Ctx) -> list[str]:
    s = ctx.shapes
    argv = _script('distill_step.py') + list(s.model) + [
        '--batch_size', str(batch), '--dtype', 'bfloat16', *_step_flags(s.steps),
        '--vocab_chunk_size', f'0,{s.vocab_chunk}', '--attention_implementation', attention,
        '--json_out', ctx.json_path(f'distill_b{_batch_name(batch, s)}')]
    if ctx.args.no_torch:
      argv.append('--skip_torch')
    if profile:
      argv += ['--profile_dir', os.path.join(ctx.work, 'profile'), '--profile_steps', '3']
    return argv
  return plan


def plan_offline(batch: int):
  def plan(ctx: Ctx) -> list[str]:
    s = ctx.shapes
    return _script('offline_step.py') + list(s.model) + [
        '--batch_size', str(batch), '--dtype', 'bfloat16', '--top_k', '64',
        '--steps', str(s.steps[0]), '--warmup', str(s.steps[1]),
        '--json_out', ctx.json_path(f'offline_b{_batch_name(batch, s)}')]
  return plan


def recipe_choice(ctx: Ctx) -> dict:
  """Microbatch and JAX variant of the recipe step: the largest step batch whose variants ran
  (it fits in memory), and its fastest variant there; the small batch's dense step otherwise."""
  s = ctx.shapes
  for batch in sorted(s.batches, reverse=True):
    r = ctx.step_result(f'distill_b{_batch_name(batch, s)}') or {}
    ok = [v for v in r.get('jax_runs', []) if v.get('status') == 'ok']
    if ok:
      best = max(ok, key=lambda v: v['tokens_per_s'])
      return {'microbatch': batch, 'vocab_chunk_size': best['vocab_chunk_size'],
              'attention_implementation': best.get('attention_implementation'),
              'because': f'fastest JAX variant of distill_b{_batch_name(batch, s)} '
                         f'({best["tokens_per_s"]:,.0f} tokens/s)'}
  return {'microbatch': min(s.batches), 'vocab_chunk_size': 0, 'attention_implementation': None,
          'because': 'no distill step ran: the smallest step batch, dense, default attention'}


def plan_recipe(ctx: Ctx) -> list[str]:
  s, c = ctx.shapes, recipe_choice(ctx)
  ctx.results['steps']['recipe_4096']['choice'] = c
  return _script('distill_step.py') + list(s.model) + [
      '--batch_size', str(s.recipe_batch),
      '--num_microbatches', str(s.recipe_batch // c['microbatch']),
      '--dtype', 'bfloat16', *_step_flags(s.recipe_steps), '--skip_torch',
      '--vocab_chunk_size', str(c['vocab_chunk_size']),
      '--attention_implementation', c['attention_implementation'] or 'default',
      '--json_out', ctx.json_path('recipe_4096')]


def plan_parity(ctx: Ctx) -> list[str]:
  return _script('attention_parity.py') + list(ctx.shapes.parity) + [
      '--dtype', 'bfloat16', '--json_out', ctx.json_path('attention_parity')]


def plan_compile_check(ctx: Ctx) -> list[str]:
  if ctx.args.compile_check_cmd:
    return shlex.split(ctx.args.compile_check_cmd.replace('{json_out}',
                                                          ctx.json_path('compile_check')))
  if importlib.util.find_spec('flaxdistil.train_compile') is None:
    raise Skip('flaxdistil.train_compile does not exist yet (issue 19); pass --compile_check_cmd '
               'to run another compile-only check')
  c = (ctx.results['steps'].get('recipe_4096') or {}).get('choice') or recipe_choice(ctx)
  # The machine has no Hub and no tokenizer files: a WordPiece vocab.txt of bert-base-uncased's
  # size gives the step its shapes (train_compile reads no data).
  tok_dir = os.path.join(ctx.work, 'vocab30522')
  os.makedirs(tok_dir, exist_ok=True)
  with open(os.path.join(tok_dir, 'vocab.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
                      + [f'w{i}' for i in range(30522 - 5)]) + '\n')
  return [sys.executable, '-m', 'flaxdistil.train_compile', '--config',
          os.path.join(ROOT, 'configs', 'distilbert.py'), '--config.dtype=bfloat16',
          '--config.teacher.path=', '--config.teacher.random_init=True',
          f'--config.data.tokenizer={tok_dir}', '--config.data.synthetic=True',
          f'--config.data.global_batch_size={ctx.shapes.recipe_batch}',
          f'--config.optim.num_microbatches={ctx.shapes.recipe_batch // c["microbatch"]}',
          f'--config.distill.vocab_chunk_size={c["vocab_chunk_size"]}',
          '--json_out', ctx.json_path('compile_check')]


def _batch_name(batch: int, shapes: Shapes) -> str:
  """Steps are named after the GPU batch sizes in the dry run too (same JSON keys)."""
  return str(GPU.batches[shapes.batches.index(batch)])


def plan(shapes: Shapes) -> list[tuple[str, Callable[[Ctx], list[str]], str]]:
  """`(step, argv builder, what it measures)` in order of value (after the wheels)."""
  b_small, b_large = shapes.batches
  return [
      ('env', plan_env, 'versions, devices, flags, achieved bf16 matmul rate'),
      ('distill_b64', plan_distill(b_small, 'default,cudnn', profile=True),
       'JAX dense/chunked x default/cudnn attention vs PyTorch, batch 64 (+ profile)'),
      ('distill_b256', plan_distill(b_large, 'default', profile=False),
       'JAX dense/chunked vs PyTorch, batch 256'),
      ('offline_b64', plan_offline(b_small), 'teacher cache (top-64) vs online, batch 64'),
      ('offline_b256', plan_offline(b_large), 'teacher cache (top-64) vs online, batch 256'),
      ('recipe_4096', plan_recipe, 'configs/distilbert.py 4096-sequence step with accumulation'),
      ('attention_parity', plan_parity, 'explicit vs default vs xla vs cudnn attention'),
      ('compile_check', plan_compile_check, "issue 19's compile-only estimate (optional)"),
  ]


# ----------------------------------------------------------------------------- running steps

def child_env(site: str | None) -> dict:
  """The steps' environment: installed wheels and the repository on the path, unbuffered output,
  no JAX preallocation (PyTorch shares the GPU), a compilation cache shared by the steps."""
  env = dict(os.environ)
  path = [p for p in (site, ROOT, env.get('PYTHONPATH', '')) if p]
  env.update(PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED='1', HF_HUB_OFFLINE='1',
             TOKENIZERS_PARALLELISM='false')
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(),
                                                           'flaxdistil_gpu_suite_jax_cache'))
  return env


class Interrupted(Exception):
  """SIGTERM / SIGINT reached the suite: the running step was killed."""


def _interrupt(signum, frame):  # pylint: disable=unused-argument
  raise Interrupted(signal.Signals(signum).name)


def _kill_group(proc, grace_s: float = 10) -> None:
  """SIGTERM, then SIGKILL, to the process group of `proc` (the step and its children)."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=grace_s)
      return
    except subprocess.TimeoutExpired:
      continue


def run_child(name: str, argv: list[str], timeout_s: float, env: dict, log) -> dict:
  """Runs `argv` in its own process group, echoing its output; kills the group at `timeout_s`.

  A new group, not a new session: whatever ends the suite's session (the device tool at its
  timeout) ends the step too; SIGTERM / SIGINT to the suite kill the group and raise Interrupted.

  Returns:
    `{'returncode', 'seconds', 'timed_out', 'output_tail'}` (the last 40 lines).
  """
  tail = collections.deque(maxlen=40)
  t0 = time.monotonic()
  proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors='replace', bufsize=1, process_group=0)

  def pump():
    for line in proc.stdout:
      tail.append(line.rstrip('\n'))
      log(f'[{name}] {line.rstrip()}')

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  timed_out = False
  try:
    rc = proc.wait(timeout=max(timeout_s, 1))
  except subprocess.TimeoutExpired:
    timed_out = True
    _kill_group(proc)
    rc = proc.poll()
  except (Interrupted, KeyboardInterrupt):
    _kill_group(proc, grace_s=3)
    raise
  reader.join(timeout=5)
  return {'returncode': rc, 'seconds': round(time.monotonic() - t0, 2), 'timed_out': timed_out,
          'output_tail': list(tail)}


def install_wheels(ctx: Ctx, log) -> dict:
  """pip-installs `--wheels`/*.whl into `<work>/site` (no index, no dependencies)."""
  wheels = sorted(glob.glob(os.path.join(ctx.args.wheels, '*.whl'))) if ctx.args.wheels else []
  if not wheels:
    return {'status': 'skipped', 'reason': f'no wheels in {ctx.args.wheels!r}'}
  site = os.path.join(ctx.work, 'site')
  argv = [sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
          '--no-cache-dir', '--upgrade', '--target', site, *wheels]
  r = run_child('wheels', argv, ctx.shapes.timeouts['wheels'], dict(os.environ), log)
  ok = r['returncode'] == 0
  return {'status': 'ok' if ok else 'failed', 'site': site if ok else None,
          'wheels': [os.path.basename(w) for w in wheels], 'argv': argv, **r}


# ----------------------------------------------------------------------------- env probe (child)

def probe_env(json_out: str, matmul_n: int) -> None:
  """Versions, devices, flags and the achieved bf16 matmul rate, as JSON (a child process)."""
  out = {'python': sys.version.split()[0], 'executable': sys.executable,
         'versions': {}, 'env_vars': {k: os.environ.get(k) for k in ENV_VARS}}
  for name in PACKAGES:
    try:
      out['versions'][name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    out['nvidia_smi'] = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit',
         '--format=csv,noheader'], capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    out['nvidia_smi'] = f'unavailable: {e}'
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dev = jax.local_devices()[0]
  out.update(platform=dev.platform, device_kind=dev.device_kind,
             num_devices=jax.local_device_count(),
             platform_version=getattr(dev.client, 'platform_version', None),
             jax_default_matmul_precision=str(getattr(jax.config, 'jax_default_matmul_precision',
                                                      None)))
  try:
    out['jax_environment_info'] = jax.print_environment_info(return_string=True)
  except Exception as e:  # pylint: disable=broad-except
    out['jax_environment_info'] = f'unavailable: {e}'
  try:
    import torch  # pylint: disable=g-import-not-at-top
    out['torch'] = {'version': torch.__version__, 'cuda': torch.version.cuda,
                    'cudnn': torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                    'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}
  except Exception as e:  # pylint: disable=broad-except
    out['torch'] = f'unavailable: {e}'
  x = jax.device_put(jnp.ones((matmul_n, matmul_n), jnp.bfloat16), dev)
  mm = jax.jit(lambda u, w: u @ w)
  mm(x, x).block_until_ready()
  best = math.inf
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(5):
      y = mm(x, x)
    y.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / 5)
  out['bf16_matmul'] = {'n': matmul_n, 'seconds': best, 'tflops': 2 * matmul_n ** 3 / best / 1e12,
                        'note': 'jnp.ones inputs, best of 5 windows of 5 products'}
  out['complete'] = True
  atomic.write_json(json_out, out)
  print(json.dumps({k: out[k] for k in ('device_kind', 'platform', 'num_devices', 'nvidia_smi',
                                        'bf16_matmul')}), flush=True)


# ----------------------------------------------------------------------------- summary

def _gib(x):
  return None if x is None else x / GIB


def summarise(results: dict) -> dict:
  """The headline numbers of every step that ran (keys as in gpu_table.md)."""
  steps, out = results['steps'], {}
  env = (steps.get('env') or {}).get('result') or {}
  if env:
    out['gpu'] = {'device_kind': env.get('device_kind'), 'nvidia_smi': env.get('nvidia_smi'),
                  'versions': env.get('versions'),
                  'bf16_matmul_tflops': (env.get('bf16_matmul') or {}).get('tflops')}
  for name in ('distill_b64', 'distill_b256', 'recipe_4096'):
    r = (steps.get(name) or {}).get('result')
    if not r:
      continue
    rows = []
    for v, q in zip(r.get('jax_runs', []), r.get('jax_runs_over_torch_tokens_per_s', [])):
      row = {'variant': _variant(v), 'status': v['status']}
      if v['status'] == 'ok':
        row.update(tokens_per_s=v['tokens_per_s'], mfu=v['mfu'], step_time_s=v['step_time_s'],
                   peak_memory_gib=_gib(v.get('peak_memory_bytes')),
                   peak_memory_exact=v.get('peak_memory_exact', True), vs_torch=q,
                   hours_per_billion_tokens=v.get('hours_per_billion_tokens'),
                   compile_s=v.get('compile_s'))
      else:
        row['why'] = v.get('reason') or v.get('error')
      rows.append(row)
    t = r.get('torch')
    if t:
      rows.append({'variant': 'PyTorch (bf16 autocast)', 'status': t['status'],
                   **({'tokens_per_s': t['tokens_per_s'], 'mfu': t['mfu'],
                       'step_time_s': t['step_time_s'],
                       'peak_memory_gib': _gib(t.get('peak_memory_bytes'))}
                      if t['status'] == 'ok' else {'why': t.get('error')})})
    out[name] = {'batch_size': r['args']['batch_size'],
                 'num_microbatches': r['args']['num_microbatches'],
                 'peak_tflops': r['peak_flops_per_device'] / 1e12,
                 'peak_source': r['peak_flops_source'], 'complete': r.get('complete'), 'rows': rows}
  for name in ('offline_b64', 'offline_b256'):
    r = (steps.get(name) or {}).get('result')
    if r:
      out[name] = {'batch_size': r['args']['batch_size'], 'teacher_share': r['teacher_share'],
                   'rows': {k: {kk: v.get(kk) for kk in ('status', 'tokens_per_s', 'step_time_s',
                                                           'vs_online', 'error')}
                            for k, v in r['results'].items()}}
  r = (steps.get('attention_parity') or {}).get('result')
  if r:
    out['attention_parity'] = {
        'model': f"{r['args']['num_hidden_layers']} × {r['args']['hidden_size']}, batch "
                 f"{r['args']['batch_size']} × {r['args']['seq_len']}, {r['args']['dtype']}",
        'implementations': {k: ({'forward_ms': v['forward_ms'],
                                 'speedup_vs_explicit': v['forward_speedup_vs_explicit'],
             'logits_rel': v['logits']['max_rel_diff'], 'grads_rel': v['grads']['max_rel_diff'],
             'within_tolerance': v['within_tolerance']} if v['status'] == 'ok'
            else {'status': v['status'], 'why': v.get('reason') or v.get('error')})
        for k, v in r['implementations'].items()}}
  c = steps.get('compile_check') or {}
  if c:
    out['compile_check'] = {'status': c.get('status'), 'why': c.get('reason'),
                            'estimates': _find_keys(c.get('result'), ('step_time', 'seconds'))}
  return out


def _variant(v: dict) -> str:
  c, impl = v.get('vocab_chunk_size'), v.get('attention_implementation')
  return ('JAX dense' if not c else f'JAX chunked ({c})') + (f', {impl} attention' if impl else '')


def _find_keys(tree, words, prefix='') -> dict:
  """Numeric leaves of `tree` whose key path mentions one of `words` (a compile report's
  estimates), by dotted path."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_find_keys(v, words, f'{prefix}{k}.'))
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and any(
      w in prefix for w in words):
    out[prefix[:-1]] = tree
  return out


def _fmt(x, spec='{:,.0f}', missing='–'):
  return missing if x is None else spec.format(x)


def table(results: dict) -> str:
  """gpu_table.md: the docs/scaling.md GPU table from `summary`."""
  s, meta = results.get('summary', {}), results['suite']
  gpu = s.get('gpu') or {}
  ver = gpu.get('versions') or {}
  lines = [f"GPU: {gpu.get('device_kind', '?')} ({gpu.get('nvidia_smi', '?')}); jax "
           f"{ver.get('jax', '?')}, jaxlib {ver.get('jaxlib', '?')}, flax {ver.get('flax', '?')}, "
           f"torch {ver.get('torch', '?')}, transformers {ver.get('transformers', '?')}; achieved "
           f"bf16 matmul {_fmt(gpu.get('bf16_matmul_tflops'), '{:.3g}')} TFLOP/s; mode "
           f"{meta['mode']}, {meta['started']}, {_fmt(meta.get('elapsed_s'), '{:.0f}')} s.", '',
           '| step | variant | tokens/s | MFU | peak memory (GiB) | vs PyTorch | s/step |',
           '|---|---|---|---|---|---|---|']
  for name in ('distill_b64', 'distill_b256', 'recipe_4096'):
    d = s.get(name)
    if not d:
      lines.append(f'| {name} | not run | | | | | |')
      continue
    label = f"{name} (batch {d['batch_size']}" + (
        f", {d['num_microbatches']} microbatches)" if d['num_microbatches'] > 1 else ')')
    for row in d['rows']:
      if row['status'] != 'ok':
        lines.append(f"| {label} | {row['variant']} | {row['status']}: {str(row.get('why'))[:80]} "
                     '| | | | |')
        continue
      mem = _fmt(row.get('peak_memory_gib'), '{:.1f}') + (
          '' if row.get('peak_memory_exact', True) else ' (≤)')
      lines.append(f"| {label} | {row['variant']} | {_fmt(row['tokens_per_s'])} | "
                   f"{_fmt(row['mfu'] and 100 * row['mfu'], '{:.1f}%')} | {mem} | "
                   f"{_fmt(row.get('vs_torch'), '{:.2f}×')} | "
                   f"{_fmt(row['step_time_s'], '{:.3f}')} |")
  r = s.get('recipe_4096')
  if r:
    best = next((row for row in r['rows'] if row['status'] == 'ok'), None)
    if best:
      lines += ['', f"Recipe step (4096 × 128 tokens): {best['step_time_s']:.2f} s/step, "
                    f"{_fmt(best.get('hours_per_billion_tokens'), '{:.2f}')} h per billion tokens."]
  for name in ('offline_b64', 'offline_b256'):
    o = s.get(name)
    if o:
      cells = ', '.join(f"{k} {_fmt(v.get('tokens_per_s'))} tokens/s"
                        + (f" ({v['vs_online']:.2f}×)" if v.get('vs_online') else '')
                        if v.get('status') == 'ok' else f"{k} {v.get('status')}"
                        for k, v in o['rows'].items())
      lines.append(f"\n{name}: {cells}; teacher-forward FLOP share "
                   f"{100 * o['teacher_share']:.0f}%.")
  p = s.get('attention_parity')
  if p:
    lines.append(f"\nattention forward ({p['model']}): " + '; '.join(
        f"{k} {v['forward_ms']:.2f} ms ({v['speedup_vs_explicit']:.2f}× explicit), rel. diff "
        f"logits {v['logits_rel']:.1e} grads {v['grads_rel']:.1e}"
        if 'forward_ms' in v else f"{k} {v['status']}" for k, v in p['implementations'].items())
                 + '.')
  c = s.get('compile_check')
  if c:
    lines.append(f"\ncompile check: {c['status']}" + (f" ({c['why']})" if c.get('why') else '')
                 + (f"; estimates {c['estimates']}" if c.get('estimates') else '') + '.')
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', help='results directory (gpu_suite.json, .log, gpu_table.md, profile)')
  p.add_argument('--dry_run', action='store_true', help='tiny shapes on any backend (CPU test)')
  p.add_argument('--budget_s', type=float, default=0,
                 help='total seconds for all steps (0 = 500 on GPU, 3600 dry run)')
  p.add_argument('--wheels', default=os.path.join(ROOT, '.whl'),
                 help="directory of wheels installed first ('' = none)")
  p.add_argument('--only', default='', help='comma list of steps to run (default: all)')
  p.add_argument('--skip', default='', help='comma list of steps not to run')
  p.add_argument('--no_torch', action='store_true',
                 help='skip the PyTorch side of the distill steps (an environment without torch)')
  p.add_argument('--compile_check_cmd', default='',
                 help='command of the compile_check step instead of flaxdistil.train_compile; '
                      '{json_out} is replaced by the JSON path the suite reads')
  p.add_argument('--work_dir', default='', help='scratch directory (default: a new temp dir)')
  p.add_argument('--probe_env', default='', help=argparse.SUPPRESS)  # the env step's child
  p.add_argument('--matmul_n', type=int, default=8192, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if not a.probe_env and not a.out:
    p.error('--out DIR is required.')
  names = {n for n, _, _ in plan(GPU)}
  for flag in ('only', 'skip'):
    bad = set(filter(None, getattr(a, flag).split(','))) - names
    if bad:
      p.error(f'--{flag}: unknown step(s) {sorted(bad)}; steps: {sorted(names)}.')
  return a


def main(argv=None) -> int:
  a = parse_args(argv)
  if a.probe_env:
    probe_env(a.probe_env, a.matmul_n)
    return 0
  shapes = DRY if a.dry_run else GPU
  budget = a.budget_s or shapes.budget_s
  os.makedirs(a.out, exist_ok=True)
  work = a.work_dir or tempfile.mkdtemp(prefix='flaxdistil_gpu_suite_')
  os.makedirs(work, exist_ok=True)
  t_start = time.monotonic()
  results = {'suite': {'mode': 'dry_run' if a.dry_run else 'gpu', 'argv': sys.argv,
                       'started': time.strftime('%Y-%m-%dT%H:%M:%S'), 'budget_s': budget,
                       'work_dir': work, 'complete': False},
             'steps': {}}
  ctx = Ctx(args=a, shapes=shapes, work=work, results=results)
  log_path = os.path.join(a.out, 'gpu_suite.log')
  log_file = open(log_path, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
  lock = threading.Lock()

  def log(line: str):
    with lock:
      print(line, flush=True)
      log_file.write(line + '\n')
      log_file.flush()

  def publish():
    results['suite']['elapsed_s'] = round(time.monotonic() - t_start, 1)
    results['summary'] = summarise(results)
    atomic.write_json(os.path.join(a.out, 'gpu_suite.json'), results)
    with atomic.atomic_file(os.path.join(a.out, 'gpu_table.md'), 'w') as f:
      f.write(table(results))

  log(f"gpu_suite: mode {results['suite']['mode']}, budget {budget:.0f} s, out {a.out}, "
      f'work {work}')
  w = results['wheels'] = install_wheels(ctx, log)
  log(f"[wheels] {w['status']}: {w.get('reason') or w.get('wheels')}")
  env = child_env(results['wheels'].get('site'))
  publish()

  only, skip = set(filter(None, a.only.split(','))), set(filter(None, a.skip.split(',')))
  failed = []
  signal.signal(signal.SIGTERM, _interrupt)
  try:
    run_steps(ctx, shapes, budget, t_start, env, only, skip, failed, log, publish)
  except (Interrupted, KeyboardInterrupt) as e:
    results['suite']['interrupted'] = str(e) or type(e).__name__
    failed.append('interrupted')
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  results['suite']['complete'] = 'interrupted' not in failed
  results['suite']['failed_steps'] = failed
  publish()
  log(f"gpu_suite: done in {results['suite']['elapsed_s']:.0f} s; failed: {failed or 'none'}; "
      f"wrote {os.path.join(a.out, 'gpu_suite.json')}, gpu_table.md, gpu_suite.log")
  log_file.close()
  return 1 if failed else 0


def run_steps(ctx, shapes, budget, t_start, env, only, skip, failed, log, publish) -> None:
  """The plan's steps in order, each within its budget; results into `ctx.results['steps']`."""
  a, work, results = ctx.args, ctx.work, ctx.results
  for name, build, what in plan(shapes):
    entry = results['steps'][name] = {'what': what}
    left = budget - (time.monotonic() - t_start)
    if (only and name not in only) or name in skip:
      entry.update(status='skipped', reason='--only/--skip')
      continue
    if left < 20:
      entry.update(status='skipped',
                   reason=f'no time left ({left:.0f} s of --budget_s {budget:.0f})')
      log(f'[{name}] skipped: {entry["reason"]}')
      publish()
      continue
    try:
      argv = build(ctx)
    except Skip as e:
      entry.update(status='skipped', reason=str(e))
      log(f'[{name}] skipped: {e}')
      publish()
      continue
    timeout = min(shapes.timeouts[name], left - 5)
    entry.update(argv=argv, timeout_s=round(timeout, 1))
    log(f'[{name}] start ({what}); timeout {timeout:.0f} s: {shlex.join(argv)}')
    path = ctx.json_path(name)
    try:
      entry.update(run_child(name, argv, timeout, env, log))
    except (Interrupted, KeyboardInterrupt):
      entry['status'] = 'interrupted'
      entry['result'] = _read_json(path)
      raise
    entry['result'] = _read_json(path)
    # our scripts write complete=False until they finish; another tool's report counts as done
    complete = bool(entry.get('result')) and entry['result'].get('complete', True)
    if entry['returncode'] == 0 and complete:
      entry['status'] = 'ok'
    else:
      entry['status'] = 'timeout' if entry['timed_out'] else 'failed'
      if entry.get('result'):
        entry['status'] += ' (partial result kept)'
      failed.append(name)
    if name == 'distill_b64':
      entry['profile'] = package_profile(os.path.join(work, 'profile'), a.out)
    log(f"[{name}] {entry['status']} in {entry['seconds']:.0f} s")
    publish()


def _read_json(path: str):
  """The step's JSON, or None if it wrote none (or was killed mid-write: writes are atomic)."""
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def package_profile(profile_dir: str, out: str) -> dict:
  """Summarises the trace and packs it into `out/profile_distill_b64.tar.gz` if it fits."""
  trace = trace_summary.find_trace(profile_dir) if os.path.isdir(profile_dir) else None
  if trace is None:
    return {'status': 'missing', 'reason': f'no perfetto trace under {profile_dir}'}
  info = {'status': 'ok'}
  try:
    info['summary'] = trace_summary.summarise(trace)
  except (OSError, ValueError, KeyError) as e:
    info['summary'] = f'unreadable: {e}'
  target = os.path.join(out, 'profile_distill_b64.tar.gz')
  run_dir = os.path.dirname(trace)
  for members in (sorted(glob.glob(os.path.join(run_dir, '*'))), [trace]):
    with tarfile.open(target, 'w:gz') as tar:
      for m in members:
        tar.add(m, arcname=os.path.join('profile', os.path.basename(m)))
    if os.path.getsize(target) <= MAX_FILE_BYTES:
      info.update(file=os.path.basename(target), bytes=os.path.getsize(target),
                  members=[os.path.basename(m) for m in members])
      return info
  os.remove(target)
  info.update(status='too large', reason=f'even the perfetto trace alone is > {MAX_FILE_BYTES} B')
  shutil.rmtree(profile_dir, ignore_errors=True)
  return info


if __name__ == '__main__':
  sys.exit(main())
