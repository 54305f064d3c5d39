"""The package's layers: no import runs up them, and no module-level cycle.

Layers, lowest first: data, models, train, eval, cli. A module imports from
its own layer or lower ones only; the top-level modules (hcd/*.py: files,
text, metrics, plots, the run directory) import no layer but data (rundir
reads CSVs through hcd.data.sources). Lazy imports inside functions count
too: they run up the layers all the same.
"""

import ast
import collections
import pathlib

HCD = pathlib.Path(__file__).resolve().parents[1] / "hcd"
LAYERS = ("data", "models", "train", "eval", "cli")


def _imports(path: pathlib.Path, top_level_only: bool = False):
  """The hcd modules a file imports (dotted names)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else ast.walk(tree)
  for node in nodes:
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module == "hcd" or node.module.startswith("hcd.")):
      for alias in node.names:
        yield f"{node.module}.{alias.name}"
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names
                  if a.name == "hcd" or a.name.startswith("hcd."))


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(HCD.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_runs_up_the_layers():
  upward = []
  for path in sorted(HCD.rglob("*.py")):
    own = _layer(_module(path))
    for target in _imports(path):
      layer = _layer(target)
      if layer is None or layer == own:
        continue
      if own is None:
        ok = layer == "data"
      else:
        ok = LAYERS.index(layer) < LAYERS.index(own)
      if not ok:
        upward.append(f"{path.relative_to(HCD.parent)} imports {target}")
  assert not upward, "\n".join(upward)


def test_no_module_level_import_cycle():
  modules = {_module(p): p for p in HCD.rglob("*.py")}
  graph = collections.defaultdict(set)
  for name, path in modules.items():
    for target in _imports(path, top_level_only=True):
      # "from hcd.data import sources" names a module; "from hcd.data
      # import BALANCE_MODES" names the package.
      while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
      if target != name and target in modules:
        graph[name].add(target)
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for name in sorted(modules):
    if name not in state:
      visit(name, [name])
  assert not cycles, "\n".join(cycles)
