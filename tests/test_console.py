"""flaxdistil.console: library chatter is filtered from the console, errors always pass."""

import logging

from flaxdistil import console


def _record(name, level, msg, pathname='/x.py'):
  return logging.LogRecord(name, level, pathname, 1, msg, None, None)


def test_quiet_libraries_drops_chatter_and_keeps_errors_and_our_lines():
  f = console.QuietLibraries()
  orbax = '/site-packages/orbax/checkpoint/manager.py'
  assert not f.filter(_record('absl', logging.INFO, 'Saving item to /w/1', orbax))
  assert f.filter(_record('absl', logging.ERROR, 'Saving failed', orbax))  # errors always pass
  assert not f.filter(_record('absl', logging.WARNING, 'read_only=True: saving disabled', orbax))
  assert f.filter(_record('absl', logging.WARNING, 'disk almost full', orbax))
  assert not f.filter(_record('jax._src.xla_bridge', logging.INFO,
                              "Unable to initialize backend 'tpu': not found"))
  assert f.filter(_record('jax._src.xla_bridge', logging.INFO, 'Backend gpu initialized'))
  assert not f.filter(_record('absl', logging.INFO, 'folding constant',
                              '/site-packages/onnxscript/optimizer.py'))
  assert f.filter(_record('absl', logging.INFO, 'step 5/20 loss=1.2',
                          '/repo/flaxdistil/training/train_log.py'))


def test_quiet_libraries_installs_once_on_absls_handler():
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  console.quiet_libraries()
  console.quiet_libraries()
  assert sum(isinstance(f, console.QuietLibraries) for f in handler.filters) == 1
