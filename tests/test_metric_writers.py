"""Interval means of the train metrics and their checkpointed state."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdistil.training import metric_writers


def _metrics(loss, tokens, ce, finite=True, skipped=0, grad_norm=1.0):
  """A train step's metrics as `make_train_step` returns them; ce = (sum, count)."""
  f = lambda x: jnp.asarray(x, jnp.float32)
  return {'loss': f(loss), 'grad_norm': f(grad_norm), 'finite': jnp.asarray(finite),
          'num_skipped': jnp.asarray(skipped, jnp.int32), 'tokens': f(tokens),
          'loss_ce': f(ce[0] / ce[1]), 'terms': {'ce': (f(ce[0]), f(ce[1]))}}


def test_interval_means_are_token_weighted_and_reset():
  acc = metric_writers.IntervalMeans()
  acc.add(_metrics(2.0, 100, (10.0, 100), grad_norm=1.0))
  acc.add(_metrics(5.0, 300, (90.0, 300), grad_norm=3.0))
  out = acc.pop()
  assert out['loss'] == pytest.approx((2 * 100 + 5 * 300) / 400)
  assert out['loss_ce'] == pytest.approx(100 / 400)  # sum / count, not the mean of the means
  assert out['grad_norm'] == pytest.approx(2.0)
  assert (out['num_steps'], out['tokens'], out['nonfinite_steps']) == (2, 400.0, 0)
  acc.add(_metrics(7.0, 10, (1.0, 10)))
  assert acc.pop()['loss'] == pytest.approx(7.0)  # the previous interval is gone
  with pytest.raises(ValueError):
    acc.pop()


def test_skipped_steps_count_in_no_mean():
  acc = metric_writers.IntervalMeans()
  acc.add(_metrics(2.0, 100, (10.0, 100)))
  acc.add(_metrics(np.nan, 100, (np.nan, 100), finite=False, skipped=1, grad_norm=np.inf))
  out = acc.pop()
  assert out['loss'] == pytest.approx(2.0) and out['loss_ce'] == pytest.approx(0.1)
  assert out['grad_norm'] == pytest.approx(1.0)
  assert (out['nonfinite_steps'], out['num_skipped'], out['num_steps']) == (1, 1, 2)
  acc.add(_metrics(np.nan, 100, (np.nan, 100), finite=False, skipped=2))
  assert np.isnan(acc.pop()['loss'])  # nothing finite to average


def test_saved_interval_continues_bit_exactly():
  # A checkpoint between log steps carries the partial sums through JSON.
  steps = [_metrics(1.0 + i / 3, 96 + i, (0.1 + i / 7, 96 + i)) for i in range(4)]
  whole = metric_writers.IntervalMeans()
  for m in steps:
    whole.add(m)
  first_half = metric_writers.IntervalMeans()
  for m in steps[:2]:
    first_half.add(m)
  saved = json.loads(json.dumps(first_half.state()))
  resumed = metric_writers.IntervalMeans()
  replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  resumed.load(saved, replicated)
  for m in steps[2:]:
    resumed.add(m)
  assert resumed.pop() == whole.pop()
  assert metric_writers.IntervalMeans().state() == {}
  empty = metric_writers.IntervalMeans()
  empty.load({}, replicated)
  with pytest.raises(ValueError):
    empty.pop()


def test_non_finite_steps_in_a_row_are_counted_across_intervals():
  bad = lambda: _metrics(np.nan, 100, (np.nan, 100), finite=False, skipped=1)
  ok = lambda: _metrics(2.0, 100, (10.0, 100))
  acc = metric_writers.IntervalMeans()
  for m in (bad(), ok(), bad(), bad()):  # two in a row at the end
    acc.add(m)
  assert acc.pop()['nonfinite_in_a_row'] == 2
  for m in (bad(), bad(), bad()):  # an interval of only skipped steps adds to the run
    acc.add(m)
  assert acc.pop()['nonfinite_in_a_row'] == 5
  acc.add(bad())
  saved = json.loads(json.dumps(acc.state()))  # a checkpoint between log steps
  resumed = metric_writers.IntervalMeans()
  resumed.load(saved, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  resumed.nonfinite_in_a_row = acc.nonfinite_in_a_row  # what the checkpoint's meta carries
  resumed.add(bad())
  assert resumed.pop()['nonfinite_in_a_row'] == 7
  resumed.add(ok())
  assert resumed.pop()['nonfinite_in_a_row'] == 0


def test_a_torn_last_line_is_dropped_when_the_writer_reopens(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "kind": "train", "loss": 2.0}\n{"step": 2, "kind": "tr')  # cut short
  writer = metric_writers.MetricWriter(str(tmp_path))
  writer.write(2, {'loss': 1.5})
  writer.close()
  recs = [json.loads(l) for l in path.read_text().splitlines()]
  assert [(r['step'], r['loss']) for r in recs] == [(1, 2.0), (2, 1.5)]
