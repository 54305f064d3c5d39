"""Static checks of the Dockerfile (no Docker engine runs on the dev/CI machines).

The image is validated only statically here: it parses, passes hadolint, pins
its base, runs as a non-root user and has an exec-form entrypoint that passes
any hcd command through. The entrypoint script itself is run for real.
"""

import json
import os
import shutil
import subprocess

import pytest
from dockerfile_parse import DockerfileParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = os.path.join(ROOT, "docker", "entrypoint.sh")


@pytest.fixture(scope="module")
def dockerfile():
  p = DockerfileParser(path=os.path.join(ROOT, "Dockerfile"))
  return p


def _instructions(df, name):
  return [i["value"] for i in df.structure if i["instruction"] == name]


def test_base_image_is_pinned_tf_2_21_0_gpu(dockerfile):
  args = dict(a.split("=", 1) for a in _instructions(dockerfile, "ARG") if "=" in a)
  assert args["BASE_IMAGE"] == "tensorflow/tensorflow:2.21.0-gpu"
  assert _instructions(dockerfile, "FROM") == ["${BASE_IMAGE}"]


def test_runs_as_non_root(dockerfile):
  users = _instructions(dockerfile, "USER")
  assert users, "no USER instruction: the container would run as root"
  assert users[-1].split(":")[0] not in ("root", "0")


def test_entrypoint_is_exec_form_and_exists(dockerfile):
  (ep,) = _instructions(dockerfile, "ENTRYPOINT")
  argv = json.loads(ep)  # Exec form is a JSON array; shell form would not parse.
  assert argv == ["/usr/local/bin/hcd-entrypoint"]
  copies = _instructions(dockerfile, "COPY")
  assert "docker/entrypoint.sh /usr/local/bin/hcd-entrypoint" in copies


def test_installs_hcd_with_the_pinned_stack(dockerfile):
  runs = " ".join(_instructions(dockerfile, "RUN"))
  assert "pip install" in runs
  assert "import tensorflow as tf, imagecodecs, hcd" in runs
  with open(os.path.join(ROOT, "setup.cfg"), encoding="utf-8") as f:
    cfg = f.read()
  assert "tensorflow==2.21.0" in cfg and "imagecodecs==" in cfg
  # imagecodecs is the one decoder: tensorflow-io is no longer installed.
  assert "tensorflow-io" not in cfg and "tensorflow_io" not in runs


def test_dockerignore_keeps_context_small():
  with open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8") as f:
    lines = {l.strip() for l in f if l.strip() and not l.startswith("#")}
  for must in (".git", ".venv", "bench_out", "demo_workspace"):
    assert must in lines


def test_hadolint_passes():
  hadolint = shutil.which("hadolint") or os.path.join(
      os.path.dirname(os.sys.executable), "hadolint")
  if not os.path.exists(hadolint):
    pytest.skip("hadolint not installed (pip install -e '.[test]' brings it)")
  proc = subprocess.run([hadolint, os.path.join(ROOT, "Dockerfile")],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def _entry(args, cwd, hcd_home):
  env = dict(os.environ, HCD_HOME=hcd_home)
  return subprocess.run(["bash", ENTRYPOINT] + args, cwd=cwd, env=env,
                        capture_output=True, text=True, check=False)


def test_entrypoint_passes_commands_and_flags_through(tmp_path):
  proc = _entry(["echo", "--flagfile=model1.flags", "a b"], tmp_path, str(tmp_path))
  assert proc.returncode == 0 and proc.stdout == "--flagfile=model1.flags a b\n"


def test_entrypoint_resolves_image_tools(tmp_path):
  home = tmp_path / "opt"
  (home / "tools").mkdir(parents=True)
  tool = home / "tools" / "make_shards"
  tool.write_text("#!/usr/bin/env bash\necho tool:$0:$*\n")
  tool.chmod(0o755)
  work = tmp_path / "ws"
  work.mkdir()
  proc = _entry(["tools/make_shards", "--split=train"], work, str(home))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == f"tool:{tool}:--split=train"


def test_entrypoint_propagates_exit_code(tmp_path):
  assert _entry(["false"], tmp_path, str(tmp_path)).returncode == 1
