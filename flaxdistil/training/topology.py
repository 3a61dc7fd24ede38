"""Accelerator slices by the names users write (`v5e-16`, `v4-8`), their chips, and their devices.

`parse_target('v5e-16')` gives the `Target`: the `jax.experimental.topologies.get_topology_desc`
arguments of that slice (as MaxText's `accelerator_to_spec_map`) and the chip's datasheet figures
the step-time estimate needs. `target_devices(target)` returns compile-only devices of the slice:
with the `libtpu` wheel installed, a machine without TPUs compiles for any TPU topology
(`train_compile`). The host's own devices (CPU, or GPUs) are the `host_target()`.

GPUs compile deviceless the same way with the CUDA plugin (`pip install jax-cuda12-plugin==<jax
version> jax-cuda12-pjrt==<jax version>`; no CUDA libraries or GPU needed): `h100`, `h200`, or
`h100-8` for the GPUs of one host, described to XLA by a `GpuTargetConfigProto`
(`gpu_target_config`), as in JAX's deviceless AOT test.

Slice names count what the generation's product names count: TensorCores for v4 and v5p (two per
chip, one megacore device each, so v4-8 and v5p-8 are 4 chips), chips for v5e and v6e (one core
each: v5e-16 is 16 chips). `v5litepod-16` (the Cloud TPU accelerator type) is v5e-16. A raw
topology (`v5e:4x8`, `v4:4x4x12`) is accepted for shapes the name rule does not give.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Datasheet figures of one chip (per chip, dense bf16).

  Attributes:
    kind: `jax.Device.device_kind` of the chip's devices (e.g. 'TPU v5 lite').
    hbm_gib: HBM capacity, GiB.
    peak_tflops: peak dense bf16 matmul throughput, TFLOP/s.
    hbm_gbps: HBM bandwidth, GB/s (1e9 bytes/s).
    ici_gbps: interconnect bandwidth per chip for collectives, GB/s: the pod's all-reduce
      bandwidth divided by its chips (TPU) or NVLink per direction (GPU).
    source: where the figures come from.
  """
  kind: str
  hbm_gib: float
  peak_tflops: float
  hbm_gbps: float
  ici_gbps: float
  source: str


_TPU_DOC = 'Cloud TPU system architecture pages (docs.cloud.google.com/tpu/docs/{})'
CHIPS = {
    'v4': ChipSpec('TPU v4', 32, 275, 1200, 1.1e6 / 4096, _TPU_DOC.format('v4')),
    'v5e': ChipSpec('TPU v5 lite', 16, 197, 819, 51.2e3 / 256, _TPU_DOC.format('v5e')),
    'v5p': ChipSpec('TPU v5', 95, 459, 2765, 600, _TPU_DOC.format('v5p')),
    'v6e': ChipSpec('TPU v6 lite', 32, 918, 1640, 102.4e3 / 256, _TPU_DOC.format('v6e')),
    'h100': ChipSpec('NVIDIA H100 80GB HBM3', 80, 989, 3350, 450,
                     'NVIDIA H100 SXM datasheet (dense bf16; NVLink 900 GB/s bidirectional)'),
    'h200': ChipSpec('NVIDIA H200', 141, 989, 4800, 450,
                     'NVIDIA H200 SXM datasheet (dense bf16; NVLink 900 GB/s bidirectional)'),
}
# Generation -> (topology prefix, name counts cores (2 per chip), 3D torus, chip config name).
_GENERATIONS = {'v4': ('v4', True, True, 'megacore_dense'), 'v5p': ('v5', True, True, 'megacore'),
                'v5e': ('v5e', False, False, 'default'), 'v6e': ('v6e', False, False, 'default')}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6lite': 'v6e'}
_PREFIX_TO_GEN = {'v4': 'v4', 'v5': 'v5p', 'v5p': 'v5p', 'v5e': 'v5e', 'v6e': 'v6e'}
EXAMPLES = ('v4-8, v5e-16, v5litepod-16, v5p-8, v6e-8, v5e-256, a topology like v5e:4x8, or '
            'GPUs of one host: h100, h100-8, h200-8')
# Hopper GPUs for XLA's deviceless compiler (GpuDeviceInfoProto fields; NVIDIA datasheets:
# 132 SMs at 1.98 GHz boost, 50 MiB L2, 228 KiB shared memory per SM).
_GPU_DEVICES = {'h100': (84_929_347_584, 3.35e12), 'h200': (150_754_820_096, 4.8e12)}


@dataclasses.dataclass(frozen=True)
class Target:
  """What to compile for.

  Attributes:
    name: as the user wrote it (`v5e-16`), or 'host' for this machine's devices.
    platform: 'tpu', or the host's platform ('cpu', 'gpu').
    topology_name: `get_topology_desc`'s `topology_name` (`v5e:4x4`), '' for the host.
    chips: chips of the slice (all slices).
    chip: the chip's `ChipSpec`, or None (a CPU host: no estimate).
    chip_config_name / chips_per_host_bounds / wrap: the remaining `get_topology_desc` arguments
      (MaxText's `accelerator_to_spec_map`).
    num_slices: slices (> 1: multi-slice over the data-center network).
    accelerator_type: the Cloud TPU accelerator type (`v5litepod-16`), for libtpu's environment.
    target_config: a GPU's `GpuTargetConfigProto` text (GPU targets only).
  """
  name: str
  platform: str
  topology_name: str
  chips: int
  chip: ChipSpec | None
  chip_config_name: str = 'default'
  chips_per_host_bounds: tuple = (2, 2, 1)
  wrap: tuple = (False, False, False)
  num_slices: int = 1
  accelerator_type: str = ''
  target_config: str = ''

  def topology_kwargs(self) -> dict:
    """Keyword arguments of `jax.experimental.topologies.get_topology_desc`."""
    if self.platform == 'gpu':
      return dict(platform='cuda', target_config=self.target_config, topology=self.topology_name)
    return dict(platform=self.platform, topology_name=self.topology_name,
                chip_config_name=self.chip_config_name,
                chips_per_host_bounds=self.chips_per_host_bounds, num_slices=self.num_slices,
                wrap=self.wrap)


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape of `chips` chips: powers of two grown as Cloud TPU slices grow.

  2D (v5e, v6e): 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16. 3D (v4, v5p): 2x2x1, 2x2x2, 2x2x4,
  2x4x4, 4x4x4, 4x4x8, ... (from 2x2x1, the last dimension equal to the smallest doubles).

  Raises:
    ValueError: `chips` is not a power of two of at least 4 (3D), or not 1 / a power of two of
      at least 4 (2D).
  """
  if dims == 2 and chips == 1:
    return (1, 1)
  if chips < 4 or chips & (chips - 1):
    raise ValueError(f'{chips} chips is not a slice this name rule knows; pass a topology such as '
                     '"v5e:4x8" or "v4:4x4x12" instead.')
  shape = [2, 2] if dims == 2 else [2, 2, 1]
  if dims == 3:
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
      if shape[2] < shape[1]:
        shape[2] *= 2
        continue
      i = max(j for j, s in enumerate(shape) if s == min(shape))
      shape[i] *= 2
  else:
    while math.prod(shape) < chips:
      i = max(j for j, s in enumerate(shape) if s == min(shape))
      shape[i] *= 2
  return tuple(shape)


def parse_target(name: str, num_slices: int = 1) -> Target:
  """The `Target` of a slice name (`v5e-16`, `v4-8`, `v5litepod-16`, `v5e:4x4`).

  Args:
    name: the slice, as users write it (module docstring).
    num_slices: slices of that shape (multi-slice training over DCN).

  Returns:
    The `Target`, chips counted over all slices.

  Raises:
    ValueError: an unknown generation or a size that is not a slice (names the accepted forms).
  """
  raw = name.strip().lower()
  m = re.fullmatch(r'(h100|h200)(?:-(\d+))?', raw)
  if m:
    gpus = int(m.group(2) or 1)
    if not 1 <= gpus <= 8:
      raise ValueError(f'--topology {name!r}: GPU targets are the 1-8 GPUs of one host.')
    return Target(name=name, platform='gpu', topology_name=f'1x1x{gpus}', chips=gpus,
                  chip=CHIPS[m.group(1)], target_config=gpu_target_config(m.group(1)))
  m = re.fullmatch(r'(v\d[a-z]*):(\d+(?:x\d+)+)', raw)
  if m:  # a topology as get_topology_desc takes it
    gen = _PREFIX_TO_GEN.get(m.group(1))
    if gen is None:
      raise ValueError(f'--topology {name!r}: unknown TPU generation {m.group(1)!r}; use {EXAMPLES}.')
    shape = tuple(int(x) for x in m.group(2).split('x'))
    chips = math.prod(shape)
  else:
    m = re.fullmatch(r'(v\d[a-z]*)-(\d+)', raw)
    if not m:
      raise ValueError(f'--topology {name!r} is not a TPU slice name; use {EXAMPLES}.')
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in _GENERATIONS:
      raise ValueError(f'--topology {name!r}: unknown TPU generation {m.group(1)!r}; use {EXAMPLES}.')
    count = int(m.group(2))
    cores = _GENERATIONS[gen][1]
    if cores and count % 2:
      raise ValueError(f'--topology {name!r}: {gen} names count TensorCores (2 per chip), so the '
                       f'number must be even, e.g. {gen}-8 (4 chips).')
    chips = count // 2 if cores else count
    try:
      shape = torus_shape(chips, 3 if _GENERATIONS[gen][2] else 2)
    except ValueError as e:
      raise ValueError(f'--topology {name!r}: {e}') from e
  prefix, cores, three_d, chip_config = _GENERATIONS[gen]
  if three_d and len(shape) != 3 or not three_d and len(shape) != 2:
    raise ValueError(f'--topology {name!r}: {gen} slices are {3 if three_d else 2}-dimensional.')
  # Wrap-around links: a full 4-wide (3D) or 16-wide (2D) dimension is a torus ring.
  wrap = tuple((s >= 4 if three_d else s >= 16) and (math.prod(shape) >= (64 if three_d else 128))
               for s in shape) + ((False,) if not three_d else ())
  count = chips * (2 if cores else 1)
  product = {'v5e': 'v5litepod'}.get(gen, gen)
  return Target(name=name, platform='tpu', topology_name=f'{prefix}:' + 'x'.join(map(str, shape)),
                chips=chips * num_slices, chip=CHIPS[gen], chip_config_name=chip_config,
                # a host holds up to 2 x 2 chips; a smaller slice (v5e-1, v5e-2) is all one host
                chips_per_host_bounds=(min(2, shape[0]), min(2, shape[1]), 1), wrap=wrap,
                num_slices=num_slices,
                accelerator_type=f'{product}-{count}')


def gpu_target_config(gpu: str) -> str:
  """The `GpuTargetConfigProto` text of a Hopper GPU ('h100', 'h200') for deviceless compiles."""
  memory, bandwidth = _GPU_DEVICES[gpu]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{CHIPS[gpu].kind}"
"""


def has_local_gpu() -> bool:
  """True when this machine has NVIDIA GPUs (`/dev/nvidia<n>`)."""
  return bool(glob.glob('/dev/nvidia[0-9]*'))


def has_local_tpu() -> bool:
  """True when this machine has TPU chips attached (`/dev/accel*` or `/dev/vfio/<n>`)."""
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def prepare_compile_only_tpu(target: Target) -> None:
  """Sets libtpu's environment for compile-only devices on a machine without TPUs.

  Call before the TPU plugin is first initialised. Without a local TPU, libtpu probes the
  machine's metadata, warns that it cannot find the accelerator type and worker hostnames, and
  takes an exclusive lock (`/tmp/libtpu_lockfile`) that stops a second compile running at the
  same time; the values set here skip all three (`TPU_ACCELERATOR_TYPE` always, the others only
  where unset). On a TPU VM nothing is set.
  """
  if target.platform != 'tpu' or has_local_tpu():
    return
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  # Set, not defaulted: a value inherited from an earlier target's compile (a parent process that
  # compiled for another slice) would describe the wrong chip layout to libtpu.
  os.environ['TPU_ACCELERATOR_TYPE'] = target.accelerator_type
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')


def target_devices(target: Target) -> list:
  """The devices to compile for: compile-only devices of the slice, or the host's devices.

  Raises:
    RuntimeError: a TPU target without the `libtpu` wheel, or a GPU target without the CUDA
      plugin (names the pip line).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if target.name == 'host':
    return list(jax.devices())
  if target.platform == 'gpu' and not has_local_gpu():
    # The CUDA plugin fails to start without a GPU and would then not be registered at all; with
    # CPU as the only backend its compiler is still there for compile-only topologies.
    jax.config.update('jax_platforms', 'cpu')
  prepare_compile_only_tpu(target)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(**target.topology_kwargs()).devices)
  except Exception as e:  # noqa: BLE001 - a missing plugin: one clear message
    text = str(e).lower()
    if target.platform == 'gpu' and ('not implemented' in text or 'unknown backend' in text
                                     or isinstance(e, NotImplementedError)):
      raise RuntimeError(
          f'Compiling for {target.name} needs the CUDA plugin: pip install '
          f'"jax-cuda12-plugin=={jax.__version__}" "jax-cuda12-pjrt=={jax.__version__}" '
          f'(no GPU or CUDA libraries needed); {type(e).__name__}: {e}') from e
    if target.platform == 'tpu' and ('libtpu' in text or 'plugin' in text
                                     or isinstance(e, ImportError)):
      raise RuntimeError(
          f'Compiling for {target.name} needs the libtpu wheel: pip install "jax[tpu]=='
          f'{jax.__version__}" (in the test extra of flaxdistil); {type(e).__name__}: {e}') from e
    raise


def host_target() -> Target:
  """This machine's devices (`jax.devices()`), with the chip's figures when they are known."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kind = devices[0].device_kind.lower()
  chip = None
  for key, spec in CHIPS.items():
    if key in kind or spec.kind.lower() == kind:
      chip = spec
      break
  return Target(name='host', platform=devices[0].platform, topology_name='', chips=len(devices),
                chip=chip)
