"""Evaluation metrics: group top-1, macro-F1 (against sklearn), per-class accuracy."""

import numpy as np
import pytest

from discl_jax.evaluation import metrics

GROUPS = np.array(["many", "many", "medium", "few", "few"])


def test_group_accuracies_by_hand():
  labels = np.array([0, 0, 1, 2, 2, 3, 4, 4])
  preds = np.array([0, 1, 1, 2, 0, 3, 0, 0])
  acc = metrics.group_accuracies(preds, labels, GROUPS)
  assert acc["many"] == pytest.approx(2 / 3)  # classes 0, 1: 3 images, 2 right
  assert acc["medium"] == pytest.approx(1 / 2)
  assert acc["few"] == pytest.approx(1 / 3)
  assert acc["all"] == pytest.approx(4 / 8)


def test_group_without_images_is_nan():
  acc = metrics.group_accuracies([0, 1], [0, 1], GROUPS)
  assert np.isnan(acc["few"]) and np.isnan(acc["medium"]) and acc["all"] == 1.0


def test_label_outside_groups_is_an_error():
  with pytest.raises(ValueError, match="label 7"):
    metrics.group_accuracies([0], [7], GROUPS)


def test_per_class_accuracy():
  acc = metrics.per_class_accuracy([0, 1, 1, 2], [0, 0, 1, 2], num_classes=4)
  np.testing.assert_allclose(acc[:3], [0.5, 1.0, 1.0])
  assert np.isnan(acc[3])


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed):
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 12, size=200)
  preds = np.where(rng.random(200) < 0.5, labels, rng.integers(0, 15, size=200))
  expected = sklearn_metrics.f1_score(labels, preds, average="macro", labels=np.unique(labels),
                                      zero_division=0)
  assert metrics.macro_f1(preds, labels) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_is_wilds_average_over_present_classes():
  """WILDS: f1_score(average="macro", labels=unique(y_true)); differs from the union here."""
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  labels = np.array([0, 0, 1, 1, 2])
  preds = np.array([0, 3, 3, 1, 4])  # class 2 never predicted; 3, 4 never true
  wilds = sklearn_metrics.f1_score(labels, preds, average="macro", labels=np.unique(labels),
                                   zero_division=0)
  union = sklearn_metrics.f1_score(labels, preds, average="macro", zero_division=0)
  assert wilds == pytest.approx((2 / 3 + 2 / 3 + 0) / 3) and union == pytest.approx(4 / 15)
  assert metrics.macro_f1(preds, labels) == pytest.approx(wilds, abs=1e-12)


def test_split_metrics_keys():
  out = metrics.split_metrics("test", [0, 1], [0, 1], GROUPS)
  assert set(out) == {"test/many", "test/medium", "test/few", "test/all", "test/macro_f1"}
