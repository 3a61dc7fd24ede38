"""What a run reports: metrics.jsonl, TensorBoard, the console, and interval means.

`MetricWriter` writes one record per logged step to `<workdir>/metrics.jsonl`
and TensorBoard events (process 0 only). `IntervalMeans` accumulates the train
step's metrics on device between log steps, so a logged train record is the
mean over every step since the previous one, not a sample of one step. The
remaining functions format the console lines a run starts and ends with.
"""

import json
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


class MetricWriter:
  """metrics.jsonl + TensorBoard events in the workdir; only process 0 writes.

  Records are appended (a resumed run continues the file), one JSON object a
  line: `step`, `kind` ('train', 'eval', 'eval_teacher') and float scalars.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict, kind: str = 'train'):
    if not self.enabled:
      return
    rec = {'step': int(step), 'kind': kind}
    rec.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(rec) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(f'{kind}/{k}', float(v), int(step))

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


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
  }


@jax.jit
def _first(m):
  return _contribution(m)


@jax.jit
def _add(acc, m):
  return jax.tree.map(jnp.add, acc, _contribution(m))


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
    num_steps, tokens: steps and non-padding tokens of the interval.
  """

  def __init__(self):
    self._acc = None
    self._num_skipped = None

  def state(self) -> dict:
    """The partial interval's sums as JSON-able host values (a device sync), for checkpoints.

    A run resumed from a checkpoint taken between log steps `load`s these, so
    its next record covers the same steps, with the same sums, as an
    uninterrupted run's.
    """
    if self._acc is None:
      return {}
    acc, skipped = jax.device_get((self._acc, self._num_skipped))
    return {'sums': jax.tree.map(float, acc), 'num_skipped': int(skipped)}

  def load(self, state: dict, sharding: jax.sharding.Sharding) -> None:
    """Continues the interval saved by `state()` (`{}`: a fresh interval), on `sharding`."""
    if not state:
      self._acc = self._num_skipped = None
      return
    sums = dict(state['sums'], terms={k: tuple(v) for k, v in state['sums']['terms'].items()})
    put = lambda x, dtype: jax.device_put(np.asarray(x, dtype), sharding)
    self._acc = jax.tree.map(lambda x: put(x, np.float32), sums)
    self._num_skipped = put(state['num_skipped'], np.int32)

  def add(self, metrics: dict) -> None:
    self._acc = _first(metrics) if self._acc is None else _add(self._acc, metrics)
    self._num_skipped = metrics['num_skipped']

  def pop(self) -> dict:
    """The interval's means (host floats); resets. Raises ValueError if nothing was added."""
    if self._acc is None:
      raise ValueError('IntervalMeans.pop() before any add()')
    acc, skipped = jax.device_get((self._acc, self._num_skipped))
    self._acc = self._num_skipped = None
    div = lambda a, b: float(a) / float(b) if b else math.nan
    out = {'loss': div(acc['loss'], acc['weight'])}
    out.update({f'loss_{k}': div(s, c) for k, (s, c) in acc['terms'].items()})
    out.update(grad_norm=div(acc['grad_norm'], acc['finite_steps']), num_skipped=int(skipped),
               nonfinite_steps=int(acc['nonfinite_steps']),
               num_steps=int(acc['finite_steps'] + acc['nonfinite_steps']),
               tokens=float(acc['tokens']))
    return out


# ----------------------------------------------------------------------------- console

class TrainLog:
  """The train loop's log steps: interval means, throughput, metrics.jsonl and the console line.

  `add` every step, `log` at log steps; `exclude(seconds)` keeps eval time out of tokens/s. The
  first interval (compilation) is labelled on the console and left out of `tokens_per_sec`.
  """

  def __init__(self, writer: MetricWriter, interval: IntervalMeans, num_steps: int):
    self.writer, self.interval, self.num_steps = writer, interval, num_steps
    self.t_log, self.tokens, self.steps = time.time(), 0.0, 0
    self.measured_tokens, self.measured_seconds, self.first = 0.0, 0.0, True

  def add(self, metrics: dict, tokens: float) -> None:
    """One step's device metrics and its non-padding tokens (all hosts)."""
    self.interval.add(metrics)
    self.tokens, self.steps = self.tokens + tokens, self.steps + 1

  def exclude(self, seconds: float) -> None:
    self.t_log += seconds

  def log(self, step: int, lr: float) -> dict:
    """Writes and prints the interval ending at `step`; returns its scalars (interval means,
    `lr`, `tokens_per_sec`, `steps_per_sec`, `nonfinite_steps`, `num_skipped`, ...)."""
    dt = time.time() - self.t_log
    if not self.first:
      self.measured_tokens += self.tokens
      self.measured_seconds += dt
    scalars = self.interval.pop()
    scalars.update(lr=lr, tokens_per_sec=self.tokens / max(dt, 1e-9),
                   steps_per_sec=self.steps / max(dt, 1e-9))
    self.writer.write(step, scalars)
    eta = (self.num_steps - step) / scalars['steps_per_sec']
    console = {k: v for k, v in scalars.items()
               if k not in ('num_steps', 'tokens', 'nonfinite_steps', 'num_skipped')}
    logging.info('step %d/%d %s%s | ETA %s', step, self.num_steps, fmt(console),
                 ' (first interval: includes compilation, tokens/s is not steady-state)'
                 if self.first else '', time.strftime('%H:%M:%S', time.gmtime(eta)))
    self.first = False
    self.t_log, self.tokens, self.steps = time.time(), 0.0, 0
    return scalars

  @property
  def tokens_per_sec(self) -> float | None:
    """Train tokens/s over the logged intervals after the first (None before the second log)."""
    return self.measured_tokens / self.measured_seconds if self.measured_seconds else None


def fmt(d: dict) -> str:
  """`k=v` pairs, floats to 4 significant digits."""
  return ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in d.items())


def output_locations(workdir: str, checkpoint_dir: str) -> str:
  """Where a run's outputs are and how to export it (the line every run ends with)."""
  return (f'Outputs: checkpoints {checkpoint_dir}, metrics {os.path.join(workdir, "metrics.jsonl")}'
          f', summary {os.path.join(workdir, "summary.json")}. Export to Hugging Face: '
          f'python -m flaxdistil.export --workdir {workdir} --out OUT')
