"""Ahead-of-time compile of the run's train step for a target slice, without its devices.

`compile_report(config, target)` builds the step `train.py` builds for `config`
(`setup.run_shapes`: the same objective, models, mesh and rules, without weights or data;
`train_step.jit_run_step`: the same jit wiring) over the target's devices (compile-only TPU
devices from libtpu, or the host's), with abstract state, teacher and batch
(`jax.ShapeDtypeStruct`s carrying their shardings), compiles it and reports per chip: XLA's memory
analysis against the chip's HBM, the model FLOPs of the step (`model/flops.py`) beside the compiled
program's, and a roofline estimate of the step time with what follows from it (tokens/s per chip,
MFU, hours per billion tokens, the run's wall time). A step that does not fit raises `OutOfMemory`
with XLA's message.

The step-time estimate is a roofline of the compiled per-chip program, not a measurement: the
program's matmul FLOPs against the chip's peak, its HBM bytes against the HBM bandwidth (the
slower of the two), plus its collectives against the interconnect bandwidth (not overlapped).
Those counts come from the HLO text (`hlo_cost`), where every loop (the microbatch scan, the
vocabulary chunks, scanned layers) is counted by its trip count: XLA's `cost_analysis()` counts a
loop body once, and its `optimal_seconds` is not a usable estimate (negative for this step).

`search(config, target)` finds, per mesh layout (data, fsdp, fsdp x tensor) and per memory option
(vocabulary chunking, remat), the largest per-device microbatch that fits (bisection over powers
of two, each a compile of two microbatches), and ranks the fits by the estimate.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from flaxdistil.data import glue
from flaxdistil.data import input_pipeline
from flaxdistil.data import teacher_cache
from flaxdistil.model import flops as flops_lib
from flaxdistil.storage import atomic
from flaxdistil.training import hlo_cost
from flaxdistil.training import optimizer
from flaxdistil.training import setup
from flaxdistil.training import sharding
from flaxdistil.training import topology
from flaxdistil.training import train_state
from flaxdistil.training import train_step

GIB = 1024 ** 3
ESTIMATE_METHOD = ('roofline of the compiled per-chip program (compiler\'s counts, loops by trip '
                   'count): max(matmul FLOPs / peak, HBM bytes / HBM bandwidth) + collective '
                   'bytes / interconnect bandwidth; an estimate, not a measurement')


class OutOfMemory(Exception):
  """XLA found that the step does not fit in the chip's memory.

  Attributes:
    message: XLA's message (its first lines).
    used_bytes / available_bytes: the HBM figures it names (None where it names none).
  """

  def __init__(self, message: str, used_bytes: float | None, available_bytes: float | None):
    super().__init__(message)
    self.message, self.used_bytes, self.available_bytes = message, used_bytes, available_bytes


_UNITS = {'': 1, 'K': 1024, 'M': 1024 ** 2, 'G': 1024 ** 3, 'T': 1024 ** 4}


def _size(text: str) -> float:
  m = re.fullmatch(r'([\d.]+)\s*([KMGT]?)i?B?', text.strip())
  return float(m.group(1)) * _UNITS[m.group(2)] if m else float('nan')


def parse_oom(message: str) -> OutOfMemory | None:
  """`OutOfMemory` of an XLA error message, or None when it is not an out-of-memory error.

  Understands XLA's TPU forms `Used 17.67G of 15.75G hbm` and `(17.67G) exceeds available HBM
  (15.75G)` (the figures are None for other wordings).
  """
  if 'RESOURCE_EXHAUSTED' not in message and 'out of memory' not in message.lower():
    return None
  used = avail = None
  m = re.search(r'Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm', message)
  if m:
    used, avail = _size(m.group(1)), _size(m.group(2))
  else:
    m = re.search(r'\(([\d.]+[KMGT]?)\) exceeds available (?:HBM|memory) \(([\d.]+[KMGT]?)\)',
                  message)
    if m:
      used, avail = _size(m.group(1)), _size(m.group(2))
  lines = [line for line in message.strip().splitlines() if line.strip()]
  return OutOfMemory('\n'.join(lines[:6]), used, avail)


@dataclasses.dataclass
class StepSpec:
  """The run's step over a target's devices, abstract: everything `lower` needs.

  `teacher` is the abstract teacher params, or None when the step does not read them.
  """
  shapes: setup.RunShapes
  mesh: Any
  step: Any                # the jitted step (`train_step.jit_run_step`)
  state: Any               # abstract train state (ShapeDtypeStructs with shardings)
  teacher: Any
  batch: dict
  num_microbatches: int
  global_batch_size: int
  seq_len: int


def abstract_batch(config, shapes: setup.RunShapes, mesh, global_batch_size: int) -> dict:
  """The global batch the train loop feeds the step, as sharded `ShapeDtypeStruct`s.

  MLM: `input_pipeline.batch_spec`; a task: `glue.batch_spec`; offline, plus the cached targets
  (`teacher_cache.feature_spec` of the cache's manifest when `teacher.cache` holds one, else of
  the manifest `cache_teacher` would write for this config).
  """
  t = int(config.data.max_seq_length)
  spec = (glue.batch_spec if shapes.task else input_pipeline.batch_spec)(global_batch_size, t)
  obj = shapes.objective
  if obj.offline:
    tcfg = shapes.teacher_config
    manifest = _read_manifest(config.teacher.cache) or teacher_cache.planned_manifest(
        config, {'hidden_size': tcfg.hidden_size, 'num_attention_heads': tcfg.num_attention_heads,
                 'num_hidden_layers': tcfg.num_hidden_layers}, tcfg.vocab_size, obj.inter)
    cached = teacher_cache.feature_spec(
        manifest, top_k=int(config.teacher.cache_top_k) or None,
        hidden=bool(config.distill.alpha_cos), logz=bool(config.teacher.cache_tail_bucket),
        layers=teacher_cache.needed_layers(obj.inter, tcfg.num_hidden_layers))
    spec.update({k: ((global_batch_size,) + shape, dtype) for k, (shape, dtype) in cached.items()})
  b_shard = sharding.batch_sharding(mesh, shapes.rules)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.leaf_sharding(b_shard, len(shape)))
          for k, (shape, dtype) in spec.items()}


def _read_manifest(directory: str) -> dict | None:
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, teacher_cache.MANIFEST) if directory else ''
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def build_step(config, devices, num_processes: int | None = None) -> StepSpec:
  """The run's jitted step and abstract arguments over `devices` (no weights, no data).

  Args:
    config: the run's ConfigDict.
    devices: the devices of the mesh (compile-only TPU devices, or real ones).
    num_processes: hosts of the target (the global batch must divide by it); None = the
      devices' process count.

  Returns:
    The `StepSpec`.

  Raises:
    ConfigError: as `setup.run_shapes` (validation with the target's device count included).
  """
  if num_processes is None:
    num_processes = len({d.process_index for d in devices})
  shapes = setup.run_shapes(config, len(devices), num_processes)
  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes, devices=devices)
  tx, _ = optimizer.make_optimizer(config.optim, config.num_train_steps)
  state_shard, state = train_state.state_layout(shapes.student_config, tx, mesh, shapes.rules,
                                                shapes.projection)
  tcfg, t_shard, teacher = shapes.teacher_config, None, None
  if tcfg is not None:
    t_shard, t_abstract = sharding.model_param_layout(tcfg, mesh, shapes.teacher_rules)
    teacher = sharding.abstract_like(t_abstract, t_shard)
  step, reads_teacher = train_step.jit_run_step(
      shapes.student_config, tcfg, tx, shapes.objective, config.optim.num_microbatches,
      state_shard, t_shard)
  gbs = int(config.data.global_batch_size)
  return StepSpec(shapes=shapes, mesh=mesh, step=step, state=state,
                  teacher=teacher if reads_teacher else None,
                  batch=abstract_batch(config, shapes, mesh, gbs),
                  num_microbatches=int(config.optim.num_microbatches), global_batch_size=gbs,
                  seq_len=int(config.data.max_seq_length))


def lower(spec: StepSpec):
  """`spec.step` lowered for its abstract arguments (inside the mesh and logical rules)."""
  with sharding.mesh_context(spec.mesh, spec.shapes.rules):
    return spec.step.lower(spec.state, spec.teacher, spec.batch)


def compile_lowered(lowered):
  """`lowered.compile()`.

  Raises:
    OutOfMemory: XLA reports that the program does not fit (`parse_oom`).
  """
  try:
    return lowered.compile()
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError / JaxRuntimeError, by message
    oom = parse_oom(str(e))
    if oom is not None:
      raise oom from None
    raise


def step_model_flops(spec: StepSpec) -> dict:
  """`flops.step_flops` of the step: which heads run follows the objective.

  The teacher runs when the step reads it; its MLM head when a logit term (alpha_ce, alpha_mse)
  reads teacher logits, its classifier for alpha_ce on a task; the student's head for an MLM
  term, its classifier always on a task; heads on `max_predictions_per_seq` positions when set.
  """
  obj, s = spec.shapes.objective, spec.shapes
  w = obj.weights
  t_logits = bool(w.alpha_ce or w.alpha_mse)
  student_head = bool(obj.task or w.alpha_mlm or w.alpha_ce or w.alpha_mse)
  projected = 0
  if s.projection is not None and obj.inter is not None:
    iw = obj.inter.weights
    projected = int(bool(iw.alpha_emb)) + (len(obj.inter.layer_map) if iw.alpha_hidden else 0)
  return flops_lib.step_flops(
      s.student_config, s.teacher_config if spec.teacher is not None else None,
      batch_size=spec.global_batch_size, seq_len=spec.seq_len,
      num_microbatches=spec.num_microbatches,
      head_positions=obj.max_predictions_per_seq or None, student_head=student_head,
      teacher_head=t_logits, projected_states=projected)


def memory_report(compiled, chip: topology.ChipSpec | None) -> dict:
  """Per-chip bytes of XLA's memory analysis, their total and the chip's HBM.

  `total = arguments + outputs - aliases + temporaries + generated code`: donated state buffers
  are reused for the new state (aliases), so they count once.
  """
  ma = compiled.memory_analysis()
  get = lambda k: int(getattr(ma, f'{k}_size_in_bytes', 0) or 0)
  out = {k: get(k) for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp'] + out['generated_code']
  out['hbm_capacity'] = chip.hbm_gib * GIB if chip else None
  return out


def estimate(cost: hlo_cost.HloCost, model_flops: dict, chips: int, chip: topology.ChipSpec | None,
             num_train_steps: int) -> dict | None:
  """The roofline step time of a per-chip `cost` (module docstring) and what follows from it.

  Returns:
    None without chip figures (a CPU host); else `{'method', 'compute_s', 'memory_s',
    'collective_s', 'step_time_s', 'tokens_per_s', 'tokens_per_s_per_chip', 'mfu',
    'hours_per_billion_tokens', 'run_hours'}` (seconds, tokens/s, fraction, hours).
  """
  if chip is None:
    return None
  compute = cost.flops / (chip.peak_tflops * 1e12)
  memory = cost.hbm_bytes / (chip.hbm_gbps * 1e9)
  comm = cost.total_collective_bytes / (chip.ici_gbps * 1e9)
  step = max(compute, memory) + comm
  if step <= 0:
    return None
  tokens = model_flops['tokens_per_step'] / step
  return {'method': ESTIMATE_METHOD, 'compute_s': compute, 'memory_s': memory,
          'collective_s': comm, 'step_time_s': step, 'tokens_per_s': tokens,
          'tokens_per_s_per_chip': tokens / chips,
          'mfu': model_flops['flops_per_step'] / (step * chips * chip.peak_tflops * 1e12),
          'hours_per_billion_tokens': 1e9 / tokens / 3600,
          'run_hours': num_train_steps * step / 3600}


def _target_info(target: topology.Target, devices) -> dict:
  chip = target.chip
  return {'name': target.name, 'platform': target.platform, 'topology': target.topology_name,
          'chips': target.chips, 'devices': len(devices), 'device_kind': devices[0].device_kind,
          'hosts': len({d.process_index for d in devices}), 'num_slices': target.num_slices,
          'chip': None if chip is None else dataclasses.asdict(chip)}


def _config_info(config, spec: StepSpec) -> dict:
  s = spec.shapes
  shards = sharding.num_batch_shards(s.mesh_shape, s.rules)
  model = lambda c: None if c is None else {
      'model_type': c.model_type, 'hidden_size': c.hidden_size, 'layers': c.num_hidden_layers,
      'heads': c.num_attention_heads, 'intermediate_size': c.intermediate_size,
      'vocab_size': c.vocab_size}
  return {'mesh_shape': dict(s.mesh_shape), 'num_microbatches': spec.num_microbatches,
          'global_batch_size': spec.global_batch_size, 'seq_len': spec.seq_len,
          'microbatch_per_device': spec.global_batch_size // spec.num_microbatches // shards,
          'batch_shards': shards, 'dtype': config.dtype, 'remat': bool(config.remat),
          'scan_layers': bool(config.get('scan_layers', False)),
          'vocab_chunk_size': int(config.distill.vocab_chunk_size),
          'max_predictions_per_seq': int(config.distill.max_predictions_per_seq),
          'objective': s.objective.describe(), 'offline': s.objective.offline,
          'task': config.data.task or None, 'teacher_forward': spec.teacher is not None,
          'teacher': model(s.teacher_config), 'student': model(s.student_config)}


def compile_report(config, target: topology.Target, devices=None,
                   trip_scale: tuple[int, int] | None = None, hlo_out: str = '') -> dict:
  """Compiles the run's step for `target` and reports memory, FLOPs and the estimate.

  Args:
    config: the run's ConfigDict.
    target: what to compile for (`topology.parse_target` / `topology.host_target`).
    devices: its devices (default `topology.target_devices(target)`).
    trip_scale: `(compiled, real)` microbatch counts: the program is compiled with `compiled`
      microbatches and costed as if its accumulation loop ran `real` times (`search`).
    hlo_out: also write the compiled program's HLO text there (for inspection).

  Returns:
    The report dict: `target`, `config`, `fits` (True), `lower_seconds`, `compile_seconds`
    (wall), `compile_cpu_seconds` (CPU time of all the process's threads: less sensitive to a
    busy machine than the wall time),
    `memory` (`memory_report`), `flops` (`model_per_step`, `model_per_chip`,
    `hlo_matmul_per_chip`, `xla_cost_analysis_per_chip`), `bytes_per_chip` (`hlo_hbm`,
    `hlo_all`, `xla_cost_analysis`), `collectives` (bytes and counts per kind), `loops` (trip
    counts) and `estimate` (`estimate`, None on a CPU host).

  Raises:
    ConfigError: a bad config for this target.
    OutOfMemory: the step does not fit (its `used_bytes` / `available_bytes`).
  """
  devices = list(devices) if devices is not None else topology.target_devices(target)
  spec = build_step(config, devices)
  t0 = time.perf_counter()
  lowered = lower(spec)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = compile_lowered(lowered)
  t2, c2 = time.perf_counter(), time.process_time()
  retrip = None
  if trip_scale is not None and trip_scale[0] != trip_scale[1]:
    retrip = trip_scale
  text = compiled.as_text()
  if hlo_out:
    with atomic.atomic_file(hlo_out, 'w') as f:
      f.write(text)
  cost = hlo_cost.hlo_cost(text, len(devices), retrip=retrip)
  try:
    xla = compiled.cost_analysis()
    xla = (xla[0] if isinstance(xla, (list, tuple)) else xla) or {}
  except Exception:  # noqa: BLE001 - not every backend has it (compile-only GPU: None)
    xla = {}
  flops = step_model_flops(spec)
  if retrip:
    scale = trip_scale[1] / trip_scale[0]
    flops = dict(flops, tokens_per_step=flops['tokens_per_step'] * scale,
                 flops_per_step=flops['flops_per_step'] * scale,
                 teacher_fwd_flops=flops['teacher_fwd_flops'] * scale,
                 student_fwd_bwd_flops=flops['student_fwd_bwd_flops'] * scale)
  chips = target.chips if target.platform == 'tpu' else len(devices)
  return {
      'target': _target_info(target, devices), 'config': _config_info(config, spec), 'fits': True,
      'lower_seconds': t1 - t0, 'compile_seconds': t2 - t1, 'compile_cpu_seconds': c2 - c1,
      'memory': memory_report(compiled, target.chip),
      'flops': {'model_per_step': flops['flops_per_step'],
                'model_per_chip': flops['flops_per_step'] / chips,
                'model_detail': flops, 'hlo_matmul_per_chip': cost.flops,
                'xla_cost_analysis_per_chip': float(xla.get('flops', float('nan')))},
      'bytes_per_chip': {'hlo_hbm': cost.hbm_bytes, 'hlo_all': cost.bytes_accessed,
                         'xla_cost_analysis': float(xla.get('bytes accessed', float('nan')))},
      'collectives': {'bytes': cost.collective_bytes, 'count': cost.collective_count},
      'loops': [n for _, n in cost.loops],
      'estimate': estimate(cost, flops, chips, target.chip, int(config.num_train_steps)),
  }


# ----------------------------------------------------------------------------- search

LAYOUTS = {'data': (-1, 1, 1), 'fsdp': (1, -1, 1)}  # + 'fsdp x tensor': (1, -1, t)


@dataclasses.dataclass(frozen=True)
class Variant:
  """A memory option of the search: vocabulary chunk size (0 = dense) and remat."""
  vocab_chunk_size: int
  remat: bool

  @property
  def label(self) -> str:
    """E.g. 'chunk 16 + remat', 'dense'."""
    parts = [f'chunk {self.vocab_chunk_size}' if self.vocab_chunk_size else 'dense']
    return ' + '.join(parts + (['remat'] if self.remat else []))


VARIANT_NAMES = ('dense', 'chunk', 'remat', 'chunk+remat')


def search_variants(config, chunk: int, names=VARIANT_NAMES) -> list[Variant]:
  """The `Variant`s of `names` (`VARIANT_NAMES`), in that order; the chunked ones only where
  chunking changes the step (online MLM with a vocabulary term) and `chunk` > 0.

  Raises:
    ValueError: an unknown name.
  """
  bad = [n for n in names if n not in VARIANT_NAMES]
  if bad:
    raise ValueError(f'search variants {bad}: use some of {", ".join(VARIANT_NAMES)}.')
  chunkable = bool(chunk and not config.teacher.cache and not config.data.task
                   and (config.distill.alpha_mlm or config.distill.alpha_ce
                        or config.distill.alpha_mse))
  out = []
  for n in names:
    c = chunk if 'chunk' in n else 0
    if c and not chunkable:
      continue
    out.append(Variant(c, 'remat' in n))
  return out


def _with(config, **flat) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.update_from_flattened_dict(flat)
  return c


def search(config, target: topology.Target, devices=None, tensor: int = 2, chunk: int = 16,
           log=print, layouts=('data', 'fsdp', 'fsdp x tensor'), variants=VARIANT_NAMES) -> dict:
  """The largest per-device microbatch that fits, per layout and memory option, and the fastest.

  For each mesh layout (`data` (-1, 1, 1), `fsdp` (1, -1, 1), `fsdp x tensor` (1, -1, tensor))
  and `Variant`, a search over powers of two m (per-device microbatch) finds the largest m
  that compiles without running out of memory (`_bisect`: a memory line from two compiles, its
  prediction checked, bisection where it is off); each try compiles the step with two
  microbatches of m x batch-shards sequences (memory as any number of microbatches would need,
  compile time as one) and costs it as `global_batch_size / (m x shards)` microbatches. A
  variant starts at the largest m of the variants it dominates (chunking and remat only save
  memory).

  Args:
    config: the run's ConfigDict (its global batch, objective, dtype, models).
    target: the slice.
    devices: its devices (default `topology.target_devices(target)`).
    tensor: the tensor-parallel size of the `fsdp x tensor` layout (0: skip that layout).
    chunk: `distill.vocab_chunk_size` of the chunked variants (0: no chunked variants).
    log: called with a line per compile (progress).
    layouts: which of 'data', 'fsdp', 'fsdp x tensor' to search.
    variants: which of `VARIANT_NAMES` to search.

  Returns:
    `{'target', 'rows': [{'layout', 'mesh_shape', 'variant', 'vocab_chunk_size', 'remat',
    'microbatch_per_device', 'num_microbatches', 'memory_total', 'estimate', 'compiles',
    'compile_seconds'}], 'best': the row with the smallest estimated step time (or None),
    'flags': the --config overrides of the best row}`.
  """
  devices = list(devices) if devices is not None else topology.target_devices(target)
  wanted = layouts
  layouts = dict(LAYOUTS)
  if tensor and tensor > 1 and len(devices) % tensor == 0 and len(devices) > tensor:
    layouts['fsdp x tensor'] = (1, -1, tensor)
  layouts = {k: v for k, v in layouts.items() if k in wanted}
  variant_list = search_variants(config, chunk, variants)
  gbs = int(config.data.global_batch_size)
  rows = []
  for layout, mesh_shape in layouts.items():
    shards = sharding.num_batch_shards(
        sharding.resolve_mesh_shape(mesh_shape, config.mesh.axes, len(devices)),
        sharding.rules_tuple(config.mesh.logical_axis_rules))
    if gbs % shards:
      log(f'{layout}: global batch {gbs} does not split over {shards} batch shards; skipped')
      continue
    top = int(math.log2(gbs // shards)) if gbs // shards >= 1 else 0
    best_m = {}
    for variant in variant_list:
      floor = max([best_m.get(v, 0) for v in best_m
                   if v.vocab_chunk_size in (0, variant.vocab_chunk_size)
                   and (not v.remat or variant.remat)] or [0])
      row = _bisect(config, target, devices, layout, mesh_shape, variant, shards, gbs, top,
                    floor, log)
      best_m[variant] = row['microbatch_per_device']
      rows.append(row)
  fitting = [r for r in rows if r['microbatch_per_device'] and r['estimate']]
  best = min(fitting, key=lambda r: r['estimate']['step_time_s']) if fitting else None
  flags = None
  if best is not None:
    flags = {'mesh.shape': best['mesh_shape'], 'optim.num_microbatches': best['num_microbatches'],
             'distill.vocab_chunk_size': best['vocab_chunk_size'], 'remat': best['remat']}
  return {'target': _target_info(target, devices), 'rows': rows, 'best': best, 'flags': flags}


def _bisect(config, target, devices, layout, mesh_shape, variant, shards, gbs, top, floor, log):
  """One search row: the largest power-of-two microbatch per device in [floor, 2^top] that fits.

  Memory per chip is close to linear in the microbatch (`a + b m`: state and code, plus
  activations), and XLA names the bytes a program needs even when it does not fit, so two
  compiles give the line, a third checks its prediction; bisection between the largest fit and
  the smallest miss finishes when the line is off. Typically three compiles per row.
  """
  fits, used, compiles, seconds = {}, {}, 0, 0.0
  capacity = target.chip.hbm_gib * GIB if target.chip else None

  def attempt(m):
    nonlocal compiles, seconds, capacity
    if m in fits:
      return fits[m]
    real = gbs // (m * shards)
    compiled_a = 2 if real >= 2 else 1
    c = _with(config, **{'mesh.shape': mesh_shape, 'remat': variant.remat,
                         'distill.vocab_chunk_size': variant.vocab_chunk_size,
                         'data.global_batch_size': m * shards * compiled_a,
                         'optim.num_microbatches': compiled_a})
    t0 = time.perf_counter()
    try:
      rep = compile_report(c, target, devices, trip_scale=(compiled_a, real))
      fits[m], used[m] = rep, rep['memory']['total']
      status = (f"fits, kinds sum to {rep['memory']['total'] / GIB:.2f} GiB/chip" +
                (f", est. {rep['estimate']['step_time_s'] * 1e3:.0f} ms/step"
                 if rep['estimate'] else ''))
    except OutOfMemory as e:
      fits[m] = None
      if e.used_bytes:
        used[m] = e.used_bytes
        capacity = e.available_bytes or capacity  # what XLA can allocate, not the datasheet
      status = 'does not fit' + (f' ({e.used_bytes / GIB:.2f} of {e.available_bytes / GIB:.2f} '
                                 'GiB)' if e.used_bytes else '')
    dt = time.perf_counter() - t0
    compiles += 1
    seconds += dt
    log(f'  {layout} {variant.label}: microbatch {m}/device: {status} [{dt:.0f} s]')
    return fits[m]

  lo = int(math.log2(floor)) if floor else -1   # largest exponent known to fit (-1: none)
  hi = top + 1                                   # smallest exponent known not to fit
  first = max(lo, 0)
  if attempt(2 ** first) is not None:
    lo = first
  else:  # (a dominated variant's fit that does not fit here: start again from 1)
    hi, lo = first, -1
    if first > 0 and attempt(1) is not None:
      lo = 0
  if lo >= 0 and hi > lo + 1:
    # A second point for the memory line, three powers of two up (or the top).
    probe = min(hi - 1, lo + 3)
    if probe > lo:
      if attempt(2 ** probe) is not None:
        lo = probe
      else:
        hi = probe
    points = sorted(used.items())
    if capacity and len(points) >= 2 and hi > lo + 1:
      (m1, u1), (m2, u2) = points[0], points[-1]
      slope = (u2 - u1) / (m2 - m1) if m2 != m1 else 0.0
      if slope > 0:
        predicted = int(math.floor(math.log2(max(1.0, (capacity - u1) / slope + m1))))
        predicted = min(max(predicted, lo + 1), hi - 1)
        if predicted > lo:
          if attempt(2 ** predicted) is not None:
            lo = predicted
          else:
            hi = predicted
  while lo >= 0 and hi - lo > 1:
    mid = (lo + hi) // 2
    if attempt(2 ** mid) is not None:
      lo = mid
    else:
      hi = mid
  m = 2 ** lo if lo >= 0 else 0
  rep = attempt(m) if m else None
  return {'layout': layout, 'mesh_shape': tuple(mesh_shape), 'variant': variant.label,
          'vocab_chunk_size': variant.vocab_chunk_size, 'remat': variant.remat,
          'microbatch_per_device': m, 'num_microbatches': gbs // (m * shards) if m else None,
          'memory_total': rep['memory']['total'] if rep else None,
          'estimate': rep['estimate'] if rep else None, 'compiles': compiles,
          'compile_seconds': seconds}


def numbers_finite(report: dict) -> bool:
  """True when the report's memory, FLOP and estimate fields are finite numbers."""
  vals = [report['memory']['total'], report['flops']['model_per_step'],
          report['flops']['hlo_matmul_per_chip'], report['compile_seconds']]
  if report.get('estimate'):
    vals += [report['estimate']['step_time_s'], report['estimate']['mfu']]
  return all(isinstance(v, (int, float)) and np.isfinite(v) for v in vals)
