"""Which positions get MLM logits: all of them, or the first M masked ones per sequence.

BERT pretraining's `masked_lm_positions` (Devlin et al., 2019; Google's
`create_pretraining_data.py` `max_predictions_per_seq`): with MLM and KL terms restricted to masked
tokens, running the MLM head at those positions only skips ~85% of the vocabulary projection, the
most expensive matmul of a small model.
"""

import jax
import jax.numpy as jnp

from flaxdistil.objectives import IGNORE_INDEX


def masked_positions(labels: jax.Array, max_predictions: int) -> tuple[jax.Array, jax.Array]:
  """First `max_predictions` masked positions per row and their labels.

  Args:
    labels: `[B, T]` int32, -100 where not predicted.
    max_predictions: M > 0.

  Returns:
    `(positions [B, M] int32, labels [B, M] int32)`; rows with fewer masked
    tokens are filled with position 0 and label -100 (ignored), rows with
    more lose the excess (choose M well above `mlm_probability * T`).
  """
  order = jnp.argsort(labels == IGNORE_INDEX, axis=-1, stable=True)[:, :max_predictions]
  gathered = jnp.take_along_axis(labels, order, axis=1)
  return jnp.where(gathered == IGNORE_INDEX, 0, order).astype(jnp.int32), gathered


def restrict_to_masked(batch: dict, max_predictions: int) -> dict:
  """Adds `logits_positions [B, M]` int32 and replaces `labels [B, T]` by the gathered `[B, M]`.

  Args:
    batch: an MLM batch with `labels [B, T]` int32 (-100 = not predicted).
    max_predictions: M (`distill.max_predictions_per_seq`); 0 = logits at every position.

  Returns:
    A new dict with `logits_positions` and `labels` as `masked_positions` returns them (other
    entries unchanged), or `batch` itself when `max_predictions` is 0.
  """
  if not max_predictions:
    return batch
  pos, labels = masked_positions(batch['labels'], max_predictions)
  return dict(batch, logits_positions=pos, labels=labels)


def gather_at_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Gathers per-row positions along axis 1.

  Args:
    x: `[B, T, ...]`, e.g. cached teacher top-k values `[B, T, k]`.
    positions: `[B, M]` int indices into T (`logits_positions`).

  Returns:
    `[B, M, ...]` with `out[b, m] = x[b, positions[b, m]]`, dtype of `x`.
  """
  return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), 1)
