"""flaxdistil.training.plots: the panels drawn from metrics.jsonl, and the PNG of a run."""

import json

import numpy as np

from flaxdistil.training import plots


def _records():
  recs = [{'step': 0, 'kind': 'eval', 'embedding_cosine': 0.5, 'hidden_mse': 0.12}]  # no token_cosine
  for step in (10, 20, 30):
    recs.append({'step': step, 'kind': 'train', 'loss': 3.0 / step, 'loss_hidden': 2.0 / step,
                 'loss_attn_kl': 1.0 / step, 'tokens_per_sec': 100.0 * step, 'lr': 1e-3})
  recs.append({'step': 30, 'kind': 'eval', 'embedding_cosine': 0.7, 'hidden_mse': 0.06})
  return recs


def _mlm_records(acc_end):
  return [{'step': 5, 'kind': 'train', 'loss': 9.0, 'loss_ce': 5.0, 'tokens_per_sec': 10.0},
          {'step': 10, 'kind': 'train', 'loss': 8.0, 'loss_ce': 4.0, 'tokens_per_sec': 50.0},
          {'step': 10, 'kind': 'eval_teacher', 'accuracy': 0.6, 'perplexity': 20.0},
          {'step': 10, 'kind': 'eval', 'accuracy': acc_end, 'perplexity': 80.0}]


def test_one_run_plots_every_loss_term_its_encoder_metrics_and_steady_throughput():
  ps = {p.title: p for p in plots.panels({'demo': _records()})}
  assert list(ps) == ['train loss (interval means)', 'held-out embedding cosine',
                      'held-out hidden mse', 'train tokens/s']
  loss = {ln.label: ln for ln in ps['train loss (interval means)'].lines}
  assert sorted(loss) == ['loss', 'loss_attn_kl', 'loss_hidden']
  assert loss['loss_hidden'].steps == [10, 20, 30] and loss['loss_hidden'].values[0] == 0.2
  cos = ps['held-out embedding cosine'].lines
  assert [(ln.steps, ln.values) for ln in cos] == [([0, 30], [0.5, 0.7])]  # no teacher line
  assert ps['held-out hidden mse'].log_y and not ps['held-out embedding cosine'].log_y
  # the first (compiling) interval is left out of tokens/s
  assert ps['train tokens/s'].lines[0].steps == [20, 30]


def test_several_runs_one_line_each_and_the_teacher_as_a_dashed_reference():
  ps = {p.title: p for p in plots.panels({'a': _mlm_records(0.3), 'b': _mlm_records(0.4)})}
  assert [ln.label for ln in ps['train loss (interval means)'].lines] == ['a', 'b']  # totals only
  acc = ps['held-out accuracy'].lines
  assert [(ln.label, ln.dashed, ln.values) for ln in acc] == [
      ('a', False, [0.3]), ('a (teacher)', True, [0.6, 0.6]),
      ('b', False, [0.4]), ('b (teacher)', True, [0.6, 0.6])]
  assert ps['held-out perplexity'].log_y


def test_write_curves_draws_a_png_from_the_workdirs_metrics(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    for r in _records():
      f.write(json.dumps(r) + '\n')
    f.write('{"step": 40, "kind": "tra')  # a run killed mid-line: the torn record is skipped
  assert len(plots.read_metrics(str(tmp_path))) == 5
  path = plots.write_curves(str(tmp_path))
  assert path == str(tmp_path / 'curves.png')
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  img = matplotlib.image.imread(path)
  assert img.shape[0] == 272 and img.shape[1] == 4 * 336  # 4 panels of 4.2 x 3.4 in at 80 dpi
  assert np.std(img) > 0.05  # something is drawn
  assert plots.write_curves(str(tmp_path / 'nothing')) is None  # no metrics.jsonl: no picture
