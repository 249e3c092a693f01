"""The README's two commands stay true: CI runs the test one verbatim (then lint-imports)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands():
  text = (ROOT / "README.md").read_text()
  return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)[:2]


def test_ci_runs_the_readme_test_command_then_the_import_contract():
  demo, tests = _readme_commands()
  ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().strip().splitlines()]
  assert "set -euo pipefail" in ci  # the run fails when either command fails
  assert tests.strip() in ci
  assert ci[-1] == ".venv/bin/lint-imports --no-cache"
  assert ci.index(tests.strip()) < len(ci) - 1


def test_demo_command_uses_files_that_exist():
  demo, _ = _readme_commands()
  for path in re.findall(r"--config=([\w/.]+\.py)", demo):
    assert (ROOT / path).is_file(), path
  assert "discl " in demo
