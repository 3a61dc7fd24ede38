"""What the step benchmarks share: the shapes, the recipe's objective, the mesh and the step.

`distill_step.py` (JAX vs PyTorch) and `offline_step.py` (teacher cache vs online) time the same
step: a bert-base-shaped random teacher (12 x 768, vocab 30522 by default) -> a DistilBERT student,
the `configs/distilbert.py` objective and optimizer, pure data parallelism over this host's devices
(the recipe's mesh (-1, 1, 1)), compiled with the train loop's own `train_step.jit_train_step`.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import distilbert as distilbert_config
from flaxdistil.model import bert
from flaxdistil.model import flops
from flaxdistil.objectives import IGNORE_INDEX
from flaxdistil.objectives.objective import Objective
from flaxdistil.training import optimizer
from flaxdistil.training import setup
from flaxdistil.training import sharding
from flaxdistil.training import train_state
from flaxdistil.training import train_step


def model_configs(a, attention_implementation: str | None = None
                  ) -> tuple[bert.ModelConfig, bert.ModelConfig]:
  """`(teacher, student)` configs of `--hidden_size`, `--vocab_size`, `--teacher_layers`,
  `--student_layers` and `--dtype` (heads of 64 dims, FFN 4 x hidden, as BERT), both with
  `attention_implementation` (`bert.ATTENTION_IMPLEMENTATIONS`)."""
  tcfg = bert.ModelConfig(
      model_type='bert', vocab_size=a.vocab_size, hidden_size=a.hidden_size,
      dtype=getattr(jnp, a.dtype), num_hidden_layers=a.teacher_layers,
      attention_implementation=attention_implementation,
      num_attention_heads=max(1, a.hidden_size // 64), intermediate_size=4 * a.hidden_size)
  return tcfg, dataclasses.replace(tcfg, model_type='distilbert', num_hidden_layers=a.student_layers)


def recipe_objective(**overrides) -> Objective:
  """The `configs/distilbert.py` objective (T=2, alpha_ce=5, alpha_mlm=2, alpha_cos=1, KL over
  every non-padding token), with `Objective` fields overridden (e.g. `vocab_chunk_size`)."""
  return dataclasses.replace(setup.objective_from_config(distilbert_config.get_config()),
                             **overrides)


def make_batch(a) -> dict:
  """Packed-looking MLM batch `[batch_size, seq_len]` int32: no padding, [CLS] ... [SEP], 15% of
  tokens predicted ([MASK] in the input, the token in `labels`, -100 elsewhere)."""
  rng = np.random.default_rng(0)
  low = min(1000, a.vocab_size // 2)  # skip [unused]/special ids of the bert vocab
  ids = rng.integers(low, a.vocab_size, size=(a.batch_size, a.seq_len), dtype=np.int32)
  ids[:, 0], ids[:, -1] = 101 % a.vocab_size, 102 % a.vocab_size
  chosen = rng.random(ids.shape) < 0.15
  chosen[:, 0] = chosen[:, -1] = False
  labels = np.where(chosen, ids, IGNORE_INDEX).astype(np.int32)
  return {'input_ids': np.where(chosen, 103 % a.vocab_size, ids).astype(np.int32),
          'attention_mask': np.ones_like(ids), 'labels': labels}


def model_flops(a) -> dict:
  """Analytic model FLOPs of one step of the shapes of `a` (`flops.step_flops`: matmuls only,
  teacher forward + student forward/backward, every position through both MLM heads;
  benchmarks/README.md "MFU")."""
  tcfg, scfg = model_configs(a)
  return flops.step_flops(scfg, tcfg, batch_size=a.batch_size, seq_len=a.seq_len,
                          num_microbatches=getattr(a, 'num_microbatches', 1))


@dataclasses.dataclass
class StepSetup:
  """The recipe's step for a benchmark: mesh, shardings, optimizer, student params (host)."""
  tcfg: bert.ModelConfig
  scfg: bert.ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: object
  state_shard: dict
  t_shard: object
  b_shard: jax.sharding.NamedSharding
  s_params: dict

  def teacher_params(self):
    """Random teacher params (`PRNGKey(0)`) on their shardings."""
    return jax.device_put(bert.init_params(self.tcfg, jax.random.PRNGKey(0)), self.t_shard)

  def fresh_state(self):
    """A step-0 train state of the student (`PRNGKey(1)` params), placed on the mesh."""
    return train_state.init_state(self.s_params, self.tx, jax.random.PRNGKey(2), self.state_shard)

  def global_batch(self, host_batch: dict, global_batch_size: int) -> dict:
    return sharding.make_global_batch(host_batch, self.b_shard, global_batch_size)

  def compile(self, objective: Objective, num_microbatches: int, state, teacher_params, batch):
    """`(compiled step, compile seconds)`: `make_train_step` + `jit_train_step`, lowered and
    compiled for these arguments (teacher_params None: a step that never reads the teacher)."""
    step_fn = train_step.make_train_step(bert.MaskedLM(self.scfg), bert.MaskedLM(self.tcfg),
                                         self.tx, objective, num_microbatches)
    t0 = time.perf_counter()
    with sharding.mesh_context(self.mesh, self.rules):  # logical constraints apply while tracing
      compiled = train_step.jit_train_step(
          step_fn, self.state_shard, None if teacher_params is None else self.t_shard).lower(
              state, teacher_params, batch).compile()
    return compiled, time.perf_counter() - t0


def step_setup(a, attention_implementation: str | None = None) -> StepSetup:
  """The recipe's data-parallel layout over this host's devices for the shapes of `a`, the
  models' attention core being `attention_implementation` (None = JAX's default).

  Raises:
    ValueError: `a.batch_size` does not split into `a.num_microbatches` (if given) microbatches
      over the devices.
  """
  cfg = distilbert_config.get_config()
  tcfg, scfg = model_configs(a, attention_implementation)
  mesh = sharding.create_mesh((-1, 1, 1), sharding.DEFAULT_MESH_AXES, devices=jax.local_devices())
  rules = sharding.rules_tuple(cfg.mesh.logical_axis_rules)
  sharding.check_batch_divisibility(a.batch_size, getattr(a, 'num_microbatches', 1), mesh, rules)
  tx, _ = optimizer.make_optimizer(cfg.optim, cfg.num_train_steps)
  state_shard, _ = train_state.state_layout(scfg, tx, mesh, rules)
  t_shard, _ = sharding.model_param_layout(tcfg, mesh, rules)
  return StepSetup(tcfg=tcfg, scfg=scfg, mesh=mesh, rules=rules, tx=tx, state_shard=state_shard,
                   t_shard=t_shard, b_shard=sharding.batch_sharding(mesh, rules),
                   s_params=jax.device_get(bert.init_params(scfg, jax.random.PRNGKey(1))))
