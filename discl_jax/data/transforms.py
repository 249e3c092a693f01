"""Host-side image transforms (numpy + PIL), pure functions of (image, rng).

Two recipes, picked by the classifier (`recipe_for(train.model)`):
  resnet  train: random-resized-crop (area `data.crop_scale`, default 0.35-1),
          horizontal flip, color jitter 1 +- `data.color_jitter` (default 0.2; the
          paper configs use the reference's 0.08-1 and 0.4); eval: resize the
          shorter side and center-crop 0.875.
  clip    CLIP's own (FLYP / DisCL, docs/design.md §6): train RandomResizedCrop(size,
          scale=(0.9, 1.0)) with bicubic resampling and nothing else; eval
          resize the shorter side to `size` (bicubic) and center-crop `size`,
          with torchvision's crop parameters and rounding.
Every random choice comes from the numpy Generator passed in (grain's
per-record rng), so a record's augmentation depends only on the loader seed
and the record's position.
"""

import math

import numpy as np
from PIL import Image, ImageEnhance

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

CROP_SCALE = (0.35, 1.0)       # default fraction of the image area a train crop covers
REFERENCE_CROP_SCALE = (0.08, 1.0)  # the reference's (torchvision's default RandomResizedCrop)
CROP_RATIO = (3 / 4, 4 / 3)    # aspect ratio range of a train crop
JITTER = 0.2                   # default brightness / contrast / saturation factors in 1 +- JITTER
REFERENCE_JITTER = 0.4         # the reference's ColorJitter(0.4, 0.4, 0.4)
EVAL_CROP_FRACTION = 0.875     # eval: center crop this fraction of a larger image
CLIP_CROP_SCALE = (0.9, 1.0)   # clip recipe: FLYP's RandomResizedCrop area range
RECIPES = ("resnet", "clip")


def recipe_for(model):
  """Returns the transform recipe of classifier `model` (train.model): "clip" or "resnet"."""
  return "clip" if model == "clip" else "resnet"


def normalize(images_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """Returns float32 (images / 255 - mean) / std over the last (channel) axis."""
  std = np.asarray(std, np.float32)
  scale = 1.0 / (255.0 * std)
  offset = -np.asarray(mean, np.float32) / std
  x = np.asarray(images_uint8).astype(np.float32)
  x *= scale
  x += offset
  return x


def resize(image, height, width, resample=Image.Resampling.BILINEAR):
  """Returns uint8 `image` resized to height x width (PIL `resample`, antialiased)."""
  if image.shape[:2] == (height, width):
    return image
  im = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), resample)
  return np.asarray(im)


def random_resized_crop(image, size, rng, scale=CROP_SCALE, ratio=CROP_RATIO):
  """Returns a size x size crop covering a random area / aspect of `image`."""
  h, w = image.shape[:2]
  area = h * w
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return resize(image[top:top + ch, left:left + cw], size, size)
  return center_crop_resize(image, size, crop_fraction=1.0)


def color_jitter(image, rng, strength=JITTER):
  """Returns uint8 `image` with random brightness, contrast and saturation.

  Factors are drawn from 1 +- strength and applied in that order (PIL's
  ImageEnhance: contrast blends with the mean grey, saturation with the grey image).
  """
  b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
  im = Image.fromarray(np.ascontiguousarray(image))
  im = ImageEnhance.Brightness(im).enhance(b)
  im = ImageEnhance.Contrast(im).enhance(c)
  im = ImageEnhance.Color(im).enhance(s)
  return np.asarray(im)


def train_transform(image, size, rng, crop_scale=CROP_SCALE, jitter=JITTER):
  """Returns the augmented size x size uint8 training view of `image`: a crop of area
  fraction in `crop_scale`, a random flip, colour jitter of strength `jitter`."""
  image = random_resized_crop(image, size, rng, scale=tuple(crop_scale))
  if rng.uniform() < 0.5:
    image = image[:, ::-1]
  return color_jitter(image, rng, strength=jitter)


def center_crop_resize(image, size, crop_fraction=EVAL_CROP_FRACTION):
  """Returns the size x size uint8 eval view: shorter side resized, center crop.

  Images no larger than `size` are not cropped (CIFAR / digits keep their frame);
  larger ones keep the central `crop_fraction` (the ImageNet 224/256 recipe).
  """
  h, w = image.shape[:2]
  if min(h, w) <= size:
    crop_fraction = 1.0
  short = size / crop_fraction
  nh, nw = (max(size, int(round(h * short / min(h, w)))),
            max(size, int(round(w * short / min(h, w)))))
  image = resize(image, nh, nw)
  top, left = (nh - size) // 2, (nw - size) // 2
  return image[top:top + size, left:left + size]


def crop_box(height, width, rng, scale=CLIP_CROP_SCALE, ratio=CROP_RATIO):
  """Returns (top, left, crop height, crop width): torchvision's RandomResizedCrop.get_params.

  Ten tries of a random area fraction in `scale` and log-uniform aspect in
  `ratio`; if none fits, the central crop of the image clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= width and 0 < ch <= height:
      top = int(rng.integers(0, height - ch + 1))
      left = int(rng.integers(0, width - cw + 1))
      return top, left, ch, cw
  in_ratio = width / height
  if in_ratio < min(ratio):
    cw, ch = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    ch, cw = height, int(round(height * max(ratio)))
  else:
    cw, ch = width, height
  return (height - ch) // 2, (width - cw) // 2, ch, cw


def clip_train_transform(image, size, rng):
  """Returns the size x size uint8 CLIP training view: a `crop_box` crop, bicubic resize."""
  top, left, ch, cw = crop_box(image.shape[0], image.shape[1], rng)
  return resize(image[top:top + ch, left:left + cw], size, size, Image.Resampling.BICUBIC)


def clip_eval_transform(image, size):
  """Returns the size x size uint8 CLIP eval view: Resize(size) bicubic, CenterCrop(size).

  torchvision's sizes: the shorter side becomes `size`, the longer
  int(size * long / short); the crop starts at round((extent - size) / 2).
  """
  h, w = image.shape[:2]
  if h <= w:
    nh, nw = size, int(size * w / h)
  else:
    nh, nw = int(size * h / w), size
  image = resize(image, nh, nw, Image.Resampling.BICUBIC)
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  return image[top:top + size, left:left + size]


def train_view(recipe, image, size, rng, crop_scale=CROP_SCALE, jitter=JITTER):
  """Returns the size x size uint8 training view of `image` under `recipe` (RECIPES).

  `crop_scale` and `jitter` (data.crop_scale, data.color_jitter) shape the resnet
  recipe; the clip recipe is FLYP's own.
  """
  if recipe == "clip":
    return clip_train_transform(image, size, rng)
  return train_transform(image, size, rng, crop_scale, jitter)


def eval_view(recipe, image, size):
  """Returns the size x size uint8 eval view of `image` under `recipe` (RECIPES)."""
  if recipe == "clip":
    return clip_eval_transform(image, size)
  return center_crop_resize(image, size)
