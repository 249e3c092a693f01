"""A tiny iWildCam-shaped dataset (WILDS v2.0 layout), written into a test's tmp dir.

Layout, as `wilds.datasets.IWildCamDataset` (v2.0) reads it:
  ROOT/metadata.csv    one row per image; columns METADATA_COLUMNS (WILDS
                       reads split, y, filename, location_remapped,
                       sequence_remapped, datetime "%Y-%m-%d %H:%M:%S.%f")
  ROOT/categories.csv  y,category_id,name (the scientific name)
  ROOT/labels.csv      y,name,english: the common-name map FLYP and DisCL
                       use for captions and prompts
  ROOT/train/FILENAME  every image, whatever its split (WILDS keeps them all in train/)
Splits: train, id_val, id_test share the ID locations; val and test use
other (OOD) locations. Images are small JPEGs whose colour and bright patch
depend on the class, plus per-image noise, so a tiny model can learn them.
"""

import csv
import dataclasses
import pathlib

import numpy as np
from PIL import Image

from discl_jax import seeding

METADATA_COLUMNS = ("split", "location_remapped", "location", "sequence_remapped", "sequence",
                    "y", "category_id", "datetime", "filename", "image_id")
SPLITS = ("train", "id_val", "id_test", "val", "test")
# (y, category_id, scientific name, common name), ids as in WILDS' categories.csv.
CLASSES = (
    (0, 0, "empty", "empty"),
    (1, 2, "tayassu pecari", "white-lipped peccary"),
    (2, 3, "dasyprocta punctata", "central american agouti"),
    (3, 4, "cuniculus paca", "spotted paca"),
)
DEFAULT_PER_CLASS = {"train": 6, "id_val": 2, "id_test": 2, "val": 2, "test": 2}
ID_LOCATIONS = (0, 1, 2)
OOD_LOCATIONS = {"val": (3,), "test": (4,)}


@dataclasses.dataclass(frozen=True)
class TinyIWildCam:
  """Paths of the written dataset and what it holds (rows as written to metadata.csv)."""
  root: pathlib.Path
  metadata_csv: pathlib.Path
  categories_csv: pathlib.Path
  labels_csv: pathlib.Path
  rows: tuple
  class_names: tuple   # scientific names, indexed by y
  common_names: tuple  # common names, indexed by y


def write_tiny_iwildcam(root, *, per_class=None, image_size=(64, 36), seed=0):
  """Writes the tiny dataset under `root`; returns its TinyIWildCam.

  `per_class` maps split -> images per class (defaults DEFAULT_PER_CLASS);
  `image_size` is (width, height), 16:9 like the reference's 480x270.
  """
  root = pathlib.Path(root)
  (root / "train").mkdir(parents=True, exist_ok=True)
  per_class = dict(DEFAULT_PER_CLASS, **(per_class or {}))
  rng = seeding.numpy_rng(seed, "tiny_iwildcam")
  rows = []
  for split in SPLITS:
    locations = OOD_LOCATIONS.get(split, ID_LOCATIONS)
    for y, category_id, _, _ in CLASSES:
      for k in range(per_class[split]):
        index = len(rows)
        image_id = f"{seeding.stable_hash('tiny_iwildcam', seed, index):08x}-{index:04d}"
        location = locations[k % len(locations)]
        rows.append({
            "split": split, "location_remapped": location, "location": 100 + location,
            "sequence_remapped": index, "sequence": f"seq{index:05d}", "y": y,
            "category_id": category_id,
            "datetime": f"2013-06-{1 + index % 28:02d} {index % 24:02d}:{index % 60:02d}:00.000",
            "filename": f"{image_id}.jpg", "image_id": image_id,
        })
        _class_image(y, image_size, rng).save(root / "train" / f"{image_id}.jpg", quality=95)
  metadata_csv = root / "metadata.csv"
  with open(metadata_csv, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  categories_csv = root / "categories.csv"
  labels_csv = root / "labels.csv"
  with open(categories_csv, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("y", "category_id", "name"))
    writer.writerows((y, cid, name) for y, cid, name, _ in CLASSES)
  with open(labels_csv, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("y", "name", "english"))
    writer.writerows((y, name, english) for y, _, name, english in CLASSES)
  return TinyIWildCam(
      root=root, metadata_csv=metadata_csv, categories_csv=categories_csv,
      labels_csv=labels_csv, rows=tuple(rows),
      class_names=tuple(c[2] for c in CLASSES), common_names=tuple(c[3] for c in CLASSES))


def _class_image(y, image_size, rng):
  """Returns a PIL image: a class colour, a bright patch at a class position, and noise."""
  width, height = image_size
  hue = np.array([[0.2, 0.5, 0.2], [0.6, 0.3, 0.2], [0.3, 0.3, 0.7], [0.7, 0.7, 0.3]])[y % 4]
  image = np.ones((height, width, 3)) * hue
  x0 = (y * width) // len(CLASSES)
  image[height // 4: 3 * height // 4, x0: x0 + width // len(CLASSES)] = 1.0
  image += rng.normal(0.0, 0.08, image.shape)
  return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))

