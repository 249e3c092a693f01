"""grain pipeline: deterministic batches, exact resume, process sharding, eval padding."""

import numpy as np
import pytest

from discl_jax.data import pipeline, transforms
from discl_jax.data.records import LabeledImages


def _split(n, num_classes=3, size=(20, 24), seed=0):
  rng = np.random.default_rng(seed)
  return LabeledImages(
      ids=np.array([f"s{seed}/{i:03d}" for i in range(n)]),
      labels=np.arange(n) % num_classes,
      class_names=tuple(str(c) for c in range(num_classes)),
      pixels=rng.integers(0, 256, (n, *size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sources():
  return [_split(30), _split(12, size=(40, 36), seed=1)]


@pytest.fixture(scope="module")
def picks():
  real = np.stack([np.zeros(30, np.int64), np.arange(30)], 1)
  synthetic = np.stack([np.ones(12, np.int64), np.arange(12)], 1)
  return np.concatenate([real, synthetic])


def _batches(loader_or_iterator):
  return [dict(b) for b in loader_or_iterator]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _train(sources, picks, **kw):
  args = dict(image_size=16, batch_size=8, seed=3, epoch=0, shard=(0, 1))
  args.update(kw)
  return pipeline.train_loader(sources, picks, **args)


def test_train_batches_shapes_and_content(sources, picks):
  batches = _batches(_train(sources, picks))
  assert len(batches) == len(picks) // 8               # remainder dropped
  b = batches[0]
  assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
  for key in ("label", "source", "row"):
    assert b[key].shape == (8,) and b[key].dtype == np.int32
  seen = np.concatenate([np.stack([x["source"], x["row"]], 1) for x in batches])
  assert len({tuple(p) for p in seen}) == len(seen)    # each pick at most once
  for s, r, label in zip(b["source"], b["row"], b["label"]):
    assert label == sources[s].labels[r]
  assert abs(float(np.mean([x["image"].mean() for x in batches]))) < 1.0


def test_same_seed_same_batches_other_seed_or_epoch_differs(sources, picks):
  first = _batches(_train(sources, picks))
  _assert_same(first, _batches(_train(sources, picks)))
  for other in (_train(sources, picks, seed=4), _train(sources, picks, epoch=1)):
    rows = [b["row"] for b in _batches(other)]
    assert not all(np.array_equal(r, b["row"]) for r, b in zip(rows, first))


def test_resumed_iterator_continues_identically(sources, picks):
  full = _batches(_train(sources, picks))
  iterator = iter(_train(sources, picks))
  head = [next(iterator) for _ in range(2)]
  state = iterator.get_state()
  resumed = iter(_train(sources, picks))
  resumed.set_state(state)
  _assert_same(head + _batches(resumed), full)


def test_resume_refuses_a_different_epoch(sources, picks):
  iterator = iter(_train(sources, picks))
  next(iterator)
  other = iter(_train(sources, picks, epoch=1))
  with pytest.raises(ValueError):
    other.set_state(iterator.get_state())


def test_process_shards_split_the_epoch(sources, picks):
  parts = [_batches(_train(sources, picks, shard=(p, 2))) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == 5            # 21 picks each, local batch 4
  assert all(b["image"].shape[0] == 4 for part in parts for b in part)
  shuffled = picks[pipeline.epoch_order(len(picks), seed=3, epoch=0)]
  for part, expected in zip(parts, (shuffled[:20], shuffled[21:41])):
    got = np.concatenate([np.stack([b["source"], b["row"]], 1) for b in part])
    np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    _train(sources, picks, shard=(0, 3))


def test_worker_process_gives_the_same_batches_and_resumes(sources, picks):
  # (With W > 1 workers grain deals records round-robin and each worker batches
  # its own, so batches depend on num_workers; for a fixed W they reproduce.)
  iterator = iter(_train(sources, picks, num_workers=1))
  head = [dict(next(iterator))]
  state = iterator.get_state()
  tail = _batches(iterator)
  _assert_same(head + tail, _batches(_train(sources, picks)))
  resumed = iter(_train(sources, picks, num_workers=1))
  resumed.set_state(state)
  _assert_same(_batches(resumed), tail)


def test_without_augmentation_train_view_is_the_eval_view(sources, picks):
  batch = next(iter(_train(sources, picks, augment=False)))
  s, r = int(batch["source"][0]), int(batch["row"][0])
  expected = transforms.normalize(
      transforms.center_crop_resize(sources[s].image(r), 16))
  np.testing.assert_allclose(batch["image"][0], expected, rtol=1e-6)


def test_eval_loader_pads_masks_and_keeps_order(sources):
  split = sources[0]
  batches = _batches(pipeline.eval_loader(split, image_size=16, batch_size=8, shard=(0, 1)))
  assert len(batches) == 4 and all(b["image"].shape == (8, 16, 16, 3) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  rows = np.concatenate([b["row"] for b in batches])
  np.testing.assert_array_equal(mask, [1] * 30 + [0] * 2)
  np.testing.assert_array_equal(rows[:30], np.arange(30))
  # Two processes: same number of batches, every image exactly once.
  parts = [_batches(pipeline.eval_loader(split, image_size=16, batch_size=8, shard=(p, 2)))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1])
  real = [r for part in parts for b in part for r, m in zip(b["row"], b["mask"]) if m]
  assert sorted(real) == list(range(30))


def test_transforms():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  assert transforms.random_resized_crop(image, 16, rng).shape == (16, 16, 3)
  assert transforms.train_transform(image, 16, rng).dtype == np.uint8
  assert transforms.center_crop_resize(image, 32).shape == (32, 32, 3)
  small = image[:32, :32]
  np.testing.assert_array_equal(transforms.center_crop_resize(small, 32), small)
  ones = transforms.normalize(np.full((1, 2, 2, 3), 255, np.uint8))
  np.testing.assert_allclose(ones[0, 0, 0], (1 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD)
