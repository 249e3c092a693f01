"""Hard samples of low-quality data (docs/design.md 1.1): what a model of the original data gets wrong.

Given, for every training image, the prediction and the true-class
probability of a model trained on the original (real) data, an image is hard
when it is misclassified (`misclassified=True`) and/or when its true-class
probability is below the `prob_quantile` quantile of all training images'
true-class probabilities (`prob_quantile > 0`). With both criteria on, an
image is hard when either holds. The quantile is taken over the whole
training split, so classes the model finds hard get more hard images.
Images of `exclude_labels` are never hard (iWildCam's `empty` class gets no
spectrum, as in the reference, docs/design.md §6).
"""

import dataclasses

import numpy as np

# hard.rule: the rules `stages/hard_stage` applies (every class of the Few split, or the
# train images a CLIP misclassifies).
RULES = ("few_classes", "misclassified")


@dataclasses.dataclass(frozen=True)
class HardSelection:
  """Which images are hard and why, with per-class figures.

  mask / misclassified / low_prob: bool [N]; prob_threshold: the quantile
  value (None when the quantile criterion is off); hard_per_class and
  total_per_class: int [C], indexed by label.
  """
  mask: np.ndarray
  misclassified: np.ndarray
  low_prob: np.ndarray
  prob_threshold: float | None
  hard_per_class: np.ndarray
  total_per_class: np.ndarray


def select_hard(true_probs, preds, labels, num_classes, *, misclassified=True,
                prob_quantile=0.0, exclude_labels=()):
  """Returns the HardSelection of images by the rule above, none of `exclude_labels`.

  Raises ValueError naming the argument when lengths differ, a label or
  prediction is outside [0, num_classes), a probability is outside [0, 1] or
  not finite, `prob_quantile` is outside [0, 1), or both criteria are off.
  """
  true_probs = np.asarray(true_probs, np.float64)
  preds = np.asarray(preds)
  labels = np.asarray(labels)
  n = len(labels)
  for name, value in (("true_probs", true_probs), ("preds", preds)):
    if value.shape != (n,):
      raise ValueError(f"hard samples: {name} has shape {value.shape}, labels has ({n},)")
  for name, value in (("labels", labels), ("preds", preds)):
    if n and (value.min() < 0 or value.max() >= num_classes):
      raise ValueError(f"hard samples: {name} outside [0, {num_classes}): "
                       f"min {value.min()}, max {value.max()}")
  bad = ~np.isfinite(true_probs) | (true_probs < 0) | (true_probs > 1)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"hard samples: true_probs[{i}] = {true_probs[i]} is not a probability")
  prob_quantile = float(prob_quantile)
  if not 0.0 <= prob_quantile < 1.0:
    raise ValueError(f"hard.prob_quantile must be in [0, 1), got {prob_quantile}")
  if not misclassified and prob_quantile == 0.0:
    raise ValueError("hard samples: no criterion (misclassified is off and "
                     "hard.prob_quantile is 0): nothing could be hard")

  wrong = preds != labels if misclassified else np.zeros(n, bool)
  threshold = None
  low = np.zeros(n, bool)
  if prob_quantile > 0.0 and n:
    threshold = float(np.quantile(true_probs, prob_quantile))
    low = true_probs < threshold
  mask = (wrong | low) & ~np.isin(labels, np.asarray(exclude_labels, np.int64))
  return HardSelection(
      mask=mask, misclassified=wrong, low_prob=low, prob_threshold=threshold,
      hard_per_class=np.bincount(labels[mask], minlength=num_classes),
      total_per_class=np.bincount(labels, minlength=num_classes))


def hard_rows(selection, ids, labels, class_names, true_probs, preds):
  """Returns one dict per hard image (input order), the rows of workdir/hard.jsonl.

  Keys: id, label, class_name, true_prob, pred, pred_class_name,
  misclassified, low_prob.
  """
  rows = []
  for i in np.flatnonzero(selection.mask):
    rows.append({
        "id": str(ids[i]), "label": int(labels[i]), "class_name": class_names[int(labels[i])],
        "true_prob": float(true_probs[i]), "pred": int(preds[i]),
        "pred_class_name": class_names[int(preds[i])],
        "misclassified": bool(selection.misclassified[i]),
        "low_prob": bool(selection.low_prob[i]),
    })
  return rows


def summary(selection, class_names, *, misclassified, prob_quantile, excluded=()):
  """Returns the rule and its figures as a JSON-ready dict for the report.

  Keys: rule (the criteria and the `excluded` class names), prob_threshold,
  num_images, num_hard, hard_share (num_hard / num_images), num_misclassified,
  num_low_prob, per_class {class_name: {hard, total}}.
  """
  num_images, num_hard = int(len(selection.mask)), int(selection.mask.sum())
  return {
      "rule": {"misclassified": bool(misclassified), "prob_quantile": float(prob_quantile),
               "excluded_classes": [str(c) for c in excluded]},
      "prob_threshold": selection.prob_threshold,
      "num_images": num_images,
      "num_hard": num_hard,
      "hard_share": num_hard / num_images if num_images else None,
      "num_misclassified": int(selection.misclassified.sum()),
      "num_low_prob": int(selection.low_prob.sum()),
      "per_class": {name: {"hard": int(selection.hard_per_class[c]),
                           "total": int(selection.total_per_class[c])}
                    for c, name in enumerate(class_names)},
  }
