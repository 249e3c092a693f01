"""The TFDS label-index cache: written on the first load, reused, invalidated on change."""

import os
import types

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

import tfds_fixture  # pylint: disable=g-import-not-at-top,wrong-import-position
from discl_jax import config as config_lib  # pylint: disable=wrong-import-position
from discl_jax.data import datasets, label_index, tfds_source  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  tfds_fixture.build(root, num_records=40)
  return root


@pytest.fixture
def reads(monkeypatch, tmp_path):
  """Counts records read through tfds_source's data sources; user cache in tmp_path."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  count = {"n": 0}
  open_source = tfds_source._source  # pylint: disable=protected-access

  class Counting:

    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      count["n"] += 1
      return self.source[i]

  monkeypatch.setattr(tfds_source, "_source",
                      lambda *a, **k: Counting(open_source(*a, **k)))
  return count


def _load(data_dir):
  c = config_lib.base_config().data
  c.name, c.tfds_name, c.data_dir, c.val_per_class = (
      "tfds", tfds_fixture.NAME, str(data_dir), 1)
  return datasets.load(c)


def _index_dir(data_dir):
  return data_dir / tfds_fixture.NAME / "1.0.0" / label_index.INDEX_DIR


def _truth(splits):
  """Returns the labels the generator gave each record (index % classes), by split."""
  out = {}
  for name, split in splits.items():
    out[name] = np.array([split._source[int(i)]["index"] % tfds_fixture.NUM_CLASSES  # pylint: disable=protected-access
                          for i in split.indices]) if len(split) else np.zeros(0)
  return out


def test_index_is_written_reused_and_invalidated(data_dir, reads):
  first = _load(data_dir)
  assert reads["n"] >= 40 + 10                       # every train and test record scanned
  files = sorted(p.name for p in _index_dir(data_dir).iterdir())
  assert len(files) == 2 and files[0].startswith("test-") and files[1].startswith("train-")
  for name, split in first.items():
    split.image(0)                                    # opens the source for _truth
  truth = _truth(first)
  for name, split in first.items():
    np.testing.assert_array_equal(split.labels, truth[name])

  reads["n"] = 0
  second = _load(data_dir)
  assert reads["n"] == 0                               # labels came from the index
  for name in first:
    np.testing.assert_array_equal(second[name].labels, first[name].labels)
    np.testing.assert_array_equal(second[name].ids, first[name].ids)

  # A changed data file (here: its modification time) invalidates that split's index.
  train_file = next((data_dir / tfds_fixture.NAME / "1.0.0").glob("*-train.array_record*"))
  st = os.stat(train_file)
  os.utime(train_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  reads["n"] = 0
  third = _load(data_dir)
  assert 40 <= reads["n"] < 50                          # train rescanned, test not
  np.testing.assert_array_equal(third["train"].labels, first["train"].labels)
  assert sorted(p.name for p in _index_dir(data_dir).iterdir()) != files
  assert len(list(_index_dir(data_dir).glob("train-*.npy"))) == 1   # stale index removed


def test_unwritable_data_dir_falls_back_to_user_cache(tmp_path_factory, reads, tmp_path):
  root = tmp_path_factory.mktemp("tfds_readonly")
  tfds_fixture.build(root, num_records=8)
  _index_dir(root).write_text("not a folder")         # the index cannot be written there
  _load(root)
  cached = tmp_path / "cache" / "discl_jax" / "label_index" / tfds_fixture.NAME
  assert len(list(cached.rglob("*.npy"))) == 2
  reads["n"] = 0
  _load(root)
  assert reads["n"] == 0


def test_corrupt_index_is_rescanned(tmp_path_factory, reads):
  root = tmp_path_factory.mktemp("tfds_corrupt")
  b = tfds_fixture.build(root, num_records=8)
  labels = label_index.cached_labels(b, "train", tfds_source.scan_labels)
  path = next(_index_dir(root).glob("train-*.npy"))
  np.save(path, labels[:3])                            # wrong length
  reads["n"] = 0
  again = label_index.cached_labels(b, "train", tfds_source.scan_labels)
  assert reads["n"] >= 8
  np.testing.assert_array_equal(again, labels)
  np.testing.assert_array_equal(np.load(path), labels)


def test_remote_data_dir_is_cached_only_in_the_user_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  remote = types.SimpleNamespace(data_dir="gs://bucket/tfds/imagenet2012/5.1.0")
  identity = {"name": "imagenet2012", "config": "", "version": "5.1.0"}
  assert label_index._dirs(remote, identity) == [  # pylint: disable=protected-access
      tmp_path / "discl_jax" / "label_index" / "imagenet2012" / "default" / "5.1.0"]
