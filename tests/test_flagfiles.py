"""The shipped flagfiles read as records, and the user docs keep their shape.

Structural rules only (no recorded flag values: test_train_cli checks what
the recipes set). Every experiment flagfile includes base.flags and nothing
deeper, lists its differences from base.flags itself, and opens with a
header of at most 10 comment lines that names its figure and points to a
section of BENCHMARKS.md that exists.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

import hcd.configs as configs
from hcd.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_HEADER_LINES = 10
MAX_README_LINES = 150
FLAG_NAMES = ({f.name for f in dataclasses.fields(TrainConfig)}
              - {"model_overrides"}) | {"model_override"}


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _split(name):
  """(header comment lines, flag lines) of a shipped flagfile."""
  lines = [l.rstrip("\n") for l in
           _read(configs.flagfile_path(name)).splitlines() if l.strip()]
  header = []
  while lines and lines[0].startswith("#"):
    header.append(lines.pop(0))
  return header, lines


def _flag_name(line):
  name = line[2:].partition("=")[0]
  if name not in FLAG_NAMES and name.startswith("no") and "=" not in line:
    name = name[2:]  # --noflips
  return name


def _headings(path):
  return {l[3:].strip() for l in _read(path).splitlines()
          if l.startswith("## ")}


@pytest.mark.parametrize("name", configs.FLAGFILES)
def test_flagfile_header_is_a_short_record(name):
  header, flags = _split(name)
  assert 1 <= len(header) <= MAX_HEADER_LINES, (name, len(header))
  assert flags, name
  # All comments are in the header: no diary between the flags.
  assert not [l for l in flags if l.startswith("#")], name
  text = "\n".join(header)
  # It points to a BENCHMARKS.md section that exists.
  sections = re.findall(r'BENCHMARKS\.md, "([^"]+)"', text)
  assert sections, f"{name}: no BENCHMARKS.md, \"<section>\" pointer"
  missing = set(sections) - _headings(os.path.join(REPO, "BENCHMARKS.md"))
  assert not missing, (name, missing)
  if name != configs.BASE:
    assert "Figure" in text, f"{name}: the header names no figure"
    assert f"--flagfile={name}" in text, f"{name}: no command in the header"


@pytest.mark.parametrize("name", configs.FLAGFILES)
def test_flagfile_chain_is_at_most_two_deep(name):
  _, flags = _split(name)
  includes = [l for l in flags if l.startswith("--flagfile=")]
  if name == configs.BASE:
    assert not includes
    return
  # base.flags first, so that the experiment's own lines override it.
  assert includes == ["--flagfile=" + configs.BASE], (name, includes)
  assert flags[0] == includes[0], name


@pytest.mark.parametrize("name", configs.EXPERIMENTS)
def test_experiment_lists_its_own_differences_once(name):
  _, flags = _split(name)
  _, base = _split(configs.BASE)
  own = [l for l in flags if not l.startswith("--flagfile=")]
  for line in own:
    assert line.startswith("--") and _flag_name(line) in FLAG_NAMES, (
        name, line)
  # Nothing set twice, nothing that only repeats base.flags.
  keys = [(_flag_name(l), l.partition("=")[2].partition("=")[0]
           if l.startswith("--model_override=") else "") for l in own]
  assert len(keys) == len(set(keys)), name
  assert not set(own) & set(base), (name, set(own) & set(base))


PARSE = """
import json, sys
from hcd.cli import flags
out = {}
for name in sys.argv[1:]:
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["hcd_train", "--flagfile=" + name])
  out[name] = json.loads(flags.config_from_flags(flags.FLAGS).to_json())
print(json.dumps(out))
"""


def test_flagfiles_parse_and_every_difference_is_written(tmp_path):
  """Each experiment resolves (absl, TrainConfig.validate) to base.flags
  plus exactly the flags its own file names."""
  configs.copy_flagfiles(str(tmp_path))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run([sys.executable, "-c", PARSE, *configs.FLAGFILES],
                     cwd=tmp_path, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  resolved = json.loads(r.stdout.strip().splitlines()[-1])
  base = resolved[configs.BASE]
  for name in configs.EXPERIMENTS:
    _, flags = _split(name)
    named = {_flag_name(l) for l in flags}
    named = {"model_overrides" if n == "model_override" else n for n in named}
    differ = {k for k, v in resolved[name].items() if base[k] != v}
    assert differ <= named, (name, differ - named)


def test_readme_is_a_short_users_guide():
  text = _read(os.path.join(REPO, "README.md"))
  assert len(text.splitlines()) <= MAX_README_LINES
  # The two quickstart commands; CI (.ci/run) runs the README's `make test`.
  assert "make demo" in text and "make test" in text
  assert "make test" in _read(os.path.join(REPO, ".ci", "run"))
  # Every shipped recipe is in the "which recipe" table.
  rows = [l for l in text.splitlines() if l.startswith("| `")]
  for name in configs.EXPERIMENTS:
    assert [r for r in rows if name in r], name
  # Relative links resolve to files in the checkout.
  for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
    assert os.path.exists(os.path.join(REPO, target)), target


def test_benchmarks_keeps_its_topic_sections():
  headings = _headings(os.path.join(REPO, "BENCHMARKS.md"))
  for section in ("Which recipe", "Stain shift", "Levers tried",
                  "Whole-slide inference"):
    assert section in headings, section
  # Ordered by topic: no session-by-session headings.
  assert not [h for h in headings if re.search(r"\bsession\b", h)]


def test_docs_links_resolve():
  docs = os.path.join(REPO, "docs")
  for name in sorted(os.listdir(docs)):
    if not name.endswith(".md"):
      continue
    text = _read(os.path.join(docs, name))
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
      assert os.path.exists(os.path.join(docs, target)), (name, target)
