r"""Distill a BERT teacher into a DistilBERT student: flags -> `train.train_and_evaluate`.

  python -m flaxdistil.main --config configs/distilbert.py --workdir DIR [--config.GROUP.KEY=VALUE]

Config files (configs/*.py): distilbert.py (the paper's recipe), tiny.py (a
30-second smoke run), wiki_mini.py, glue.py:TASK,ROLE, minilm_wiki.py. Any
field can be overridden with --config.GROUP.KEY=VALUE (an unknown key is an
error); the groups:

  teacher     path (local directory or hub name), random-init shape, cache of its targets
  student     init (teacher layers / random / pretrained), depth, width (0 = teacher's)
  distill     temperature, alpha_* loss weights, masking, intermediate-layer terms
  data        train/eval files or dataset, tokenizer, max_seq_length, global_batch_size
  optim       AdamW, learning-rate schedule, clipping, num_microbatches, on_nonfinite
  mesh        device mesh axes and shape, logical_axis_rules (data / FSDP / tensor parallel)
  checkpoint  Orbax checkpointing (max_to_keep, async saves)

Top-level fields: seed, num_train_steps, steps_per_run, log_every_steps,
eval_every_steps, checkpoint_every_steps, dtype, remat. Rerunning a command
resumes from the newest checkpoint in --workdir. On a multi-host TPU slice or
GPU cluster jax.distributed.initialize() is called first (auto-detected from
the environment; --multihost forces it). Offline machines: HF_HUB_OFFLINE=1
and local directories for teacher.path / data.tokenizer.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from flaxdistil import console

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


_HUB_UNREACHABLE_TYPES = ('OfflineModeIsEnabled', 'LocalEntryNotFoundError', 'ConnectError',
                          'ConnectTimeout', 'ConnectionError')


def _hub_unreachable(error: BaseException) -> bool:
  """True if `error` or an exception it was raised from says the Hub could not be reached."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error).lower()
    if (isinstance(error, ConnectionError) or type(error).__name__ in _HUB_UNREACHABLE_TYPES
        or "couldn't connect to" in text or 'outgoing traffic has been disabled' in text
        or 'hub is offline' in text or 'hub is unreachable' in text):
      return True
    error = error.__cause__ or error.__context__
  return False


def _hub_hint(config, error: BaseException) -> str:
  """The fix for a hub name (teacher.path, data.tokenizer, student.path) that the offline or
  unreachable Hub cannot serve, or '' when `error` is about something else."""
  offline = os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')
  text = str(error).lower()
  # Offline, setup refuses an 'org/name' it takes for a missing directory before any hub call.
  missing = any(w in text for w in ('does not exist', 'cannot load', 'could not load'))
  if not (_hub_unreachable(error) or offline and missing):
    return ''
  wants = {'teacher.path': 'config.json and weights (model.safetensors or pytorch_model.bin)',
           'student.path': 'config.json and weights (model.safetensors or pytorch_model.bin)',
           'data.tokenizer': 'tokenizer.json or vocab.txt'}
  for key, content in wants.items():
    group, field = key.split('.')
    value = str(config[group].get(field, '') or '')
    if (not value or value.startswith(('.', '/', '~')) or value.count('/') > 1
        or os.path.exists(os.path.expanduser(value)) or repr(value) not in str(error)
        or f'--config.{key}' in str(error)):  # the error already names the fix
      continue
    why = 'offline (HF_HUB_OFFLINE=1)' if offline else 'unreachable'
    return (f'{key}={value!r} is a Hugging Face Hub name and the Hub is {why}: set '
            f'--config.{key} to a local directory with {content}.')
  return ''


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.quiet_libraries()  # orbax / JAX-platform-probe chatter
  _maybe_initialize_distributed()
  logging.info('JAX %s: process %d/%d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  from flaxdistil import setup, train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except setup.ConfigError as e:
    # Printed once, without a log prefix; logging it as well would show it twice on stderr.
    hint = _hub_hint(FLAGS.config, e)
    print(f'error: {e}' + (f'\nfix: {hint}' if hint else ''), file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:  # optim.on_nonfinite='stop'
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)


if __name__ == '__main__':
  app.run(main)
