r"""TinyBERT's data augmentation of a GLUE train set: the command line.

  python -m flaxdistil.augment --task mrpc --train ../shared/data/glue/MRPC/train.tsv \
      --teacher ../shared/models/minilm-l6-mlm-wiki --out runs/aug/mrpc_train_aug.tsv \
      [--p_t 0.4] [--n_a 20] [--top_k 15] [--seed 0] [--num_examples N]
  # then task distillation on it, the existing data.task path:
  python -m flaxdistil.main --config configs/glue.py:mrpc,distill --workdir runs/glue/mrpc/aug \
      --config.data.train_files='("runs/aug/mrpc_train_aug.tsv",)'

Writes a GLUE-format TSV (the input's header; every row followed by its augmented copies),
`flaxdistil.data.augmentation` (Jiao et al., 2020, Sec. 3.2, Algorithm 1). The teacher is an MLM
(`*ForMaskedLM`) checkpoint: the pretrained one, not a task-fine-tuned classifier. Rerunning a
killed command resumes from its finished chunks (`OUT.parts/`). Prints a JSON report; exit code 2
with `error: ...` on bad input.
"""

import json
import os
import sys

from absl import app
from absl import flags

from flaxdistil import console

FLAGS = flags.FLAGS


def _define_flags():
  """The CLI's flags, defined only when this module runs (other entry points define `--out`)."""
  flags.DEFINE_string('task', None, 'GLUE task of --train (sst2, mrpc).')
  flags.DEFINE_string('train', None, "The task's labelled train.tsv (GLUE layout).")
  flags.DEFINE_string('out', None, 'The augmented TSV to write (must not exist).')
  flags.DEFINE_string('teacher', None, 'MLM teacher: a HF BertForMaskedLM directory.')
  flags.DEFINE_string('tokenizer', '', "Tokenizer directory; default: the teacher's.")
  flags.DEFINE_float('p_t', 0.4, 'p_t: probability of replacing each replaceable word.')
  flags.DEFINE_integer('n_a', 20, 'N_a: augmented copies drawn per example (duplicates dropped).')
  flags.DEFINE_integer('top_k', 15, 'K: candidates per word.')
  flags.DEFINE_integer('seed', 0, 'Augmentation seed (example i draws from default_rng([seed, i])).')
  flags.DEFINE_integer('num_examples', 0, 'Augment only the first N examples (the rest are copied '
                       'unchanged); 0 = all.')
  flags.DEFINE_integer('max_seq_length', 128, 'MLM rows are cut to this many tokens.')
  flags.DEFINE_integer('batch_size', 128, 'Rows per jitted MLM call.')
  flags.DEFINE_integer('chunk_size', 256, 'Examples per resumable part.')


def main(argv):
  """Augments `--train` into `--out` and prints the JSON report (`app.run`).

  Args:
    argv: the command line left after absl parsed its flags; only the program name is allowed.

  Raises:
    app.UsageError: positional arguments.
    SystemExit: code 2 on bad input (`error: ...` on stderr).
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.setup()  # clean console lines, library chatter filtered
  from flaxdistil.data import augmentation  # pylint: disable=g-import-not-at-top
  from flaxdistil.data import glue  # pylint: disable=g-import-not-at-top
  from flaxdistil.data import tokenization  # pylint: disable=g-import-not-at-top
  from flaxdistil.model import hf_conversion  # pylint: disable=g-import-not-at-top
  try:
    if os.path.exists(FLAGS.out):  # before the teacher is loaded
      raise FileExistsError(f'--out {FLAGS.out} already exists; remove it or choose another path.')
    task = glue.get_task(FLAGS.task)
    tok = tokenization.load_tokenizer(FLAGS.tokenizer or FLAGS.teacher)
    config, params = hf_conversion.load_hf_model(FLAGS.teacher, with_mlm_head=True,
                                                 with_classifier=False)
    augmenter = augmentation.Augmenter(config, params, tok, top_k=FLAGS.top_k,
                                       batch_size=FLAGS.batch_size,
                                       max_seq_length=FLAGS.max_seq_length)
    report = augmentation.augment_file(
        FLAGS.train, FLAGS.out, task, augmenter, n_a=FLAGS.n_a, p_t=FLAGS.p_t, seed=FLAGS.seed,
        num_examples=FLAGS.num_examples, chunk_size=FLAGS.chunk_size,
        settings={'teacher': FLAGS.teacher, 'tokenizer': FLAGS.tokenizer or FLAGS.teacher})
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(dict(report, out=FLAGS.out)))


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['task', 'train', 'out', 'teacher'])
  app.run(main)
