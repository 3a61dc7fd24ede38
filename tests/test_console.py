"""flaxdistil.console: clean console lines (no absl prefix), the full log in a file, library
chatter filtered from the console, and the end-of-run summary table."""

import logging

import pytest

from flaxdistil import console


def _record(name, level, msg, pathname='/x.py'):
  return logging.LogRecord(name, level, pathname, 1, msg, None, None)


def test_quiet_libraries_drops_chatter_and_keeps_errors_and_our_lines():
  f = console.QuietLibraries()
  orbax = '/site-packages/orbax/checkpoint/manager.py'
  assert not f.filter(_record('absl', logging.INFO, 'Saving item to /w/1', orbax))
  assert f.filter(_record('absl', logging.ERROR, 'Saving failed', orbax))  # errors always pass
  assert not f.filter(_record('absl', logging.WARNING, 'read_only=True: saving disabled', orbax))
  assert f.filter(_record('absl', logging.WARNING, 'disk almost full', orbax))
  assert not f.filter(_record('jax._src.xla_bridge', logging.INFO,
                              "Unable to initialize backend 'tpu': not found"))
  assert f.filter(_record('jax._src.xla_bridge', logging.INFO, 'Backend gpu initialized'))
  assert not f.filter(_record('absl', logging.INFO, 'folding constant',
                              '/site-packages/onnxscript/optimizer.py'))
  assert f.filter(_record('absl', logging.INFO, 'step 5/20 loss=1.2',
                          '/repo/flaxdistil/training/train_log.py'))


def test_console_formatter_prints_the_message_alone_and_names_warnings_and_errors():
  fmt = console.ConsoleFormatter()
  assert fmt.format(_record('absl', logging.INFO, 'step 5/20 loss=1.2')) == 'step 5/20 loss=1.2'
  assert fmt.format(_record('absl', logging.WARNING, 'disk full')) == 'warning: disk full'
  assert fmt.format(_record('absl', logging.ERROR, 'it broke')) == 'error: it broke'


@pytest.fixture
def root_handlers():
  """Restores the root logger's handlers and level after a test that calls console.setup."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  root = logging.getLogger()
  saved, level = list(root.handlers), root.level
  if absl_logging.get_absl_handler() not in root.handlers:
    root.addHandler(absl_logging.get_absl_handler())  # as absl.app.run leaves it
  yield root
  for h in list(root.handlers):
    if h not in saved:
      root.removeHandler(h)
      h.close()
  for h in saved:
    if h not in root.handlers:
      root.addHandler(h)
  root.setLevel(level)


def test_setup_replaces_absls_prefix_on_the_console_and_logs_everything_to_a_file(
    tmp_path, capsys, root_handlers):
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  root_handlers.setLevel(logging.INFO)
  console.setup(str(tmp_path / 'log.txt'))
  console.setup(str(tmp_path / 'log.txt'))  # idempotent: one handler of each
  assert absl_logging.get_absl_handler() not in root_handlers.handlers
  assert sum(isinstance(h, console.ConsoleHandler) for h in root_handlers.handlers) == 1
  assert sum(getattr(h, 'baseFilename', '') == str(tmp_path / 'log.txt')
             for h in root_handlers.handlers) == 1
  absl_logging.info('step %d/%d loss=%.1f', 5, 20, 1.25)
  absl_logging.warning('disk almost full')
  logging.getLogger('absl').info('Saving item')  # orbax-style chatter from orbax's path
  for h in root_handlers.handlers:
    h.flush()
  err = capsys.readouterr().err
  assert 'step 5/20 loss=1.2\n' in err and 'warning: disk almost full\n' in err
  assert 'test_console.py:' not in err  # absl's `I1201 19:05:15.585 123 file.py:12]` prefix
  log = (tmp_path / 'log.txt').read_text()
  lines = [ln for ln in log.splitlines() if 'step 5/20' in ln]
  assert len(lines) == 1 and lines[0].startswith('I') and 'test_console.py:' in lines[0]
  assert any(ln.startswith('W') and 'disk almost full' in ln for ln in log.splitlines())


_CLOSED_LOOP = (
    'Traceback (most recent call last):\n'
    '  File "/usr/lib/python3.11/asyncio/base_events.py", line 806, in call_soon_threadsafe\n'
    '    self._check_closed()\n'
    '  File "/usr/lib/python3.11/asyncio/base_events.py", line 519, in _check_closed\n'
    "    raise RuntimeError('Event loop is closed')\n"
    'RuntimeError: Event loop is closed\n')


@pytest.mark.parametrize('piece', [1, 7, 10_000])  # written char by char, in pieces, at once
def test_stderr_drops_closed_loop_tracebacks_and_keeps_everything_else(piece):
  import io  # pylint: disable=g-import-not-at-top
  other = _CLOSED_LOOP.replace('Event loop is closed', 'something else').replace('asyncio', 'ours')
  chained = _CLOSED_LOOP.replace('RuntimeError: Event loop is closed', 'ValueError: bad')
  text = ('step 1/4 |##  | ETA 00:01\r' + _CLOSED_LOOP + 'step 2/4\n' + other + _CLOSED_LOOP
          + _CLOSED_LOOP + chained + 'error: No space left on device\n' + 'Traceback (most')
  out = io.StringIO()
  stream = console.ClosedLoopTracebacks(out)
  for i in range(0, len(text), piece):
    assert stream.write(text[i:i + piece]) == len(text[i:i + piece])
  stream._write_pending()  # what atexit does: an unfinished block is not lost
  assert out.getvalue() == ('step 1/4 |##  | ETA 00:01\rstep 2/4\n' + other + chained
                            + 'error: No space left on device\n' + 'Traceback (most')
  assert stream.getvalue() == out.getvalue()  # other attributes are the wrapped stream's


def test_stderr_drops_a_closed_loop_traceback_while_another_thread_logs_between_its_pieces():
  """What failed in test_reliability's disk-full run: a tensorstore thread prints the traceback
  line by line while the training thread logs its step lines in between."""
  import io  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  stream = console.ClosedLoopTracebacks(out)
  pieces = _CLOSED_LOOP.splitlines(keepends=True)
  turn = [threading.Event() for _ in range(2 * len(pieces) + 1)]

  def tensorstore():
    for n, piece in enumerate(pieces):
      turn[2 * n].wait()
      stream.write(piece)
      turn[2 * n + 1].set()

  t = threading.Thread(target=tensorstore)
  t.start()
  for n in range(len(pieces)):
    turn[2 * n].set()
    turn[2 * n + 1].wait()
    stream.write(f'step {n}/9 loss=1.0\n')
  t.join()
  stream.write('error: No space left on device\n')
  stream.flush()
  assert out.getvalue() == ''.join(f'step {n}/9 loss=1.0\n' for n in range(len(pieces))) + (
      'error: No space left on device\n')


def test_summary_table_compares_teacher_and_student_before_and_after():
  summary = {'step': 150, 'num_train_steps': 150, 'train_seconds': 192.4,
             'train_tokens_per_sec': 1234.5, 'teacher': {},
             'student_initial': {'embedding_cosine': 0.5, 'hidden_mse': 0.12, 'num_sequences': 256},
             'student': {'embedding_cosine': 0.75, 'hidden_mse': 0.05, 'num_sequences': 256},
             'models': {'teacher': {'layers': 6, 'hidden_size': 384, 'params': 22_713_216},
                        'student': {'layers': 3, 'hidden_size': 384, 'params': 17_390_208}}}
  text = console.summary_table(summary, 'runs/demo')
  lines = text.splitlines()
  assert lines[0] == 'Summary of runs/demo: 150/150 steps in 3 min 12 s, 1,234 train tokens/s'
  header = next(ln for ln in lines if 'teacher' in ln and 'step 0' in ln)
  assert header.index('teacher') < header.index('student, step 0') < header.index(
      'student, step 150')
  row = lambda name: [c.strip() for c in next(ln for ln in lines if f' {name} ' in ln)
                      .strip('│ ').split('│')]
  assert row('layers x hidden') == ['layers x hidden', '6 x 384', '3 x 384', '3 x 384']
  assert row('parameters') == ['parameters', '22.7M', '17.4M', '17.4M']
  assert row('embedding_cosine') == ['embedding_cosine', '', '0.5', '0.75']
  assert not any('num_sequences' in ln for ln in lines)  # a count, not a metric
  assert lines[-1].startswith('curves: runs/demo/curves.png')


def test_summary_table_of_an_mlm_run_has_the_teachers_metrics():
  summary = {'step': 20, 'num_train_steps': 20, 'train_seconds': 31, 'train_tokens_per_sec': None,
             'teacher': {'accuracy': 0.4, 'perplexity': 30.0},
             'student': {'accuracy': 0.25, 'perplexity': 90.5, 'agreement': 0.3}}
  lines = console.summary_table(summary, '/w').splitlines()
  assert lines[0] == 'Summary of /w: 20/20 steps in 31 s'
  acc = next(ln for ln in lines if ' accuracy ' in ln)
  assert [c.strip() for c in acc.strip('│ ').split('│')] == ['accuracy', '0.4', '0.25']
