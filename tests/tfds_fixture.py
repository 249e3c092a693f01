"""A generated TFDS image-classification dataset, built as ArrayRecord into a given data_dir.

Building needs no TensorFlow: images are passed as encoded PNG bytes. Each
class has one small image (its colour), so a large dataset builds quickly;
the record's label is `index % num_classes` in generation order, stored
under the key `index` (TFDS shuffles records on write).
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "discl_generated_images"
NUM_CLASSES = 10
IMAGE_SIZE = 8


def _png(rgb, size):
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


class DisclGeneratedImages(tfds.core.GeneratorBasedBuilder):
  """`num_records` train and `num_records // 4` test records of NUM_CLASSES classes."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, num_records=40, **kwargs):
    self.num_records = num_records
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
        "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        "index": np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(self.num_records),
            "test": self._generate_examples(max(1, self.num_records // 4))}

  def _generate_examples(self, n):
    images = [_png((40 * c % 256, 90 * c % 256, 200), IMAGE_SIZE) for c in range(NUM_CLASSES)]
    for i in range(n):
      yield i, {"image": images[i % NUM_CLASSES], "label": i % NUM_CLASSES,
                "index": i}


def build(data_dir, num_records=40):
  """Returns the builder of the generated dataset, prepared in `data_dir`."""
  b = DisclGeneratedImages(data_dir=str(data_dir), file_format="array_record",
                           num_records=num_records)
  b.download_and_prepare(file_format="array_record")
  return b
