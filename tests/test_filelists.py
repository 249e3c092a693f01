"""File-list readers on files the test writes: ImageNet-LT lists and iWildCam's metadata.csv."""

import threading
import time

import iwildcam_fixture
import numpy as np
import pytest
from PIL import Image

from discl_jax import config as config_lib
from discl_jax.data import datasets, filelists, pipeline
from discl_jax.data.records import BadImageError


def _data_config(**overrides):
  c = config_lib.base_config().data
  c.max_skip_fraction = 0.5  # the fixtures' splits hold a handful of images
  for key, value in overrides.items():
    c[key] = value
  return c


def _write_image(path, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(path)


@pytest.fixture
def imagenet_lt(tmp_path):
  """Writes 3 classes of tiny PNGs and the three split lists; returns the data config."""
  root = tmp_path / "images"
  lines = {"train": [], "val": [], "test": []}
  for split, per_class in (("train", (5, 3, 1)), ("val", (1, 1, 1)), ("test", (2, 2, 2))):
    for label, n in enumerate(per_class):
      for k in range(n):
        rel = f"{split}/c{label}/img{k}.png"
        _write_image(root / rel, 40 * label + k)
        lines[split].append(f"{rel} {label}")
  files = {}
  for split, rows in lines.items():
    files[split] = tmp_path / f"ImageNet_LT_{split}.txt"
    files[split].write_text("\n".join(rows) + "\n")
  names = tmp_path / "classnames.txt"
  names.write_text("tench\ngoldfish\nshark\n")
  return _data_config(name="imagenet_lt", root=str(root), train_list=str(files["train"]),
                      val_list=str(files["val"]), test_list=str(files["test"]),
                      class_names_file=str(names))


def test_imagenet_lt_lists_load(imagenet_lt):
  splits = datasets.load(imagenet_lt)
  np.testing.assert_array_equal(splits["train"].class_counts(), [5, 3, 1])
  np.testing.assert_array_equal(splits["val"].class_counts(), [1, 1, 1])
  np.testing.assert_array_equal(splits["test"].class_counts(), [2, 2, 2])
  train = splits["train"]
  assert train.class_names == ("tench", "goldfish", "shark")
  assert train.ids[0] == "train/c0/img0.png"
  assert train.image(5).shape == (12, 10, 3) and train.image(5)[0, 0, 0] == 40


def test_imagenet_lt_without_val_list_carves_val_from_train(imagenet_lt):
  imagenet_lt.val_list = ""
  imagenet_lt.val_per_class = 1
  splits = datasets.load(imagenet_lt)
  np.testing.assert_array_equal(splits["val"].class_counts(), [1, 1, 1])
  np.testing.assert_array_equal(splits["train"].class_counts(), [4, 2, 0])
  assert not set(splits["val"].ids) & set(splits["train"].ids)


def test_missing_list_file_is_named(imagenet_lt, tmp_path):
  imagenet_lt.test_list = str(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    datasets.load(imagenet_lt)


@pytest.mark.parametrize("label, message", [
    ("seven", "label 'seven' is not an integer"),
    ("3", r"label 3 is out of range \[0, 3\)"),
    ("-1", "label -1 is out of range"),
])
def test_bad_label_names_file_and_line(imagenet_lt, label, message):
  path = imagenet_lt.train_list
  with open(path, "a") as f:
    f.write(f"train/c0/img0.png {label}\n")
  with pytest.raises(ValueError, match=f"ImageNet_LT_train.txt:10: {message}"):
    datasets.load(imagenet_lt)


def test_missing_image_errors_or_is_skipped_and_reported(imagenet_lt):
  with open(imagenet_lt.test_list, "a") as f:
    f.write("test/c1/gone.png 1\n")
  with pytest.raises(BadImageError, match=r"file not found: .*test/c1/gone.png .*ImageNet_LT_test.txt:7"):
    datasets.load(imagenet_lt)
  imagenet_lt.on_bad_image = "skip"
  skipped = []
  splits = datasets.load(imagenet_lt, skipped=skipped)
  assert len(splits["test"]) == 6
  assert len(skipped) == 1 and skipped[0]["split"] == "test"
  assert skipped[0]["path"].endswith("test/c1/gone.png")
  assert "ImageNet_LT_test.txt:7" in skipped[0]["reason"]


@pytest.fixture
def corrupt_train(imagenet_lt):
  """Overwrites one train image with bytes that are not an image; returns its path."""
  bad = imagenet_lt.root + "/train/c1/img2.png"
  with open(bad, "wb") as f:
    f.write(b"this is not a png")
  return bad


def test_unreadable_image_found_at_load_with_header_check(imagenet_lt, corrupt_train):
  imagenet_lt.verify_images = "header"
  with pytest.raises(BadImageError, match="train/c1/img2.png"):
    datasets.load(imagenet_lt)
  imagenet_lt.on_bad_image = "skip"
  skipped = []
  splits = datasets.load(imagenet_lt, skipped=skipped)
  np.testing.assert_array_equal(splits["train"].class_counts(), [5, 2, 1])
  assert [s["path"] for s in skipped] == [corrupt_train]


def test_unreadable_image_found_in_the_pipeline(imagenet_lt, corrupt_train):
  train = datasets.load(imagenet_lt)["train"]     # "exists" check passes it
  bad_row = int(np.flatnonzero(train.paths == corrupt_train)[0])
  picks = np.stack([np.zeros(len(train), np.int64), np.arange(len(train))], 1)
  loader = pipeline.train_loader([train], picks, image_size=8, batch_size=3, seed=0,
                                 epoch=0, shard=(0, 1))
  with pytest.raises(BadImageError, match="train/c1/img2.png"):
    list(loader)
  loader = pipeline.train_loader([train], picks, image_size=8, batch_size=3, seed=0,
                                 epoch=0, shard=(0, 1), on_bad_image="skip")
  batches = list(loader)
  rows = np.concatenate([b["row"] for b in batches])
  assert len(batches) == 2 and bad_row not in rows and len(set(rows)) == 6
  assert len(loader.skipped) == 1 and "train/c1/img2.png" in loader.skipped[0]
  ev_loader = pipeline.eval_loader(train, image_size=8, batch_size=4, shard=(0, 1),
                                   on_bad_image="skip")
  ev = list(ev_loader)
  assert len(ev_loader.skipped) == 1
  mask = np.concatenate([b["mask"] for b in ev])
  np.testing.assert_array_equal(np.flatnonzero(mask == 0), [bad_row] + [9, 10, 11])


def test_bad_option_values_are_named(imagenet_lt):
  imagenet_lt.on_bad_image = "ignore"
  with pytest.raises(ValueError, match="data.on_bad_image .* 'ignore'"):
    datasets.load(imagenet_lt)
  imagenet_lt.on_bad_image = "error"
  imagenet_lt.verify_images = "all"
  with pytest.raises(ValueError, match="data.verify_images .* 'all'"):
    datasets.load(imagenet_lt)


def test_decode_check_finds_a_truncated_image(imagenet_lt):
  path = imagenet_lt.root + "/test/c2/img1.png"
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])                      # header intact, pixels cut
  imagenet_lt.verify_images = "decode"
  imagenet_lt.on_bad_image = "skip"
  skipped = []
  splits = datasets.load(imagenet_lt, skipped=skipped)
  assert [s["path"] for s in skipped] == [path] and len(splits["test"]) == 5
  assert "cannot decode" in skipped[0]["reason"]


def test_iwildcam_metadata_csv(tmp_path):
  tiny = iwildcam_fixture.write_tiny_iwildcam(tmp_path / "iwildcam_v2.0", image_size=(16, 9))
  splits = datasets.load(_data_config(name="iwildcam", metadata_csv=str(tiny.metadata_csv)))
  assert set(splits) == set(filelists.WILDS_SPLITS)
  per_class = iwildcam_fixture.DEFAULT_PER_CLASS
  for name, split in splits.items():
    np.testing.assert_array_equal(split.class_counts(), [per_class[name]] * 4)
    assert split.class_names == tiny.class_names
  rows = [r for r in tiny.rows if r["split"] == "val"]
  assert list(splits["val"].ids) == [r["filename"] for r in rows]
  assert splits["val"].image(0).shape == (9, 16, 3)


def test_iwildcam_errors_name_the_file(tmp_path):
  tiny = iwildcam_fixture.write_tiny_iwildcam(tmp_path / "w", image_size=(16, 9))
  c = _data_config(name="iwildcam", metadata_csv=str(tmp_path / "missing.csv"))
  with pytest.raises(FileNotFoundError, match="missing.csv"):
    datasets.load(c)
  text = tiny.metadata_csv.read_text().splitlines()
  first = text[1].split(",")
  first[0] = "holdout"
  tiny.metadata_csv.write_text("\n".join([text[0], ",".join(first)] + text[2:]) + "\n")
  c.metadata_csv = str(tiny.metadata_csv)
  with pytest.raises(ValueError, match=r"metadata.csv:2: unknown split 'holdout'"):
    datasets.load(c)
  (tiny.root / "train" / tiny.rows[-1]["filename"]).unlink()
  tiny.metadata_csv.write_text("\n".join(text) + "\n")
  c.on_bad_image = "skip"
  skipped = []
  splits = datasets.load(c, skipped=skipped)
  assert len(skipped) == 1 and skipped[0]["split"] == "test"
  assert skipped[0]["path"].endswith(tiny.rows[-1]["filename"])
  assert len(splits["test"]) == len([r for r in tiny.rows if r["split"] == "test"]) - 1


def test_a_split_with_no_readable_image_or_too_many_skipped_is_an_error(imagenet_lt, tmp_path):
  imagenet_lt.on_bad_image = "skip"
  imagenet_lt.root = str(tmp_path / "wrong_root")
  with pytest.raises(BadImageError, match=r"split 'train': 9 of 9 listed images are unreadable"
                     r".*wrong_root"):
    datasets.load(imagenet_lt)
  imagenet_lt.root = str(tmp_path / "images")
  (tmp_path / "images" / "test" / "c1" / "img0.png").unlink()
  imagenet_lt.max_skip_fraction = 0.1
  with pytest.raises(BadImageError, match=r"split 'test': 1 of 6 .*max_skip_fraction=0.1"):
    datasets.load(imagenet_lt)
  imagenet_lt.max_skip_fraction = 0.2
  assert len(datasets.load(imagenet_lt)["test"]) == 5


def test_images_are_checked_in_parallel_and_results_keep_list_order(imagenet_lt, monkeypatch):
  """Checks overlap in time (a 2-party barrier would time out if serial); the later-listed
  bad files finish first, yet the error names the first-listed one and the report keeps list order."""
  barrier = threading.Barrier(2, timeout=10)
  check = filelists.check_image

  def slow_check(path, verify="exists"):
    if path.endswith("train/c0/img0.png") or path.endswith("train/c0/img1.png"):
      barrier.wait()                                  # both must be in flight at once
    if "train/c0/img" in path:
      time.sleep(0.05 * (5 - int(path[-5])))           # earlier files finish later
    bad = path.endswith(("train/c0/img1.png", "train/c0/img3.png"))
    return "bad on purpose" if bad else check(path, verify)

  monkeypatch.setattr(filelists, "check_image", slow_check)
  with pytest.raises(BadImageError,
                     match=r"bad on purpose: .*train/c0/img1.png .*ImageNet_LT_train.txt:2\); "
                           r"2 of 9 train images are bad"):
    datasets.load(imagenet_lt)
  imagenet_lt.on_bad_image = "skip"
  skipped = []
  splits = datasets.load(imagenet_lt, skipped=skipped)
  assert [s["path"][-17:] for s in skipped] == ["train/c0/img1.png", "train/c0/img3.png"]
  assert list(splits["train"].ids[:3]) == ["train/c0/img0.png", "train/c0/img2.png",
                                           "train/c0/img4.png"]
