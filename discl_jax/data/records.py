"""`LabeledImages`: one split of a dataset, in memory or as files on disk."""

import dataclasses

import numpy as np
from PIL import Image


class BadImageError(ValueError):
  """An image file that is missing or cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class LabeledImages:
  """One split: stable string ids, int labels, and pixels or paths.

  Exactly one of `pixels` (uint8, N x H x W x 3) and `paths` is set.
  `class_names[label]` names each label.
  """
  ids: np.ndarray
  labels: np.ndarray
  class_names: tuple
  pixels: np.ndarray | None = None
  paths: np.ndarray | None = None

  def __post_init__(self):
    if (self.pixels is None) == (self.paths is None):
      raise ValueError("LabeledImages needs exactly one of pixels and paths")
    n = len(self.ids)
    for name in ("labels", "pixels", "paths"):
      value = getattr(self, name)
      if value is not None and len(value) != n:
        raise ValueError(f"LabeledImages.{name} has {len(value)} rows, ids has {n}")

  def __len__(self):
    return len(self.ids)

  @property
  def num_classes(self):
    """Returns the number of classes of the dataset (not only those present)."""
    return len(self.class_names)

  def class_counts(self):
    """Returns an int array: images per class, indexed by label."""
    return np.bincount(self.labels, minlength=self.num_classes)

  def image(self, index):
    """Returns image `index` as uint8 H x W x 3; BadImageError names a bad file."""
    if self.pixels is not None:
      return self.pixels[index]
    return read_rgb(self.paths[index])

  def subset(self, indices):
    """Returns the split restricted to `indices` (any integer index array)."""
    indices = np.asarray(indices)
    take = lambda a: None if a is None else a[indices]
    return LabeledImages(
        ids=self.ids[indices], labels=self.labels[indices],
        class_names=self.class_names, pixels=take(self.pixels),
        paths=take(self.paths))


def read_rgb(path):
  """Returns the image file at `path` as uint8 H x W x 3; BadImageError names it."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError as e:
    raise BadImageError(f"image file not found: {path}") from e
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadImageError(f"cannot decode image file {path}: {e}") from e
