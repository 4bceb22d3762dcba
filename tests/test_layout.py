"""The package's layout: no import circles, and rooms of a readable size."""

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "pivq_jax")
# The file whose bulk is data (colour tables, attribute lists).
_DATA_TABLES = {"data/faces.py"}
_MAX_LINES = 430


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        yield rel.removesuffix(".__init__"), path


def _imports(module: str, path: str) -> set[str]:
  """Every pivq_jax module `module` imports, at the top or inside functions."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      out.add(base)
      out.update(f"{base}.{a.name}" for a in node.names)
  known = dict(_modules())
  return {m for m in out if m in known and m != module}


def test_no_import_circles():
  graph = {m: _imports(m, p) for m, p in _modules()}
  # A package's __init__ importing nothing but itself is fine; drop parent-package edges.
  graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_no_file_is_a_house_with_no_walls():
  too_long = {}
  for _, path in _modules():
    rel = os.path.relpath(path, PACKAGE).replace(os.sep, "/")
    n = len(open(path).read().splitlines())
    if n > _MAX_LINES and rel not in _DATA_TABLES:
      too_long[rel] = n
  assert not too_long, too_long


def test_modes_are_named_in_one_place():
  from pivq_jax import runner  # pylint: disable=g-import-not-at-top
  assert set(runner.MODES) == {"train", "eval", "sample", "interpolate", "export", "plan"}
  for _, path in _modules():
    if not path.endswith("runner.py"):
      assert "MODES" not in open(path).read() or path.endswith("main.py"), path
