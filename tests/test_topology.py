"""topology: slice names as users write them -> get_topology_desc arguments, chips, devices."""

import pytest

from flaxdistil.training import topology


@pytest.mark.parametrize('name, topo, chips, accel', [
    ('v4-8', 'v4:2x2x1', 4, 'v4-8'),             # v4 counts TensorCores: 4 chips
    ('v4-32', 'v4:2x2x4', 16, 'v4-32'),
    ('v4-128', 'v4:4x4x4', 64, 'v4-128'),
    ('v5p-8', 'v5:2x2x1', 4, 'v5p-8'),
    ('v5p-256', 'v5:4x4x8', 128, 'v5p-256'),
    ('v5e-1', 'v5e:1x1', 1, 'v5litepod-1'),
    ('v5e-8', 'v5e:2x4', 8, 'v5litepod-8'),       # v5e counts chips
    ('v5litepod-16', 'v5e:4x4', 16, 'v5litepod-16'),
    ('v5e-256', 'v5e:16x16', 256, 'v5litepod-256'),
    ('v6e-8', 'v6e:2x4', 8, 'v6e-8'),
    ('v6e-128', 'v6e:8x16', 128, 'v6e-128'),
    ('v5e:4x8', 'v5e:4x8', 32, 'v5litepod-32'),   # a raw topology passes through
])
def test_names_map_like_maxtexts_accelerator_table(name, topo, chips, accel):
  t = topology.parse_target(name)
  assert (t.topology_name, t.chips, t.accelerator_type) == (topo, chips, accel)
  gen = {'v4': 'v4', 'v5': 'v5p', 'v5e': 'v5e', 'v6e': 'v6e'}[topo.split(':')[0]]
  assert t.platform == 'tpu' and t.chip is topology.CHIPS[gen]


def test_chip_config_and_wrap():
  assert topology.parse_target('v4-8').chip_config_name == 'megacore_dense'
  assert topology.parse_target('v5p-8').chip_config_name == 'megacore'
  assert topology.parse_target('v5e-8').chip_config_name == 'default'
  assert topology.parse_target('v5e-256').wrap == (True, True, False)
  assert topology.parse_target('v5e-128').wrap == (False, True, False)
  assert topology.parse_target('v4-128').wrap == (True, True, True)
  assert topology.parse_target('v4-64').wrap == (False, False, False)
  assert topology.parse_target('v5e-16', num_slices=2).chips == 32
  assert topology.parse_target('v5e-16').chip.hbm_gib == 16
  assert topology.parse_target('v6e-8').chip.peak_tflops == 918


@pytest.mark.parametrize('name, match', [
    ('v5e-3', '3 chips is not a slice'),
    ('v4-7', 'count TensorCores'),
    ('v9-8', 'unknown TPU generation'),
    ('a100', 'not a TPU slice name'),  # (h100 / h200 name GPU targets)
    ('v5e:2x2x2', '2-dimensional'),
])
def test_bad_names_say_what_is_accepted(name, match):
  with pytest.raises(ValueError, match=match):
    topology.parse_target(name)


def test_compile_only_devices_of_a_slice():
  # libtpu (jax[tpu], in the package's test extra) gives compile-only devices on a machine without TPUs.
  devices = topology.target_devices(topology.parse_target('v4-8'))
  assert len(devices) == 4 and devices[0].device_kind == 'TPU v4'  # megacore: a device per chip
  devices = topology.target_devices(topology.parse_target('v5e-16'))
  assert len(devices) == 16 and devices[0].device_kind == 'TPU v5 lite'


def test_host_target_is_this_machine():
  t = topology.host_target()
  assert t.platform == 'cpu' and t.chip is None and t.chips >= 1
