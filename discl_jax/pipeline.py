"""Runs stages in order on one workdir; importable from a notebook."""

import contextlib

import jax
from absl import logging

from discl_jax import config_checks
from discl_jax import digit_models
from discl_jax import stages
from discl_jax import workdir as wd


def run_stages(config, workdir, names=stages.ORDER):
  """Runs each stage in `names` on `workdir`; returns None.

  Before any stage: checks every config value and that the inputs of `names`
  exist (`config_checks`), and takes the workdir's lock (one run per workdir;
  in multi-host mode the processes share the workdir and coordinate through
  their own shards instead). Records the config in `workdir/config.json`
  (process 0 only).
  """
  runners = [stages.get(name) for name in names]
  config_checks.check_values(config)
  config_checks.check_inputs(config, names)
  digit_models.check_heldout(config)
  wd.path(workdir).mkdir(parents=True, exist_ok=True)
  several = config.mesh.multi_host or jax.process_count() > 1
  lock = contextlib.nullcontext() if several else wd.exclusive(workdir)
  with lock:
    if wd.is_main_process():
      wd.atomic_write_text(wd.path(workdir, wd.CONFIG), config.to_json_best_effort(indent=2) + "\n")
    for name, stage in zip(names, runners):
      logging.info("stage %s: start", name)
      stage(config, workdir)
      logging.info("stage %s: done", name)
