"""`load(data_config)`: every dataset's splits as LabeledImages-like objects.

The splits depend on `data_config` alone: `data_config.split_seed` draws every
random choice that defines the dataset (held-out carve-outs, the long-tail
subsample), so runs that vary only the config's training `seed` share one
train/val/test split.

Long-tail datasets return "train" (long-tailed), "val" (balanced, carved from
the source's train split before the long-tail subsampling, disjoint from train)
and "test"; iwildcam returns the WILDS split names.
"""

from discl_jax.data import digits

NAMES = ("digits_lt", "cifar100_lt", "tfds", "imagenet_lt", "iwildcam")


def load(data_config, *, skipped=None):
  """Returns {split name: LabeledImages} for `data_config.name`, drawn from `split_seed`.

  `skipped`, when a list, receives one dict {split, path, reason} per image
  left out under `data_config.on_bad_image == "skip"` (file-list datasets).
  """
  name, seed = data_config.name, int(data_config.split_seed)
  if name == "digits_lt":
    return digits.load(
        seed, imbalance_ratio=data_config.imbalance_ratio,
        max_per_class=data_config.max_per_class,
        val_per_class=data_config.val_per_class,
        test_per_class=data_config.test_per_class)
  if name in ("cifar100_lt", "tfds"):
    from discl_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.load(data_config, seed)
  if name in ("imagenet_lt", "iwildcam"):
    from discl_jax.data import filelists  # pylint: disable=g-import-not-at-top
    splits, report = filelists.load(data_config, seed)
    if skipped is not None:
      skipped.extend(report)
    return splits
  raise ValueError(f"unknown data.name {name!r}; known: {', '.join(NAMES)}")
