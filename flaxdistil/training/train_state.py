"""The train state: what is trained and checkpointed, its shardings, and a fresh one.

`{'step', 'params', 'opt_state', 'rng', 'num_skipped'}` plus `'proj'` (TinyBERT projections of a
narrower student). The teacher is not part of it: it is an input of the run, never differentiated
and never checkpointed. `state_layout` gives the shardings and abstract state for any mesh, so a
checkpoint restores onto another mesh than the one that wrote it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxdistil.model import bert
from flaxdistil.objectives import intermediate
from flaxdistil.training import sharding

State = dict  # {'step', 'params', 'opt_state', 'rng', 'num_skipped'} [+ 'proj']


def trainable_tree(state: State) -> dict:
  """What the optimizer updates: the student, plus projections if any.

  Returns:
    `{'student': state['params']}`, plus `'proj': state['proj']` when the state has it.
  """
  return {'student': state['params'], **({'proj': state['proj']} if 'proj' in state else {})}


def state_layout(student_config: bert.ModelConfig, tx, mesh, rules, projection=None):
  """`(shardings, abstract_state)` of the train state for `mesh`/`rules`.

  The same layout restores a checkpoint onto any mesh, e.g. one CPU device
  for export of a checkpoint written by a sharded run. Abstract leaves carry
  their target sharding (`sharding.abstract_like`).

  Args:
    student_config: the student's shapes.
    tx: the optimizer (`optimizer.make_optimizer`).
    mesh: the mesh to lay the state out on.
    rules: its logical axis rules.
    projection: `(student_hidden, teacher_hidden)` when the state holds
      TinyBERT projections (`state['proj']`), else None.

  Returns:
    `(shardings, abstract_state)`: a `State`-shaped tree of `NamedSharding`s (step, rng and
    num_skipped replicated; params and optimizer state by the rules), and the same tree of
    `ShapeDtypeStruct`s (`step`, `num_skipped` int32 scalars, `rng` uint32 `[2]`).
  """
  p_shard, params = sharding.model_param_layout(student_config, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = {
      'step': jax.ShapeDtypeStruct((), jnp.int32),
      'params': params,
      'rng': jax.ShapeDtypeStruct((2,), jnp.uint32),
      'num_skipped': jax.ShapeDtypeStruct((), jnp.int32),
  }
  shard = {'step': replicated, 'params': p_shard, 'rng': replicated, 'num_skipped': replicated}
  if projection:
    boxed_proj = intermediate.abstract_projection_params(*projection)
    abstract['proj'] = nn.meta.unbox(boxed_proj)
    shard['proj'] = sharding.param_shardings(boxed_proj, mesh, rules)
  trainable = trainable_tree(abstract)
  abstract['opt_state'] = jax.eval_shape(tx.init, trainable)
  shard['opt_state'] = sharding.opt_state_shardings(tx, trainable, trainable_tree(shard), mesh)
  return shard, sharding.abstract_like(abstract, shard)


def init_state(params, tx, rng, shardings=None, proj=None) -> State:
  """A fresh train state (step 0) from student params (host or device arrays).

  Args:
    params: student params.
    tx: the optimizer; its state is initialised on `trainable_tree(state)`.
    rng: `jax.random.PRNGKey` for dropout (folded with the step).
    shardings: `state_layout(...)[0]` to place everything, or None (default
      device).
    proj: projection params, or None.

  Returns:
    The `State`: `step` and `num_skipped` int32 0, `params`, `rng`, `opt_state` (and `proj`).
  """
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'rng': rng,
           'num_skipped': jnp.zeros((), jnp.int32)}
  if proj is not None:
    state['proj'] = proj
  init = tx.init
  if shardings is not None:
    state = {k: jax.device_put(v, shardings[k]) for k, v in state.items()}
    init = jax.jit(tx.init, out_shardings=shardings['opt_state'])
  state['opt_state'] = init(trainable_tree(state))
  return state
