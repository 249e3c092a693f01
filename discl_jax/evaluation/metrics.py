"""Classification metrics: Many / Medium / Few / All top-1, macro-F1, per-class accuracy.

All functions take integer predictions and labels (numpy or array-likes).
A group with no evaluation images has accuracy NaN.
"""

import numpy as np

GROUPS = ("many", "medium", "few")
# eval.select_metric: the metrics `split_metrics` reports that the best epoch may be chosen on.
SELECT_METRICS = ("all", "macro_f1") + GROUPS


def _as_ints(preds, labels):
  preds = np.asarray(preds).astype(np.int64).reshape(-1)
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  if preds.shape != labels.shape:
    raise ValueError(f"preds has {preds.size} entries, labels {labels.size}")
  return preds, labels


def top1(preds, labels):
  """Returns the fraction of `preds` equal to `labels` (NaN when empty)."""
  preds, labels = _as_ints(preds, labels)
  return float(np.mean(preds == labels)) if labels.size else float("nan")


def group_accuracies(preds, labels, groups):
  """Returns {"many", "medium", "few", "all"}: top-1 over images of each class group.

  `groups[c]` is "many" / "medium" / "few" for class c (from the train counts).
  """
  preds, labels = _as_ints(preds, labels)
  groups = np.asarray(groups)
  if labels.size and labels.max() >= len(groups):
    raise ValueError(f"label {labels.max()} has no group; groups covers {len(groups)} classes")
  image_groups = groups[labels]
  out = {name: top1(preds[image_groups == name], labels[image_groups == name]) for name in GROUPS}
  out["all"] = top1(preds, labels)
  return out


def per_class_accuracy(preds, labels, num_classes):
  """Returns float [num_classes]: top-1 per true class (NaN for classes with no images)."""
  preds, labels = _as_ints(preds, labels)
  totals = np.bincount(labels, minlength=num_classes).astype(np.float64)
  hits = np.bincount(labels[preds == labels], minlength=num_classes).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(totals > 0, hits / np.maximum(totals, 1), np.nan)[:num_classes]


def macro_f1(preds, labels):
  """Returns WILDS' macro-F1: the unweighted mean F1 over the classes present in `labels`.

  WILDS' iWildCam metric (docs/design.md §6) is sklearn's `f1_score(labels, preds,
  average="macro", labels=unique(labels))`: a class predicted but absent from
  the split does not enter the average (sklearn's default, the union of true
  and predicted classes, would count it as F1 = 0). A present class never
  predicted correctly scores 0.
  """
  preds, labels = _as_ints(preds, labels)
  if labels.size == 0:
    return float("nan")
  classes = np.unique(labels)
  size = int(max(classes.max(), preds.max())) + 1
  tp = np.bincount(labels[preds == labels], minlength=size)[classes]
  predicted = np.bincount(preds, minlength=size)[classes]
  actual = np.bincount(labels, minlength=size)[classes]
  f1 = 2.0 * tp / (predicted + actual)
  return float(np.mean(f1))


def split_metrics(split, preds, labels, groups):
  """Returns {f"{split}/{name}": value} for many/medium/few/all top-1 and macro_f1.

  These are the keys `report.py` reads from metrics.jsonl.
  """
  out = {f"{split}/{name}": value for name, value in group_accuracies(preds, labels, groups).items()}
  out[f"{split}/macro_f1"] = macro_f1(preds, labels)
  return out
