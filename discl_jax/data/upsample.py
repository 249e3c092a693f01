"""Source images scaled up before generation (CIFAR100-LT as the reference's rebuttal ran it).

The rebuttal super-resolved the 32 x 32 CIFAR images to 128 x 128 before
image-guided generation. No super-resolution model ships here, so
`diffusion.source_upsample` scales them up with a LANCZOS filter instead.
"""

import numpy as np
from PIL import Image


def upsample(image, shorter_side):
  """Returns uint8 H x W x 3 `image` scaled up (LANCZOS, aspect kept) to `shorter_side`.

  An image whose shorter side is already at least `shorter_side`, or
  `shorter_side` 0, is returned unchanged.
  """
  image = np.asarray(image)
  height, width = image.shape[:2]
  if shorter_side < 0:
    raise ValueError(f"diffusion.source_upsample must be >= 0, got {shorter_side}")
  if not shorter_side or min(height, width) >= shorter_side:
    return image
  scale = shorter_side / min(height, width)
  size = (max(shorter_side, round(width * scale)), max(shorter_side, round(height * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


class UpsampledSplit:
  """A split whose `image(i)` is `upsample`d; every other attribute is the wrapped split's."""

  def __init__(self, split, shorter_side):
    self._split = split
    self._shorter_side = shorter_side

  def __len__(self):
    return len(self._split)

  def __getattr__(self, name):
    return getattr(self._split, name)

  def image(self, index):
    """Returns the upsampled uint8 image of row `index`."""
    return upsample(self._split.image(index), self._shorter_side)


def upsampled(split, shorter_side):
  """Returns `split` itself when `shorter_side` is 0, else an UpsampledSplit of it."""
  return UpsampledSplit(split, shorter_side) if shorter_side else split
