"""Training curves from `metrics.jsonl`: `curves.png` of every run, and several runs side by side.

Panels, left to right: the train loss and each loss term (interval means, log scale); one panel per
held-out metric of the run's kind (masked-LM: top-1 accuracy and perplexity; classification:
accuracy and F1; encoder students: embedding and token cosine, last-layer MSE), the student's curve with
the teacher's value as a dashed line where the teacher is scored; train tokens/s per interval (the
first, compiling interval left out). `panels(runs)` builds the data (tested), `draw` renders it
with matplotlib's Agg backend (no display needed), `write_curves(workdir)` is what a run calls.
`scripts/plot_runs.py` draws several workdirs in one figure, one line per run.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging

# Held-out metrics plotted, in this order, when the eval records have them.
EVAL_METRICS = ('accuracy', 'perplexity', 'f1', 'embedding_cosine', 'token_cosine',
                'hidden_mse')


@dataclasses.dataclass
class Line:
  label: str
  steps: list
  values: list
  dashed: bool = False  # a reference (the teacher), drawn as a horizontal dashed line


@dataclasses.dataclass
class Panel:
  title: str
  lines: list = dataclasses.field(default_factory=list)
  log_y: bool = False


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl` (`[]` if there is none); a torn last line is skipped.

  Returns:
    The records in file order: dicts with `step`, `kind` ('train', 'eval', 'eval_teacher') and
    float scalars.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # a run killed mid-write
        continue
  return out


def _series(records, kind, key):
  pts = [(r['step'], r[key]) for r in records if r.get('kind') == kind and key in r]
  return [s for s, _ in pts], [v for _, v in pts]


def panels(runs: dict[str, list[dict]]) -> list[Panel]:
  """The panels of `runs` (`{label: metrics.jsonl records}`), empty panels left out.

  One run: every train loss term in the loss panel. Several runs: the total loss of each (terms
  of different objectives are not comparable), and every other panel one line per run.

  Args:
    runs: run label -> its records (`read_metrics`), in legend order.

  Returns:
    `Panel`s in drawing order: 'train loss', one per `EVAL_METRICS` key present ('held-out ...'),
    'train tokens/s'.
  """
  single = len(runs) == 1
  name = lambda label, what: what if single else f'{label}' + ('' if what == 'student' else
                                                               f' ({what})')
  loss = Panel('train loss (interval means)', log_y=True)
  for label, recs in runs.items():
    keys = ['loss']
    if single:
      keys += sorted({k for r in recs if r.get('kind') == 'train' for k in r
                      if k.startswith('loss_')})
    for k in keys:
      steps, vals = _series(recs, 'train', k)
      if steps:
        loss.lines.append(Line(k if single else label, steps, vals))
  out = [loss]
  for metric in EVAL_METRICS:
    p = Panel(f'held-out {metric.replace("_", " ")}', log_y=metric in ('perplexity', 'hidden_mse'))
    for label, recs in runs.items():
      steps, vals = _series(recs, 'eval', metric)
      if steps:
        p.lines.append(Line(name(label, 'student'), steps, vals))
        t_steps, t_vals = _series(recs, 'eval_teacher', metric)
        if t_vals:
          p.lines.append(Line(name(label, 'teacher'), [min(steps), max(steps)],
                              [t_vals[-1]] * 2, dashed=True))
    out.append(p)
  tps = Panel('train tokens/s')
  for label, recs in runs.items():
    steps, vals = _series(recs, 'train', 'tokens_per_sec')
    if len(steps) > 1:
      tps.lines.append(Line(label if not single else 'tokens/s', steps[1:], vals[1:]))
  out.append(tps)
  return [p for p in out if p.lines]


def draw(panel_list: list[Panel], path: str, title: str = '') -> None:
  """Renders `panel_list` side by side into the PNG `path` (Agg backend; written atomically).

  Args:
    panel_list: from `panels`.
    path: the .png to write (its directory must exist).
    title: the figure's title.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from flaxdistil.storage import atomic  # pylint: disable=g-import-not-at-top
  n = max(len(panel_list), 1)
  fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
  for ax, p in zip(axes[0], panel_list):
    for ln in p.lines:
      ax.plot(ln.steps, ln.values, '--' if ln.dashed else '-', label=ln.label,
              marker=None if ln.dashed or len(ln.steps) > 12 else 'o', markersize=3)
    ax.set_title(p.title, fontsize=10)
    ax.set_xlabel('step')
    if p.log_y:
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    if len(p.lines) > 1:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  with atomic.atomic_file(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=80)
  plt.close(fig)


def write_curves(workdir: str) -> str | None:
  """Writes `<workdir>/curves.png` from its metrics.jsonl (process 0; no records: nothing).

  A plotting failure is logged as a warning, not raised: the run's checkpoints and metrics are
  already written and stay valid.

  Returns:
    The path written, or None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return None
  records = read_metrics(workdir)
  if not records:
    return None
  path = os.path.join(workdir, 'curves.png')
  try:
    draw(panels({os.path.basename(os.path.normpath(workdir)): records}), path,
         title=os.path.basename(os.path.normpath(workdir)))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('curves.png not written (%s: %s); metrics.jsonl has the data.',
                    type(e).__name__, e)
    return None
  return path
