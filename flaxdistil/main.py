r"""Entry point: flags -> `train.train_and_evaluate(config, workdir)`.

  python -m flaxdistil.main --config configs/distilbert.py --workdir DIR [--config.key=value]

On a multi-host TPU slice or GPU cluster `jax.distributed.initialize()` is
called first (auto-detected from the environment; `--multihost` forces it).
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
flags.DEFINE_bool('multihost', None, 'Call jax.distributed.initialize(); default: auto-detect.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for clusters JAX cannot detect (e.g. CPU hosts).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process index (with --coordinator_address).')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])

_MULTIHOST_ENV = ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'SLURM_NTASKS',
                  'OMPI_COMM_WORLD_SIZE')


def _maybe_initialize_distributed():
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    return
  multihost = FLAGS.multihost
  if multihost is None:
    multihost = any(os.environ.get(k) for k in _MULTIHOST_ENV) and os.environ.get(
        'TPU_WORKER_HOSTNAMES', 'x') not in ('', 'localhost')
  if multihost:
    jax.distributed.initialize()


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of orbax (one line per file it writes); warnings pass."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _maybe_initialize_distributed()
  logging.info('JAX %s: process %d/%d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  from flaxdistil import setup, train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except setup.ConfigError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:  # optim.on_nonfinite='stop'
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)


if __name__ == '__main__':
  app.run(main)
