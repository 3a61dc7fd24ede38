"""The student's optimizer: AdamW, linear warmup and decay, global-norm clipping.

As HF's DistilBERT `distiller.py` (AdamW, `get_linear_schedule_with_warmup`, `max_grad_norm`) and
BERT pretraining; no weight decay on LayerNorm parameters and biases.
"""

from typing import Any

import jax
import optax


def decay_mask(params) -> Any:
  """True for weight matrices/embeddings; LayerNorm and biases get no weight decay.

  Args:
    params: the trainable tree (arrays or `ShapeDtypeStruct`s).

  Returns:
    A tree of bools of the same structure: True where the leaf's key is `kernel` or `embedding`.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) in ('kernel', 'embedding'), params)


def make_optimizer(optim, num_train_steps: int) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with linear warmup + linear decay and global-norm clipping.

  Args:
    optim: the config's `optim` group (learning_rate, warmup_steps, b1, b2,
      eps, weight_decay, grad_clip_norm).
    num_train_steps: the step at which the learning rate has decayed to 0.

  Returns:
    `(tx, schedule)`; `schedule(step)` gives the learning rate.
  """
  warmup = int(optim.warmup_steps)
  schedule = optax.join_schedules([
      optax.linear_schedule(0.0, optim.learning_rate, max(warmup, 1)),
      optax.linear_schedule(optim.learning_rate, 0.0, max(num_train_steps - warmup, 1)),
  ], [warmup])
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask),
  )
  return tx, schedule
