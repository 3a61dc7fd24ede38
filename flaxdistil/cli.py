"""What every command line shares: multi-host start-up, and input errors as one paragraph.

`main` (train), `cache_teacher` (build a teacher cache) and the other entry points run on every
host of a TPU slice or GPU cluster; `initialize_distributed` starts JAX's multi-host runtime the
same way for all of them. `exit_on_config_error` turns the errors a user can fix (a bad config, a
missing file, a hub name offline) into `error: ...` / `fix: ...` on stderr and exit code 2, with no
traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from absl import flags
import jax

from flaxdistil.storage import hub
from flaxdistil.training.errors import ConfigError

# Process counts of cluster launchers (JAX's own auto-detection covers TPU VMs, SLURM and Open MPI
# once initialize() is called): more than one process means a multi-process job.
_PROCESS_COUNT_ENV = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def define_multihost_flags() -> None:
  """`--multihost`, `--coordinator_address`, `--num_processes`, `--process_id` (absl flags)."""
  flags.DEFINE_bool('multihost', None, 'Call jax.distributed.initialize(); default: auto-detect.')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, for clusters JAX cannot detect (e.g. CPU hosts).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
  flags.DEFINE_integer('process_id', None, 'This process index (with --coordinator_address).')


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
                           num_processes: int | None = None, process_id: int | None = None) -> None:
  """`jax.distributed.initialize()` when this is one process of several.

  Args:
    multihost: True forces it, False skips it, None auto-detects (`multihost_detected`). Ignored
      when `coordinator_address` is given.
    coordinator_address: `host:port` of process 0, for an explicit cluster (CPU hosts, or any
      cluster JAX cannot detect); given an address, `num_processes` and `process_id` are passed
      on to `jax.distributed.initialize` as they are.
    num_processes: number of processes of the explicit cluster (None: JAX's default).
    process_id: this process's index in the explicit cluster (None: JAX's default).
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif multihost or (multihost is None and multihost_detected()):
    jax.distributed.initialize()


def initialize_from_flags() -> None:
  """`initialize_distributed` with the values of `define_multihost_flags`' flags."""
  f = flags.FLAGS
  initialize_distributed(f.multihost, f.coordinator_address, f.num_processes, f.process_id)


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
def exit_on_config_error(config=None) -> Iterator[None]:
  """Turns a `ConfigError` (`training/errors.py`) into `error: ...` on stderr and exit code 2.

  Printed once, without a log prefix (logging it as well would show it twice on stderr); a
  `fix: ...` line follows when `hub_hint` has one. Other exceptions pass through unchanged.

  Args:
    config: the run's ConfigDict, for `hub_hint`; None prints no `fix:` line.

  Raises:
    SystemExit: code 2, after a `ConfigError` inside the block.
  """
  try:
    yield
  except ConfigError as e:
    hint = hub_hint(config, e) if config is not None else ''
    print(f'error: {e}' + (f'\nfix: {hint}' if hint else ''), file=sys.stderr)
    sys.exit(2)
