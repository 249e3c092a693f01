"""File-list datasets: ImageNet-LT split files and WILDS iWildCam's metadata.csv.

ImageNet-LT: `data.train_list` / `val_list` / `test_list`, one "path label"
per line, paths relative to `data.root`; class names from
`data.class_names_file` (one per line) or the label numbers. An empty
`val_list` carves `val_per_class` images per class from train (none when 0).

iWildCam (WILDS v2.0): `data.metadata_csv` with columns split, filename, y;
images at `{data.root}/{filename}`, `data.root` defaulting to the `train/`
folder next to the csv; class names from `data.class_names_file` when set,
else from `categories.csv` beside the csv (columns y, name) when present. Splits: train, id_val, id_test, val (OOD), test (OOD).

At load time every image is checked (`data.verify_images`: "exists" stats the
file, "header" opens it, "decode" decodes it), by VERIFY_THREADS threads with
a progress bar on a terminal; results do not depend on thread timing. A bad
image raises BadImageError naming the first bad file in list order (and its
list line) and the count of bad files, or with `data.on_bad_image="skip"` is
left out and reported; a split that keeps none of its listed images, or skips
more than `data.max_skip_fraction` of them, is an error naming the split, the
root and the first unreadable file. A bad label raises ValueError naming the
file and line. Ids are the paths as listed.
"""

import concurrent.futures
import csv
import logging
import os
import pathlib

import numpy as np
from PIL import Image

from discl_jax import progress
from discl_jax.data import longtail
from discl_jax.data.records import BadImageError, LabeledImages, read_rgb

WILDS_SPLITS = ("train", "id_val", "id_test", "val", "test")
VERIFY = ("exists", "header", "decode")
ON_BAD_IMAGE = ("error", "skip")
VERIFY_THREADS = 16  # image checks are file I/O and PIL decoding, which release the GIL


def check_image(path, verify="exists"):
  """Returns None when `path` passes `verify`, else the reason it does not."""
  if verify not in VERIFY:
    raise ValueError(f"data.verify_images must be one of {VERIFY}, got {verify!r}")
  if not os.path.isfile(path):
    return "file not found"
  if verify == "exists":
    return None
  try:
    if verify == "header":
      with Image.open(path) as im:
        im.size  # pylint: disable=pointless-statement
    else:
      read_rgb(path)
  except BadImageError as e:
    return str(e)
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    return f"cannot decode image: {type(e).__name__}: {e}"
  return None


def check_images(paths, verify="exists", description="checking images"):
  """Returns check_image's result for each of `paths`, in order, checked by a thread pool."""
  if verify not in VERIFY:
    raise ValueError(f"data.verify_images must be one of {VERIFY}, got {verify!r}")
  with concurrent.futures.ThreadPoolExecutor(VERIFY_THREADS) as pool:
    results = pool.map(lambda path: check_image(path, verify), paths)
    return list(progress.counted(results, len(paths), description, lambda result: 1))


def _read_lines(path, what):
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{what} not found: {path}")
  return path.read_text(encoding="utf-8").splitlines()


def read_class_names(path):
  """Returns the non-empty lines of class-names file `path` as a tuple."""
  return tuple(line.strip() for line in _read_lines(path, "class names file")
               if line.strip())


def _parse_label(text, num_classes, where):
  try:
    label = int(text)
  except ValueError:
    raise ValueError(f"{where}: label {text!r} is not an integer") from None
  if label < 0 or (num_classes is not None and label >= num_classes):
    raise ValueError(
        f"{where}: label {label} is out of range [0, {num_classes or 'inf'})")
  return label


def read_split_file(path, num_classes=None):
  """Returns (paths, labels, line numbers) of an ImageNet-LT "path label" file."""
  paths, labels, line_numbers = [], [], []
  for n, line in enumerate(_read_lines(path, "split list file"), start=1):
    if not line.strip():
      continue
    parts = line.strip().rsplit(maxsplit=1)
    if len(parts) != 2:
      raise ValueError(f"{path}:{n}: expected 'path label', got {line.strip()!r}")
    paths.append(parts[0])
    labels.append(_parse_label(parts[1], num_classes, f"{path}:{n}"))
    line_numbers.append(n)
  return paths, np.asarray(labels, np.int64), line_numbers


def _checked(split_name, rel_paths, labels, wheres, root, class_names, data_config,
             report):
  """Returns LabeledImages of the rows whose image passes the check."""
  paths = [os.path.join(root, rel) for rel in rel_paths]
  reasons = check_images(paths, data_config.verify_images, f"checking {split_name} images")
  bad = [i for i, reason in enumerate(reasons) if reason is not None]
  if bad and data_config.on_bad_image != "skip":
    i = bad[0]
    raise BadImageError(f"{reasons[i]}: {paths[i]} (listed at {wheres[i]}); "
                        f"{len(bad)} of {len(paths)} {split_name} images are bad")
  report.extend({"split": split_name, "path": paths[i], "reason": f"{wheres[i]}: {reasons[i]}"}
                for i in bad)
  keep = [i for i, reason in enumerate(reasons) if reason is None]
  _check_skipped(split_name, len(rel_paths), len(keep), report, root, data_config)
  keep = np.asarray(keep, np.int64)
  full = [paths[i] for i in keep]
  return LabeledImages(
      ids=np.asarray(rel_paths, dtype=str)[keep] if len(keep) else np.zeros(0, str),
      labels=np.asarray(labels, np.int64)[keep], class_names=tuple(class_names),
      paths=np.asarray(full, dtype=str) if full else np.zeros(0, str))


def _check_skipped(split_name, listed, kept, report, root, data_config):
  """Raises BadImageError when split `split_name` kept none of its `listed` images or
  skipped more than `data.max_skip_fraction` of them; returns None otherwise."""
  skipped = listed - kept
  if not skipped:
    return
  limit = float(data_config.max_skip_fraction)
  if kept and skipped <= limit * listed:
    return
  first = next(r for r in report if r["split"] == split_name)
  raise BadImageError(
      f"split {split_name!r}: {skipped} of {listed} listed images are unreadable "
      f"({skipped / listed:.1%}; data.max_skip_fraction={limit:g}) under data.root "
      f"{str(root)!r}; e.g. {first['path']}: {first['reason']}")


def load_imagenet_lt(data_config, seed=0):
  """Returns ({"train", "val", "test"}, skipped rows) from ImageNet-LT split files."""
  names = (read_class_names(data_config.class_names_file)
           if data_config.class_names_file else None)
  num_classes = len(names) if names else None
  lists = {"train": data_config.train_list, "val": data_config.val_list,
           "test": data_config.test_list}
  for split in ("train", "test"):
    if not lists[split]:
      raise ValueError(f"data.name='imagenet_lt' needs data.{split}_list")
  parsed = {s: read_split_file(p, num_classes) for s, p in lists.items() if p}
  for split, (paths, _, _) in parsed.items():
    if not paths:
      raise ValueError(f"data.{split}_list {lists[split]} lists no images")
  if names is None:
    num_classes = 1 + max(int(l.max()) for _, l, _ in parsed.values() if len(l))
    names = tuple(str(c) for c in range(num_classes))
  report, splits = [], {}
  for split, (paths, labels, lines) in parsed.items():
    wheres = [f"{lists[split]}:{n}" for n in lines]
    splits[split] = _checked(split, paths, labels, wheres, data_config.root, names,
                             data_config, report)
  if "val" not in splits:
    val_idx, rest_idx = longtail.take_per_class(
        splits["train"].labels, data_config.val_per_class, seed, "imagenet_lt/val")
    splits["val"] = splits["train"].subset(val_idx)
    splits["train"] = splits["train"].subset(rest_idx)
  _log_report(report)
  return splits, report


def _wilds_class_names(csv_dir, num_labels):
  path = csv_dir / "categories.csv"
  names = [str(y) for y in range(num_labels)]
  if not path.is_file():
    return tuple(names)
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not {"y", "name"} <= set(reader.fieldnames or ()):
      raise ValueError(f"{path}: needs columns 'y' and 'name', has {reader.fieldnames}")
    for n, row in enumerate(reader, start=2):
      y = _parse_label(row["y"], None, f"{path}:{n}")
      if y >= len(names):
        names.extend(str(k) for k in range(len(names), y + 1))
      names[y] = row["name"]
  return tuple(names)


def load_iwildcam(data_config):
  """Returns ({WILDS split: LabeledImages}, skipped rows) from metadata.csv."""
  if not data_config.metadata_csv:
    raise ValueError("data.name='iwildcam' needs data.metadata_csv")
  csv_path = pathlib.Path(data_config.metadata_csv)
  if not csv_path.is_file():
    raise FileNotFoundError(f"iWildCam metadata file not found: {csv_path}")
  root = data_config.root or str(csv_path.parent / "train")
  rows = {s: ([], [], []) for s in WILDS_SPLITS}
  with open(csv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = {"split", "filename", "y"} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}")
    for n, row in enumerate(reader, start=2):
      split = row["split"]
      if split not in rows:
        raise ValueError(f"{csv_path}:{n}: unknown split {split!r}; known: {WILDS_SPLITS}")
      rows[split][0].append(row["filename"])
      rows[split][1].append(_parse_label(row["y"], None, f"{csv_path}:{n}"))
      rows[split][2].append(f"{csv_path}:{n}")
  num_labels = 1 + max((max(r[1]) for r in rows.values() if r[1]), default=-1)
  if data_config.class_names_file:
    names = read_class_names(data_config.class_names_file)
    if num_labels > len(names):
      raise ValueError(f"{csv_path}: label {num_labels - 1} has no name in "
                       f"{data_config.class_names_file} ({len(names)} names)")
  else:
    names = _wilds_class_names(csv_path.parent, num_labels)
  report = []
  splits = {s: _checked(s, r[0], r[1], r[2], root, names, data_config, report)
            for s, r in rows.items()}
  _log_report(report)
  return splits, report


def _log_report(report):
  if report:
    logging.warning("skipped %d unreadable image(s), first: %s", len(report),
                    report[0]["path"])


def load(data_config, seed=0):
  """Returns ({split: LabeledImages}, skipped rows) for imagenet_lt or iwildcam."""
  if data_config.on_bad_image not in ON_BAD_IMAGE:
    raise ValueError(f"data.on_bad_image must be one of {ON_BAD_IMAGE}, "
                     f"got {data_config.on_bad_image!r}")
  if data_config.verify_images not in VERIFY:
    raise ValueError(f"data.verify_images must be one of {VERIFY}, "
                     f"got {data_config.verify_images!r}")
  if data_config.name == "imagenet_lt":
    return load_imagenet_lt(data_config, seed)
  return load_iwildcam(data_config)
