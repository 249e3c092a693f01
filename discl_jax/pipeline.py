"""Runs stages in order on one workdir; importable from a notebook."""

import contextlib
import json
import time

import jax
from absl import logging

from discl_jax import config_checks
from discl_jax import digit_models
from discl_jax import progress
from discl_jax import provenance
from discl_jax import stages
from discl_jax import workdir as wd
from discl_jax.data import spectrum_store
from discl_jax.stages import train_stage
from discl_jax.train import hard_selection


SPECTRUM_STAGES = ("hard", "prompts", "generate", "score")


def run_stages(config, workdir, names=stages.ORDER):
  """Runs each stage in `names` on `workdir`; returns None.

  Before any stage, `preflight` checks every config value and that the config
  can run `names`, and `config_checks.check_inputs` that their inputs exist;
  then the workdir's lock is taken (one run per workdir; in multi-host mode the
  processes share the workdir and coordinate through their own shards instead)
  and `check_recorded` compares every stage's recorded fingerprint with the
  config, so a refusal comes before any stage rewrites anything. Each stage
  records its own fingerprint and config (`provenance`). Stages nothing uses
  are skipped with one log line (`skip_reasons`): the spectrum stages with
  `data.spectrum_dir` set (the spectrum is another workdir's), and in a run of
  every stage those a real-data schedule never reads.
  """
  workdir = wd.check_workdir(workdir)
  runners = {name: stages.get(name) for name in names}
  preflight(config, names)
  skips = skip_reasons(config, names)
  to_run = [name for name in names if name not in skips]
  config_checks.check_inputs(config, to_run)
  wd.make_workdir(workdir)
  several = config.mesh.multi_host or jax.process_count() > 1
  lock = contextlib.nullcontext() if several else wd.exclusive(workdir)
  with lock:
    logging.info("%s; workdir %s", progress.startup_line(), workdir)
    check_recorded(config, workdir, to_run)
    for reason in dict.fromkeys(skips.values()):
      skipped_here = [name for name in names if skips.get(name) == reason]
      logging.info("stage%s %s: skipped, %s", "s" if len(skipped_here) > 1 else "",
                   ", ".join(skipped_here), reason)
    for name in to_run:
      logging.info("stage %s: start", name)
      started = time.perf_counter()
      runners[name](config, workdir)
      seconds = time.perf_counter() - started
      logging.info("stage %s: done in %.1f s", name, seconds)
      if wd.is_main_process():
        record_time(workdir, name, seconds)


def preflight(config, names=stages.ORDER):
  """Returns None; raises before any stage when `config` cannot run `names`.

  Checks every value (`config_checks`), the digit models' held-out split, the
  hard rule's model checkpoint and, for `train`, a required long-tail base
  checkpoint and a job of `diffusion.strengths` at every curriculum level.
  `run_stages` then checks that the inputs of `names` exist.
  """
  config_checks.check_values(config)
  digit_models.check_heldout(config)
  hard_selection.check_config(config)
  tc = config.train
  if "train" in names and tc.require_init_checkpoint and not tc.init_checkpoint:
    raise ValueError(
        "train.init_checkpoint is empty, but this config fine-tunes a long-tail base classifier "
        "as the reference does (train.require_init_checkpoint=True). Either import one: "
        "--config.train.init_checkpoint=PATH (a PyTorch ResNet .pth/.pt/.safetensors, e.g. "
        "LDMLR's ImageNet-LT ResNet-10, or a ckpt directory of this project); or train one "
        "first with this config's `:base` variant and pass its WORKDIR/ckpt")
  if "train" in names:
    errors = config_checks.level_errors(config)
    if errors:
      raise ValueError("; ".join(errors))


# The stages a real-data schedule's training never reads, in a run of every stage:
# `none` trains on every real image as it is; `resample` holds the tail share with the
# real images of the hard set (hard.jsonl), so it keeps `hard`.
UNUSED_BY_SCHEDULE = {"none": SPECTRUM_STAGES, "resample": ("prompts", "generate", "score")}


def skip_reasons(config, names):
  """Returns {stage in `names`: why it does not run} for the stages that are skipped.

  With `data.spectrum_dir` set the spectrum stages do not run (the spectrum is
  another workdir's). When `names` is every stage (`--stage=all`) and the
  schedule trains on real data only (`UNUSED_BY_SCHEDULE`), the stages it never
  reads do not run either; `--stage=NAME` still runs any of them.
  """
  reasons = {}
  schedule = config.curriculum.schedule
  unused = UNUSED_BY_SCHEDULE.get(schedule, ()) if tuple(names) == stages.ORDER else ()
  for name in names:
    if config.data.spectrum_dir and name in SPECTRUM_STAGES:
      reasons[name] = f"the spectrum comes from data.spectrum_dir={config.data.spectrum_dir}"
    elif name in unused:
      reasons[name] = (f"curriculum.schedule={schedule!r} trains on real data only and never "
                       "reads them (run one with --stage=NAME)")
  return reasons


def check_recorded(config, workdir, names):
  """Returns None; raises ValueError naming the first differing key when a stage in `names`
  would refuse the fingerprint its output records, before any of them runs.

  Compares the part of each fingerprint the config decides (a stage adds the
  hashes of what earlier stages write when it runs); writes nothing.
  """
  spectrum = wd.path(workdir, wd.SPECTRUM)
  records = {"generate": spectrum / spectrum_store.GENERATION,
             "score": spectrum / spectrum_store.SCORE_PROVENANCE}
  for name in names:
    target = records.get(name, wd.path(workdir, wd.PROVENANCE % name))
    if not target.exists():
      continue  # a fresh output
    if name == "generate":
      current = provenance.fingerprint(config, "generate")
      outputs = [spectrum]
    elif name == "hard":
      current = provenance.fingerprint(config, "hard")
      outputs = [wd.path(workdir, wd.HARD), wd.path(workdir, wd.HARD_SUMMARY)]
    elif name == "prompts":
      current = provenance.fingerprint(config, "prompts", workdir)
      current.pop("hard.jsonl_sha256")  # `hard`, checked above, rewrites it unchanged
      outputs = [wd.path(workdir, wd.PROMPTS)]
    elif name == "score":
      current = provenance.fingerprint(config, "score")
      outputs = [spectrum / spectrum_store.SCORES_GLOB]
    elif name == "train":
      current = train_stage.config_fingerprint(config)
      outputs = [wd.path(workdir, output) for output in train_stage.TRAIN_OUTPUTS]
    else:
      continue
    provenance.check_stage_unchanged(workdir, name, current, target=target, outputs=outputs)


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
