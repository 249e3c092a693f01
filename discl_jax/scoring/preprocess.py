"""CLIP image preprocessing, the way `CLIPImageProcessor` does it.

Resize (shortest side, PIL bicubic on uint8) and center crop run on the host
and give uint8 crops, so what crosses to the device is 4x smaller than floats;
rescale to [0, 1] and the CLIP mean/std normalisation run inside the jitted
scorer (`normalize`).
"""

import dataclasses
import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
  """Preprocessing settings of one CLIP checkpoint.

  `size` is the shortest side after resizing (an int) or an exact (h, w);
  `crop` is the (h, w) of the center crop.
  """
  size: int | tuple = 224
  crop: tuple = (224, 224)
  mean: tuple = CLIP_MEAN
  std: tuple = CLIP_STD
  resample: int = int(Image.Resampling.BICUBIC)
  do_resize: bool = True
  do_center_crop: bool = True

  @classmethod
  def from_dict(cls, d, image_size=224):
    """Returns the settings read from a `preprocessor_config.json` dict."""
    size = d.get("size", image_size)
    if isinstance(size, dict):
      if "shortest_edge" in size:
        size = int(size["shortest_edge"])
      elif "height" in size and "width" in size:
        size = (int(size["height"]), int(size["width"]))
      else:
        raise ValueError(f"preprocessor size needs shortest_edge or height/width, got {size}")
    crop = d.get("crop_size", image_size)
    if isinstance(crop, dict):
      crop = (int(crop["height"]), int(crop["width"]))
    elif isinstance(crop, int):
      crop = (crop, crop)
    return cls(
        size=size, crop=tuple(crop),
        mean=tuple(float(m) for m in d.get("image_mean", CLIP_MEAN)),
        std=tuple(float(s) for s in d.get("image_std", CLIP_STD)),
        resample=int(d.get("resample", Image.Resampling.BICUBIC)),
        do_resize=bool(d.get("do_resize", True)),
        do_center_crop=bool(d.get("do_center_crop", True)))

  @classmethod
  def from_file(cls, target, image_size):
    """Returns the settings in `target` (a preprocessor_config.json), or the CLIP
    defaults at `image_size` when `target` is None."""
    if target is None:
      return cls(size=image_size, crop=(image_size, image_size))
    try:
      return cls.from_dict(json.loads(pathlib.Path(target).read_text(encoding="utf-8")), image_size)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{target}: not a valid CLIP preprocessor config: {e}") from e


def resized_shape(height, width, size):
  """Returns (h, w) after resizing to `size` (shortest side int, or exact (h, w))."""
  if not isinstance(size, int):
    return tuple(size)
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image, crop):
  """Returns the (h, w) = `crop` center of `image` (zero-padded when smaller)."""
  height, width = image.shape[:2]
  crop_h, crop_w = crop
  if crop_h > height or crop_w > width:
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[top_pad:top_pad + height, left_pad:left_pad + width] = image
    image, height, width = padded, new_h, new_w
  top, left = (height - crop_h) // 2, (width - crop_w) // 2
  return image[top:top + crop_h, left:left + crop_w]


def resize_and_crop(image, spec):
  """Returns uint8 crop[0] x crop[1] x 3: `image` (uint8 H x W x 3) resized and cropped."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"CLIP preprocessing needs uint8 H x W x 3, got {image.dtype} {image.shape}")
  if spec.do_resize:
    height, width = resized_shape(image.shape[0], image.shape[1], spec.size)
    if (height, width) != image.shape[:2]:
      image = np.asarray(Image.fromarray(image).resize(
          (width, height), resample=spec.resample, reducing_gap=None))
  if spec.do_center_crop:
    image = center_crop(image, spec.crop)
  return np.ascontiguousarray(image)


def preprocess_batch(images, spec):
  """Returns uint8 [N, crop_h, crop_w, 3] for a sequence of uint8 H x W x 3 images."""
  crops = [resize_and_crop(image, spec) for image in images]
  if not crops:
    return np.zeros((0,) + tuple(spec.crop) + (3,), np.uint8)
  return np.stack(crops)


def normalize(pixels_uint8, spec):
  """Returns float32 pixels rescaled to [0, 1] and normalised by the CLIP mean/std."""
  x = pixels_uint8.astype(jnp.float32) * jnp.float32(1 / 255)
  mean = jnp.asarray(spec.mean, jnp.float32)
  std = jnp.asarray(spec.std, jnp.float32)
  return (x - mean) / std
