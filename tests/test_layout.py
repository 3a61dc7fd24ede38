"""The package layout: imports only go down the wings, and no module imports itself back.

Wings, lowest first (README "Layout"): storage < model < objectives < data < training < export <
the entry points (main, cache_teacher, augment, prune, cli, console, export/__main__). A module
may import its own wing or any lower one, never a higher one; within the package no import circle
exists (lazy imports inside functions count too). The model definition and the objectives import no config, data,
checkpoint or I/O library either.
"""

import ast
import os

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, 'flaxdistil')
WINGS = ('storage', 'model', 'objectives', 'data', 'training', 'export', 'entry')
# Libraries that mean config, data or I/O: none may appear below the data wing.
IO_LIBRARIES = ('ml_collections', 'absl', 'orbax', 'datasets', 'tokenizers', 'transformers',
                'torch', 'pyarrow', 'tensorboardX', 'onnx', 'onnxruntime', 'safetensors')


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  out = {}
  for parent, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(parent, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        out[rel.removesuffix('.__init__')] = path
  return out


MODULES = _modules()


def _imports(path: str) -> set[str]:
  """Every absolute module an import statement in `path` names (top-level and lazy)."""
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.add(node.module)
      # `from flaxdistil.training import setup` imports the module flaxdistil.training.setup
      out.update(f'{node.module}.{a.name}' for a in node.names
                 if f'{node.module}.{a.name}' in MODULES)
  return out


def _project_imports(name: str) -> set[str]:
  return {m for m in _imports(MODULES[name]) if m in MODULES and m != name
          and m != 'flaxdistil' and not name.startswith(m + '.')}


def wing(name: str) -> str:
  parts = name.split('.')
  if len(parts) > 2 and parts[1] in WINGS and parts[-1] != '__main__':
    return parts[1]
  if len(parts) == 2 and parts[1] in WINGS:  # the wing package itself (its __init__)
    return parts[1]
  return 'entry'  # flaxdistil.main, flaxdistil.cli, flaxdistil.export.__main__, ...


def test_every_module_belongs_to_a_wing():
  top = sorted(n for n in MODULES if n.count('.') == 1 and n.split('.')[1] not in WINGS)
  assert top == ['flaxdistil.augment', 'flaxdistil.cache_teacher', 'flaxdistil.cli',
                 'flaxdistil.console', 'flaxdistil.main', 'flaxdistil.prune',
                 'flaxdistil.train_compile'], top


@pytest.mark.parametrize('name', sorted(MODULES))
def test_imports_only_go_down(name):
  rank = WINGS.index(wing(name))
  up = sorted(m for m in _project_imports(name) if WINGS.index(wing(m)) > rank)
  assert not up, f'{name} ({wing(name)}) imports higher wings: {up}'


def test_no_import_circle():
  graph = {n: _project_imports(n) for n in MODULES}
  state, stack, circles = {}, [], []

  def visit(n):
    state[n] = 'open'
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == 'open':
        circles.append(stack[stack.index(m):] + [m])
      elif m not in state:
        visit(m)
    stack.pop()
    state[n] = 'done'

  for n in sorted(graph):
    if n not in state:
      visit(n)
  assert not circles, circles


@pytest.mark.parametrize('name', sorted(n for n in MODULES
                                        if wing(n) == 'objectives' or n == 'flaxdistil.model.bert'))
def test_models_and_losses_import_no_config_data_or_io(name):
  imported = _imports(MODULES[name])
  bad = sorted(m for m in imported if m.split('.')[0] in IO_LIBRARIES
               or (m in MODULES and wing(m) not in ('model', 'objectives')))
  assert not bad, f'{name} imports {bad}'
