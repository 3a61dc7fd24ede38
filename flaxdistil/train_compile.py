r"""Compile the real train step for a TPU slice without the TPU: does it fit, how fast might it be.

  python -m flaxdistil.train_compile --config configs/distilbert.py --topology v5e-16 \
      [--config.GROUP.KEY=VALUE ...] [--json_out report.json]
  python -m flaxdistil.train_compile --config configs/distilbert.py --topology v5e-16 --search

Builds exactly the step `python -m flaxdistil.main` would train with the same flags (objective,
models, mesh, microbatches, vocabulary chunking, dtype; `training/aot.py`), with abstract teacher,
state and batch (shapes from the config and the teacher's config.json, no weights, no data), and
compiles it for the slice's compile-only devices (the `libtpu` wheel: `pip install
"jax[tpu]==<jax version>"`). Without `--topology` it compiles for this machine's own devices.

Prints per-chip HBM by kind against the chip's HBM, compile time, model FLOPs beside the compiled
program's, and a roofline estimate of the step time (tokens/s per chip, MFU, hours per billion
tokens, the run's wall time), and writes the same as JSON. `--search` finds the largest
microbatch per device that fits for each mesh layout (data, fsdp, fsdp x tensor), with and
without vocabulary chunking and remat, and names the fastest by the estimate
(docs/scaling.md "Compile for TPUs before paying for them").

Exit codes: 0 fits; 3 does not fit (XLA's message and the HBM figures, no traceback); 2 a bad
config or topology (`error: ...`).
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from flaxdistil import cli
from flaxdistil import console

FLAGS = flags.FLAGS
GIB = 1024 ** 3


def _define_flags():
  """The CLI's flags, defined only when this module runs (`flaxdistil.main` defines `--config`
  too, and absl refuses a second definition in one process)."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string('topology', '', 'TPU slice to compile for: v4-8, v5e-16, v5litepod-16, '
                      'v5p-8, v6e-8, v5e-256, or a topology like v5e:4x8; empty = this host.')
  flags.DEFINE_integer('num_slices', 1, 'Slices of --topology (multi-slice over DCN).')
  flags.DEFINE_bool('search', False, 'Search the largest per-device microbatch per mesh layout '
                    'and memory option, and the fastest by the estimate.')
  flags.DEFINE_integer('search_tensor', 2, 'Tensor-parallel size of the fsdp x tensor layout '
                       '(0: skip it).')
  flags.DEFINE_integer('search_chunk', 16, 'distill.vocab_chunk_size of the chunked variants.')
  flags.DEFINE_list('search_layouts', ['data', 'fsdp', 'fsdp_tensor'],
                    'Mesh layouts to search: data, fsdp, fsdp_tensor.')
  flags.DEFINE_list('search_variants', ['dense', 'chunk', 'remat', 'chunk+remat'],
                    'Memory options to search: dense, chunk, remat, chunk+remat.')
  flags.DEFINE_string('hlo_out', '', 'Also write the compiled program (HLO text) to this file.')
  flags.DEFINE_string('json_out', '', 'Report file (default: train_compile_<topology>.json in the '
                      'current directory).')
  flags.mark_flags_as_required(['config'])


def _gib(x) -> str:
  return '-' if x is None else f'{x / GIB:.3f}' if x < GIB else f'{x / GIB:.2f}'


def _flop(x) -> str:
  return f'{x / 1e12:,.2f} TFLOP' if x >= 1e11 else f'{x / 1e9:,.3f} GFLOP'


def _ms(x) -> str:
  return '-' if x is None else f'{x * 1e3:,.1f}' if x >= 1e-3 else f'{x * 1e3:.4f}'


def format_report(rep: dict) -> str:
  """The console table of an `aot.compile_report`."""
  t, c, m, f, e = rep['target'], rep['config'], rep['memory'], rep['flops'], rep['estimate']
  teacher = c['teacher']
  lines = [
      f"target  {t['name']}: {t['topology'] or t['platform']}, {t['chips']} chips "
      f"({t['devices']} devices of {t['device_kind']}, {t['hosts']} host(s))",
      f"step    mesh {c['mesh_shape']}, {c['num_microbatches']} microbatch(es) of "
      f"{c['microbatch_per_device']}/device (global {c['global_batch_size']} x {c['seq_len']}), "
      f"{c['dtype']}, remat {'on' if c['remat'] else 'off'}, scan_layers "
      f"{'on' if c['scan_layers'] else 'off'}, vocab_chunk_size {c['vocab_chunk_size']}",
      f"        {c['objective']}; "
      + (f"teacher {teacher['model_type']} {teacher['layers']}x{teacher['hidden_size']} "
         f"({'forward' if c['teacher_forward'] else 'cached targets' if c['offline'] else 'not run'})"
         if teacher else 'no teacher')
      + f", student {c['student']['model_type']} {c['student']['layers']}x"
        f"{c['student']['hidden_size']}",
      '',
      'memory per chip (XLA memory analysis)        GiB',
      f"  arguments                                  {_gib(m['argument'])}",
      f"  outputs                                    {_gib(m['output'])}",
      f"  aliases (donated state, counted once)      {_gib(m['alias'])}",
      f"  temporaries                                {_gib(m['temp'])}",
      f"  generated code                             {_gib(m['generated_code'])}",
      f"  total (sum of the kinds)                   {_gib(m['total'])}"
      + (f" of {_gib(m['hbm_capacity'])} HBM: {'fits' if rep['fits'] else 'DOES NOT FIT'}"
         if m['hbm_capacity'] else '')
      # XLA's buffer assignment, which decides "fits", shares memory between the kinds: at large
      # microbatches the sum overstates its peak (docs/scaling.md).
      + (' (XLA compiled it: its peak is below the sum)'
         if m['hbm_capacity'] and rep['fits'] and m['total'] > m['hbm_capacity'] else ''),
      f"compile (this machine)                       lower {rep['lower_seconds']:.1f} s, "
      f"compile {rep['compile_seconds']:.1f} s wall, {rep['compile_cpu_seconds']:.1f} s CPU",
      f"FLOPs per step, model (ours, matmuls)        {_flop(f['model_per_step'])} "
      f"({_flop(f['model_per_chip'])} per chip)",
      f"  compiled program, matmuls per chip         {_flop(f['hlo_matmul_per_chip'])} "
      "(loops by trip count, remat included)",
      f"  XLA cost_analysis per chip                 {_flop(f['xla_cost_analysis_per_chip'])} "
      "(each loop body counted once)",
      f"HBM bytes per chip (compiled program)        {_gib(rep['bytes_per_chip']['hlo_hbm'])} GiB",
  ]
  if rep['collectives']['bytes']:
    coll = ', '.join(f'{k} {v / 2 ** 20:,.1f} MiB' for k, v in rep['collectives']['bytes'].items())
    lines.append(f'collectives per chip (sent)                  {coll}')
  if e:
    chip = t['chip']
    lines += [
        f"estimate (roofline, not a measurement; {chip['kind']}: {chip['peak_tflops']:g} TFLOP/s "
        f"bf16, {chip['hbm_gbps']:g} GB/s HBM, {chip['ici_gbps']:.0f} GB/s ICI)",
        f"  compute / HBM / collectives                {_ms(e['compute_s'])} / "
        f"{_ms(e['memory_s'])} / {_ms(e['collective_s'])} ms",
        f"  step time                                  {_ms(e['step_time_s'])} ms "
        f"({_ms(e['step_time_s'] / c['num_microbatches'])} ms per microbatch)",
        f"  tokens/s per chip                          {e['tokens_per_s_per_chip']:,.0f}",
        f"  MFU (model FLOPs vs bf16 peak)             {100 * e['mfu']:.1f}%",
        f"  hours per billion tokens                   {e['hours_per_billion_tokens']:,.2f}",
        f"  run of num_train_steps={rep['num_train_steps']:,}{'':{max(1, 16 - len(str(rep['num_train_steps'])))}}"
        f"{e['run_hours']:,.2f} h",
    ]
  else:
    lines.append('estimate: none (no chip figures for this device kind)')
  return '\n'.join(lines)


def format_search(res: dict) -> str:
  """The console table of an `aot.search`."""
  head = ('| layout | mesh.shape | variant | microbatch/device | num_microbatches | HBM/chip (GiB) '
          '| est. step (ms) | tokens/s/chip | MFU | compiles |')
  lines = [head, '|' + '---|' * 10]
  for r in res['rows']:
    e = r['estimate'] or {}
    lines.append(
        f"| {r['layout']} | {r['mesh_shape']} | {r['variant']} | {r['microbatch_per_device'] or '-'} "
        f"| {r['num_microbatches'] or '-'} | {_gib(r['memory_total'])} | "
        f"{_ms(e.get('step_time_s'))} | "
        f"{'-' if not e else format(e['tokens_per_s_per_chip'], ',.0f')} | "
        f"{'-' if not e else format(100 * e['mfu'], '.1f') + '%'} | {r['compiles']} |")
  if res['flags']:
    f = res['flags']
    lines.append(f"fastest by the estimate: --config.mesh.shape='{tuple(f['mesh.shape'])}' "
                 f"--config.optim.num_microbatches={f['optim.num_microbatches']} "
                 f"--config.distill.vocab_chunk_size={f['distill.vocab_chunk_size']} "
                 f"--config.remat={f['remat']}")
  else:
    lines.append('nothing fits, not even one sequence per device.')
  return '\n'.join(lines)


def main(argv):
  """Compiles (or searches) `--config` for `--topology`; run through `absl.app.run`.

  Args:
    argv: the command line left after absl parsed its flags; only the program name is allowed.

  Raises:
    app.UsageError: positional arguments.
    SystemExit: code 3 when the step does not fit (or nothing fits, `--search`), code 2 after a
      bad config or topology.
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.setup()  # clean console lines, library chatter filtered
  from flaxdistil.storage import atomic  # pylint: disable=g-import-not-at-top
  from flaxdistil.training import aot  # pylint: disable=g-import-not-at-top
  from flaxdistil.training import topology  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  try:
    target = (topology.parse_target(FLAGS.topology, FLAGS.num_slices) if FLAGS.topology
              else topology.host_target())
    devices = topology.target_devices(target)
  except (ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  bad = [x for x in FLAGS.search_layouts if x not in ('data', 'fsdp', 'fsdp_tensor')]
  try:
    if bad:
      raise ValueError(f'--search_layouts {bad}: use some of data, fsdp, fsdp_tensor.')
    aot.search_variants(config, FLAGS.search_chunk, FLAGS.search_variants)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  name = (FLAGS.topology or 'host').replace(':', '_')
  out = FLAGS.json_out or f'train_compile_{name}.json'
  load = os.getloadavg()
  with cli.exit_on_error(config):
    if FLAGS.search:
      res = aot.search(config, target, devices, tensor=FLAGS.search_tensor,
                       chunk=FLAGS.search_chunk, log=lambda s: print(s, flush=True),
                       layouts=[x.replace('_', ' x ') for x in FLAGS.search_layouts],
                       variants=FLAGS.search_variants)
      res['load_average'] = [load[0], os.getloadavg()[0]]
      print(format_search(res))
      atomic.write_json(out, json.loads(json.dumps(res, default=str)))
      print(f'wrote {out}')
      sys.exit(0 if res['best'] else 3)
    try:
      rep = aot.compile_report(config, target, devices, hlo_out=FLAGS.hlo_out)
    except aot.OutOfMemory as e:
      figures = (f'{e.used_bytes / GIB:.2f} GiB needed per chip, {e.available_bytes / GIB:.2f} '
                 'GiB available' if e.used_bytes else 'figures: see the message')
      atomic.write_json(out, {'target': {'name': target.name, 'topology': target.topology_name},
                              'fits': False, 'used_bytes': e.used_bytes,
                              'available_bytes': e.available_bytes, 'error': e.message})
      print(f'does not fit on {target.name}: {figures}\n{e.message}\nwrote {out}',
            file=sys.stderr)
      sys.exit(3)
  rep['num_train_steps'] = int(config.num_train_steps)
  rep['load_average'] = [load[0], os.getloadavg()[0]]
  print(format_report(rep))
  atomic.write_json(out, json.loads(json.dumps(rep, default=str)))
  print(f'wrote {out}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
