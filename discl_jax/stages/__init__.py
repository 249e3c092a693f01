"""Pipeline stages: each module has `run(config, workdir)` and talks only via files.

A stage imports the libraries, never another stage.
"""

import importlib

ORDER = ("hard", "prompts", "generate", "score", "train", "eval")


def get(name):
  """Returns the `run(config, workdir)` function of stage `name`."""
  if name not in ORDER:
    raise ValueError(f"unknown stage {name!r}; valid: {', '.join(('all',) + ORDER)}")
  return importlib.import_module(f"discl_jax.stages.{name}_stage").run
