"""Runs stages in order on one workdir; importable from a notebook."""


import json
import time

from absl import logging

from discl_jax import digit_models
from discl_jax import progress
from discl_jax import stages
from discl_jax import workdir as wd


SPECTRUM_STAGES = ("hard", "prompts", "generate", "score")


def run_stages(config, workdir, names=stages.ORDER):
  """Runs each stage in `names` on `workdir`; returns None.

  Each stage records its own fingerprint and config (`provenance`). With
  `data.spectrum_dir` set the spectrum stages are skipped: the spectrum is
  another workdir's.
  """
  digit_models.check_heldout(config)
  wd.path(workdir).mkdir(parents=True, exist_ok=True)
  logging.info("%s; workdir %s", progress.startup_line(), workdir)
  for name in names:
    if config.data.spectrum_dir and name in SPECTRUM_STAGES:
      logging.info("stage %s: skipped, the spectrum comes from data.spectrum_dir=%s", name,
                   config.data.spectrum_dir)
      continue
    logging.info("stage %s: start", name)
    started = time.perf_counter()
    stages.get(name)(config, workdir)
    seconds = time.perf_counter() - started
    logging.info("stage %s: done in %.1f s", name, seconds)
    if wd.is_main_process():
      record_time(workdir, name, seconds)


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
