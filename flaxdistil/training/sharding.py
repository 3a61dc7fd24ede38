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

  Args:
    mesh_shape: one size per axis (`mesh.shape`); at most one -1 ("the rest").
    mesh_axes: the axis names (`mesh.axes`), as many as sizes.
    num_devices: devices the mesh must cover exactly.

  Returns:
    `{axis name: size}` in axis order, the sizes multiplying to `num_devices`.

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

  Returns:
    The `Mesh`, devices in `mesh_utils.create_device_mesh`'s topology-aware order (else in the
    given order), every axis `AxisType.Auto` where JAX has axis types.

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
  """A (1, 1, 1) mesh over `device` (default: the first local one), for restore and export.

  Returns:
    A `Mesh` with axes `DEFAULT_MESH_AXES`, so the default rules apply unchanged.
  """
  return create_mesh((1, 1, 1), DEFAULT_MESH_AXES,
                     devices=[device if device is not None else jax.local_devices()[0]])


def rules_tuple(rules) -> tuple:
  """Normalises config rules (lists from ConfigDict) into a hashable tuple.

  Args:
    rules: `(logical axis, mesh axes)` pairs; mesh axes are a name, a list/tuple of names,
      or None (replicated).

  Returns:
    A tuple of `(logical axis, mesh axes)` pairs, list axes turned into tuples.
  """
  out = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  """Mesh + logical rules active while tracing, so `with_logical_constraint` applies.

  Args:
    mesh: entered with `jax.set_mesh` (or `jax.sharding.use_mesh`, or as a context manager on
      older JAX).
    rules: logical axis rules (`rules_tuple` input), for `nn.logical_axis_rules`.
  """
  set_mesh = getattr(jax, 'set_mesh', None) or getattr(jax.sharding, 'use_mesh', None)
  with contextlib.ExitStack() as stack:
    stack.enter_context(set_mesh(mesh) if set_mesh else mesh)
    stack.enter_context(nn.logical_axis_rules(rules_tuple(rules)))
    yield


def logical_to_shardings(logical_specs, mesh: Mesh, rules) -> Any:
  """Tree of logical `PartitionSpec`s -> tree of `NamedSharding`s.

  Args:
    logical_specs: tree of `PartitionSpec`s of logical axis names (`nn.get_partition_spec`).
    mesh: the mesh to place onto.
    rules: logical axis rules mapping those names to `mesh` axes.

  Returns:
    The same tree of `NamedSharding`s on `mesh` (`nn.logical_to_mesh_sharding`).
  """
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_tuple(rules))


def param_shardings(abstract_boxed_params, mesh: Mesh, rules) -> Any:
  """`NamedSharding` per parameter from the model's logical annotations.

  Args:
    abstract_boxed_params: `jax.eval_shape` of `model.init(...)['params']`,
      still holding `nn.LogicallyPartitioned` boxes (`bert.abstract_params`).
    mesh: the mesh to place onto.
    rules: logical axis rules.

  Returns:
    Unboxed tree of `NamedSharding`s; a dimension its mesh axes do not divide evenly is
    replicated instead (e.g. vocab 30522 over 4 tensor shards).
  """
  shardings = logical_to_shardings(nn.get_partition_spec(abstract_boxed_params), mesh, rules)
  shapes = nn.meta.unbox(abstract_boxed_params)
  return jax.tree.map(lambda sh, x: _fit(sh, x.shape), shardings, shapes)


def model_param_layout(model_config, mesh: Mesh, rules) -> tuple[Any, Any]:
  """`(shardings, abstract params)` of a `bert.MaskedLM` of `model_config` on `mesh`.

  No memory is allocated: the abstract params are `ShapeDtypeStruct`s (unboxed).

  Args:
    model_config: the `bert.ModelConfig` of the model.
    mesh: the mesh to place onto.
    rules: logical axis rules.

  Returns:
    `(shardings, abstract_params)`: `param_shardings` of the model, and its unboxed
    `ShapeDtypeStruct` tree (without shardings; see `abstract_like`).
  """
  boxed = bert.abstract_params(model_config)
  return param_shardings(boxed, mesh, rules), nn.meta.unbox(boxed)


def abstract_like(tree: Any, shardings: Any) -> Any:
  """`tree`'s shapes and dtypes carrying `shardings`, to restore into or to lower a step for.

  Nothing is allocated, so a step can be lowered for a mesh whose devices are absent.

  Args:
    tree: arrays or `ShapeDtypeStruct`s.
    shardings: a tree of the same structure, one `jax.sharding.Sharding` per leaf.

  Returns:
    The tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`.
  """
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
  """Optimizer state sharded like the parameters it mirrors, scalars replicated.

  Args:
    tx: the optimizer.
    abstract_params: the trainable tree (arrays or `ShapeDtypeStruct`s) `tx` is initialised on.
    p_shardings: its `NamedSharding`s, same structure.
    mesh: the mesh of the replicated leaves.

  Returns:
    The tree of `NamedSharding`s of `tx.init(abstract_params)`: parameter-shaped leaves (Adam
    moments) take their parameter's sharding, the rest (counts) are replicated.
  """
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, p_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of `[batch, seq_len]` inputs: rows over ('data', 'fsdp') by the default rules.

  Args:
    mesh: the mesh to place onto.
    rules: logical axis rules (`act_batch`, `act_len` are read).

  Returns:
    The `NamedSharding` of the logical axes `('act_batch', 'act_len')`.
  """
  spec = nn.logical_to_mesh_axes(('act_batch', 'act_len'), rules_tuple(rules))
  return NamedSharding(mesh, spec)


def num_batch_shards(mesh_or_shape: Mesh | Mapping[str, int], rules) -> int:
  """How many ways the batch dimension is split (a batch must divide by it).

  Args:
    mesh_or_shape: a `Mesh`, or its `{axis: size}` shape.
    rules: logical axis rules (the mesh axes of `act_batch` are read).

  Returns:
    The product of the sizes of the mesh axes `act_batch` maps to; 1 if it maps to none.
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

  Args:
    host_batch: `{name: [global_batch_size / process_count, ...]}` numpy arrays of this host.
    sharding: the batch sharding (`batch_sharding`); a leaf of lower rank (labels `[B]`) keeps
      only its leading axes, the extra dimensions of a higher-rank leaf are not split.
    global_batch_size: rows of the global batch, over all hosts.

  Returns:
    `{name: jax.Array [global_batch_size, ...]}`, same dtypes, sharded by `sharding`.
  """
  out = {}
  for k, v in host_batch.items():
    global_shape = (global_batch_size,) + tuple(v.shape[1:])
    out[k] = jax.make_array_from_process_local_data(leaf_sharding(sharding, v.ndim), v,
                                                    global_shape)
  return out


def leaf_sharding(batch_sharding_: NamedSharding, ndim: int) -> NamedSharding:
  """The sharding of a batch leaf of rank `ndim` under the `[batch, seq_len]` `batch_sharding`.

  Rank-1 leaves (one label per example) keep only the batch axis of the spec; the extra
  dimensions of a higher-rank leaf (cached teacher targets `[B, T, k]`) are not split.
  """
  spec = tuple(batch_sharding_.spec)[:ndim] + (None,) * max(0, ndim - len(batch_sharding_.spec))
  return NamedSharding(batch_sharding_.mesh, PartitionSpec(*spec))


def check_batch_divisibility(global_batch_size: int, num_microbatches: int,
                             mesh_or_shape: Mesh | Mapping[str, int], rules) -> None:
  """Checks that every microbatch splits evenly over the batch shards.

  Args:
    global_batch_size: `data.global_batch_size`.
    num_microbatches: `optim.num_microbatches`.
    mesh_or_shape: a `Mesh`, or its `{axis: size}` shape (`resolve_mesh_shape`).
    rules: logical axis rules (`num_batch_shards`).

  Raises:
    ValueError: the global batch is not divisible by `num_microbatches`, or a microbatch not
      by the batch shards (the message names the multiple to use).
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
