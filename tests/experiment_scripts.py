"""Imports a script under `experiments/` as a module, for tests of its functions."""

import importlib.util
import pathlib

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load(name):
  """Returns experiments/NAME.py imported as a fresh module named NAME."""
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
