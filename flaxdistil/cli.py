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

# Environment variables that mean "this process is one of several" (JAX's own auto-detection
# covers TPU VMs, SLURM and Open MPI once initialize() is called).
_MULTIHOST_ENV = ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'SLURM_NTASKS',
                  'OMPI_COMM_WORLD_SIZE')


def define_multihost_flags() -> None:
  """`--multihost`, `--coordinator_address`, `--num_processes`, `--process_id` (absl flags)."""
  flags.DEFINE_bool('multihost', None, 'Call jax.distributed.initialize(); default: auto-detect.')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, for clusters JAX cannot detect (e.g. CPU hosts).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
  flags.DEFINE_integer('process_id', None, 'This process index (with --coordinator_address).')


def multihost_detected(environ=None) -> bool:
  """True when the environment says this is one process of a multi-host job.

  A single-host TPU VM sets `TPU_WORKER_HOSTNAMES=localhost`; that is not multi-host.
  """
  environ = os.environ if environ is None else environ
  return any(environ.get(k) for k in _MULTIHOST_ENV) and environ.get(
      'TPU_WORKER_HOSTNAMES', 'x') not in ('', 'localhost')


def initialize_distributed(multihost: bool | None = None, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> None:
  """`jax.distributed.initialize()` when this is one process of several.

  Args:
    multihost: True forces it, False skips it, None auto-detects (`multihost_detected`).
    coordinator_address / num_processes / process_id: an explicit cluster (CPU hosts, or any
      cluster JAX cannot detect); given an address, the others are passed on as they are.
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
  """The fix for a hub name (teacher.path, data.tokenizer, student.path) that the offline or
  unreachable Hub cannot serve, or '' when `error` is about something else."""
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
  """Turns a `setup.ConfigError` into `error: ...` (+ `fix: ...`) on stderr and exit code 2.

  Printed once, without a log prefix (logging it as well would show it twice on stderr).
  """
  from flaxdistil.training import setup  # pylint: disable=g-import-not-at-top
  try:
    yield
  except setup.ConfigError as e:
    hint = hub_hint(config, e) if config is not None else ''
    print(f'error: {e}' + (f'\nfix: {hint}' if hint else ''), file=sys.stderr)
    sys.exit(2)
