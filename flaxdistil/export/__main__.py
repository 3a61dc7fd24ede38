r"""Orbax checkpoint -> verified Hugging Face (and ONNX) directory: the export command.

  python -m flaxdistil.export --workdir DIR [--step N] --out OUT_DIR [--dtype float32] [--onnx]

Logs one line saying what was exported and verified, then prints the JSON report of
`hf_export.export` on stdout (`path`, `max_abs_diff`, `step`, and with `--onnx` the ONNX report).
Exit code 2 with a one-paragraph `error: ...` when nothing could be exported (4 when the disk is
full, 5 when the checkpoint fails its checksums).
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging

from flaxdistil import console
from flaxdistil.export import hf_export
from flaxdistil.storage.integrity import CorruptFileError
from flaxdistil.storage.space import DiskFullError

FLAGS = flags.FLAGS


def _define_flags():
  """The CLI's flags, defined only when this module runs (`flaxdistil.main` defines `--workdir`
  too, and absl refuses a second definition in one process)."""
  flags.DEFINE_string('workdir', None, 'Training workdir (holds checkpoints/ and config.json).')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest readable one.')
  flags.DEFINE_string('out', None, 'Output directory (must not exist unless --overwrite).')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Dtype of the written weights.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out directory.')
  flags.DEFINE_bool('onnx', False, 'Also write OUT/onnx/model.onnx (fp32) and '
                    'model_quantized.onnx (int8), verified with onnxruntime against torch and Flax.')


def main(argv):
  """Exports the run of `--workdir` to `--out` and prints the JSON report (`app.run`).

  Args:
    argv: the command line left after absl parsed its flags; only the program name is allowed.

  Raises:
    app.UsageError: positional arguments, or no `--workdir` / `--out`.
    SystemExit: code 2 when the export fails (`error: ...` on stderr; 4 disk full, 5 a
      corrupt checkpoint).
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('--workdir and --out are required.')
  console.setup()
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of the checks
  try:
    report = hf_export.export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                    overwrite=FLAGS.overwrite, onnx=FLAGS.onnx)
  except (DiskFullError, CorruptFileError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(e.exit_code)
  except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  onnx = report.get('onnx')
  logging.info('Exported step %d to %s: transformers reproduces the Flax student (max |diff| '
               '%.2g)%s.', report['step'], report['path'], report['max_abs_diff'],
               f'; ONNX fp32 / int8 in {onnx["path"]} (max |diff| {onnx["max_abs_diff"]:.2g})'
               if onnx else '')
  print(json.dumps(report, default=str))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
