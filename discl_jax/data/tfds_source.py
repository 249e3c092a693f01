"""TFDS datasets through `tfds.data_source` (ArrayRecord, no TensorFlow at read time).

- `cifar100_lt`: CIFAR-100 in memory; val = `val_per_class` per class from the
  TFDS train split, train = the rest subsampled to the exponential profile,
  test = the TFDS test split.
- `tfds`: any TFDS image classification set (`data.tfds_name`, e.g.
  imagenet2012, i_naturalist2018), read lazily (`TfdsImages`): labels in
  memory (scanned once per dataset version, then read from the
  `label_index` cache), images decoded when asked for. val = `val_per_class` per class from
  train (none when 0), test = `data.tfds_test_split` (default: "validation"
  when the dataset has one, else "test"). `data.class_names_file` replaces
  the dataset's names (imagenet2012's are WordNet ids).

Datasets must be prepared in the ArrayRecord format under `data.data_dir`. A
dataset that is not there is an error naming the data_dir, never a silent
download: only `data.prepare=True` downloads (cifar100, 160 MB) or prepares
(imagenet2012 from `data.manual_dir`) it. Preparing needs TensorFlow; reading
does not. Ids are "{tfds name}/{split}/{record index}".
"""

import logging

import numpy as np

from discl_jax.data import filelists
from discl_jax.data import label_index
from discl_jax.data import longtail
from discl_jax.data.records import LabeledImages


# What TFDS's builders need to prepare a dataset but not to read one (the `prepare` extra).
PREPARE_MODULES = ("tensorflow", "importlib_resources")


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def builder(name, data_dir="", manual_dir="", prepare=False):
  """Returns the prepared TFDS builder of `name`.

  Raises FileNotFoundError naming the data_dir when the dataset is not
  prepared there, unless `prepare` (data.prepare) allows downloading and
  preparing it.
  """
  tfds = _tfds()
  try:
    b = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"data.tfds_name {name!r}: no such TFDS dataset ({e})") from e
  if not prepare:
    if not b.is_prepared():
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in data_dir {str(b.data_dir)!r} "
          f"(data.data_dir={data_dir!r}); nothing was downloaded. Point data.data_dir at "
          f"its prepared copy, prepare it once with `tfds build {name} "
          f"--file_format=array_record`, or set data.prepare=True to download and prepare it.")
    return b
  try:
    b.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
  except Exception as e:  # pylint: disable=broad-except
    missing = _missing_prepare_module(e)
    if missing:
      raise ImportError(
          f"data.prepare=True: preparing TFDS dataset {name!r} needs {missing!r}, which a "
          f"default install leaves out: pip install 'discl-jax[prepare]' (TensorFlow and "
          f"importlib_resources), or prepare it elsewhere with `tfds build {name} "
          f"--file_format=array_record` and point data.data_dir at it") from e
    raise RuntimeError(
        f"TFDS dataset {name!r} is not prepared in data_dir "
        f"{data_dir or tfds.core.constants.DATA_DIR!r} and preparing it failed "
        f"(manual_dir={manual_dir!r}): {type(e).__name__}: {e}. Prepare it once "
        f"with `tfds build {name} --file_format=array_record"
        + (f" --manual_dir={manual_dir}" if manual_dir else "")
        + "` (needs tensorflow) and point data.data_dir at it.") from e
  return b


def _missing_prepare_module(error):
  """Returns the name of the module (PREPARE_MODULES) whose absence caused `error`, or None."""
  while error is not None:
    if isinstance(error, ImportError) and error.name in PREPARE_MODULES:
      return error.name
    error = error.__cause__ or error.__context__
  return None


def _source(b, split, **kwargs):
  try:
    return b.as_data_source(split=split, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"cannot read split {split!r} of TFDS dataset {b.name!r} in {b.data_dir}: "
        f"{type(e).__name__}: {e}. Splits need the array_record file format "
        f"(`tfds convert_format` converts tfrecord data).") from e


def _rgb(image):
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def class_names(b):
  """Returns the names of the `label` ClassLabel feature of builder `b`."""
  return tuple(b.info.features["label"].names)


def in_memory_split(b, split):
  """Returns TFDS split `split` decoded into LabeledImages (pixels in memory)."""
  source = _source(b, split)
  images, labels = [], []
  for i in range(len(source)):
    example = source[i]
    images.append(_rgb(example["image"]))
    labels.append(int(example["label"]))
  ids = np.array([f"{b.name}/{split}/{i:07d}" for i in range(len(labels))])
  return LabeledImages(ids=ids, labels=np.asarray(labels, np.int64),
                       class_names=class_names(b), pixels=np.stack(images))


class TfdsImages:
  """A TFDS split read lazily, with the `LabeledImages` interface.

  `labels`, `ids` and the record `indices` are in memory; `image(i)` decodes
  record `indices[i]`. Pickles without its open data source (grain workers
  reopen it).
  """

  def __init__(self, name, split, data_dir, labels, class_names_, indices=None):
    """`name` is the TFDS name as requested (config / version included)."""
    self.name, self.split, self.data_dir = name, split, data_dir
    self.labels = np.asarray(labels, np.int64)
    self.class_names = tuple(class_names_)
    self.indices = (np.arange(len(self.labels)) if indices is None
                    else np.asarray(indices, np.int64))
    self.ids = np.array([f"{name}/{split}/{i:07d}" for i in self.indices], dtype=str)
    self._source = None

  def __len__(self):
    return len(self.labels)

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  @property
  def num_classes(self):
    """Returns the number of classes of the dataset."""
    return len(self.class_names)

  def class_counts(self):
    """Returns an int array: images per class, indexed by label."""
    return np.bincount(self.labels, minlength=self.num_classes)

  def image(self, index):
    """Returns image `index` decoded as uint8 H x W x 3."""
    if self._source is None:
      b = _tfds().builder(self.name, data_dir=self.data_dir or None,
                          file_format="array_record")
      self._source = _source(b, self.split)
    return _rgb(self._source[int(self.indices[index])]["image"])

  def subset(self, indices):
    """Returns the split restricted to `indices`."""
    indices = np.asarray(indices)
    return TfdsImages(self.name, self.split, self.data_dir, self.labels[indices],
                      self.class_names, self.indices[indices])


def scan_labels(b, split):
  """Returns int64 [N]: the label of every record of `split`.

  Reads serialized records and parses only the tf.Example (no image decoding);
  falls back to full decoding where raw records cannot be read.
  """
  tfds = _tfds()
  source = _source(b, split)
  try:
    raw = _source(b, split,
                  deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    parser = b.info.features._example_parser_np  # pylint: disable=protected-access
    parse = lambda i: parser.parse_example(raw[i])["label"]
    parse(0)
  except Exception as e:  # pylint: disable=broad-except
    logging.info("label scan of %s/%s decodes whole records: %s", b.name, split, e)
    parse = lambda i: source[i]["label"]
  return np.fromiter((int(parse(i)) for i in range(len(source))), np.int64,
                     count=len(source))


def _test_split(b, requested):
  if requested:
    return requested
  return "validation" if "validation" in b.info.splits else "test"


def load(data_config, seed):
  """Returns {"train", "val", "test"} for data.name cifar100_lt or tfds."""
  if data_config.name == "cifar100_lt":
    b = builder("cifar100", data_config.data_dir, data_config.manual_dir, data_config.prepare)
    full = in_memory_split(b, "train")
    test = in_memory_split(b, "test")
    val_idx, rest_idx = longtail.take_per_class(
        full.labels, data_config.val_per_class, seed, "cifar100/val")
    rest = full.subset(rest_idx)
    n_max = data_config.max_per_class or int(rest.class_counts()[0])
    counts = longtail.longtail_counts(full.num_classes, n_max,
                                      data_config.imbalance_ratio)
    return {"train": longtail.subsample_longtail(rest, counts, seed),
            "val": full.subset(val_idx), "test": test}
  if not data_config.tfds_name:
    raise ValueError("data.name='tfds' needs data.tfds_name (e.g. imagenet2012)")
  name, data_dir = data_config.tfds_name, data_config.data_dir
  b = builder(name, data_dir, data_config.manual_dir, data_config.prepare)
  names = class_names(b)
  if data_config.class_names_file:  # e.g. readable names for imagenet2012's WordNet ids
    names = filelists.read_class_names(data_config.class_names_file)
    if len(names) != len(class_names(b)):
      raise ValueError(f"data.class_names_file {data_config.class_names_file} has {len(names)} "
                       f"names; {name} has {len(class_names(b))} classes")
  labels = lambda split: label_index.cached_labels(b, split, scan_labels)
  train = TfdsImages(name, "train", data_dir, labels("train"), names)
  test_split = _test_split(b, data_config.tfds_test_split)
  test = TfdsImages(name, test_split, data_dir, labels(test_split), names)
  val_idx, rest_idx = longtail.take_per_class(
      train.labels, data_config.val_per_class, seed, f"{name}/val")
  return {"train": train.subset(rest_idx), "val": train.subset(val_idx), "test": test}
