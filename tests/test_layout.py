"""The code's shape: no import cycles, dependencies flowing one way between the packages, no reaching into another
module's private names, and a CLI whose commands hand over to the library.

Layers, lowest first: `tfds_covidct` (the dataset) <- the `covidct` library <- `export` (which uses the library) <-
`benchmarks` (which measures what export writes, with export's parity rules) <- the application: `covidct.cli` and
`covidct.pipeline` (the main job), which may use everything.
"""

from __future__ import annotations

import ast
import pathlib

from tests.conftest import ROOT

PACKAGES = ("tfds_covidct", "covidct", "export", "benchmarks")
APPLICATION = ("covidct.cli", "covidct.pipeline")


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for pkg in PACKAGES:
    for p in (ROOT / pkg).rglob("*.py"):
      parts = p.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      mods[name] = p
  return mods


def _imports(mods) -> dict[str, set[str]]:
  """Module -> the project modules it imports anywhere (top level or inside functions)."""

  def resolve(name):
    while name and name not in mods:
      name = name.rpartition(".")[0]
    return name

  edges = {m: set() for m in mods}
  for m, p in mods.items():
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for t in map(resolve, targets):
        if t and t != m and not m.startswith(t + "."):  # a package's own __init__ is not a dependency of its modules
          edges[m].add(t)
  return edges


def _cycles(edges) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in edges:
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  assert _cycles(_imports(_modules())) == []


def test_cycle_finder_finds_one():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_flow_one_way():
  wrong = []
  for m, targets in _imports(_modules()).items():
    top = m.split(".")[0]
    app = any(m == a or m.startswith(a + ".") for a in APPLICATION)
    for t in targets:
      t_top = t.split(".")[0]
      if top == "tfds_covidct" and t_top != "tfds_covidct":
        wrong.append(f"{m} -> {t} (the dataset builder stands alone)")
      elif top == "covidct" and not app and t_top in ("export", "benchmarks"):
        wrong.append(f"{m} -> {t} (the library must not use export or benchmarks)")
      elif top == "export" and t_top == "benchmarks":
        wrong.append(f"{m} -> {t} (benchmarks measure exports, not the other way)")
  assert wrong == []


def test_no_private_names_from_other_modules():
  mods = _modules()
  wrong = []
  for m, p in mods.items():
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
        wrong += [f"{m}: from {node.module} import {a.name}" for a in node.names
                  if a.name.startswith("_") and a.name != "__version__"]
  assert wrong == []


def test_cli_commands_hand_over_to_the_library():
  """Each command parses its options and calls the library: a few statements, no loops over data."""
  long = []
  for p in sorted((ROOT / "covidct" / "cli").glob("*.py")):
    for node in ast.parse(p.read_text()).body:
      if isinstance(node, ast.FunctionDef) and any("command" in ast.unparse(d) for d in node.decorator_list):
        body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        if len(body) > 10:
          long.append(f"{p.name}:{node.name} has {len(body)} statements")
  assert long == []
