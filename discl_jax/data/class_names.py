"""The names prompts and captions use per class: common names where a dataset has them.

Text is built from readable names only: a file-list dataset without
`data.class_names_file` has label numbers for names (and TFDS ImageNet has
WordNet ids such as n01440764), which would make prompts and CLIP texts read
"a photo of 417"; `text_names` refuses them. A name with "/" lists
alternatives, which read as "a or b" (the reference's ImageNet names,
docs/design.md §6 "Class names").
"""

import csv
import pathlib
import re

from absl import logging

LABELS_CSV = "labels.csv"
WORDNET_ID = re.compile(r"^n\d{8}$")
NUMBERED_CLASSES = ("digits_lt",)  # datasets whose classes are numbers: the digits


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


def missing_labels_message(labels):
  """Returns the error for iWildCam's common-name file `labels` missing."""
  return (f"{labels} not found: iWildCam's captions and prompts use the common names of "
          f"FLYP's {LABELS_CSV} (columns y, english; put it beside data.metadata_csv), or set "
          "data.allow_scientific_names=True to build them from the scientific names")


def caption_names(data_config, class_names):
  """Returns the names captions and prompts use per class: common names when known.

  iWildCam: labels.csv beside `data.metadata_csv` (every class must have a
  common name); without it FileNotFoundError, unless
  `data.allow_scientific_names` says to use the class (scientific) names.
  Other datasets: the class names themselves.
  """
  if data_config.name == "iwildcam" and data_config.metadata_csv:
    labels = pathlib.Path(data_config.metadata_csv).parent / LABELS_CSV
    if labels.is_file():
      return read_common_names(labels, class_names)
    if not data_config.get("allow_scientific_names", False):
      raise FileNotFoundError(missing_labels_message(labels))
    logging.warning("%s not found: captions use the scientific names "
                    "(data.allow_scientific_names=True)", labels)
  return tuple(class_names)


def readable(name):
  """Returns `name` with "/"-separated alternatives joined by "or" ("a / b" -> "a or b")."""
  return " or ".join(part.strip() for part in str(name).split("/") if part.strip())


def check_readable(data_config, class_names, what):
  """Returns None; ValueError when `what` would be built from label numbers or WordNet ids.

  Digits-LT's classes are numbers, so its names pass.
  """
  if data_config.name in NUMBERED_CLASSES:
    return
  bad = sorted({str(n) for n in class_names
                if str(n).strip().isdigit() or WORDNET_ID.match(str(n).strip())})
  if bad:
    raise ValueError(
        f"{what} would be built from class names {bad[:5]} (data.name={data_config.name!r}), "
        f"label numbers or WordNet ids, reading 'a photo of {bad[0]}'. Set "
        "data.class_names_file to a file of readable names, one per line in label order "
        "(the README's ImageNet-LT section says where ImageNet's come from)")


def text_names(data_config, class_names, what):
  """Returns the readable per-class names `what` (prompts, CLIP texts, captions) is built from.

  Common names where the dataset has them (`caption_names`), "/" alternatives
  joined by "or"; raises ValueError naming `data.class_names_file` for label
  numbers or WordNet ids (`check_readable`).
  """
  names = caption_names(data_config, class_names)
  check_readable(data_config, names, what)
  return tuple(readable(n) for n in names)
