"""What every command line shares: multi-host start-up, a lost host, errors as one paragraph.

`main` (train), `cache_teacher` (build a teacher cache) and the other entry points run on every
host of a TPU slice or GPU cluster; `initialize_distributed` starts JAX's multi-host runtime the
same way for all of them, with bounded timeouts, and a `PeerWatchdog` that ends every surviving
process, naming the lost one, when a process of the job dies. `exit_on_error` turns the errors a
user can act on into `error: ...` (and `fix: ...`) on stderr and an exit code, with no traceback:

  2 a bad config or input (`ConfigError`)        5 a corrupt file (`CorruptFileError`)
  3 non-finite steps (`FloatingPointError`)      6 the directory is in use (`DirectoryLockedError`)
  4 no space left on device (`DiskFullError`)    7 a process of the job was lost (`PeerWatchdog`)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from typing import Callable, Iterator

from absl import flags
from absl import logging
import jax

from flaxdistil.storage import hub
from flaxdistil.storage.integrity import CorruptFileError
from flaxdistil.storage.lock import DirectoryLockedError
from flaxdistil.storage.space import DiskFullError
from flaxdistil.training.errors import ConfigError

# What `exit_on_error` reports, and how; the codes live on the classes (`exit_code`).
_REPORTED = (ConfigError, FloatingPointError, DiskFullError, CorruptFileError, DirectoryLockedError)
EXIT_NONFINITE, EXIT_PROCESS_LOST = 3, 7

# Process counts of cluster launchers (JAX's own auto-detection covers TPU VMs, SLURM and Open MPI
# once initialize() is called): more than one process means a multi-process job.
_PROCESS_COUNT_ENV = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def define_multihost_flags() -> None:
  """`--multihost`, `--coordinator_address`, `--num_processes`, `--process_id`,
  `--heartbeat_timeout_seconds`, `--initialization_timeout` (absl flags)."""
  flags.DEFINE_bool('multihost', None, 'Call jax.distributed.initialize(); default: auto-detect.')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, for clusters JAX cannot detect (e.g. CPU hosts).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
  flags.DEFINE_integer('process_id', None, 'This process index (with --coordinator_address).')
  flags.DEFINE_integer('heartbeat_timeout_seconds', 100,
                       'Multi-process jobs: a process silent this long is lost; the others stop '
                       '(ours after half of it, naming the lost process; JAX\'s own heartbeat '
                       'after all of it) instead of waiting for it forever.', lower_bound=2)
  flags.DEFINE_integer('initialization_timeout', 300,
                       'Multi-process jobs: seconds to wait for every process to join at start.',
                       lower_bound=1)


def multihost_detected(environ=None) -> bool:
  """True when the environment says this is one process of a multi-process job.

  Signals: `JAX_COORDINATOR_ADDRESS`; `TPU_WORKER_HOSTNAMES` listing more than one worker (a
  single-host TPU VM sets `localhost`, or nothing); `SLURM_NTASKS` / `OMPI_COMM_WORLD_SIZE` > 1
  (a value that is not an integer is ignored).

  Args:
    environ: the environment variables to read (a mapping); None reads `os.environ`.

  Returns:
    True for a multi-process job, False otherwise.
  """
  environ = os.environ if environ is None else environ
  if environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  workers = [w for w in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if w.strip()]
  if len(workers) > 1:
    return True
  for key in _PROCESS_COUNT_ENV:
    try:
      if int(environ.get(key, '1') or '1') > 1:
        return True
    except ValueError:
      pass
  return False


def initialize_distributed(multihost: bool | None = None, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           heartbeat_timeout_seconds: int = 100,
                           initialization_timeout: int = 300) -> PeerWatchdog | None:
  """`jax.distributed.initialize()` when this is one process of several, and its watchdog.

  Args:
    multihost: True forces it, False skips it, None auto-detects (`multihost_detected`). Ignored
      when `coordinator_address` is given.
    coordinator_address: `host:port` of process 0, for an explicit cluster (CPU hosts, or any
      cluster JAX cannot detect); given an address, `num_processes` and `process_id` are passed
      on to `jax.distributed.initialize` as they are.
    num_processes: number of processes of the explicit cluster (None: JAX's default).
    process_id: this process's index in the explicit cluster (None: JAX's default).
    heartbeat_timeout_seconds: JAX's `heartbeat_timeout_seconds`; the watchdog reports a lost
      process after half of it.
    initialization_timeout: JAX's `initialization_timeout` (seconds for all processes to join).

  Returns:
    The started `PeerWatchdog` of a multi-process job, else None.
  """
  global _WATCHDOG
  timeouts = dict(initialization_timeout=initialization_timeout,
                  heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
  elif multihost or (multihost is None and multihost_detected()):
    jax.distributed.initialize(**timeouts)
  if jax.process_count() > 1:
    _WATCHDOG = PeerWatchdog(heartbeat_timeout_seconds / 2).start()
  return _WATCHDOG


_WATCHDOG: PeerWatchdog | None = None  # this process's, read by `exit_on_error`


def initialize_from_flags() -> PeerWatchdog | None:
  """`initialize_distributed` with the values of `define_multihost_flags`' flags."""
  f = flags.FLAGS
  return initialize_distributed(f.multihost, f.coordinator_address, f.num_processes,
                                f.process_id, f.heartbeat_timeout_seconds,
                                f.initialization_timeout)


class PeerWatchdog:
  """Ends this process, naming the lost one, when another process of the job stops responding.

  A process that dies (host failure, SIGKILL, OOM) leaves the others blocked in a collective
  or a barrier, and JAX's coordination service aborts them only after its
  `heartbeat_timeout_seconds`, with a C++ stack dump. This daemon thread beats first: every
  `timeout / 10` s it writes a counter under `flaxdistil/heartbeat/<process>` in the
  coordination service's key-value store and reads the others'; a counter unchanged for
  `timeout` s (measured on this host's monotonic clock) means that process is lost, and the
  watchdog prints one paragraph on stderr (which process, for how long, what to do) and exits
  with code 7 (`os._exit`: the main thread may be stuck in the collective). A process that
  ends normally marks itself `exit` first (atexit), so a peer finishing later is not taken for
  lost. If the store itself becomes unreachable for `timeout` s, process 0 (which hosts it) is
  lost; JAX usually aborts first in that case, with its own message.

  Args:
    timeout: seconds without a beat before a process counts as lost.
    resume_hint: returns the sentence on resuming (e.g. 'They resume from step 16, ...'); set by
      the command line once it knows its workdir.
  """

  PREFIX = 'flaxdistil/heartbeat/'

  def __init__(self, timeout: float, resume_hint: Callable[[], str] | None = None):
    from jax._src import distributed  # pylint: disable=g-import-not-at-top  (the runtime client)
    self.client = distributed.global_state.client
    self.timeout, self.interval = float(timeout), max(0.2, timeout / 10)
    self.index, self.count = jax.process_index(), jax.process_count()
    self.resume_hint = resume_hint
    self._stop, self._lost = threading.Event(), threading.Event()
    self._peers = [p for p in range(self.count) if p != self.index]
    now = time.monotonic()
    self._seen = {p: (None, now) for p in self._peers}  # peer -> (last value, when it changed)
    self._thread = threading.Thread(target=self._run, name='flaxdistil-peer-watchdog', daemon=True)

  def start(self) -> PeerWatchdog:
    """Starts the thread and registers `stop` at exit; returns self."""
    self._thread.start()
    atexit.register(self.stop)
    logging.info('Process %d of %d: a process silent for %.0f s counts as lost and ends the others '
                 '(exit code 7); if process 0, which hosts the coordination service, is lost, '
                 'JAX ends them at once ("Terminating process because the JAX distributed service '
                 'detected fatal errors ... the leader task").', self.index, self.count,
                 self.timeout)
    return self

  def stop(self) -> None:
    """Marks this process `exit` in the store (peers stop watching it) and ends the thread."""
    if self._stop.is_set():
      return
    self._stop.set()
    with contextlib.suppress(Exception):
      self.client.key_value_set(self.PREFIX + str(self.index), 'exit', allow_overwrite=True)

  def confirm_loss(self) -> bool:
    """Waits until every peer has beaten again (or ended), or the watchdog finds one lost.

    For an exception of the main thread that may be a symptom (a collective failing because a
    peer closed its connection): if a peer is lost, the watchdog exits the process with its
    message during the wait (within `timeout`) and this never returns; if all are alive, it
    returns after about one beat.

    Returns:
      False: no process was lost.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < self.timeout + 2 * self.interval:
      if self._lost.wait(self.interval / 4):
        return True  # not reached: the watchdog exits the process
      if all(value == 'exit' or changed > t0 for value, changed in self._seen.values()):
        return False
    return False

  def _report(self, lost: list[int], seconds: float, why: str) -> None:
    self._lost.set()
    names = ', '.join(str(p) for p in lost)
    hint = ''
    with contextlib.suppress(Exception):
      hint = ' ' + self.resume_hint() if self.resume_hint else ''
    print(f'error: lost process {names} of {self.count} ({why} for {seconds:.0f} s; its host '
          f'died, was preempted or lost the network). Process {self.index} stops now instead of '
          f'waiting for it forever. fix: relaunch all {self.count} processes with the same '
          f'command.{hint}', file=sys.stderr, flush=True)
    os._exit(EXIT_PROCESS_LOST)  # pylint: disable=protected-access

  def _run(self) -> None:
    peers, seen = self._peers, self._seen
    beat, unreachable_since = 0, None
    while not self._stop.is_set():
      beat += 1
      now = time.monotonic()
      try:
        self.client.key_value_set(self.PREFIX + str(self.index), str(beat), allow_overwrite=True)
        values = dict(self.client.key_value_dir_get(self.PREFIX))
        unreachable_since = None
      except Exception:  # pylint: disable=broad-except  (the store is down or unreachable)
        if self._stop.is_set():
          return
        unreachable_since = unreachable_since or now
        if now - unreachable_since > self.timeout:
          self._report([0], now - unreachable_since,
                       'the coordination service it hosts has not answered')
        self._stop.wait(self.interval)
        continue
      lost = []
      for p in peers:
        value = values.get(self.PREFIX + str(p))
        if value == 'exit':
          continue
        if value != seen[p][0]:
          seen[p] = (value, now)
        elif now - seen[p][1] > self.timeout:
          lost.append(p)
      if lost and not self._stop.is_set():
        self._report(lost, max(now - seen[p][1] for p in lost), 'no heartbeat')
      self._stop.wait(self.interval)


# Config keys that take "a local directory or a hub name", and what such a directory holds.
_HUB_KEYS = {'teacher.path': 'config.json and weights (model.safetensors or pytorch_model.bin)',
             'student.path': 'config.json and weights (model.safetensors or pytorch_model.bin)',
             'data.tokenizer': 'tokenizer.json or vocab.txt'}


def hub_hint(config, error: BaseException) -> str:
  """The fix for a hub name (teacher.path, data.tokenizer, student.path) the Hub cannot serve.

  Args:
    config: the run's ConfigDict (its `teacher`, `student` and `data` groups are read).
    error: the exception to explain; it counts as a Hub problem when `hub.hub_unreachable` says
      so, or when `HF_HUB_OFFLINE` is set and its message says a path does not exist / cannot
      be loaded.

  Returns:
    One line naming the config key, its hub-name value and the `--config.KEY` to set to a local
    directory; '' when `error` is about something else, names no such value, or already names
    the fix.
  """
  text = str(error)
  # Offline, setup refuses an 'org/name' it takes for a missing directory before any hub call.
  missing = any(w in text.lower() for w in ('does not exist', 'cannot load', 'could not load'))
  if not (hub.hub_unreachable(error) or hub.hub_offline() and missing):
    return ''
  for key, content in _HUB_KEYS.items():
    group, field = key.split('.')
    value = str(config[group].get(field, '') or '')
    if (not value or hub.looks_like_local_path(value) or repr(value) not in text
        or f'--config.{key}' in text):  # the error already names the fix
      continue
    return (f'{key}={value!r} is a Hugging Face Hub name and the Hub is '
            f'{hub.unreachable_reason()}: set --config.{key} to a local directory with {content}.')
  return ''


@contextlib.contextmanager
def exit_on_error(config=None) -> Iterator[None]:
  """Turns the errors a user can act on into `error: ...` on stderr and an exit code.

  The codes are those of the module docstring (`exit_code` of each error class). Printed
  once, without a log prefix (logging it as well would show it twice on stderr); a `fix: ...`
  line follows a `ConfigError` when `hub_hint` has one. In a multi-process job any other
  exception first waits for the `PeerWatchdog` (a collective fails when a peer dies; then the
  watchdog's message and code 7 replace the traceback). Other exceptions pass through unchanged.

  Args:
    config: the run's ConfigDict, for `hub_hint`; None prints no `fix:` line.

  Raises:
    SystemExit: with the error's code after one of those errors inside the block.
  """
  try:
    yield
  except _REPORTED as e:
    code = EXIT_NONFINITE if isinstance(e, FloatingPointError) else e.exit_code
    hint = hub_hint(config, e) if config is not None and isinstance(e, ConfigError) else ''
    print(f'error: {e}' + (f'\nfix: {hint}' if hint else ''), file=sys.stderr)
    if isinstance(e, DiskFullError):
      # Orbax's writer threads of the failed save outlive it; at interpreter shutdown they print
      # 'Event loop is closed' tracebacks under the paragraph. Every write is atomic (nothing
      # half-written remains), so leave without that shutdown.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)  # pylint: disable=protected-access
    sys.exit(code)
  except Exception:
    if _WATCHDOG is not None:
      _WATCHDOG.confirm_loss()
    raise
