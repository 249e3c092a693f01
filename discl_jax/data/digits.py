"""digits-LT: scikit-learn's bundled 8x8 digits (offline) as 32x32 RGB images.

The 1797 images are partitioned once per seed, independently of every other
setting except `test_per_class`:
  test: `test_per_class` images of each digit (the held-out balanced test split);
  pool: everything else; the balanced val split and the long-tailed train split
        are drawn from the pool, so a model trained on the pool (e.g. a digit
        generator) never sees a test image.
Ids are "digits/NNNN", NNNN the index in `sklearn.datasets.load_digits()`.
"""

import functools

import numpy as np
from PIL import Image

from discl_jax.data import longtail
from discl_jax.data.records import LabeledImages

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven",
               "eight", "nine")
NUM_IMAGES = 1797
IMAGE_SIZE = 32


@functools.cache
def _raw():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  return digits.images.astype(np.float32), digits.target.astype(np.int64)


def to_rgb(images_8x8, size=IMAGE_SIZE):
  """Returns uint8 [N, size, size, 3]: dark ink on white, bicubic-upscaled.

  `images_8x8` holds sklearn's intensities 0..16 (16 = full ink).
  """
  gray = np.clip(255.0 - np.asarray(images_8x8) * (255.0 / 16.0), 0, 255)
  out = np.empty((len(gray), size, size, 3), np.uint8)
  for i, g in enumerate(gray):
    im = Image.fromarray(g.astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BICUBIC)
    out[i] = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)[..., None]
  return out


def all_images():
  """Returns all 1797 digits as LabeledImages (32x32 RGB, ids "digits/NNNN")."""
  images, labels = _raw()
  ids = np.array([f"digits/{i:04d}" for i in range(len(labels))])
  return LabeledImages(ids=ids, labels=labels, class_names=CLASS_NAMES,
                       pixels=to_rgb(images))


def partition(seed, test_per_class=50):
  """Returns {"test", "pool"}: sorted, disjoint index arrays covering all digits.

  Depends only on (seed, test_per_class). Everything digits-LT trains on
  (train, val) comes from "pool".
  """
  _, labels = _raw()
  test, pool = longtail.take_per_class(labels, test_per_class, seed, "digits/test")
  return {"test": test, "pool": pool}


def load(seed, *, imbalance_ratio, max_per_class=0, val_per_class=0,
         test_per_class=50):
  """Returns {"train", "val", "test"}: long-tailed train, balanced val and test.

  val takes `val_per_class` of each class from the pool; train subsamples the
  rest of the pool with the exponential profile (n_max = `max_per_class`, or
  with 0 the head class's remaining count).
  """
  images = all_images()
  parts = partition(seed, test_per_class)
  pool = images.subset(parts["pool"])
  val_idx, rest_idx = longtail.take_per_class(
      pool.labels, val_per_class, seed, "digits/val")
  rest = pool.subset(rest_idx)
  n_max = max_per_class or int(rest.class_counts()[0])
  counts = longtail.longtail_counts(len(CLASS_NAMES), n_max, imbalance_ratio)
  train = longtail.subsample_longtail(rest, counts, seed)
  return {"train": train, "val": pool.subset(val_idx),
          "test": images.subset(parts["test"])}
