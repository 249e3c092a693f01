"""CLIP's own transforms (FLYP / DisCL, docs/design.md §6), on exact crop parameters."""

import math

import numpy as np
import pytest
from PIL import Image

from discl_jax.data import pipeline
from discl_jax.data import records
from discl_jax.data import transforms


def _image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _bicubic(image, height, width):
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def test_recipe_follows_the_model():
  assert transforms.recipe_for("clip") == "clip"
  assert {transforms.recipe_for(m) for m in ("tiny", "resnet10", "resnet32")} == {"resnet"}


def test_eval_is_resize_224_bicubic_then_center_crop_224():
  image = _image(270, 480)  # the reference's iWildCam size
  out = transforms.clip_eval_transform(image, 224)
  # torchvision Resize(224): 270 -> 224, 480 -> int(224 * 480 / 270) = 398; CenterCrop(224)
  # starts at round((398 - 224) / 2) = 87.
  np.testing.assert_array_equal(out, _bicubic(image, 224, 398)[:, 87:311])
  tall = _image(300, 225, seed=1)
  np.testing.assert_array_equal(transforms.clip_eval_transform(tall, 224),
                                _bicubic(tall, 298, 224)[37:261])


def test_train_is_random_resized_crop_09_1_bicubic_and_nothing_else():
  image = _image(300, 400)  # 4:3, as many WILDS camera-trap images
  out = transforms.clip_train_transform(image, 224, np.random.default_rng(1))
  rng = np.random.default_rng(1)  # the same draws, by hand: area, log-aspect, top, left
  area = 300 * 400 * rng.uniform(0.9, 1.0)
  aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
  cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
  assert ch <= 300 and cw <= 400  # this seed's first try fits
  top, left = int(rng.integers(0, 300 - ch + 1)), int(rng.integers(0, 400 - cw + 1))
  assert transforms.crop_box(300, 400, np.random.default_rng(1)) == (top, left, ch, cw)
  # No flip, no colour jitter: the bicubic resize of the crop, pixel for pixel.
  np.testing.assert_array_equal(out, _bicubic(image[top:top + ch, left:left + cw], 224, 224))


def test_a_16_9_image_always_gets_the_central_4_3_crop():
  """At >= 90 % of a 16:9 image no aspect in [3/4, 4/3] fits (the crop would be taller than
  the image), so torchvision, and we, take the central crop clamped to 4/3: 270 x 360."""
  image = _image(270, 480)
  for seed in range(5):
    assert transforms.crop_box(270, 480, np.random.default_rng(seed)) == (0, 60, 270, 360)
  np.testing.assert_array_equal(
      transforms.clip_train_transform(image, 224, np.random.default_rng(0)),
      _bicubic(image[:, 60:420], 224, 224))


def test_crop_box_covers_90_to_100_percent_and_falls_back_like_torchvision():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, ch, cw = transforms.crop_box(300, 400, rng)
    assert 0 <= top <= 300 - ch and 0 <= left <= 400 - cw
    assert 0.89 <= ch * cw / (300 * 400) <= 1.0
  # A 10 x 100 strip: no try fits, so the center crop clamped to aspect 4/3.
  assert transforms.crop_box(10, 100, np.random.default_rng(0)) == (0, 43, 10, 13)


def test_loaders_apply_the_recipe_they_are_given():
  image = _image(36, 64)
  split = records.LabeledImages(ids=np.array(["x"]), labels=np.zeros(1, np.int64),
                                class_names=("a",), pixels=image[None])
  batch = next(iter(pipeline.eval_loader(split, image_size=32, batch_size=1, shard=(0, 1),
                                         recipe="clip", mean=transforms.CLIP_MEAN,
                                         std=transforms.CLIP_STD)))
  expected = transforms.normalize(transforms.clip_eval_transform(image, 32),
                                  transforms.CLIP_MEAN, transforms.CLIP_STD)
  np.testing.assert_allclose(batch["image"][0], expected, atol=1e-6)
  with pytest.raises(ValueError, match="unknown transform recipe 'vit'"):
    pipeline.eval_loader(split, image_size=32, batch_size=1, shard=(0, 1), recipe="vit")
