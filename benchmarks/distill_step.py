r"""Throughput of one distillation step: flaxdistil (JAX) vs. HF distiller.py-style PyTorch.

A step = teacher forward (no grad) + student forward/backward + global-norm
clipping + AdamW update, for bert-base-uncased (12 x 768, vocab 30522) ->
6-layer DistilBERT shapes with random weights. The JAX side is the project's
real step (`benchmarks/common.py`: `train_step.make_train_step` / `optimizer.make_optimizer` /
`train_state.state_layout` / `train_step.jit_train_step`, the train loop's jit wiring;
`bert.MaskedLM`, a data-parallel `sharding` mesh over all local devices, the objective and
optimizer of `configs/distilbert.py`). The PyTorch side is written the
way HF `examples/research_projects/distillation/distiller.py` does it:
transformers `BertForMaskedLM` teacher (eval, no_grad), `DistilBertForMaskedLM`
student, KLDivLoss(batchmean) * T^2 over non-pad tokens + CE on masked tokens +
CosineEmbeddingLoss on last hidden states, AdamW with distiller's param groups,
`clip_grad_norm_`, `loss.item()` every step; bf16 autocast when --dtype bfloat16.

Launch (from the repository root):

  # GPU (H100 / H200), bf16, the paper's microbatch of 64 sequences:
  python benchmarks/distill_step.py --batch_size 64 --dtype bfloat16 --steps 20 --warmup 3 \
      --json_out /tmp/distill_step_gpu.json
  # CPU smoke run at full bert-base shapes (a few minutes on 2 cores):
  python benchmarks/distill_step.py --batch_size 4 --steps 3 --warmup 1 --json_out /tmp/cpu.json
  # JAX only / tiny shapes:
  python benchmarks/distill_step.py --skip_torch --hidden_size 128 --vocab_size 1024

MFU = model FLOPs per step / step time / peak FLOP/s, with model FLOPs = teacher fwd
2*N_t*tokens + student fwd+bwd 6*N_s*tokens + attention, N including the vocab
projection; peak from --peak_tflops, a per-device-kind table (H100/H200 bf16 989)
or, on CPU, a measured matmul. Accounting, memory sources and fairness notes
(TF32, XLA preallocation off, loss.item() per step): benchmarks/README.md.
"""

import argparse
import gc
import json
import os
import platform
import resource
import time
import traceback

# Let PyTorch and JAX share one GPU; peak_bytes_in_use is exact either way.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import common  # the sibling module: this file's directory is sys.path[0]
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np

from configs import distilbert as distilbert_config  # pylint: disable=wrong-import-position
from flaxdistil.model import bert
from flaxdistil.storage import atomic

# Dense peak TFLOP/s by device_kind substring: (bfloat16, float32). float32 on GPU = TF32
# tensor cores (JAX's default matmul precision there); TPUs run float32 dots as bf16 passes.
PEAK_TFLOPS = (('h100 pcie', (756.0, 378.0)), ('h100', (989.0, 494.5)), ('h200', (989.0, 494.5)),
               ('a100', (312.0, 156.0)), ('tpu v4', (275.0, 275.0)), ('tpu v5 lite', (197.0, 197.0)),
               ('tpu v5', (459.0, 459.0)), ('tpu v6 lite', (918.0, 918.0)))
GIB = 1024 ** 3


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--batch_size', type=int, default=32, help='global batch (sequences per step)')
  for name, default in (('seq_len', 128), ('teacher_layers', 12), ('student_layers', 6),
                        ('vocab_size', 30522)):
    p.add_argument(f'--{name}', type=int, default=default)
  p.add_argument('--steps', type=int, default=10, help='timed steps')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='compute dtype (params and optimizer state stay float32)')
  p.add_argument('--hidden_size', type=int, default=768, help='heads = hidden/64, FFN = 4*hidden')
  p.add_argument('--num_microbatches', type=int, default=1, help='gradient accumulation factor')
  p.add_argument('--vocab_chunk_size', default='0',
                 help='comma list of distill.vocab_chunk_size values to time on the JAX side, '
                      'e.g. "0,32" (0 = dense [B, T, V] logits)')
  p.add_argument('--attention_implementation', default='default',
                 help='comma list of attention implementations to time on the JAX side (each with '
                      'every --vocab_chunk_size): default (= jax\'s None, XLA), xla, cudnn (GPU, '
                      'bfloat16; the teacher forward only: the student trains with attention '
                      'dropout, which keeps the explicit softmax)')
  p.add_argument('--repeats', type=int, default=2,
                 help='timing windows of --steps steps per side; min and median are reported')
  p.add_argument('--peak_tflops', type=float, default=0.0,
                 help='peak TFLOP/s for MFU; 0 = per-device-kind default or measured')
  p.add_argument('--skip_torch', action='store_true', help='time only the JAX step')
  p.add_argument('--memory_only', action='store_true',
                 help="compile the JAX step(s) and print XLA's memory analysis; no timing, no torch")
  p.add_argument('--json_out', default='',
                 help='write all results to this JSON file (rewritten after every variant)')
  p.add_argument('--profile_dir', default='',
                 help='after timing, trace --profile_steps steps of the first JAX variant with '
                      'jax.profiler (xplane + perfetto trace) into this directory')
  p.add_argument('--profile_steps', type=int, default=3)
  a = p.parse_args(argv)
  if a.hidden_size % 64:
    p.error(f'--hidden_size {a.hidden_size} must be a multiple of 64 (head size 64, as bert-base).')
  if a.batch_size % a.num_microbatches:
    p.error(f'--batch_size {a.batch_size} is not divisible by --num_microbatches {a.num_microbatches}.')
  if a.steps < 1 or a.warmup < 0 or a.repeats < 1:
    p.error('--steps and --repeats must be >= 1 and --warmup >= 0.')
  try:
    a.vocab_chunk_sizes = [int(x) for x in a.vocab_chunk_size.split(',')]
  except ValueError:
    p.error(f'--vocab_chunk_size {a.vocab_chunk_size!r}: give integers, e.g. "0,32".')
  if any(c < 0 for c in a.vocab_chunk_sizes):
    p.error('--vocab_chunk_size values must be >= 0.')
  names = a.attention_implementation.split(',')
  if any(n not in ('default', 'xla', 'cudnn') for n in names):
    p.error(f'--attention_implementation {a.attention_implementation!r}: use a comma list of '
            'default, xla, cudnn.')
  a.attention_implementations = [None if n == 'default' else n for n in names]
  # every chunk size with the first implementation, then the same with the next one
  a.variants = [(c, i) for i in a.attention_implementations for c in a.vocab_chunk_sizes]
  return a


def peak_flops(a, device) -> tuple[float, str]:
  """(peak FLOP/s, where it came from) for MFU."""
  if a.peak_tflops > 0:
    return a.peak_tflops * 1e12, '--peak_tflops'
  kind = device.device_kind.lower()
  if device.platform != 'cpu':
    for key, (bf16, fp32) in PEAK_TFLOPS:
      if key in kind:
        return (bf16 if a.dtype == 'bfloat16' else fp32) * 1e12, f'datasheet ({device.device_kind}, {a.dtype})'
  # CPU or an unknown accelerator: the best of a few large matmuls in the compute dtype.
  n = 2048 if device.platform == 'cpu' else 8192
  x = jax.device_put(jnp.ones((n, n), getattr(jnp, a.dtype)), device)
  mm = jax.jit(lambda u, w: u @ w)
  mm(x, x).block_until_ready()
  best = min(_timed(lambda: mm(x, x).block_until_ready()) for _ in range(3))
  return 2 * n ** 3 / best, f'measured {n}x{n} {a.dtype} matmul on {device.device_kind}'


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


# ----------------------------------------------------------------------------- JAX

def _windows(a, step) -> list[float]:
  """Seconds per step of `a.repeats` windows of `a.steps` steps each (`step()` blocks)."""
  out = []
  for _ in range(a.repeats):
    t0 = time.perf_counter()
    step(a.steps)
    out.append((time.perf_counter() - t0) / a.steps)
  return out


def _summarise(times: list[float]) -> dict:
  return {'step_time_s': min(times), 'step_time_median_s': float(np.median(times)),
          'step_times_s': times}


def _peak_bytes() -> int | None:
  """Max over devices of `peak_bytes_in_use` since the process started (None on CPU)."""
  stats = [dev.memory_stats() or {} for dev in jax.local_devices()]
  return max(s['peak_bytes_in_use'] for s in stats) if all(
      'peak_bytes_in_use' in s for s in stats) else None


def unavailable(a, attention_implementation) -> str:
  """Why a JAX variant cannot run on this backend ('' if it can)."""
  if attention_implementation == 'cudnn':
    if jax.default_backend() != 'gpu':
      return f'cudnn attention needs an NVIDIA GPU (backend here: {jax.default_backend()})'
    if a.dtype != 'bfloat16':
      return 'cudnn attention needs --dtype bfloat16'
  return ''


def run_jax(a, host_batch, vocab_chunk_size: int = 0, attention_implementation=None,
            profile_dir: str = '') -> dict:
  """One JAX variant: compile, warm up, `a.repeats` windows of `a.steps` steps (+ a trace)."""
  peak_before = _peak_bytes()
  bench = common.step_setup(a, attention_implementation)
  t_params = bench.teacher_params()
  state = bench.fresh_state()
  batch = bench.global_batch(host_batch, a.batch_size)
  compiled, compile_s = bench.compile(common.recipe_objective(vocab_chunk_size=vocab_chunk_size),
                                      a.num_microbatches, state, t_params, batch)
  ma = compiled.memory_analysis()
  if a.memory_only:
    return {'vocab_chunk_size': vocab_chunk_size, 'compile_s': compile_s,
            'attention_implementation': attention_implementation,
            'memory_analysis': {k: int(getattr(ma, f'{k}_size_in_bytes', 0))
                                for k in ('temp', 'argument', 'output', 'alias', 'generated_code')}}

  for _ in range(a.warmup):
    state, metrics = compiled(state, t_params, batch)
  jax.block_until_ready((state, t_params))

  def steps(n):
    nonlocal state, metrics
    for _ in range(n):  # dispatch is asynchronous, as in the train loop
      state, metrics = compiled(state, t_params, batch)
    jax.block_until_ready((state, metrics))

  out = {**_summarise(_windows(a, steps)), 'compile_s': compile_s, 'status': 'ok',
         'vocab_chunk_size': vocab_chunk_size, 'attention_implementation': attention_implementation,
         'loss': float(metrics['loss']),
         'finite': bool(metrics['finite']), 'teacher_params': bert.count_params(t_params),
         'student_params': bert.count_params(state['params'])}
  peak = _peak_bytes()
  if peak is not None:
    out['peak_memory_bytes'] = peak
    out['peak_memory_source'] = "max over devices of memory_stats()['peak_bytes_in_use']"
    # The allocator's peak never resets: it is this variant's own only if it rose above the
    # peak left by the variants (and PyTorch-free JAX work) before it.
    out['peak_memory_exact'] = peak_before is None or peak > peak_before
  elif ma is not None:
    out['peak_memory_bytes'] = int(ma.temp_size_in_bytes + ma.argument_size_in_bytes)
    out['peak_memory_source'] = 'compiled.memory_analysis() temp + argument (per device)'
  if ma is not None:
    out['memory_analysis'] = {k: int(getattr(ma, f'{k}_size_in_bytes', 0))
                              for k in ('temp', 'argument', 'output', 'alias', 'generated_code')}
  try:  # XLA's own count, a cross-check only (while-loop bodies may be counted once)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out['xla_cost_analysis_flops'] = float(cost['flops'])
  except Exception:  # pylint: disable=broad-except
    pass
  if profile_dir:
    out['profile'] = _trace(a, profile_dir, steps)
  return out  # the arrays die with this frame; the caller collects


def _trace(a, profile_dir: str, steps) -> dict:
  """Traces `a.profile_steps` more steps (xplane.pb + perfetto_trace.json.gz under profile_dir)."""
  try:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      steps(a.profile_steps)
  except Exception as e:  # pylint: disable=broad-except  (e.g. no CUPTI in a sandbox)
    return {'status': 'failed', 'error': f'{type(e).__name__}: {e}'[:2000]}
  return {'status': 'ok', 'dir': profile_dir, 'steps': a.profile_steps}


# ----------------------------------------------------------------------------- PyTorch

def run_torch(a, host_batch) -> dict:
  """The same step as HF distiller.py `Distiller.step` + `optimize` (fp32 or bf16 autocast);
  its models and optimizer are freed (and the CUDA cache emptied) before it returns."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    return _torch_step(a, host_batch)
  finally:
    gc.collect()
    if torch.cuda.is_available():
      torch.cuda.empty_cache()  # hand the memory back before JAX runs


def _torch_step(a, host_batch) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  cfg = distilbert_config.get_config()
  d, o = cfg.distill, cfg.optim
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  cuda = dev.type == 'cuda'
  if cuda and a.dtype == 'float32':
    torch.backends.cuda.matmul.allow_tf32 = True  # = JAX's default fp32 matmul precision on GPU
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  torch.manual_seed(0)
  gc.collect()
  rss0 = _rss_bytes()
  if cuda:
    torch.cuda.reset_peak_memory_stats()

  heads, ffn = a.hidden_size // 64, 4 * a.hidden_size
  teacher = transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.teacher_layers,
      num_attention_heads=heads, intermediate_size=ffn)).to(dev).eval()
  student = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
      vocab_size=a.vocab_size, dim=a.hidden_size, n_layers=a.student_layers, n_heads=heads,
      hidden_dim=ffn)).to(dev).train()
  no_decay = ['bias', 'LayerNorm.weight']  # distiller.py's param groups, verbatim
  named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
  skip = lambda n: any(nd in n for nd in no_decay)
  groups = [{'params': [p for n, p in named if not skip(n)], 'weight_decay': o.weight_decay},
            {'params': [p for n, p in named if skip(n)], 'weight_decay': 0.0}]
  torch_opt = torch.optim.AdamW(groups, lr=o.learning_rate, eps=o.eps, betas=(o.b1, o.b2))
  scheduler = transformers.get_linear_schedule_with_warmup(torch_opt, o.warmup_steps,
                                                           cfg.num_train_steps)
  ce_loss_fct, lm_loss_fct = nn.KLDivLoss(reduction='batchmean'), nn.CrossEntropyLoss(ignore_index=-100)
  cosine_loss_fct, temp = nn.CosineEmbeddingLoss(reduction='mean'), d.temperature

  full = {k: torch.from_numpy(v).long().to(dev) for k, v in host_batch.items()}
  micro = [{k: v.chunk(a.num_microbatches)[i] for k, v in full.items()}
           for i in range(a.num_microbatches)]

  def loss_fn(mb):
    input_ids, attn_mask, lm_labels = mb['input_ids'], mb['attention_mask'].bool(), mb['labels']
    s_out = student(input_ids=input_ids, attention_mask=attn_mask.long(), output_hidden_states=True)
    with torch.no_grad():
      t_out = teacher(input_ids=input_ids, attention_mask=attn_mask.long(), output_hidden_states=True)
    s_logits, t_logits = s_out.logits, t_out.logits
    mask = attn_mask.unsqueeze(-1).expand_as(s_logits)  # KL over non-pad tokens
    s_slct = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
    t_slct = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
    loss_ce = ce_loss_fct(nn.functional.log_softmax(s_slct / temp, dim=-1),
                          nn.functional.softmax(t_slct / temp, dim=-1)) * temp ** 2
    loss = d.alpha_ce * loss_ce
    loss = loss + d.alpha_mlm * lm_loss_fct(s_logits.view(-1, s_logits.size(-1)), lm_labels.view(-1))
    s_h, t_h = s_out.hidden_states[-1], t_out.hidden_states[-1]
    hmask = attn_mask.unsqueeze(-1).expand_as(s_h)
    s_h = torch.masked_select(s_h, hmask).view(-1, s_h.size(-1))
    t_h = torch.masked_select(t_h, hmask).view(-1, s_h.size(-1))
    target = s_h.new(s_h.size(0)).fill_(1)
    return loss + d.alpha_cos * cosine_loss_fct(s_h, t_h, target)

  def step():
    total = 0.0
    for mb in micro:
      with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == 'bfloat16'):
        loss = loss_fn(mb)
      (loss / a.num_microbatches).backward()
      total += loss.item() / a.num_microbatches  # distiller logs loss.item() every iteration
    nn.utils.clip_grad_norm_(student.parameters(), o.grad_clip_norm)
    torch_opt.step()
    torch_opt.zero_grad()
    scheduler.step()
    return total

  for _ in range(a.warmup):
    step()
  sync()
  losses_ = []

  def steps(n):
    losses_.extend(step() for _ in range(n))
    sync()

  out = {**_summarise(_windows(a, steps)), 'loss': losses_[-1],
         'teacher_params': sum(p.numel() for p in teacher.parameters()),
         'student_params': sum(p.numel() for p in student.parameters()),
         'attn_implementation': student.config._attn_implementation}  # pylint: disable=protected-access
  if cuda:
    out['peak_memory_bytes'] = int(torch.cuda.max_memory_allocated())
    out['peak_memory_source'] = 'torch.cuda.max_memory_allocated()'
  else:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out['peak_memory_bytes'] = max(maxrss - rss0, 0)
    out['peak_memory_source'] = 'process peak RSS - RSS before building the models'
  out.update(device=str(torch.cuda.get_device_name() if cuda else 'cpu'),
             num_threads=torch.get_num_threads(), version=torch.__version__,
             transformers_version=transformers.__version__)
  return out


# ----------------------------------------------------------------------------- report

def label(r: dict) -> str:
  """Column name of a JAX variant."""
  c, impl = r['vocab_chunk_size'], r.get('attention_implementation')
  return ('JAX, dense logits' if not c else f'JAX, vocab chunks of {c}') + (
      f', {impl} attention' if impl else '')


def derive(r: dict, flops: dict, peak_total: float) -> None:
  """Adds tokens/s, model TFLOP/s, MFU and hours per billion tokens to a timed run `r`."""
  r['tokens_per_s'] = flops['tokens_per_step'] / r['step_time_s']
  r['model_tflops_per_s'] = flops['flops_per_step'] / r['step_time_s'] / 1e12
  r['mfu'] = flops['flops_per_step'] / r['step_time_s'] / peak_total
  r['hours_per_billion_tokens'] = 1e9 / r['tokens_per_s'] / 3600


def _failed(e: Exception, **fields) -> dict:
  traceback.print_exc()
  return {'status': 'failed', 'error': f'{type(e).__name__}: {e}'[:2000], **fields}


def main(argv=None):
  a = parse_args(argv)
  device = jax.local_devices()[0]
  flops = common.model_flops(a)
  host_batch = common.make_batch(a)
  load0 = os.getloadavg()
  mb = a.batch_size // a.num_microbatches
  logits_bytes = mb * a.seq_len * a.vocab_size * jnp.dtype(a.dtype).itemsize * 2
  print(f'devices: {jax.local_device_count()} x {device.device_kind} ({device.platform}); '
        f'jax {jax.__version__}; batch {a.batch_size} x {a.seq_len}, {a.dtype}, '
        f'teacher {a.teacher_layers}x{a.hidden_size} -> student {a.student_layers}x{a.hidden_size}, '
        f'vocab {a.vocab_size}, {a.num_microbatches} microbatch(es)', flush=True)

  if a.memory_only:
    print('| vocab_chunk_size | attention | XLA temp buffers (GiB) | arguments (GiB) | '
          'compile (s) |\n|---|---|---|---|---|')
    for chunk, impl in a.variants:
      if unavailable(a, impl):
        print(f"| {chunk or 'dense'} | {impl} | skipped: {unavailable(a, impl)} | | |")
        continue
      r = run_jax(a, host_batch, chunk, impl)
      m = r['memory_analysis']
      print(f"| {chunk or 'dense'} | {impl or 'default'} | {m['temp'] / GIB:.3f} | "
            f"{m['argument'] / GIB:.3f} | {r['compile_s']:.1f} |", flush=True)
    print(f'full-vocab logits per microbatch: [{mb}, {a.seq_len}, {a.vocab_size}] x '
          f'{jnp.dtype(a.dtype).itemsize} B = {logits_bytes / 2 / GIB:.3f} GiB per model')
    return

  peak, peak_src = peak_flops(a, device)
  peak_total = peak * jax.local_device_count()  # MFU over every device of the mesh
  jax_runs, torch_res = [], None
  result = {'args': {k: v for k, v in vars(a).items() if k != 'variants'},
            'device_kind': device.device_kind, 'platform': device.platform,
            'num_devices': jax.local_device_count(), 'jax_version': jax.__version__,
            'host': platform.node(), 'cpu_count': os.cpu_count(), 'loadavg_before': load0,
            'time': time.strftime('%Y-%m-%dT%H:%M:%S'), 'flops': flops,
            'peak_flops_per_device': peak, 'peak_flops_source': peak_src,
            'logits_bytes_per_microbatch': logits_bytes, 'complete': False}

  def publish():
    """Derived numbers and ratios of what ran so far, and the JSON file rewritten."""
    ok = [r for r in jax_runs if r['status'] == 'ok']
    torch_ok = torch_res is not None and torch_res.get('status') == 'ok'
    ratios = [r['tokens_per_s'] / torch_res['tokens_per_s'] if torch_ok and r['status'] == 'ok'
              else None for r in jax_runs]
    result.update(jax=ok[0] if ok else None, jax_runs=jax_runs, torch=torch_res,
                  jax_runs_over_torch_tokens_per_s=ratios,
                  jax_over_torch_tokens_per_s=next((q for q in ratios if q), None),
                  loadavg_after=os.getloadavg())
    if a.json_out:
      os.makedirs(os.path.dirname(os.path.abspath(a.json_out)), exist_ok=True)
      atomic.write_json(a.json_out, json.loads(json.dumps(result, default=str)))

  if not a.skip_torch:
    print('timing PyTorch (HF distiller.py-style step) ...', flush=True)
    try:
      torch_res = {'status': 'ok', **run_torch(a, host_batch)}
      derive(torch_res, flops, peak_total)
      if (torch_res['device'] == 'cpu') != (device.platform == 'cpu'):
        torch_res['mfu'] = None  # e.g. a CPU-only torch beside a GPU JAX: one peak does not fit
        print('WARNING: PyTorch ran on', torch_res['device'], 'but JAX on', device.platform)
    except Exception as e:  # pylint: disable=broad-except  (the JAX variants still run)
      torch_res = _failed(e)
    publish()

  profile_dir = a.profile_dir
  for chunk, impl in a.variants:
    fields = {'vocab_chunk_size': chunk, 'attention_implementation': impl}
    why = unavailable(a, impl)
    if why:
      print(f'skipping JAX vocab_chunk_size={chunk}, attention {impl}: {why}', flush=True)
      jax_runs.append({'status': 'skipped', 'reason': why, **fields})
      continue
    print(f'timing JAX (flaxdistil train_step, vocab_chunk_size={chunk}, attention '
          f'{impl or "default"}) ...', flush=True)
    try:
      r = run_jax(a, host_batch, chunk, impl, profile_dir)
      derive(r, flops, peak_total)
      profile_dir = ''  # one trace: the first variant's
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: the rest run)
      r = _failed(e, **fields)
    gc.collect()  # free this variant's buffers before the next one compiles
    jax_runs.append(r)
    publish()

  ok = [r for r in jax_runs if r['status'] == 'ok']
  rows = [('step time (ms), min / median', lambda r: f"{r['step_time_s'] * 1e3:.1f} / "
                                                      f"{r['step_time_median_s'] * 1e3:.1f}"),
          ('tokens/s', lambda r: f"{r['tokens_per_s']:,.0f}"),
          ('model TFLOP/s', lambda r: f"{r['model_tflops_per_s']:.3f}"),
          ('MFU', lambda r: '-' if r['mfu'] is None else f"{100 * r['mfu']:.1f}%"),
          ('peak memory (GiB)', lambda r: f"{r.get('peak_memory_bytes', float('nan')) / GIB:.2f}"
           + ('' if r.get('peak_memory_exact', True) else ' (<=)')),
          ('XLA temp buffers (GiB)', lambda r: f"{r['memory_analysis']['temp'] / GIB:.3f}"
           if 'memory_analysis' in r else '-'),
          ('loss (last step)', lambda r: f"{r['loss']:.4f}"),
          ('params teacher / student', lambda r: f"{r['teacher_params']:,} / {r['student_params']:,}")]
  cols = [(label(r), r) for r in ok]
  torch_ok = torch_res is not None and torch_res['status'] == 'ok'
  cols += [('PyTorch HF distiller-style', torch_res)] if torch_ok else []
  print('\n| metric | ' + ' | '.join(c for c, _ in cols) + ' |\n|---|' + '---|' * len(cols))
  for name, fmt in rows:
    print(f'| {name} | ' + ' | '.join(fmt(r) for _, r in cols) + ' |')
  print()
  for r, q in zip(jax_runs, result['jax_runs_over_torch_tokens_per_s']):
    if r['status'] != 'ok':
      print(f"{label(r)}: {r['status']} ({r.get('reason') or r.get('error')})")
      continue
    print((f'{label(r)} / PyTorch tokens/s (min step times): {q:.2f}x; ' if q else '')
          + f"JAX compile (excluded from timing): {r['compile_s']:.1f} s")
  if torch_res is not None and not torch_ok:
    print(f"PyTorch: failed ({torch_res['error']})")
  print(f"model FLOPs/step: {flops['flops_per_step'] / 1e9:,.1f} GFLOP (teacher fwd "
        f"{flops['teacher_fwd_flops'] / 1e9:,.1f} + student fwd+bwd "
        f"{flops['student_fwd_bwd_flops'] / 1e9:,.1f}); N_t={flops['teacher_matmul_params']:,}, "
        f"N_s={flops['student_matmul_params']:,} matmul params incl. vocab projection")
  if ok and 'xla_cost_analysis_flops' in ok[0]:
    print('XLA cost_analysis FLOPs/step (cross-check): '
          f"{ok[0]['xla_cost_analysis_flops'] / 1e9:,.1f} GFLOP")
  print(f'peak: {peak / 1e12:.3f} TFLOP/s per device ({peak_src}); host load average '
        f'{load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after (CPU timings are noisy when > cores)')
  if ok:
    print(f"JAX peak memory source: {ok[0].get('peak_memory_source')}"
          + (f"; PyTorch: {torch_res['peak_memory_source']}" if torch_ok else ''))
  print(f'full-vocab logits per microbatch (peak driver): [{mb}, {a.seq_len}, {a.vocab_size}] x '
        f'{jnp.dtype(a.dtype).itemsize} B x 2 models = {logits_bytes / GIB:.3f} GiB '
        f'(+ float32 copies in the losses)')
  result['complete'] = True
  publish()
  if a.json_out:
    print(f'wrote {a.json_out}')


if __name__ == '__main__':
  main()
