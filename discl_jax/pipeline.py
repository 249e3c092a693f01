"""Runs stages in order on one workdir; importable from a notebook."""

import contextlib

import jax
from absl import logging

from discl_jax import config_checks
from discl_jax import digit_models
from discl_jax import stages
from discl_jax import workdir as wd
from discl_jax.stages import hard_stage


def run_stages(config, workdir, names=stages.ORDER):
  """Runs each stage in `names` on `workdir`; returns None.

  Before any stage, `preflight` checks every config value and that the config
  can run `names`, and `config_checks.check_inputs` that their inputs exist; then the workdir's lock is
  taken (one run per workdir; in multi-host mode the processes share the
  workdir and coordinate through their own shards instead) and the config is
  recorded in `workdir/config.json` (process 0 only).
  """
  runners = [stages.get(name) for name in names]
  preflight(config, names)
  config_checks.check_inputs(config, names)
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


def preflight(config, names=stages.ORDER):
  """Returns None; raises before any stage when `config` cannot run `names`.

  Checks every value (`config_checks`), the digit models' held-out split, the
  hard rule's model checkpoint and, for `train`, a required long-tail base
  checkpoint. `run_stages` then checks that the inputs of `names` exist.
  """
  config_checks.check_values(config)
  digit_models.check_heldout(config)
  hard_stage.check_config(config)
  tc = config.train
  if "train" in names and tc.require_init_checkpoint and not tc.init_checkpoint:
    raise ValueError(
        "train.init_checkpoint is empty, but this config fine-tunes a long-tail base classifier "
        "as the reference does (train.require_init_checkpoint=True). Either import one: "
        "--config.train.init_checkpoint=PATH (a PyTorch ResNet .pth/.pt/.safetensors, e.g. "
        "LDMLR's ImageNet-LT ResNet-10, or a ckpt directory of this project); or train one "
        "first with this config's `:base` variant and pass its WORKDIR/ckpt")
