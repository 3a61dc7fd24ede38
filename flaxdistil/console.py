"""What the command lines (`main`, `cache_teacher`, `export`) show a person, and what they keep.

- `setup(log_file)`: one clean line per log record on stderr (no absl prefix such as
  `I1201 19:05:15.585633 140123 metric_writers.py:180]`; warnings start with `warning: `), written
  through `tqdm.write` so that lines scroll above a live progress bar (`data/progress.py`), with
  library chatter filtered out (`QuietLibraries`), and `sys.stderr` without the tracebacks of a
  failed async save's closed event loop (`ClosedLoopTracebacks`); and, given `log_file` (`<workdir>/log.txt`),
  every record, chatter included, with absl's full prefix, in that file.
- `summary_table(summary)`: the end-of-run table of `train.train_and_evaluate`'s summary (rich).

Errors a user can fix stay one paragraph (`error: ...`, exit 2 and up: `cli.exit_on_error`). The
console is set up inside `absl.app.run`'s main, after absl installed its own handler, which it
replaces; library users who never call `setup` keep their logging as it was.
"""

import atexit
import io
import logging
import os
import sys
import threading

import rich.box
import rich.console
import rich.table
import tqdm

from flaxdistil.storage import space


class QuietLibraries(logging.Filter):
  """Drops library chatter that tells a user nothing; errors pass (all but the last below).

  Dropped:
  - INFO of orbax (one line per file it reads or writes), of the ONNX
    optimiser passes (`onnxscript`, `onnx_ir`: constant folding, node removal)
    and of onnxruntime's quantizer (one line per tensor it skips);
  - JAX's INFO "Unable to initialize backend 'tpu'", logged while it probes for
    optional platforms: expected on a CPU or GPU machine, and the platform in
    use is logged by `main`. A platform requested with JAX_PLATFORMS that fails
    raises instead, so TPU/GPU problems still show;
  - orbax's warnings that a read-only manager (export) disables saving, and
    the quantizer's advice to pre-process the model (an image-model recipe);
  - orbax's (and asyncio's) error tracebacks of a save that found the disk
    full, and orbax's error that a damaged step's metadata does not parse: the
    command reports those itself, once, with the fix.
  """

  _QUIET_INFO_PATHS = ('/orbax/', '/onnxscript/', '/onnx_ir/', '/onnxruntime/quantization/')

  def filter(self, record: logging.LogRecord) -> bool:
    """True to emit `record`, False to drop it (the rules of the class docstring)."""
    if record.levelno >= logging.ERROR:
      # A save that found the disk full: orbax (and asyncio, for its unawaited write tasks) logs
      # the traceback; the command reports it in one paragraph (`storage.space.DiskFullError`).
      if (('/orbax/' in record.pathname or record.name == 'asyncio') and record.exc_info
          and space.is_disk_full(record.exc_info[1])):
        return False
      # A damaged step's metadata: orbax logs that it cannot parse it, then our checksum check
      # names the file and the fix (`storage.integrity.CorruptFileError`).
      return not ('/orbax/' in record.pathname and 'Failed to json parse' in str(record.msg))
    msg = str(record.msg)
    if record.levelno >= logging.WARNING:
      return not (('/orbax/' in record.pathname and 'read_only' in msg.replace(' ', '_'))
                  or msg.startswith('Please consider to run pre-processing before quantization'))
    if any(p in record.pathname for p in self._QUIET_INFO_PATHS):
      return False
    return not (record.name.startswith('jax') and msg.startswith('Unable to initialize backend'))


class ClosedLoopTracebacks:
  """`sys.stderr` less the tracebacks of writes that complete after orbax's save loop closed.

  When an async checkpoint save fails (a full disk), orbax's event loop closes while tensorstore
  still has writes in flight; as each completes, its callback's `loop.call_soon_threadsafe`
  raises `RuntimeError: Event loop is closed`, which the C++ side prints straight to
  `sys.stderr` (not through logging), a dozen times, seconds before the command reports the
  failed save in its one paragraph. Such a traceback (every frame in asyncio, that exact last
  line) is dropped here; anything else, other tracebacks included, passes through unchanged.
  Text is held per writing thread: the traceback comes in pieces from a tensorstore thread while
  the training thread goes on logging, so one thread's lines never land inside another's block.
  Other attributes (`isatty`, `fileno`, `encoding`...) are the wrapped stream's.
  """

  _HEAD = 'Traceback (most recent call last):'
  _TAIL = 'RuntimeError: Event loop is closed'

  def __init__(self, stream):
    self._stream = stream
    self._held = {}  # thread id -> a traceback being written (until its exception line) or a
    #                  header's start
    self._lock = threading.Lock()
    atexit.register(self._write_pending)

  def write(self, text: str) -> int:
    tid = threading.get_ident()
    with self._lock:
      self._held[tid] = self._held.get(tid, '') + text
      self._write_held(tid)
    return len(text)

  def _in_block(self, tid: int) -> bool:
    """A traceback is being held (a header's start alone is shorter than the header)."""
    return self._held.get(tid, '').startswith(self._HEAD)

  def _write_held(self, tid: int) -> None:
    held = self._held[tid]
    while True:
      if not held.startswith(self._HEAD):
        start = held.find(self._HEAD)
        if start < 0:
          # Hold back only what could be the start of a header (written in pieces).
          keep = next((k for k in range(min(len(self._HEAD) - 1, len(held)), 0, -1)
                       if held.endswith(self._HEAD[:k])), 0)
          self._stream.write(held[:len(held) - keep])
          held = held[len(held) - keep:]
          break
        self._stream.write(held[:start])
        held = held[start:]
      lines = held.split('\n')
      # lines[0] is the header, lines[-1] not complete yet: the traceback ends at the first
      # complete line that is not indented (the exception's line).
      end = next((n for n in range(1, len(lines) - 1) if not lines[n].startswith(' ')), None)
      if end is None:
        break
      frames = [ln for ln in lines[1:end] if ln.lstrip().startswith('File ')]
      if not (lines[end] == self._TAIL and frames and all('/asyncio/' in f for f in frames)):
        self._stream.write('\n'.join(lines[:end + 1]) + '\n')
      held = '\n'.join(lines[end + 1:])
    if held:
      self._held[tid] = held
    else:
      self._held.pop(tid, None)

  def flush(self) -> None:
    with self._lock:
      for tid in [t for t in self._held if not self._in_block(t)]:
        self._stream.write(self._held.pop(tid))  # a header start no traceback followed: text
    self._stream.flush()

  def _write_pending(self) -> None:
    with self._lock:
      for held in self._held.values():
        self._stream.write(held)
      self._held.clear()

  def __getattr__(self, name):
    return getattr(self._stream, name)


class ConsoleFormatter(logging.Formatter):
  """The message alone; `warning: ` / `error: ` before records of those levels (and tracebacks)."""

  def format(self, record: logging.LogRecord) -> str:
    msg = record.getMessage()
    if record.levelno >= logging.ERROR:
      msg = f'error: {msg}'
    elif record.levelno >= logging.WARNING:
      msg = f'warning: {msg}'
    if record.exc_info:
      msg += '\n' + self.formatException(record.exc_info)
    return msg


class ConsoleHandler(logging.Handler):
  """Writes formatted records to the current `sys.stderr` through `tqdm.write` (above any bar)."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except  (logging's own contract)
      self.handleError(record)


def setup(log_file: str | None = None) -> None:
  """Replaces absl's stderr handler by `ConsoleHandler`; adds `log_file` with the full records.

  Call inside `absl.app.run`'s main (absl installs its handler in `app.run`). Idempotent: a
  second call adds nothing but a log file not yet attached.

  Args:
    log_file: a file that gets every record (INFO and up, library chatter included) with absl's
      prefix (`I1201 19:05:15.585633 140123 train_log.py:95] ...`), appended to; its directory
      must exist. None: the console only.
  """
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if not isinstance(sys.stderr, ClosedLoopTracebacks):
    sys.stderr = ClosedLoopTracebacks(sys.stderr)
  root = logging.getLogger()
  absl_handler = absl_logging.get_absl_handler()
  if absl_handler in root.handlers:
    root.removeHandler(absl_handler)
  if not any(isinstance(h, ConsoleHandler) for h in root.handlers):
    handler = ConsoleHandler()
    handler.setFormatter(ConsoleFormatter())
    handler.addFilter(QuietLibraries())
    root.addHandler(handler)
  # torch logs through its own handler: its ONNX exporter's warnings that torchvision is not
  # installed (no torchvision operators in BERT) are silenced by the level of that one logger.
  logging.getLogger('torch.onnx._internal.exporter._registration').setLevel(logging.ERROR)
  if log_file:
    path = os.path.abspath(log_file)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path
               for h in root.handlers):
      file_handler = logging.FileHandler(path, encoding='utf-8')
      file_handler.setFormatter(absl_logging.PythonFormatter())
      root.addHandler(file_handler)


def _num(v) -> str:
  """A metric for the table: 4 significant digits; '' for a missing value."""
  if v is None:
    return ''
  if isinstance(v, float):
    return f'{v:.4g}'
  return f'{v:,}' if isinstance(v, int) else str(v)


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return '?'
  m, s = divmod(int(round(seconds)), 60)
  return f'{m} min {s:02d} s' if m else f'{s} s'


# Eval keys that are counts, not quality: left out of the table.
_COUNT_KEYS = ('num_tokens', 'num_sequences')


def summary_table(summary: dict, workdir: str) -> str:
  """The end-of-run table: teacher vs student (initial and final) on the held-out metrics.

  Args:
    summary: what `train.train_and_evaluate` returned (`step`, `num_train_steps`, `student`,
      `teacher`, optional `student_initial`, `models`, `train_seconds`, `train_tokens_per_sec`).
    workdir: the run's directory (for the output paths below the table).

  Returns:
    The table as plain text (box drawing, no colour codes), a title line above it and the
    outputs below it, ready for `logging.info` (console and log.txt alike).
  """
  models = summary.get('models') or {}
  cols = []  # (header, model key, metrics)
  if 'teacher' in models or summary.get('teacher'):
    cols.append(('teacher', 'teacher', summary.get('teacher') or {}))
  if summary.get('student_initial'):
    cols.append(('student, step 0', 'student', summary['student_initial']))
  cols.append((f'student, step {summary.get("step")}', 'student', summary.get('student') or {}))
  table = rich.table.Table(box=rich.box.SQUARE, show_edge=True, pad_edge=True)
  table.add_column('')
  for header, _, _ in cols:
    table.add_column(header, justify='right')
  if models:
    shape = lambda m: f'{m["layers"]} x {m["hidden_size"]}' if m else ''
    table.add_row('layers x hidden', *[shape(models.get(key)) for _, key, _ in cols])
    count = lambda n: f'{n / 1e6:.1f}M' if n >= 1e6 else f'{n / 1e3:.1f}k'
    table.add_row('parameters', *[count(models[key]['params']) if key in models else ''
                                  for _, key, _ in cols])
  keys = []
  for _, _, metrics in cols:
    keys += [k for k in metrics if k not in keys and k not in _COUNT_KEYS]
  for k in keys:
    table.add_row(k, *[_num(metrics.get(k)) for _, _, metrics in cols])
  buf = io.StringIO()
  rich.console.Console(file=buf, width=100, color_system=None, force_terminal=False,
                       highlight=False).print(table)
  tps = summary.get('train_tokens_per_sec')
  title = (f'Summary of {workdir}: {summary.get("step")}/{summary.get("num_train_steps")} steps '
           f'in {_duration(summary.get("train_seconds"))}'
           + (f', {tps:,.0f} train tokens/s' if tps else ''))
  notes = []
  if keys and not any(cols[0][2].get(k) is not None for k in keys) and cols[0][0] == 'teacher':
    notes.append('teacher: the reference the student metrics compare with')
  outputs = (f'curves: {os.path.join(workdir, "curves.png")}  metrics: '
             f'{os.path.join(workdir, "metrics.jsonl")}  log: {os.path.join(workdir, "log.txt")}')
  return '\n'.join([title, buf.getvalue().rstrip('\n'), *notes, outputs])
