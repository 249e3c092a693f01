"""Hard samples of low-quality data on a constructed example."""

import json

import numpy as np
import pytest

from discl_jax.train import hardness

CLASSES = ("empty", "peccary", "agouti")
IDS = np.array([f"img{i}" for i in range(8)])
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2])
PREDS = np.array([0, 1, 0, 1, 0, 2, 2, 1])            # 1, 4 and 7 are wrong
PROBS = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.7, 0.3, 0.6])


def test_misclassified_rule():
  sel = hardness.select_hard(PROBS, PREDS, LABELS, 3)
  np.testing.assert_array_equal(np.flatnonzero(sel.mask), [1, 4, 7])
  assert sel.prob_threshold is None and not sel.low_prob.any()
  np.testing.assert_array_equal(sel.hard_per_class, [1, 1, 1])
  np.testing.assert_array_equal(sel.total_per_class, [3, 2, 3])


def test_quantile_rule_alone_and_combined():
  # sorted probs 0.1 0.2 0.3 0.5 0.6 0.7 0.8 0.9: the 0.3 quantile sits at
  # position 0.3 * 7 = 2.1, between 0.3 and 0.5: 0.3 + 0.1 * (0.5 - 0.3) = 0.32
  sel = hardness.select_hard(PROBS, PREDS, LABELS, 3, misclassified=False, prob_quantile=0.3)
  assert sel.prob_threshold == pytest.approx(0.32)
  np.testing.assert_array_equal(np.flatnonzero(sel.mask), [1, 4, 6])
  np.testing.assert_array_equal(sel.hard_per_class, [1, 1, 1])
  assert not sel.misclassified.any()

  both = hardness.select_hard(PROBS, PREDS, LABELS, 3, misclassified=True, prob_quantile=0.3)
  np.testing.assert_array_equal(np.flatnonzero(both.mask), [1, 4, 6, 7])
  np.testing.assert_array_equal(both.hard_per_class, [1, 1, 2])
  np.testing.assert_array_equal(np.flatnonzero(both.misclassified), [1, 4, 7])
  np.testing.assert_array_equal(np.flatnonzero(both.low_prob), [1, 4, 6])


def test_rows_and_summary_for_hard_jsonl_and_report():
  sel = hardness.select_hard(PROBS, PREDS, LABELS, 3, prob_quantile=0.3)
  rows = hardness.hard_rows(sel, IDS, LABELS, CLASSES, PROBS, PREDS)
  assert [r["id"] for r in rows] == ["img1", "img4", "img6", "img7"]
  assert rows[3] == {"id": "img7", "label": 2, "class_name": "agouti", "true_prob": 0.6,
                     "pred": 1, "pred_class_name": "peccary", "misclassified": True,
                     "low_prob": False}
  assert rows[2]["misclassified"] is False and rows[2]["low_prob"] is True
  json.dumps(rows)  # JSON-ready
  report = hardness.summary(sel, CLASSES, misclassified=True, prob_quantile=0.3)
  assert report["rule"] == {"misclassified": True, "prob_quantile": 0.3}
  assert report["prob_threshold"] == pytest.approx(0.32)
  assert (report["num_images"], report["num_hard"]) == (8, 4)
  assert (report["num_misclassified"], report["num_low_prob"]) == (3, 3)
  assert report["per_class"] == {"empty": {"hard": 1, "total": 3},
                                 "peccary": {"hard": 1, "total": 2},
                                 "agouti": {"hard": 2, "total": 3}}
  json.dumps(report)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prob_quantile=1.0), "hard.prob_quantile must be in"),
    (dict(prob_quantile=-0.1), "hard.prob_quantile must be in"),
    (dict(misclassified=False), "no criterion"),
    (dict(probs=np.append(PROBS[:-1], 1.5)), r"true_probs\[7\] = 1.5"),
    (dict(probs=np.append(PROBS[:-1], np.nan)), r"true_probs\[7\] = nan"),
    (dict(probs=PROBS[:-1]), "true_probs has shape"),
    (dict(preds=np.append(PREDS[:-1], 3)), r"preds outside \[0, 3\)"),
    (dict(labels=np.append(LABELS[:-1], -1)), r"labels outside \[0, 3\)"),
])
def test_bad_input_names_the_problem(kwargs, message):
  probs = kwargs.pop("probs", PROBS)
  preds = kwargs.pop("preds", PREDS)
  labels = kwargs.pop("labels", LABELS)
  with pytest.raises(ValueError, match=message):
    hardness.select_hard(probs, preds, labels, 3, **kwargs)
