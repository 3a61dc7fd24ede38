r"""Distill a BERT teacher into a DistilBERT student: flags -> `train.train_and_evaluate`.

  python -m flaxdistil.main --config configs/distilbert.py --workdir DIR [--config.GROUP.KEY=VALUE]

Config files (configs/*.py): demo.py (the first run: the pretrained MiniLM
encoder distilled on the embedded Wikipedia slice, minutes on a CPU),
distilbert.py (the paper's recipe), tiny.py (a 30-second smoke run), wiki_mini.py,
glue.py:TASK,ROLE, minilm_wiki.py. Any field can be overridden with
--config.GROUP.KEY=VALUE (an unknown key is an error); the groups:

  teacher     path (local directory or hub name), random-init shape, cache of its targets
  student     init (teacher layers / random / pretrained), depth, width (0 = teacher's)
  distill     temperature, alpha_* loss weights, masking, intermediate-layer terms
  data        train/eval files or dataset, tokenizer, max_seq_length, global_batch_size
  optim       AdamW, learning-rate schedule, clipping, num_microbatches, on_nonfinite
  mesh        device mesh axes and shape, logical_axis_rules (data / FSDP / tensor parallel)
  checkpoint  Orbax checkpointing (max_to_keep, async saves)

Top-level fields: seed, num_train_steps, steps_per_run, log_every_steps,
eval_every_steps, eval_at_start, checkpoint_every_steps, dtype, remat, scan_layers,
attention_implementation. Rerunning a command resumes from the newest checkpoint in --workdir.
The console shows one line per log interval, a progress bar in a terminal and a summary table at
the end; the full log is <workdir>/log.txt, the curves <workdir>/curves.png.
On a multi-host TPU slice or GPU cluster jax.distributed.initialize() is called
first (auto-detected from the environment; --multihost forces it). Offline machines: HF_HUB_OFFLINE=1
and local directories for teacher.path / data.tokenizer.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from flaxdistil import cli
from flaxdistil import console

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
cli.define_multihost_flags()
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  """Trains (or resumes) the run of `--config` in `--workdir`; run through `absl.app.run`.

  Args:
    argv: the command line left after absl parsed its flags; only the program name is allowed.

  Raises:
    app.UsageError: positional arguments beyond the program name.
    SystemExit: printed as `error: ...` (`cli.exit_on_error`): code 2 after a `ConfigError`,
      3 after non-finite steps (`optim.on_nonfinite='stop'`, or `optim.max_consecutive_nonfinite`
      in a row), 4 when the disk is full, 5 for a corrupt checkpoint or cache file, 6 when
      another run holds `--workdir`, 7 when another process of a multi-process job was lost.
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.setup()  # clean console lines, library chatter filtered
  watchdog = cli.initialize_from_flags()
  from flaxdistil.training import checkpointing  # pylint: disable=g-import-not-at-top
  from flaxdistil.training import setup  # pylint: disable=g-import-not-at-top
  from flaxdistil.training import train  # pylint: disable=g-import-not-at-top
  if watchdog is not None:
    watchdog.resume_hint = lambda: checkpointing.resume_hint(FLAGS.workdir)
  with cli.exit_on_error(FLAGS.config):
    setup.prepare_workdir(FLAGS.workdir)
    i = jax.process_index()
    console.setup(os.path.join(FLAGS.workdir, 'log.txt' if i == 0 else f'log.{i}.txt'))
    logging.info('JAX %s: process %d/%d, %d local / %d global devices (%s)', jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if i == 0 and not summary.get('preempted'):
    logging.info('%s', console.summary_table(summary, FLAGS.workdir))

if __name__ == '__main__':
  app.run(main)
