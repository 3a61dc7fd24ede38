r"""Entry point: run the teacher once over the training rows and store its targets.

  python -m flaxdistil.cache_teacher --config configs/wiki_mini.py --out runs/cache_k64 \
      [--num_rows N] [--config.teacher.cache_top_k=64] [--config.key=value]
  python -m flaxdistil.main --config configs/wiki_mini.py --workdir runs/offline \
      --config.teacher.cache=runs/cache_k64

Rerunning the same command after a kill resumes (finished shards are kept). On a multi-host
cluster run it on every host (as main.py): each host writes its own shards. Format, equations and
guarantees: flaxdistil/teacher_cache.py.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config (configs/*.py).', lock_config=True)
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (TPU pods, SLURM, ...).')
flags.DEFINE_string('out', None, 'Cache directory (created; an unfinished build there is resumed).')
flags.DEFINE_integer('num_rows', 0, 'Packed rows to cache; 0 = the rows the configured run reads '
                     '(num_train_steps x global_batch_size, in its data order).')
flags.DEFINE_integer('rows_per_shard', 1024, 'Rows per shard file (the unit of resumption).')
flags.DEFINE_integer('batch_size', 0, 'Rows per teacher forward; 0 = data.eval_batch_size.')
flags.DEFINE_string('build_workdir', None, 'Scratch dir for data preparation; default OUT/../'
                    '<basename>_work (outside the cache, so its size is the cache alone).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.multihost:
    jax.distributed.initialize()
  from flaxdistil import setup, teacher_cache  # pylint: disable=g-import-not-at-top
  out = FLAGS.out.rstrip('/')
  workdir = FLAGS.build_workdir or os.path.join(os.path.dirname(out) or '.',
                                                os.path.basename(out) + '_work')
  try:
    setup.prepare_workdir(workdir)
    m = teacher_cache.build(FLAGS.config, out, workdir, num_rows=FLAGS.num_rows,
                            rows_per_shard=FLAGS.rows_per_shard, batch_size=FLAGS.batch_size)
  except setup.ConfigError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  summary = {k: m.get(k) for k in ('top_k', 'values_dtype', 'hidden_dtype', 'num_shards', 'bytes',
                                   'num_tokens', 'bytes_per_token', 'build_seconds')}
  summary['rows'] = len(m['rows'])
  print(json.dumps({'out': os.path.abspath(out), **summary}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'out'])
  app.run(main)
