"""The config files shipped with the package (`configs/`), by name: `--config=demo:runlocal`.

`discl_jax/configs` is the repository's `configs/` folder (a symlink in the
source tree, real files in an installed wheel), so a config name works from a
non-editable install and `--config=configs/demo.py` keeps working in a checkout.
"""

import ast
import importlib.resources
import pathlib

ROOT = pathlib.Path(str(importlib.resources.files("discl_jax").joinpath("configs")))


def names():
  """Returns the sorted names of the shipped configs ("demo", "cifar100_lt", ...): the files
  that define `get_config` (`common.py` holds shared pieces)."""
  return sorted(p.stem for p in ROOT.glob("*.py") if not p.name.startswith("_")
                and "\ndef get_config(" in p.read_text(encoding="utf-8"))


def path(name):
  """Returns the file of shipped config `name`; ValueError lists the names when unknown."""
  if name not in names():
    raise ValueError(f"no shipped config {name!r}; shipped: {', '.join(names())}")
  return ROOT / f"{name}.py"


def resolve(spec):
  """Returns `--config` value `spec` ("FILE[:ARGS]") with a shipped config name made a path.

  A spec whose FILE exists is returned as it is; ValueError when FILE is
  neither a file nor a shipped name (listing the names).
  """
  file, sep, arg = spec.partition(":")
  if pathlib.Path(file).expanduser().is_file():
    return spec
  name = file[:-3] if file.endswith(".py") else file
  if "/" not in name and name in names():
    return f"{path(name)}{sep}{arg}"
  raise ValueError(f"config file {file!r} not found, and it is not a shipped config "
                   f"({', '.join(names())})")


def describe(name):
  """Returns (one-line summary, variant argument names) of shipped config `name`.

  Read from the file without running it: its docstring's first line and the
  keywords of its `config_lib.parse_arg(arg, ...)` call.
  """
  tree = ast.parse(path(name).read_text(encoding="utf-8"))
  summary = (ast.get_docstring(tree) or "").strip().splitlines()
  variants = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "parse_arg"):
      variants = [k.arg for k in node.keywords]
  return (summary[0] if summary else ""), variants
