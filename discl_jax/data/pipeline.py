"""grain input pipelines: decode, augment or resize, batch, shard by process.

`batch_size` is the GLOBAL batch: each of `shard = (process_index,
process_count)` yields its own `batch_size // process_count` rows, the slice
`parallel.put_batch` expects. Iterators are grain `DataLoader` iterators, so
`get_state()` / `set_state()` checkpoint and resume them exactly.
With `num_workers` W > 1 grain deals records round-robin to the workers and
each batches its own, so batch composition depends on W (and is reproducible
for a fixed W); W = 0 and W = 1 give the same batches.
"""

import hashlib
import logging

from absl import flags
import grain.python as grain
import numpy as np

from discl_jax import seeding
from discl_jax.data import transforms
from discl_jax.data.records import BadImageError
from discl_jax.data.transforms import normalize  # public here too (INTERFACES.md)

ON_BAD_IMAGE = ("error", "skip")


def _default_shard():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


class PicksSource(grain.RandomAccessDataSource):
  """Record k decodes `sources[picks[k, 0]].image(picks[k, 1])`.

  Picks [K, 3] carry a third column the record passes on as "template" (FLYP's
  caption template of each (image, caption) pair, `flyp.pair_picks`).

  With `on_bad_image="skip"` an unreadable image yields a record with image
  None and mask 0, and its message (naming the file) is logged and appended to
  `self.skipped` (the loader's `.skipped`; filled in-process, i.e. with
  `num_workers=0`); "error" raises BadImageError naming the file.
  """

  def __init__(self, sources, picks, on_bad_image="error"):
    if on_bad_image not in ON_BAD_IMAGE:
      raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    self._sources = tuple(sources)
    self._picks = as_picks(picks)
    self._on_bad_image = on_bad_image
    self.skipped = []
    bad = (self._picks[:, 0] < 0) | (self._picks[:, 0] >= len(self._sources))
    if bad.any():
      raise ValueError(f"picks name source {int(self._picks[bad][0, 0])}, "
                       f"only {len(self._sources)} given")
    for s, source in enumerate(self._sources):
      rows = self._picks[self._picks[:, 0] == s, 1]
      if len(rows) and (rows.min() < 0 or rows.max() >= len(source)):
        raise ValueError(f"picks index rows outside source {s} (size {len(source)})")

  def __len__(self):
    return len(self._picks)

  def __repr__(self):
    digest = hashlib.sha256(self._picks.tobytes()).hexdigest()[:16]
    sizes = [len(source) for source in self._sources]
    return f"PicksSource(picks={len(self._picks)}:{digest}, sources={sizes})"

  def __getitem__(self, k):
    s, row = (int(v) for v in self._picks[k, :2])
    source = self._sources[s]
    try:
      image = source.image(row)
    except BadImageError as e:
      if self._on_bad_image == "error":
        raise
      logging.warning("skipping unreadable image: %s", e)
      self.skipped.append(str(e))
      image = None
    record = {"image": image, "label": np.int32(source.labels[row]),
              "source": np.int32(s), "row": np.int32(row), "mask": np.float32(image is not None)}
    if self._picks.shape[1] == 3:
      record["template"] = np.int32(self._picks[k, 2])
    return record


class _TrainView(grain.RandomMapTransform):

  def __init__(self, size, augment, mean, std, recipe, crop_scale, jitter):
    self._size, self._augment, self._mean, self._std = size, augment, mean, std
    self._recipe, self._crop_scale, self._jitter = recipe, tuple(crop_scale), float(jitter)

  def random_map(self, element, rng):
    if self._augment:
      image = transforms.train_view(self._recipe, element["image"], self._size, rng,
                                    self._crop_scale, self._jitter)
    else:
      image = transforms.eval_view(self._recipe, element["image"], self._size)
    element["image"] = normalize(image, self._mean, self._std)
    del element["mask"]
    return element


class _EvalView(grain.MapTransform):

  def __init__(self, size, mean, std, recipe):
    self._size, self._mean, self._std, self._recipe = size, mean, std, recipe

  def map(self, element):
    if element["image"] is None:
      image = np.zeros((self._size, self._size, 3), np.uint8)
    else:
      image = transforms.eval_view(self._recipe, element["image"], self._size)
    element["image"] = normalize(image, self._mean, self._std)
    return element


class _DropBad(grain.FilterTransform):

  def filter(self, element):
    return element["image"] is not None


class _PadMask(grain.MapTransform):
  """Zeroes the mask of padding records (index >= the split's real size)."""

  def __init__(self, real_size):
    self._real_size = real_size

  def map(self, element):
    if element["pad_index"] >= self._real_size:
      element["mask"] = np.float32(0)
    del element["pad_index"]
    return element


class _PaddedSource(grain.RandomAccessDataSource):
  """`base` extended to `size` records by repeating record 0 (marked pad)."""

  def __init__(self, base, size):
    self._base, self._size = base, size

  def __len__(self):
    return self._size

  def __repr__(self):
    return f"_PaddedSource({self._base!r}, size={self._size})"

  def __getitem__(self, k):
    element = self._base[k if k < len(self._base) else 0]
    element["pad_index"] = np.int64(k)
    return element


def _absl_flags_ready(num_workers):
  """grain's worker start-up reads absl flags; outside an absl app use their defaults."""
  if num_workers and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _with_skipped(loader, source):
  """Returns `loader` with `.skipped`: messages of images skipped in this process."""
  loader.skipped = source.skipped
  return loader


def _local_batch(batch_size, shard):
  index, count = shard
  if batch_size % count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {count} processes")
  return batch_size // count


def as_picks(picks):
  """Returns int64 picks [K, 2] (source, row), or [K, 3] with a template column."""
  picks = np.asarray(picks, np.int64)
  return picks if picks.ndim == 2 and picks.shape[1] == 3 else picks.reshape(-1, 2)


def _recipe(name):
  if name not in transforms.RECIPES:
    raise ValueError(f"unknown transform recipe {name!r}; valid: {', '.join(transforms.RECIPES)}")
  return name


def epoch_order(num_picks, seed, epoch):
  """Returns the permutation of an epoch's picks, from (seed, epoch) alone."""
  return seeding.numpy_rng(seed, "train_loader/order", epoch).permutation(num_picks)


def train_loader(sources, picks, *, image_size, batch_size, seed, epoch,
                 shuffle=True, augment=True, shard=None, num_workers=0, on_bad_image="error",
                 mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD, recipe="resnet",
                 crop_scale=transforms.CROP_SCALE, color_jitter=transforms.JITTER):
  """Returns a grain DataLoader over one epoch of `picks`, shuffled from (seed, epoch).

  `recipe` names the transforms (`transforms.RECIPES`: "resnet" or "clip";
  `crop_scale` and `color_jitter` shape the resnet one's augmentation);
  `shuffle=False` keeps the order of `picks` (already drawn by the caller).

  Batches: {"image": float32 [b, S, S, 3] normalised, "label", "source", "row":
  int32 [b]} (plus "template" for picks [K, 3]) with b = batch_size //
  process_count; the remainder is dropped.
  Augmentation draws from grain's per-record rng (seeded from seed and epoch).
  """
  shard = _default_shard() if shard is None else tuple(shard)
  local = _local_batch(batch_size, shard)
  _absl_flags_ready(num_workers)
  picks = as_picks(picks)
  if len(picks) < batch_size:
    raise ValueError(f"an epoch of {len(picks)} picks is smaller than one batch ({batch_size})")
  if shuffle:
    picks = picks[epoch_order(len(picks), seed, epoch)]
  source = PicksSource(sources, picks, on_bad_image)
  sampler = grain.IndexSampler(
      num_records=len(source),
      shard_options=grain.ShardOptions(shard[0], shard[1], drop_remainder=True),
      shuffle=False, num_epochs=1,
      seed=seeding.stable_hash("train_loader/augment", seed, epoch) & 0x7FFFFFFF)
  operations = [_DropBad()] if on_bad_image == "skip" else []
  operations += [_TrainView(image_size, augment, mean, std, _recipe(recipe), crop_scale,
                            color_jitter),
                 grain.Batch(local, drop_remainder=True)]
  return _with_skipped(grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations,
      worker_count=num_workers), source)


def eval_loader(split, *, image_size, batch_size, shard=None, num_workers=0,
                on_bad_image="error", mean=transforms.IMAGENET_MEAN,
                std=transforms.IMAGENET_STD, recipe="resnet"):
  """Returns a grain DataLoader over `split` in order, every image exactly once.

  `recipe` names the eval transform (`transforms.RECIPES`).

  Batches add "mask" float32 [b]: 0 for padding (the split is padded to a
  multiple of batch_size so every process yields the same number of batches)
  and, with on_bad_image="skip", for unreadable images.
  """
  shard = _default_shard() if shard is None else tuple(shard)
  local = _local_batch(batch_size, shard)
  _absl_flags_ready(num_workers)
  if not len(split):
    raise ValueError("eval_loader got an empty split")
  picks = np.stack([np.zeros(len(split), np.int64), np.arange(len(split))], 1)
  padded = -(-len(split) // batch_size) * batch_size
  picks_source = PicksSource([split], picks, on_bad_image)
  source = _PaddedSource(picks_source, padded)
  sampler = grain.IndexSampler(
      num_records=padded,
      shard_options=grain.ShardOptions(shard[0], shard[1], drop_remainder=True),
      shuffle=False, num_epochs=1, seed=0)
  operations = [_PadMask(len(split)), _EvalView(image_size, mean, std, _recipe(recipe)),
                grain.Batch(local, drop_remainder=False)]
  return _with_skipped(grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations,
      worker_count=num_workers), picks_source)
