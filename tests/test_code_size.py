"""Size limits of the package's code: files and functions that read in one go.

No file in hcd/ may exceed MAX_FILE_LINES lines and no function or method
MAX_FUNCTION_LINES (its whole definition, decorators and docstring
included). There is no allowlist: a unit that outgrows a limit is split.
"""

import ast
import pathlib

HCD = pathlib.Path(__file__).resolve().parents[1] / "hcd"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def _sources():
  paths = sorted(HCD.rglob("*.py"))
  assert len(paths) > 20, f"no package sources under {HCD}"
  return paths


def _function_lengths(path: pathlib.Path):
  """(qualified name, first line, length in lines) of every function."""
  tree = ast.parse(path.read_text(), filename=str(path))

  def walk(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        first = min([child.lineno] +
                    [d.lineno for d in child.decorator_list])
        name = f"{prefix}{child.name}"
        yield name, first, child.end_lineno - first + 1
        yield from walk(child, f"{name}.")
      elif isinstance(child, ast.ClassDef):
        yield from walk(child, f"{prefix}{child.name}.")
      else:
        yield from walk(child, prefix)

  yield from walk(tree, "")


def test_no_file_is_over_the_limit():
  long = []
  for path in _sources():
    n = len(path.read_text().splitlines())
    if n > MAX_FILE_LINES:
      long.append(f"{path.relative_to(HCD.parent)}: {n} lines")
  assert not long, (f"files over {MAX_FILE_LINES} lines:\n" +
                    "\n".join(long))


def test_no_function_is_over_the_limit():
  long = []
  for path in _sources():
    for name, line, n in _function_lengths(path):
      if n > MAX_FUNCTION_LINES:
        long.append(f"{path.relative_to(HCD.parent)}:{line} {name}: "
                    f"{n} lines")
  assert not long, (f"functions over {MAX_FUNCTION_LINES} lines:\n" +
                    "\n".join(long))


def test_the_limits_catch_a_long_function(tmp_path):
  # The check itself must be able to fail.
  body = "\n".join(f"    x{k} = {k}" for k in range(MAX_FUNCTION_LINES))
  path = tmp_path / "long.py"
  path.write_text(f"class A:\n  @staticmethod\n  def f():\n{body}\n")
  (name, _, n), = list(_function_lengths(path))
  assert name == "A.f" and n == MAX_FUNCTION_LINES + 2
