"""Pipeline stages: each module has `run(config, workdir)` and talks only via files.

A stage imports the libraries, never another stage.
"""

import importlib

ORDER = ("hard", "prompts", "generate", "score", "train", "eval")


class StageNotImplemented(NotImplementedError):
  """A stage whose module has not landed yet."""


def get(name):
  """Returns the `run(config, workdir)` function of stage `name`."""
  if name not in ORDER:
    raise ValueError(f"unknown stage {name!r}; valid: {', '.join(('all',) + ORDER)}")
  try:
    module = importlib.import_module(f"discl_jax.stages.{name}_stage")
  except ModuleNotFoundError as e:
    if e.name != f"discl_jax.stages.{name}_stage":
      raise
    raise StageNotImplemented(f"stage {name!r} is not implemented yet") from None
  return module.run
