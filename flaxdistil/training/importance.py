"""Head and FFN-neuron importance from the gradient of the distillation loss (Michel et al., 2019).

Every head's output and every FFN neuron is multiplied by a gate xi = 1 (`bert.gate_ones`, the
model's `gates` collection); the importance of a unit is the mean over batches of |dL/dxi|, L
the run's own objective (`train_step.make_loss_fn`: the distillation loss against the teacher,
or the task loss) on held-out batches (Michel et al., Eq. 2; their code sums |grad| per batch,
as here, rather than per example). Dropout is off: the gradients are those of the model as
evaluated. `model/pruning.py` ranks and removes.
"""

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from flaxdistil.model import bert
from flaxdistil.objectives.objective import Objective
from flaxdistil.training import train_step


def _no_dropout(config: bert.ModelConfig) -> bert.ModelConfig:
  return dataclasses.replace(config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             classifier_dropout=0.0, remat=False)


def make_gate_grad_fn(student_config: bert.ModelConfig, teacher: bert.MaskedLM | None,
                      objective: Objective):
  """`gate_grads(params, teacher_params, batch) -> (loss, |dL/dgates|)`, jitted.

  Args:
    student_config: the student's config (its dropout is switched off).
    teacher: the teacher's module, or None (plain MLM / fine-tuning objective).
    objective: the run's objective (`setup.Run.objective`).

  Returns:
    The jitted function: `batch` is a global batch as the train step takes it; `loss` the
    float32 objective (nats) and the second output the `bert.gate_ones` tree of float32
    absolute gradients.
  """
  student = bert.MaskedLM(_no_dropout(student_config))
  loss_fn = train_step.make_loss_fn(student, teacher, objective)

  def gate_grads(params, teacher_params, batch):
    batch = objective.prepare_batch(batch)
    counts = objective.counts(batch)
    gates = bert.gate_ones(student.config)

    def loss_of(g):
      loss, _ = loss_fn({'student': params, 'gates': g}, teacher_params, batch, counts,
                        jax.random.PRNGKey(0))  # no dropout: the rng is never used
      return loss

    loss, grads = jax.value_and_grad(loss_of)(gates)
    return loss, jax.tree.map(jnp.abs, grads)

  return jax.jit(gate_grads)


def importance(student_config: bert.ModelConfig, params, teacher: bert.MaskedLM | None,
               teacher_params, objective: Objective, batches: Iterable[dict]):
  """Michel et al.'s importance of every head and FFN neuron over `batches`.

  Args:
    student_config: the student's config.
    params: its params (host or device, unboxed).
    teacher: the teacher's module, or None.
    teacher_params: its params, or None.
    objective: the run's objective.
    batches: global batches (e.g. `setup.Run.eval_batches()`), all of one shape (one compile).

  Returns:
    `{'heads': [layers] of [heads_i] float64, 'ffn': [layers] of [intermediate_size] float64,
    'loss': mean objective over the batches (nats), 'num_batches': int}`: mean |dL/dxi|.

  Raises:
    ValueError: no batches.
  """
  fn = make_gate_grad_fn(student_config, teacher, objective)
  total, losses = None, []
  for batch in batches:
    loss, g = jax.device_get(fn(params, teacher_params, batch))
    losses.append(float(loss))
    total = g if total is None else jax.tree.map(np.add, total, g)
  if total is None:
    raise ValueError('No batches to compute importance on; the run has no eval data (set '
                     "data.eval_files) or use the training batches.")
  n = len(losses)
  layers = [total['encoder'][f'layer_{i}'] for i in range(student_config.num_hidden_layers)]
  return {'heads': [np.asarray(x['attention']['head'], np.float64) / n for x in layers],
          'ffn': [np.asarray(x['ffn'], np.float64) / n for x in layers],
          'loss': float(np.mean(losses)), 'num_batches': n}
