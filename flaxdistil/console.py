"""Console hygiene of the command lines (`main`, `cache_teacher`, `export`): chatter filtered out.

A filter on absl's handler (through which Python `logging` records reach stderr
once `absl.app.run` starts) rather than log levels on library loggers, so that
nothing changes for library users and for files/handlers of their own.
"""

import logging

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
  - orbax's error tracebacks of a save that found the disk full: the command
    reports that itself, once, with the space needed and the fix.
  """

  _QUIET_INFO_PATHS = ('/orbax/', '/onnxscript/', '/onnx_ir/', '/onnxruntime/quantization/')

  def filter(self, record: logging.LogRecord) -> bool:
    """True to emit `record`, False to drop it (the rules of the class docstring)."""
    if record.levelno >= logging.ERROR:
      # A save that found the disk full: orbax logs the traceback, the command reports it in one
      # paragraph (`storage.space.DiskFullError`).
      return not ('/orbax/' in record.pathname and record.exc_info
                  and space.is_disk_full(record.exc_info[1]))
    msg = str(record.msg)
    if record.levelno >= logging.WARNING:
      return not (('/orbax/' in record.pathname and 'read_only' in msg.replace(' ', '_'))
                  or msg.startswith('Please consider to run pre-processing before quantization'))
    if any(p in record.pathname for p in self._QUIET_INFO_PATHS):
      return False
    return not (record.name.startswith('jax') and msg.startswith('Unable to initialize backend'))


def quiet_libraries():
  """Installs `QuietLibraries` on absl's stderr handler (call inside `absl.app.run`'s main).

  torch logs through its own handler, not absl's: its ONNX exporter's warnings
  that torchvision is not installed (no torchvision operators in BERT) are
  silenced by the level of that one logger.
  """
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())
  logging.getLogger('torch.onnx._internal.exporter._registration').setLevel(logging.ERROR)
