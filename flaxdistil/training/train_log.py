"""What a run prints: one line per log interval with throughput and ETA, a progress bar, and
where its outputs are.

`TrainLog` is the train loop's log step: it pops the interval means
(`metric_writers.IntervalMeans`), adds throughput (tokens/s, steps/s), writes the record
(`metric_writers.MetricWriter`), logs the console line and moves the progress bar
(`data/progress.py`: drawn only in a terminal, so CI logs and `log.txt` get the lines alone).
"""

import os
import time
from typing import Callable

from absl import logging

from flaxdistil.data import progress
from flaxdistil.training import metric_writers


class TrainLog:
  """The train loop's log steps: interval means, throughput, metrics.jsonl and the console line.

  `add` every step, `log` at log steps; `exclude(seconds)` keeps eval time out of tokens/s. The
  first interval (compilation) is labelled on the console and left out of `tokens_per_sec`.

  Args:
    writer: where the train records go (`metric_writers.MetricWriter`).
    interval: the interval's accumulator (`metric_writers.IntervalMeans`; possibly `load`ed).
    num_steps: `num_train_steps`, for the `step i/N` and the ETA.
    start_step: the step the run starts (or resumes) from, where the progress bar starts.
    clock: seconds (monotonic); tests pass a fake one.
  """

  def __init__(self, writer: metric_writers.MetricWriter,
               interval: metric_writers.IntervalMeans, num_steps: int, start_step: int = 0,
               clock: Callable[[], float] = time.monotonic):
    self.writer, self.interval, self.num_steps = writer, interval, num_steps
    self.bar = progress.progress_bar(num_steps, 'train', 'step', initial=start_step)
    self.clock = clock  # seconds; monotonic, so a clock change cannot give negative intervals
    self.t_log, self.tokens, self.steps = clock(), 0.0, 0
    self.measured_tokens, self.measured_seconds, self.first = 0.0, 0.0, True

  def add(self, metrics: dict, tokens: float) -> None:
    """Adds one step's device metrics and its non-padding tokens (all hosts).

    Args:
      metrics: the train step's metrics (device arrays; not waited for).
      tokens: non-padding tokens of the global batch.
    """
    self.interval.add(metrics)
    self.tokens, self.steps = self.tokens + tokens, self.steps + 1
    self.bar.update(1)

  def close(self) -> None:
    """Removes the progress bar (idempotent); the logged lines stay."""
    self.bar.close()

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (e.g. an eval) out of the current interval's time."""
    self.t_log += seconds

  def log(self, step: int, lr: float) -> dict:
    """Writes and prints the interval ending at `step`, then starts the next one.

    Args:
      step: the last step of the interval (1-based count of steps done).
      lr: the learning rate of that step.

    Returns:
      The record written: `IntervalMeans.pop()`'s means and counts plus `lr`,
      `tokens_per_sec` and `steps_per_sec` of the interval (eval time excluded).

    Raises:
      ValueError: no step was added since the last `log` (`IntervalMeans.pop`).
    """
    dt = self.clock() - self.t_log
    if not self.first:
      self.measured_tokens += self.tokens
      self.measured_seconds += dt
    scalars = self.interval.pop()
    scalars.update(lr=lr, tokens_per_sec=self.tokens / max(dt, 1e-9),
                   steps_per_sec=self.steps / max(dt, 1e-9))
    self.writer.write(step, scalars)
    eta = (self.num_steps - step) / scalars['steps_per_sec']
    console = {k: v for k, v in scalars.items()
               if k not in ('num_steps', 'tokens', 'nonfinite_steps', 'num_skipped',
                             'nonfinite_in_a_row')}
    logging.info('step %d/%d %s%s | ETA %s', step, self.num_steps, fmt(console),
                 ' (first interval: includes compilation, tokens/s is not steady-state)'
                 if self.first else '', time.strftime('%H:%M:%S', time.gmtime(eta)))
    self.bar.set_postfix_str(f'loss={scalars["loss"]:.4g}', refresh=False)
    self.first = False
    self.t_log, self.tokens, self.steps = self.clock(), 0.0, 0
    return scalars

  @property
  def tokens_per_sec(self) -> float | None:
    """Train tokens/s over the logged intervals after the first (None before the second log)."""
    return self.measured_tokens / self.measured_seconds if self.measured_seconds else None


def fmt(d: dict) -> str:
  """`k=v` pairs, floats to 4 significant digits.

  Returns:
    The pairs of `d`, in its order, joined by spaces.
  """
  return ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in d.items())


def output_locations(workdir: str, checkpoint_dir: str) -> str:
  """Where a run's outputs are and how to export it (the line every run ends with).

  Args:
    workdir: the run's directory (metrics.jsonl, summary.json).
    checkpoint_dir: its checkpoint directory (`manager.directory`).

  Returns:
    One line: the checkpoint, metrics and summary paths and the export command.
  """
  return (f'Outputs: checkpoints {checkpoint_dir}, metrics {os.path.join(workdir, "metrics.jsonl")}'
          f', summary {os.path.join(workdir, "summary.json")}. Export to Hugging Face: '
          f'python -m flaxdistil.export --workdir {workdir} --out OUT')
