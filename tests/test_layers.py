"""kdlab's imports go one way (docs/design.md): no cycles, no private names across modules, layer order kept.

Every import counts, at module level and inside functions alike.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The layer order, bottom first: a module may import from its own layer and the ones before it.
LAYERS = (
    ("base", ("kdlab.errors", "kdlab.config", "kdlab.files", "kdlab.mesh", "kdlab.distributed",
              "kdlab.stderr_filter")),
    ("losses", ("kdlab.losses",)),
    ("models", ("kdlab.models", "kdlab.ops")),
    ("objective", ("kdlab.objective",)),
    ("data", ("kdlab.data",)),
    ("sampling", ("kdlab.sampling",)),
    ("train", ("kdlab.train",)),
    ("offline", ("kdlab.offline",)),
    ("experiments", ("kdlab.sweep", "kdlab.launch", "kdlab.report", "kdlab.repro")),
    ("cli", ("kdlab.cli", "kdlab.__main__", "kdlab")),
)


def layer_of(module: str) -> int:
  """The index in LAYERS of the longest entry naming ``module`` or a package holding it.

  The root package (an entry without a dot) names its ``__init__`` alone.
  """
  best, best_len = None, -1
  for i, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      inside = "." in prefix and module.startswith(prefix + ".")
      if (module == prefix or inside) and len(prefix) > best_len:
        best, best_len = i, len(prefix)
  if best is None:
    raise KeyError(f"{module} is in no layer of tests/test_layers.py:LAYERS; add it to the right one")
  return best


@dataclasses.dataclass(frozen=True)
class Import:
  importer: str
  imported: str  # a module of the tree
  names: tuple[str, ...]  # names taken from it (from-imports and attribute reads of a bound module)
  line: int


def module_files(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """``{"pkg.sub.mod": path}`` for every ``.py`` file under ``package_dir`` (a package named by its folder)."""
  base = package_dir.parent
  found = {}
  for path in sorted(package_dir.rglob("*.py")):
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    found[".".join(parts)] = path
  return found


def imports(modules: dict[str, pathlib.Path]) -> list[Import]:
  """Every import of one module of ``modules`` by another, with the names it takes."""
  found = []
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, str] = {}  # local name -> module of the tree it is bound to
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name in modules:
            found.append(Import(name, alias.name, (), node.lineno))
            bound[alias.asname or alias.name] = alias.name
      elif isinstance(node, ast.ImportFrom):
        source = _absolute(node, name, is_package)
        for alias in node.names:
          target = f"{source}.{alias.name}"
          if target in modules:  # `from pkg import module`
            found.append(Import(name, target, (), node.lineno))
            bound[alias.asname or alias.name] = target
          elif source in modules:
            found.append(Import(name, source, (alias.name,), node.lineno))
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
          and f"{bound[node.value.id]}.{node.attr}" not in modules):
        found.append(Import(name, bound[node.value.id], (node.attr,), node.lineno))
  return found


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
  if not node.level:
    return node.module or ""
  parts = importer.split(".")
  base = parts if is_package else parts[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def cycles(edges: list[Import]) -> list[list[str]]:
  """The import cycles (strongly connected components of more than one module, or a self-import)."""
  graph: dict[str, set[str]] = {}
  for e in edges:
    graph.setdefault(e.importer, set()).add(e.imported)
    graph.setdefault(e.imported, set())
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v: str) -> None:  # Tarjan's algorithm.
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in graph[v]:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _is_parent_package(importer: str, imported: str) -> bool:
  """A package's ``__init__`` importing its own submodules (re-exports) is not a cycle back to it."""
  return imported.startswith(importer + ".")


def problems(modules: dict[str, pathlib.Path]) -> list[str]:
  edges = [e for e in imports(modules) if e.importer != e.imported]
  found = []
  # A submodule importing its own package's __init__ while that __init__ imports it back is the
  # package's re-export pattern, not a dependency between layers: only the re-export edge counts.
  graph_edges = [e for e in edges if not _is_parent_package(e.imported, e.importer)]
  found += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph_edges)]
  for e in edges:
    owner = e.imported.rpartition(".")[0]  # A private module is for the package that holds it.
    private_module = e.imported.rpartition(".")[2].startswith("_") and not e.imported.endswith("__")
    if private_module and not (e.importer == owner or e.importer.startswith(owner + ".")):
      found.append(f"{e.importer}:{e.line} imports the private module {e.imported}")
    for n in e.names:
      if n.startswith("_") and not n.startswith("__"):
        found.append(f"{e.importer}:{e.line} uses the private name {e.imported}.{n}")
  return found


def layer_problems(modules: dict[str, pathlib.Path]) -> list[str]:
  found, seen = [], set()
  for e in imports(modules):
    if layer_of(e.importer) < layer_of(e.imported) and (e.importer, e.imported, e.line) not in seen:
      seen.add((e.importer, e.imported, e.line))
      found.append(f"{e.importer}:{e.line} ({LAYERS[layer_of(e.importer)][0]}) imports {e.imported} "
                   f"({LAYERS[layer_of(e.imported)][0]}), a layer above it")
  return found


def test_kdlab_has_no_import_cycle_and_no_private_import():
  assert problems(module_files(ROOT / "kdlab")) == []


def test_kdlab_imports_follow_the_layer_order():
  assert layer_problems(module_files(ROOT / "kdlab")) == []


def _write(root: pathlib.Path, files: dict[str, str]) -> dict[str, pathlib.Path]:
  for rel, text in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)
  return module_files(root / "pkg")


@pytest.mark.parametrize("files, expected", [
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": "def f():\n  import pkg.a\n"},
     "import cycle: pkg.a -> pkg.b"),
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import _helper\n", "pkg/b.py": "def _helper(): pass\n"},
     "pkg.a:1 uses the private name pkg.b._helper"),
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\nb._helper()\n", "pkg/b.py": "def _helper(): pass\n"},
     "pkg.a:2 uses the private name pkg.b._helper"),
    ({"pkg/__init__.py": "", "pkg/x/__init__.py": "", "pkg/x/_util.py": "", "pkg/a.py": "from pkg.x import _util\n"},
     "pkg.a:1 imports the private module pkg.x._util"),
])
def test_the_checks_find_a_cycle_and_private_imports(tmp_path, files, expected):
  assert expected in problems(_write(tmp_path, files))


def test_a_package_reexporting_its_submodules_is_no_cycle(tmp_path):
  modules = _write(tmp_path, {"pkg/__init__.py": "from pkg.a import f\n", "pkg/a.py": "from pkg.b import g\ndef f(): pass\n",
                              "pkg/b.py": "def g(): pass\n", "pkg/c.py": "from pkg import f\n"})
  assert problems(modules) == []


def test_the_layer_check_finds_an_upward_import(tmp_path, monkeypatch):
  modules = _write(tmp_path, {"pkg/__init__.py": "", "pkg/low.py": "def f():\n  from pkg import high\n",
                              "pkg/high.py": "from pkg import low\n"})
  monkeypatch.setattr(sys.modules[__name__], "LAYERS", (("low", ("pkg.low",)), ("high", ("pkg.high", "pkg"))))
  assert layer_problems(modules) == ["pkg.low:2 (low) imports pkg.high (high), a layer above it"]
