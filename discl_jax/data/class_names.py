"""The names prompts and captions use per class: common names where a dataset has them."""

import csv
import pathlib

from absl import logging

LABELS_CSV = "labels.csv"


def read_common_names(path, class_names):
  """Returns the common name of each class (tuple, indexed by label) from labels.csv `path`.

  The file has columns y and english (the FLYP / WILDS labels.csv). Raises
  ValueError naming the file and every class without a common name.
  """
  path = pathlib.Path(path)
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not {"y", "english"} <= set(reader.fieldnames or ()):
      raise ValueError(f"{path}: needs columns 'y' and 'english', has {reader.fieldnames}")
    names = {}
    for n, row in enumerate(reader, start=2):
      try:
        y = int(row["y"])
      except ValueError:
        raise ValueError(f"{path}:{n}: y {row['y']!r} is not an integer") from None
      if (row["english"] or "").strip():
        names[y] = row["english"].strip()
  missing = [f"{y} ({name!r})" for y, name in enumerate(class_names) if y not in names]
  if missing:
    raise ValueError(f"{path}: no common name (column 'english') for class(es) "
                     f"{', '.join(missing)}")
  return tuple(names[y] for y in range(len(class_names)))


def caption_names(data_config, class_names):
  """Returns the names captions and prompts use per class: common names when known.

  iWildCam: labels.csv beside `data.metadata_csv` when present (every class
  must have a common name); otherwise the class names themselves.
  """
  if data_config.name == "iwildcam" and data_config.metadata_csv:
    labels = pathlib.Path(data_config.metadata_csv).parent / LABELS_CSV
    if labels.is_file():
      return read_common_names(labels, class_names)
    logging.warning("%s not found: captions use the class names", labels)
  return tuple(class_names)
