"""digits-LT and the TFDS sources (tfds.testing.mock_data: nothing is downloaded)."""

import pickle

import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax.data import datasets, digits, longtail, pipeline


def _data_config(**overrides):
  c = config_lib.base_config().data
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.fixture(scope="module")
def digits_lt():
  return datasets.load(_data_config(imbalance_ratio=20.0, max_per_class=120,
                                    val_per_class=5, test_per_class=50))


def test_digits_lt_shapes_labels_and_ids(digits_lt):
  assert set(digits_lt) == {"train", "val", "test"}
  for split in digits_lt.values():
    assert split.pixels.dtype == np.uint8 and split.pixels.shape[1:] == (32, 32, 3)
    assert split.class_names == ("zero", "one", "two", "three", "four", "five",
                                 "six", "seven", "eight", "nine")
    assert all(i.startswith("digits/") and len(i) == len("digits/0000") for i in split.ids)
    assert split.labels.min() >= 0 and split.labels.max() <= 9
  # Channels are equal (grey digits in RGB) and the images are not blank.
  test = digits_lt["test"].pixels
  assert np.array_equal(test[..., 0], test[..., 2]) and test.std() > 30


def test_digits_lt_is_long_tailed_and_splits_are_balanced_and_disjoint(digits_lt):
  np.testing.assert_array_equal(digits_lt["train"].class_counts(),
                                longtail.longtail_counts(10, 120, 20.0))
  np.testing.assert_array_equal(digits_lt["val"].class_counts(), [5] * 10)
  np.testing.assert_array_equal(digits_lt["test"].class_counts(), [50] * 10)
  ids = [set(s.ids) for s in digits_lt.values()]
  assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
  groups = longtail.class_groups(digits_lt["train"].class_counts(), 60, 15)
  assert list(groups[:3]) == ["many", "many", "many"] and groups[-1] == "few"


def test_digits_lt_is_deterministic_and_depends_on_split_seed_only(digits_lt):
  again = datasets.load(_data_config(imbalance_ratio=20.0, max_per_class=120,
                                     val_per_class=5, test_per_class=50))
  other = datasets.load(_data_config(imbalance_ratio=20.0, max_per_class=120,
                                     val_per_class=5, test_per_class=50, split_seed=1))
  for name in ("train", "val", "test"):
    np.testing.assert_array_equal(again[name].ids, digits_lt[name].ids)
    np.testing.assert_array_equal(again[name].pixels, digits_lt[name].pixels)
  assert not np.array_equal(other["train"].ids, digits_lt["train"].ids)
  assert not np.array_equal(other["test"].ids, digits_lt["test"].ids)


def test_training_seed_does_not_move_the_split():
  """Stages load data from `config.data` only: the training `seed` never moves a split."""
  config = config_lib.base_config()
  config.data.imbalance_ratio, config.data.val_per_class = 20.0, 5
  first = datasets.load(config.data)
  config.seed = 7
  second = datasets.load(config.data)
  for name in ("train", "val", "test"):
    np.testing.assert_array_equal(first[name].ids, second[name].ids)


def test_digits_partition_keeps_test_out_of_everything_else(digits_lt):
  parts = digits.partition(0, test_per_class=50)
  assert len(parts["test"]) + len(parts["pool"]) == digits.NUM_IMAGES
  assert not set(parts["test"]) & set(parts["pool"])
  test_ids = {f"digits/{i:04d}" for i in parts["test"]}
  pool_ids = {f"digits/{i:04d}" for i in parts["pool"]}
  assert set(digits_lt["test"].ids) == test_ids
  assert set(digits_lt["train"].ids) | set(digits_lt["val"].ids) <= pool_ids
  # The partition does not depend on the long-tail settings.
  other = datasets.load(_data_config(imbalance_ratio=5.0, max_per_class=0,
                                     val_per_class=2, test_per_class=50))
  np.testing.assert_array_equal(other["test"].ids, digits_lt["test"].ids)
  assert other["train"].class_counts()[0] == 178 - 50 - 2   # 0: the head's remaining count


def test_unknown_dataset_name_is_named():
  with pytest.raises(ValueError, match="unknown data.name 'mnist'"):
    datasets.load(_data_config(name="mnist"))


tfds = pytest.importorskip("tensorflow_datasets")


def test_cifar100_lt_through_tfds_mock_data():
  c = _data_config(name="cifar100_lt", imbalance_ratio=4.0, max_per_class=4,
                   val_per_class=1, prepare=True)  # mock_data: a no-op download_and_prepare
  with tfds.testing.mock_data(num_examples=1500):
    splits = datasets.load(c)
  train, val, test = splits["train"], splits["val"], splits["test"]
  assert train.num_classes == 100
  np.testing.assert_array_equal(train.class_counts(), longtail.longtail_counts(100, 4, 4.0))
  np.testing.assert_array_equal(val.class_counts(), np.ones(100))
  assert len(test) == 1500 and test.pixels.shape == (1500, 32, 32, 3)
  assert train.pixels.dtype == np.uint8
  assert not set(train.ids) & set(val.ids)
  assert train.ids[0].startswith("cifar100/train/") and test.ids[0].startswith("cifar100/test/")


def test_generic_tfds_is_lazy_and_keeps_labels():
  c = _data_config(name="tfds", tfds_name="imagenet2012", tfds_test_split="validation",
                   val_per_class=0, prepare=True)
  with tfds.testing.mock_data(num_examples=12):
    splits = datasets.load(c)
    train, test = splits["train"], splits["test"]
    full = tfds.data_source("imagenet2012", split="train")
    assert len(train) == 12 and len(splits["val"]) == 0 and len(test) == 12
    assert train.num_classes == 1000 and train.class_names[0] == "n01440764"
    for i in (0, 5):
      np.testing.assert_array_equal(train.image(i), full[i]["image"])
      assert train.labels[i] == full[i]["label"]
    sub = train.subset([5, 0])
    np.testing.assert_array_equal(sub.image(0), full[5]["image"])
    assert list(sub.ids) == ["imagenet2012/train/0000005", "imagenet2012/train/0000000"]
    assert test.ids[0] == "imagenet2012/validation/0000000"
    copy = pickle.loads(pickle.dumps(sub))      # what grain workers receive
    np.testing.assert_array_equal(copy.image(1), full[0]["image"])
    picks = np.stack([np.zeros(4, np.int64), np.arange(4)], 1)
    batch = next(iter(pipeline.train_loader([train], picks, image_size=16, batch_size=4,
                                            seed=0, epoch=0, shard=(0, 1))))
    assert batch["image"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(batch["label"], train.labels[batch["row"]])


def test_missing_tfds_name_is_named():
  with pytest.raises(ValueError, match="data.tfds_name"):
    datasets.load(_data_config(name="tfds"))


def test_an_unprepared_tfds_dataset_is_never_downloaded_unless_asked(tmp_path, monkeypatch):
  def no_download(self, *args, **kwargs):
    raise AssertionError(f"download_and_prepare of {self.name} was called")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
  for name, extra in (("cifar100_lt", {}), ("tfds", {"tfds_name": "i_naturalist2018"})):
    c = _data_config(name=name, data_dir=str(tmp_path / "tfds"), **extra)
    with pytest.raises(FileNotFoundError, match=r"not prepared in data_dir .*tfds.*"
                       r"nothing was downloaded.*data.prepare=True"):
      datasets.load(c)
  assert not any((tmp_path / "tfds").rglob("*.array_record*"))
  c.prepare = True
  with pytest.raises(RuntimeError, match="download_and_prepare of i_naturalist2018 was called"):
    datasets.load(c)
