"""The train loop's log step: records are interval means with throughput; the first interval
(compilation) is labelled and kept out of the run's tokens/s."""

import json

import jax.numpy as jnp

from flaxdistil.training import metric_writers
from flaxdistil.training import train_log


def _metrics(loss, tokens):
  f = lambda x: jnp.asarray(x, jnp.float32)
  return {'loss': f(loss), 'grad_norm': f(1.0), 'finite': jnp.asarray(True),
          'num_skipped': jnp.asarray(0, jnp.int32), 'tokens': f(tokens),
          'terms': {'mlm': (f(loss * tokens), f(tokens))}}


def test_log_writes_interval_means_and_excludes_the_first_interval_from_throughput(tmp_path):
  clock = iter([0.0, 10.0, 10.0, 12.0, 12.0]).__next__  # start, 1st log (compiling), 2nd log
  writer = metric_writers.MetricWriter(str(tmp_path))
  log = train_log.TrainLog(writer, metric_writers.IntervalMeans(), num_steps=4, clock=clock)
  log.add(_metrics(2.0, 100), tokens=100.0)
  first = log.log(1, lr=1e-3)
  assert first['tokens_per_sec'] == 10.0 and log.tokens_per_sec is None  # compiling: not counted
  log.add(_metrics(4.0, 100), tokens=100.0)
  log.add(_metrics(6.0, 300), tokens=300.0)
  second = log.log(3, lr=5e-4)
  assert second['loss'] == (4.0 * 100 + 6.0 * 300) / 400 and second['loss_mlm'] == second['loss']
  assert second['tokens_per_sec'] == 200.0 and second['steps_per_sec'] == 1.0
  assert log.tokens_per_sec == 200.0  # the steady-state intervals only
  writer.close()
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['kind'], r['lr']) for r in records] == [(1, 'train', 1e-3),
                                                                (3, 'train', 5e-4)]


def test_exclude_keeps_eval_time_out_of_throughput(tmp_path):
  clock = iter([0.0, 1.0, 1.0, 12.0, 12.0]).__next__
  log = train_log.TrainLog(metric_writers.MetricWriter(str(tmp_path)),
                           metric_writers.IntervalMeans(), num_steps=10, clock=clock)
  log.add(_metrics(1.0, 50), tokens=50.0)
  log.log(1, lr=0.0)                      # t = 1: first interval
  log.add(_metrics(1.0, 50), tokens=50.0)
  log.exclude(8.0)                        # 8 s of evaluation inside the interval
  assert log.log(2, lr=0.0)['tokens_per_sec'] == 50.0 / (12.0 - 1.0 - 8.0)


def test_output_locations_name_every_output_and_the_export_command():
  line = train_log.output_locations('/w', '/w/checkpoints')
  for part in ('/w/checkpoints', '/w/metrics.jsonl', '/w/summary.json',
               'python -m flaxdistil.export --workdir /w --out OUT'):
    assert part in line
