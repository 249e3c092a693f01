"""Stage `eval`: the run report from what the train stage wrote.

Reads workdir/metrics.jsonl (one row per epoch), train_result.json (the best
validation epoch and its metrics) and predictions.npz (that epoch's test
predictions, for per-class accuracy), and writes report.md and curves.png.
Only process 0 writes; rerunning rewrites both from the same inputs.
"""

import json

import numpy as np
from absl import logging

from discl_jax import workdir as wd
from discl_jax.data import datasets
from discl_jax.data import longtail
from discl_jax.evaluation import report


def run(config, workdir):
  """Writes report.md and curves.png (process 0); returns their paths, or None elsewhere."""
  if not wd.is_main_process():
    return None
  metrics_path = wd.path(workdir, wd.METRICS)
  rows = wd.read_jsonl(metrics_path)
  if not rows:
    raise FileNotFoundError(
        f"{metrics_path}: no epoch metrics to report on; run the train stage first")
  final = _read_json(wd.path(workdir, wd.TRAIN_RESULT))
  per_class = _per_class(config, wd.path(workdir, wd.PREDICTIONS))
  paths = report.write_report(workdir, rows, final=final, config=config, per_class=per_class)
  logging.info("eval: wrote %s and %s", *paths)
  return paths


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
  with np.load(predictions_path) as saved:
    if "test_pred" not in saved or "test_label" not in saved:
      raise ValueError(f"{predictions_path}: needs arrays test_pred and test_label")
    preds, labels = saved["test_pred"], saved["test_label"]
  train = datasets.load(config.data)["train"]
  counts = train.class_counts()
  groups = longtail.class_groups(counts, config.data.many_threshold, config.data.few_threshold)
  return dict(preds=preds, labels=labels, class_names=train.class_names, groups=groups,
              train_counts=counts)
