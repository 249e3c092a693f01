"""Long-tail profile, subsampling and Many / Medium / Few groups."""

import numpy as np
import pytest

from discl_jax.data import longtail
from discl_jax.data.records import LabeledImages


def _balanced(num_classes, per_class):
  labels = np.repeat(np.arange(num_classes), per_class)
  ids = np.array([f"x/{i:05d}" for i in range(len(labels))])
  pixels = np.zeros((len(labels), 2, 2, 3), np.uint8)
  return LabeledImages(ids=ids, labels=labels,
                       class_names=tuple(str(c) for c in range(num_classes)),
                       pixels=pixels)


def test_cifar100_lt_profile_matches_the_published_totals():
  counts = longtail.longtail_counts(100, 500, 100)
  assert counts[0] == 500 and counts[-1] == 5
  assert counts.sum() == 10847           # CIFAR-100-LT, ir 100 (Cao et al.)
  assert longtail.longtail_counts(100, 500, 50).sum() == 12608
  assert np.all(np.diff(counts) <= 0)


def test_profile_formula_and_edge_cases():
  counts = longtail.longtail_counts(10, 120, 20)
  expected = [int(120 * 20 ** (-i / 9)) for i in range(10)]
  np.testing.assert_array_equal(counts, expected)
  np.testing.assert_array_equal(longtail.longtail_counts(4, 7, 1), [7] * 4)
  np.testing.assert_array_equal(longtail.longtail_counts(1, 9, 10), [9])
  with pytest.raises(ValueError, match="imbalance_ratio"):
    longtail.longtail_counts(10, 100, 0.5)
  with pytest.raises(ValueError, match="max_per_class"):
    longtail.longtail_counts(10, 0, 10)


def test_subsample_is_deterministic_and_follows_counts():
  split = _balanced(5, 40)
  counts = longtail.longtail_counts(5, 40, 10)
  a = longtail.subsample_longtail(split, counts, seed=3)
  b = longtail.subsample_longtail(split, counts, seed=3)
  c = longtail.subsample_longtail(split, counts, seed=4)
  np.testing.assert_array_equal(a.class_counts(), counts)
  np.testing.assert_array_equal(a.ids, b.ids)
  assert not np.array_equal(a.ids, c.ids)
  assert list(a.ids) == sorted(a.ids)            # split order kept
  assert set(a.ids) <= set(split.ids)


def test_subsample_names_a_class_that_is_too_small():
  split = _balanced(3, 5)
  with pytest.raises(ValueError, match="class 0 .* has 5 images.* asks for 9"):
    longtail.subsample_longtail(split, [9, 2, 1], seed=0)


def test_take_per_class_is_disjoint_and_balanced():
  labels = np.repeat(np.arange(4), [10, 7, 5, 3])
  taken, rest = longtail.take_per_class(labels, 2, seed=1, purpose="val")
  np.testing.assert_array_equal(np.bincount(labels[taken]), [2, 2, 2, 2])
  assert not set(taken) & set(rest) and len(taken) + len(rest) == len(labels)
  again, _ = longtail.take_per_class(labels, 2, seed=1, purpose="val")
  np.testing.assert_array_equal(taken, again)
  with pytest.raises(ValueError, match="class 3 has 3 images"):
    longtail.take_per_class(labels, 4, seed=1, purpose="val")


def test_class_groups_default_and_custom_thresholds():
  counts = np.array([500, 100, 99, 20, 19, 0])
  np.testing.assert_array_equal(
      longtail.class_groups(counts),
      ["many", "many", "medium", "medium", "few", "few"])
  np.testing.assert_array_equal(
      longtail.class_groups([120, 60, 59, 15, 14], many_threshold=60, few_threshold=15),
      ["many", "many", "medium", "medium", "few"])
  with pytest.raises(ValueError, match="few_threshold=50, many_threshold=10"):
    longtail.class_groups(counts, many_threshold=10, few_threshold=50)
