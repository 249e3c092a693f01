"""Stage `eval`: the run report from what the train stage wrote.

Reads workdir/metrics.jsonl (one row per epoch), train_result.json (the best
validation epoch and its metrics) and predictions.npz (that epoch's test
predictions, for per-class accuracy), and writes report.md and curves.png,
which depend on the run's results only (two runs of one config give the same
bytes), and timings.md, the stage wall times and images/s. Everything is
described by the config the run was trained with (recorded by the train stage
in train.provenance.json), never by the current flags. A run that has not
trained every epoch is reported as unfinished, with a warning. Only process 0
writes; rerunning rewrites them from the same inputs.
"""

import json
import os
import pathlib
import zipfile

import numpy as np
from absl import logging

from discl_jax import provenance
from discl_jax import stages as stages_lib
from discl_jax import workdir as wd
from discl_jax.data import datasets
from discl_jax.data import longtail
from discl_jax.data import spectrum_store
from discl_jax.diffusion import jobs
from discl_jax.evaluation import report
from discl_jax.scoring import acceptance


def run(config, workdir):
  """Writes report.md and curves.png (process 0); returns their paths, or None elsewhere."""
  if not wd.is_main_process():
    return None
  metrics_path = wd.path(workdir, wd.METRICS)
  rows = wd.read_jsonl(metrics_path)
  if not rows:
    raise FileNotFoundError(
        f"{metrics_path}: no epoch metrics to report on; run the train stage first")
  config = run_config(config, workdir)
  final = _read_json(wd.path(workdir, wd.TRAIN_RESULT))
  per_class = _per_class(config, wd.path(workdir, wd.PREDICTIONS))
  unfinished = report.unfinished(rows, config.train.epochs, final)
  if unfinished:
    logging.warning("eval: %s", unfinished)
  summary = run_summary(config, workdir, rows)
  paths = report.write_report(workdir, rows, final=final, config=config, per_class=per_class,
                              run=summary)
  timings = wd.atomic_write_text(wd.path(workdir, wd.TIMINGS_REPORT),
                                 report.timings_markdown(summary["stages"]))
  logging.info("eval: wrote %s, %s and %s", *paths, timings)
  return paths


def run_config(config, workdir):
  """Returns the config the workdir's run was trained with; `config` (with a warning)
  when the train stage recorded none (a workdir of an older version)."""
  record = wd.path(workdir, wd.PROVENANCE % "train")
  stored = provenance.stored_config(record)
  if stored is None:
    logging.warning("eval: %s is missing; the report describes the current config", record)
    return config
  return stored


def run_summary(config, workdir, rows):
  """Returns the report's run facts: {"synthetic": dict or None, "stages": [rows],
  "environment": dict}, from the stored spectrum, timings and train record."""
  spectrum = (wd.spectrum_folder(config.data.spectrum_dir) if config.data.spectrum_dir
              else wd.path(workdir, wd.SPECTRUM))
  store_rows = (jobs.grid_rows(spectrum_store.SpectrumStore(spectrum).rows(), config.diffusion)
                if spectrum.is_dir() else [])
  synthetic = None
  if store_rows and config.curriculum.schedule != "none":
    synthetic = _synthetic(config, workdir, spectrum, store_rows, rows)
  times = provenance.read_record(wd.path(workdir, wd.STAGE_TIMES)) or {}
  if config.data.spectrum_dir:  # the spectrum stages ran in the workdir that holds it
    shared = provenance.read_record(spectrum.parent / wd.STAGE_TIMES) or {}
    times.update({k: v for k, v in shared.items() if k in ("hard", "prompts", "generate", "score")})
  images = {"generate": len(store_rows),
            "score": sum(acceptance.is_scored(r) for r in store_rows)}
  stages = [dict(stage=name, seconds=times[name]["seconds"], runs=times[name]["runs"],
                 images=images.get(name)) for name in stages_lib.ORDER if name in times]
  epochs = wd.read_jsonl(wd.path(workdir, wd.TIMINGS))
  for entry in stages:
    if entry["stage"] == "train" and epochs:  # what was trained, over its training time
      entry.update(images=sum(int(e["images"]) for e in epochs),
                   rate_seconds=sum(float(e["seconds"]) for e in epochs))
  record = provenance.stored_record(wd.path(workdir, wd.PROVENANCE % "train"))
  return {"synthetic": synthetic, "stages": stages,
          "environment": record.get("environment") or provenance.environment()}


def _synthetic(config, workdir, spectrum, store_rows, rows):
  """Returns the synthetic-data summary: models, threshold, acceptance per level, links."""
  accepted = acceptance.build_report(store_rows, config.score.threshold)
  generation = provenance.stored_fingerprint(spectrum / spectrum_store.GENERATION)
  diffusion = generation.get("diffusion", {})
  scoring = provenance.stored_record(spectrum / spectrum_store.SCORE_PROVENANCE).get(
      "fingerprint", {})
  home = spectrum.parent  # the workdir that made the spectrum (this one unless shared)
  relative = lambda p: os.path.relpath(p, workdir)
  acceptance_png = home / wd.ACCEPTANCE_PNG
  return dict(
      generator="tiny random SD" if diffusion.get("tiny") else diffusion.get("model", "-"),
      clip=("tiny random CLIP" if scoring.get("score.tiny")
            else scoring.get("score.model", "-")),
      threshold=float(config.score.threshold), per_level=accepted["per_level"],
      overall=accepted["overall"],
      trained_on=sum(int(r.get("num_synthetic") or 0) for r in rows),
      acceptance_png=relative(acceptance_png) if acceptance_png.exists() else None,
      grids=[relative(p) for p in sorted(home.glob("spectrum_grid_*.png"))])


def _read_json(path):
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from e


def _per_class(config, predictions_path):
  """Returns the per-class table inputs from the best epoch's test predictions, or None."""
  if not predictions_path.exists():
    logging.warning("eval: %s is missing; the report has no per-class table", predictions_path)
    return None
  try:
    with np.load(predictions_path) as saved:
      if "test_pred" not in saved or "test_label" not in saved:
        raise ValueError(f"{predictions_path}: needs arrays test_pred and test_label")
      preds, labels = saved["test_pred"], saved["test_label"]
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{predictions_path} is damaged ({type(e).__name__}: {e}): rerun the "
                     "train stage, which writes it again from the best epoch's checkpoint") from e
  train = datasets.load(config.data)["train"]
  counts = train.class_counts()
  groups = longtail.class_groups(counts, config.data.many_threshold, config.data.few_threshold)
  return dict(preds=preds, labels=labels, class_names=train.class_names, groups=groups,
              train_counts=counts)
