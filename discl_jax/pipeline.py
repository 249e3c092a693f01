"""Runs stages in order on one workdir; importable from a notebook."""


from absl import logging

from discl_jax import digit_models
from discl_jax import stages
from discl_jax import workdir as wd
from discl_jax.stages import hard_stage


def preflight(config):
  """Returns None, or raises ValueError naming the key of a config no stage may start with."""
  hard_stage.check_config(config)


def run_stages(config, workdir, names=stages.ORDER):
  """Runs each stage in `names` on `workdir`; returns None.

  Records the config in `workdir/config.json` first (process 0 only), after
  `preflight` accepted it.
  """
  digit_models.check_heldout(config)
  preflight(config)
  wd.path(workdir).mkdir(parents=True, exist_ok=True)
  if wd.is_main_process():
    wd.atomic_write_text(wd.path(workdir, wd.CONFIG), config.to_json_best_effort(indent=2) + "\n")
  for name in names:
    logging.info("stage %s: start", name)
    stages.get(name)(config, workdir)
    logging.info("stage %s: done", name)
