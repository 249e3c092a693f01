"""Host-side image transforms (numpy + PIL), pure functions of (image, rng).

Train: random-resized-crop, horizontal flip, mild color jitter. Eval: resize the
shorter side and center-crop. Every random choice comes from the numpy
Generator passed in (grain's per-record rng), so a record's augmentation
depends only on the loader seed and the record's position.
"""

import numpy as np
from PIL import Image, ImageEnhance

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

CROP_SCALE = (0.35, 1.0)       # fraction of the image area a train crop covers
CROP_RATIO = (3 / 4, 4 / 3)    # aspect ratio range of a train crop
JITTER = 0.2                   # brightness / contrast / saturation factors in 1 +- JITTER
EVAL_CROP_FRACTION = 0.875     # eval: center crop this fraction of a larger image


def normalize(images_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """Returns float32 (images / 255 - mean) / std over the last (channel) axis."""
  std = np.asarray(std, np.float32)
  scale = 1.0 / (255.0 * std)
  offset = -np.asarray(mean, np.float32) / std
  x = np.asarray(images_uint8).astype(np.float32)
  x *= scale
  x += offset
  return x


def resize(image, height, width):
  """Returns uint8 `image` resized to height x width (bilinear, antialiased)."""
  if image.shape[:2] == (height, width):
    return image
  im = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
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


def train_transform(image, size, rng):
  """Returns the augmented size x size uint8 training view of `image`."""
  image = random_resized_crop(image, size, rng)
  if rng.uniform() < 0.5:
    image = image[:, ::-1]
  return color_jitter(image, rng)


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
