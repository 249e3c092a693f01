"""Imports a script under `experiments/` as a module, for tests of its functions."""

import importlib.util
import pathlib
import sys

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load(name):
  """Returns experiments/NAME.py imported as a fresh module named NAME.

  Like `python experiments/NAME.py`, the script can import its sibling scripts.
  """
  if str(EXPERIMENTS) not in sys.path:
    sys.path.append(str(EXPERIMENTS))
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
