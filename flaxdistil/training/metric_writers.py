"""What a run records: metrics.jsonl, TensorBoard events, and interval means of train metrics.

`MetricWriter` writes one record per logged step to `<workdir>/metrics.jsonl`
and TensorBoard events (process 0 only). `IntervalMeans` accumulates the train
step's metrics on device between log steps, so a logged train record is the
mean over every step since the previous one, not a sample of one step. The
console lines are `train_log.py`'s.
"""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np


def _tensorboardx_summary_writer():
  """`tensorboardX.SummaryWriter`, imported without importing torch when torch is not loaded.

  tensorboardX's writer module tries `import torch` at import time only to accept torch tensors
  (we log floats); on CPU that import is ~2 s of every training command's start. Marking torch
  unimportable for that one import makes tensorboardX fall back to numpy, as without torch; the
  mark is removed at once, so a later `import torch` (export in the same process) is unaffected.
  """
  if 'torch' in sys.modules or 'tensorboardX.writer' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """metrics.jsonl + TensorBoard events in the workdir; only process 0 writes.

  Records are appended (a resumed run continues the file), one JSON object a
  line: `step`, `kind` ('train', 'eval', 'eval_teacher') and float scalars. A
  last line without its newline (a write cut short by a full disk or a kill) is
  dropped when the file is opened again, so every line stays one JSON record.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    SummaryWriter = _tensorboardx_summary_writer()  # pylint: disable=invalid-name
    path = os.path.join(workdir, 'metrics.jsonl')
    _drop_torn_line(path)
    self._jsonl = open(path, 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict, kind: str = 'train'):
    """Appends one record to metrics.jsonl and each scalar as TensorBoard `<kind>/<name>`.

    Args:
      step: the train step the record belongs to.
      scalars: `{name: number}`; every value is written as a float.
      kind: 'train', 'eval' or 'eval_teacher'.
    """
    if not self.enabled:
      return
    rec = {'step': int(step), 'kind': kind}
    rec.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(rec) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(f'{kind}/{k}', float(v), int(step))

  def close(self):
    """Closes metrics.jsonl and the TensorBoard writer (process 0)."""
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _drop_torn_line(path: str) -> None:
  """Truncates `path` after its last newline (nothing to do if it ends with one or is absent)."""
  if not os.path.exists(path) or not os.path.getsize(path):
    return
  with open(path, 'rb+') as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b'\n':
      return
    f.seek(0)
    f.truncate(f.read().rfind(b'\n') + 1)


def _contribution(m: dict) -> dict:
  """One step's share of the interval sums; a skipped (non-finite) step adds nothing but a count."""
  finite = m['finite']
  keep = lambda x: jnp.where(finite, x.astype(jnp.float32), 0.0)  # NaN * 0 would stay NaN
  return {
      'loss': keep(m['loss'] * m['tokens']),
      'weight': keep(m['tokens']),
      'grad_norm': keep(m['grad_norm']),
      'finite_steps': finite.astype(jnp.float32),
      'nonfinite_steps': 1.0 - finite.astype(jnp.float32),
      'tokens': m['tokens'].astype(jnp.float32),
      'terms': {k: (keep(s), keep(c)) for k, (s, c) in m['terms'].items()},
      'trailing_nonfinite': 1.0 - finite.astype(jnp.float32),  # non-finite steps at the end
  }


@jax.jit
def _first(m):
  return _contribution(m)


@jax.jit
def _add(acc, m):
  out = jax.tree.map(jnp.add, acc, _contribution(m))
  out['trailing_nonfinite'] = jnp.where(m['finite'], 0.0, acc['trailing_nonfinite'] + 1.0)
  return out


class IntervalMeans:
  """Means of the train step's metrics over the steps since the last `pop`.

  `add(metrics)` costs one small jitted call on device arrays and never waits
  for the step, so asynchronous dispatch keeps running ahead. `pop()` reads
  the sums (one device-to-host transfer) and returns:

    loss: token-weighted mean of the steps' total losses,
      `sum(loss_i * tokens_i) / sum(tokens_i)`;
    loss_<term>: `sum(s_i) / sum(c_i)` over the steps' `(sum, count)` pairs,
      the term's mean over all its tokens (or examples) of the interval, as
      one big batch would give;
    grad_norm: mean over steps; num_skipped: the run's total after the last
      step; nonfinite_steps: steps of the interval whose update was skipped
      (they count in no mean; an interval of only such steps gives NaN);
    nonfinite_in_a_row: skipped steps in a row up to the interval's last step,
      across intervals (also the attribute of that name, which a resumed run
      sets from its checkpoint);
    num_steps, tokens: steps and non-padding tokens of the interval.
  """

  def __init__(self):
    self._acc = None
    self._num_skipped = None
    self.nonfinite_in_a_row = 0

  def state(self) -> dict:
    """The partial interval's sums as JSON-able host values (a device sync), for checkpoints.

    A run resumed from a checkpoint taken between log steps `load`s these, so
    its next record covers the same steps, with the same sums, as an
    uninterrupted run's.

    Returns:
      `{'sums': {name: float, 'terms': {term: (sum, count)}}, 'num_skipped': int}`, or `{}`
      when nothing was added since the last `pop`.
    """
    if self._acc is None:
      return {}
    acc, skipped = jax.device_get((self._acc, self._num_skipped))
    return {'sums': jax.tree.map(float, acc), 'num_skipped': int(skipped)}

  def load(self, state: dict, sharding: jax.sharding.Sharding) -> None:
    """Continues the interval saved by `state()` (`{}`: a fresh interval), on `sharding`.

    Args:
      state: what `state()` returned (from a checkpoint's metadata).
      sharding: where to put the sums (the train state's replicated sharding).
    """
    if not state:
      self._acc = self._num_skipped = None
      return
    sums = dict(state['sums'], terms={k: tuple(v) for k, v in state['sums']['terms'].items()})
    sums.setdefault('trailing_nonfinite', 0.0)  # saved before it existed
    put = lambda x, dtype: jax.device_put(np.asarray(x, dtype), sharding)
    self._acc = jax.tree.map(lambda x: put(x, np.float32), sums)
    self._num_skipped = put(state['num_skipped'], np.int32)

  def add(self, metrics: dict) -> None:
    """Adds one train step's device metrics (`train_step.make_train_step`) without waiting."""
    self._acc = _first(metrics) if self._acc is None else _add(self._acc, metrics)
    self._num_skipped = metrics['num_skipped']

  def pop(self) -> dict:
    """The interval's means (host floats), then starts a new interval.

    Returns:
      `loss`, `loss_<term>`, `grad_norm`, `num_skipped`, `nonfinite_steps`,
      `nonfinite_in_a_row`, `num_steps`, `tokens` (class docstring); a mean over no finite
      step is NaN.

    Raises:
      ValueError: nothing was added since the last `pop`.
    """
    if self._acc is None:
      raise ValueError('IntervalMeans.pop() before any add()')
    acc, skipped = jax.device_get((self._acc, self._num_skipped))
    self._acc = self._num_skipped = None
    div = lambda a, b: float(a) / float(b) if b else math.nan
    out = {'loss': div(acc['loss'], acc['weight'])}
    out.update({f'loss_{k}': div(s, c) for k, (s, c) in acc['terms'].items()})
    if acc['finite_steps']:
      self.nonfinite_in_a_row = int(acc['trailing_nonfinite'])
    else:
      self.nonfinite_in_a_row += int(acc['nonfinite_steps'])
    out.update(grad_norm=div(acc['grad_norm'], acc['finite_steps']), num_skipped=int(skipped),
               nonfinite_steps=int(acc['nonfinite_steps']),
               nonfinite_in_a_row=self.nonfinite_in_a_row,
               num_steps=int(acc['finite_steps'] + acc['nonfinite_steps']),
               tokens=float(acc['tokens']))
    return out
