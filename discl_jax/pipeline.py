"""Runs stages in order on one workdir; importable from a notebook."""

import contextlib
import json
import time

import jax
from absl import logging

from discl_jax import config_checks
from discl_jax import digit_models
from discl_jax import progress
from discl_jax import stages
from discl_jax import workdir as wd
from discl_jax.stages import hard_stage


SPECTRUM_STAGES = ("hard", "prompts", "generate", "score")


def run_stages(config, workdir, names=stages.ORDER):
  """Runs each stage in `names` on `workdir`; returns None.

  Before any stage, `preflight` checks every config value and that the config
  can run `names`, and `config_checks.check_inputs` that their inputs exist;
  then the workdir's lock is taken (one run per workdir; in multi-host mode the
  processes share the workdir and coordinate through their own shards instead).
  Each stage records its own fingerprint and config (`provenance`). With
  `data.spectrum_dir` set the spectrum stages are skipped: the spectrum is
  another workdir's.
  """
  runners = [stages.get(name) for name in names]
  preflight(config, names)
  config_checks.check_inputs(config, [n for n in names if not skipped(config, n)])
  wd.path(workdir).mkdir(parents=True, exist_ok=True)
  several = config.mesh.multi_host or jax.process_count() > 1
  lock = contextlib.nullcontext() if several else wd.exclusive(workdir)
  with lock:
    logging.info("%s; workdir %s", progress.startup_line(), workdir)
    for name, stage in zip(names, runners):
      if skipped(config, name):
        logging.info("stage %s: skipped, the spectrum comes from data.spectrum_dir=%s", name,
                     config.data.spectrum_dir)
        continue
      logging.info("stage %s: start", name)
      started = time.perf_counter()
      stage(config, workdir)
      seconds = time.perf_counter() - started
      logging.info("stage %s: done in %.1f s", name, seconds)
      if wd.is_main_process():
        record_time(workdir, name, seconds)


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


def skipped(config, name):
  """Returns True when stage `name` does not run: a spectrum stage with `data.spectrum_dir` set."""
  return bool(config.data.spectrum_dir) and name in SPECTRUM_STAGES


def record_time(workdir, stage, seconds):
  """Adds `seconds` to `stage`'s wall time in workdir/stage_times.json; returns the Path."""
  target = wd.path(workdir, wd.STAGE_TIMES)
  try:
    times = json.loads(target.read_text(encoding="utf-8")) if target.exists() else {}
  except json.JSONDecodeError:
    times = {}  # a damaged record only loses past timings
  entry = times.setdefault(stage, {"seconds": 0.0, "runs": 0})
  entry.update(seconds=entry["seconds"] + seconds, runs=entry["runs"] + 1)
  return wd.atomic_write_json(target, times)
