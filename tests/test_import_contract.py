"""The one-way layers and independent stages (pyproject's [tool.importlinter]); no cycle."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_the_layer_contract_holds():
  pytest.importorskip("importlinter")  # the `test` extra installs it (README's test command)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  script = ("import sys; from importlinter.cli import lint_imports_command; "
            "sys.exit(lint_imports_command())")
  result = subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  assert "0 broken" in result.stdout


def test_no_module_imports_itself_back():
  grimp = pytest.importorskip("grimp")  # installed with import-linter
  sys.path.insert(0, str(REPO))
  try:
    graph = grimp.build_graph("discl_jax", cache_dir=None)
  finally:
    sys.path.remove(str(REPO))
  cycles = [(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
            if graph.chain_exists(importer=b, imported=a)]
  assert not cycles, cycles
