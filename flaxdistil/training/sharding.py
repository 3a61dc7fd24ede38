"""Device mesh, logical-axis sharding rules and global batches.

One code path for every topology: `jax.jit` with `NamedSharding`s over a
`jax.sharding.Mesh` (what `pjit` became; `pmap` is in maintenance mode in
current JAX and is not used). Parameters and activations carry logical axis
names (`vocab`, `embed`, `heads`, `mlp`, `act_batch`, ...; see `model/bert.py`),
and `logical_axis_rules` from the config map them onto mesh axes, as in
MaxText/t5x:

  pure data parallel   mesh_shape (-1, 1, 1)  over ('data', 'fsdp', 'tensor')
  FSDP (ZeRO-3)        mesh_shape (1, -1, 1)  params + optimizer state sharded on `embed`
  tensor parallel      mesh_shape (1, 1, -1)  attention heads / MLP / vocab split
"""

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import optax

from flaxdistil.model import bert

# Default rules (t5x/MaxText style). A mesh axis of size 1 makes its rule a no-op,
# so the same rules serve every mesh shape.
DEFAULT_LOGICAL_AXIS_RULES = (
    ('act_batch', ('data', 'fsdp')),
    ('act_len', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
)


DEFAULT_MESH_AXES = ('data', 'fsdp', 'tensor')


def resolve_mesh_shape(mesh_shape: Sequence[int], mesh_axes: Sequence[str],
                       num_devices: int) -> dict[str, int]:
  """`{axis: size}` of `mesh_shape` over `num_devices` devices, its -1 resolved.

  Raises:
    ValueError: lengths differ, more than one -1, or the product does not
      equal the number of devices.
  """
  shape = list(mesh_shape)
  if len(shape) != len(mesh_axes):
    raise ValueError(f'mesh.shape {tuple(shape)} and mesh.axes {tuple(mesh_axes)} differ in length.')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh.shape {tuple(shape)} may contain at most one -1.')
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ValueError(f'mesh.shape {tuple(shape)}: {num_devices} devices are not divisible by {known}.')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f'mesh.shape {tuple(shape)} needs {math.prod(shape)} devices but {num_devices} are '
        f'available; use -1 for one axis to take the rest.')
  return dict(zip(mesh_axes, shape))


def create_mesh(mesh_shape: Sequence[int], mesh_axes: Sequence[str],
                devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a `Mesh` over all (global) devices.

  Args:
    mesh_shape: one size per axis; exactly one entry may be -1 ("the rest").
    mesh_axes: axis names, e.g. ('data', 'fsdp', 'tensor').
    devices: defaults to `jax.devices()` (all hosts).

  Raises:
    ValueError: as `resolve_mesh_shape`.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(resolve_mesh_shape(mesh_shape, mesh_axes, len(devices)).values())
  try:
    from jax.experimental import mesh_utils  # topology-aware device order on TPU
    dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    dev_array = np.asarray(devices).reshape(shape)
  kwargs = {}
  if hasattr(jax.sharding, 'AxisType'):
    # Auto axes = classic GSPMD propagation; newer JAX defaults to Explicit.
    kwargs['axis_types'] = (jax.sharding.AxisType.Auto,) * len(shape)
  return Mesh(dev_array, tuple(mesh_axes), **kwargs)


def single_device_mesh(device=None) -> Mesh:
  """A (1, 1, 1) mesh over `device` (default: the first local one), for restore and export."""
  return create_mesh((1, 1, 1), DEFAULT_MESH_AXES,
                     devices=[device if device is not None else jax.local_devices()[0]])


def rules_tuple(rules) -> tuple:
  """Normalises config rules (lists from ConfigDict) into a hashable tuple."""
  out = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  """Mesh + logical rules active while tracing, so `with_logical_constraint` applies."""
  set_mesh = getattr(jax, 'set_mesh', None) or getattr(jax.sharding, 'use_mesh', None)
  with contextlib.ExitStack() as stack:
    stack.enter_context(set_mesh(mesh) if set_mesh else mesh)
    stack.enter_context(nn.logical_axis_rules(rules_tuple(rules)))
    yield


def logical_to_shardings(logical_specs, mesh: Mesh, rules) -> Any:
  """Tree of logical `PartitionSpec`s -> tree of `NamedSharding`s."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_tuple(rules))


def param_shardings(abstract_boxed_params, mesh: Mesh, rules) -> Any:
  """`NamedSharding` per parameter from the model's logical annotations.

  Args:
    abstract_boxed_params: `jax.eval_shape` of `model.init(...)['params']`,
      still holding `nn.LogicallyPartitioned` boxes (`models.abstract_params`).
  """
  shardings = logical_to_shardings(nn.get_partition_spec(abstract_boxed_params), mesh, rules)
  shapes = nn.meta.unbox(abstract_boxed_params)
  return jax.tree.map(lambda sh, x: _fit(sh, x.shape), shardings, shapes)


def model_param_layout(model_config, mesh: Mesh, rules) -> tuple[Any, Any]:
  """`(shardings, abstract params)` of a `bert.MaskedLM` of `model_config` on `mesh`.

  No memory is allocated: the abstract params are `ShapeDtypeStruct`s (unboxed).
  """
  boxed = bert.abstract_params(model_config)
  return param_shardings(boxed, mesh, rules), nn.meta.unbox(boxed)


def abstract_like(tree: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct` tree of `tree`'s shapes and dtypes carrying `shardings` (to restore into,
  or to lower a step for a mesh without allocating it)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _fit(named: NamedSharding, shape) -> NamedSharding:
  """Replicates any dimension its mesh axes do not divide evenly.

  E.g. vocab 30522 over a tensor axis of 4: JAX cannot place uneven shards, and
  replicating that one dimension (the embedding's other dimension stays
  sharded) is cheaper than padding the vocabulary.
  """
  spec = list(named.spec) + [None] * (len(shape) - len(named.spec))
  for i, axes in enumerate(spec):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else axes
    if shape[i] % math.prod(named.mesh.shape[a] for a in names):
      spec[i] = None
  return NamedSharding(named.mesh, PartitionSpec(*spec))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, p_shardings,
                        mesh: Mesh) -> Any:
  """Optimizer state sharded like the parameters it mirrors, scalars replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, p_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of `[batch, seq_len]` inputs: rows over ('data', 'fsdp')."""
  spec = nn.logical_to_mesh_axes(('act_batch', 'act_len'), rules_tuple(rules))
  return NamedSharding(mesh, spec)


def num_batch_shards(mesh_or_shape: Mesh | Mapping[str, int], rules) -> int:
  """How many ways the batch dimension is split (a batch must divide by it).

  Args:
    mesh_or_shape: a `Mesh`, or its `{axis: size}` shape.
  """
  shape = dict(getattr(mesh_or_shape, 'shape', mesh_or_shape))
  spec = nn.logical_to_mesh_axes(('act_batch', 'act_len'), rules_tuple(rules))
  axes = spec[0] if len(spec) else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(shape[a] for a in axes)


def make_global_batch(host_batch: Mapping[str, np.ndarray], sharding: NamedSharding,
                      global_batch_size: int) -> dict:
  """Host-local numpy rows -> global `jax.Array`s (one call on every host).

  Each host passes only the rows it read (`global_batch_size / process_count`
  of them, in process order); `jax.make_array_from_process_local_data`
  assembles the global `[global_batch_size, seq_len]` array without any host
  holding all of it.
  """
  out = {}
  for k, v in host_batch.items():
    global_shape = (global_batch_size,) + tuple(v.shape[1:])
    # Rank-1 leaves (one label per example) keep only the batch axis of the spec.
    spec = tuple(sharding.spec)[:v.ndim] + (None,) * max(0, v.ndim - len(sharding.spec))
    leaf = NamedSharding(sharding.mesh, PartitionSpec(*spec))
    out[k] = jax.make_array_from_process_local_data(leaf, v, global_shape)
  return out


def check_batch_divisibility(global_batch_size: int, num_microbatches: int,
                             mesh_or_shape: Mesh | Mapping[str, int], rules) -> None:
  """Raises ValueError unless every microbatch splits evenly over the batch shards.

  Args:
    mesh_or_shape: a `Mesh`, or its `{axis: size}` shape (`resolve_mesh_shape`).
  """
  mesh_shape = dict(getattr(mesh_or_shape, 'shape', mesh_or_shape))
  shards = num_batch_shards(mesh_shape, rules)
  if global_batch_size % num_microbatches:
    raise ValueError(
        f'data.global_batch_size={global_batch_size} is not divisible by '
        f'optim.num_microbatches={num_microbatches}.')
  micro = global_batch_size // num_microbatches
  if micro % shards:
    raise ValueError(
        f'microbatch of {micro} sequences (global_batch_size={global_batch_size} / '
        f'num_microbatches={num_microbatches}) is not divisible by the {shards} batch shards of '
        f'mesh {dict(mesh_shape)}; choose global_batch_size as a multiple of '
        f'{shards * num_microbatches}.')
