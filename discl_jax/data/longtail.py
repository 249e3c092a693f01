"""Long-tail construction: the exponential profile, subsampling and class groups.

The profile is the CIFAR-LT recipe (Cao et al., LDAM): class i of C keeps
n_i = floor(n_max * ir^(-i / (C - 1))) images, so class 0 is the head with
n_max images and class C - 1 the tail with n_max / ir.
"""

import numpy as np

from discl_jax import seeding

GROUPS = ("many", "medium", "few")


def longtail_counts(num_classes, n_max, imbalance_ratio):
  """Returns int64 [num_classes]: images kept per class, head (class 0) first."""
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if n_max < 1:
    raise ValueError(f"n_max (data.max_per_class) must be >= 1, got {n_max}")
  if imbalance_ratio < 1:
    raise ValueError(
        f"data.imbalance_ratio must be >= 1 (n_max / n_min), got {imbalance_ratio}")
  if num_classes == 1:
    return np.array([n_max], np.int64)
  exponents = np.arange(num_classes) / (num_classes - 1)
  counts = np.floor(n_max * float(imbalance_ratio) ** (-exponents) + 1e-9)
  return np.maximum(counts.astype(np.int64), 1)


def subsample_longtail(split, counts, seed):
  """Returns `split` keeping `counts[c]` images of class c, chosen from `seed`.

  The choice within a class depends only on (seed, class, the class's images in
  split order); kept images stay in split order. A class with fewer images than
  asked raises ValueError naming it.
  """
  counts = np.asarray(counts)
  if len(counts) != split.num_classes:
    raise ValueError(
        f"counts has {len(counts)} entries, the split has {split.num_classes} classes")
  keep = []
  for c, n in enumerate(counts):
    members = np.flatnonzero(split.labels == c)
    if len(members) < n:
      raise ValueError(
          f"class {c} ({split.class_names[c]!r}) has {len(members)} images, "
          f"the long-tail profile asks for {n}")
    rng = seeding.numpy_rng(seed, "longtail", c)
    keep.append(members[rng.permutation(len(members))[:n]])
  return split.subset(np.sort(np.concatenate(keep)))


def take_per_class(labels, per_class, seed, purpose):
  """Returns (taken, rest): sorted index arrays, `per_class` of each class taken.

  The choice is a seeded permutation within each class keyed by `purpose`
  (e.g. "val"), so different purposes draw independently. A class with fewer
  than `per_class` images raises ValueError naming it.
  """
  labels = np.asarray(labels)
  taken = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise ValueError(
          f"class {c} has {len(members)} images, {purpose} needs {per_class} per class")
    rng = seeding.numpy_rng(seed, purpose, int(c))
    taken.append(members[rng.permutation(len(members))[:per_class]])
  taken = np.sort(np.concatenate(taken)) if taken else np.zeros(0, np.int64)
  rest = np.setdiff1d(np.arange(len(labels)), taken)
  return taken, rest


def class_groups(train_counts, many_threshold=100, few_threshold=20):
  """Returns str [C]: "many" (>= many_threshold), "few" (< few_threshold) or "medium"."""
  if not 0 <= few_threshold <= many_threshold:
    raise ValueError(
        "class-group thresholds need 0 <= few_threshold <= many_threshold, got "
        f"few_threshold={few_threshold}, many_threshold={many_threshold}")
  counts = np.asarray(train_counts)
  groups = np.full(counts.shape, "medium", dtype=object)
  groups[counts >= many_threshold] = "many"
  groups[counts < few_threshold] = "few"
  return groups.astype(str)
