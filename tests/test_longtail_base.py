"""The long-tail configs start from a base (docs/design.md §6); `:base` trains one; text needs readable names."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from discl_jax import config as config_lib
from discl_jax import pipeline
from discl_jax import provenance
from discl_jax import workdir as wd
from discl_jax.data import class_names as class_names_lib
from discl_jax.data import upsample
from discl_jax.diffusion import prompts

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_discl_variant_without_base_fails_before_any_stage(tmp_path):
  work = tmp_path / "work"
  result = subprocess.run(
      [sys.executable, "-m", "discl_jax.main", "--config=configs/imagenet_lt.py:runlocal",
       f"--workdir={work}"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert "train.init_checkpoint is empty" in result.stderr
  assert "--config.train.init_checkpoint=PATH" in result.stderr and "`:base`" in result.stderr
  assert not work.exists() or not any(work.iterdir())  # no stage ran, nothing written


@pytest.mark.parametrize("path, arg", [("configs/imagenet_lt.py", "schedule=adaptive"),
                                       ("configs/cifar100_lt.py", "ir=50,runlocal")])
def test_every_discl_variant_refuses_and_base_does_not(tmp_path, path, arg):
  config = config_lib.load_file(ROOT / path, arg)
  with pytest.raises(ValueError, match="train.init_checkpoint is empty"):
    pipeline.run_stages(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()
  pipeline.preflight(config, ("hard", "prompts", "generate", "score"))  # no train: no base needed
  config.train.init_checkpoint = str(tmp_path / "base.pth")
  pipeline.preflight(config, ("train",))
  pipeline.preflight(config_lib.load_file(ROOT / path, arg + ",base"), ("train",))


# cifar100_lt:base takes LDMLR's CIFAR-100-LT recipe (wd, milestones, epochs, batch, mixup).
@pytest.mark.parametrize("path, recipe", [
    ("configs/imagenet_lt.py", (2e-4, (60, 80), 100, 128, 0.2)),
    ("configs/cifar100_lt.py", (5e-4, (100, 150), 200, 64, 0.5))])
def test_base_variant_is_the_reference_recipe(path, recipe):
  c = config_lib.load_file(ROOT / path, "base")
  t = c.train
  weight_decay, milestones, epochs, batch_size, mixup = recipe
  assert (t.optimizer, t.learning_rate, t.momentum, t.nesterov, t.weight_decay) == (
      "sgd", 0.1, 0.9, True, weight_decay)
  assert (t.lr_schedule, tuple(t.lr_milestones), t.lr_decay, t.warmup_epochs) == (
      "step", milestones, 0.1, 5)
  assert (t.epochs, t.batch_size, t.mixup_alpha, t.init_checkpoint) == (
      epochs, batch_size, mixup, "")
  assert c.curriculum.schedule == "none"


def _write_imagenet_lt(root, per_class=(12, 6, 2)):
  """Writes tiny PNGs and ImageNet-LT style lists; returns {split: list path}."""
  rng = np.random.default_rng(0)
  lists = {}
  for split, counts in (("train", per_class), ("val", (2, 2, 2)), ("test", (2, 2, 2))):
    rows = []
    for label, n in enumerate(counts):
      for k in range(n):
        rel = f"{split}/n0000000{label}/{k}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(root / rel)
        rows.append(f"{rel} {label}")
    lists[split] = root / f"ImageNet_LT_{split}.txt"
    lists[split].write_text("\n".join(rows) + "\n")
  return lists


def test_base_trains_on_a_tiny_imagenet_lt(tmp_path):
  lists = _write_imagenet_lt(tmp_path)
  c = config_lib.load_file(ROOT / "configs/imagenet_lt.py", "base,runlocal")
  c.data.update(root=str(tmp_path), train_list=str(lists["train"]), val_list=str(lists["val"]),
                test_list=str(lists["test"]), image_size=32, num_workers=0)
  c.train.update(batch_size=4, epochs=1)
  c.eval.batch_size = 4
  pipeline.run_stages(c, tmp_path / "work", names=("train",))
  rows = wd.read_jsonl(wd.path(tmp_path / "work", wd.METRICS))
  assert len(rows) == 1 and rows[0]["lr"] == pytest.approx(0.1 / 5)  # warm-up epoch 1 of 5
  assert np.isfinite(rows[0]["loss"])
  result = json.loads(wd.path(tmp_path / "work", wd.TRAIN_RESULT).read_text())
  assert "test/all" in result


@pytest.mark.parametrize("names", [("0", "1", "2"), ("n01440764", "goldfish")])
def test_text_from_numbers_or_wordnet_ids_is_refused(names):
  data = config_lib.base_config().data
  data.name = "imagenet_lt"
  with pytest.raises(ValueError, match=f"class names .*'{names[0]}'.*data.class_names_file"):
    class_names_lib.text_names(data, names, "score's CLIP texts")
  data.name = "digits_lt"  # the digits are numbers
  assert class_names_lib.text_names(data, names, "texts") == names


def test_prompts_stage_refuses_numeric_names(tmp_path):
  from discl_jax.stages import prompts_stage  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.data.name = "imagenet_lt"
  wd.append_jsonl(wd.path(tmp_path, wd.HARD),
                  [{"source_id": "a.png", "label": 417, "class_name": "417"}])
  with pytest.raises(ValueError, match="prompts.*'417'.*data.class_names_file"):
    prompts_stage.run(config, tmp_path)
  assert not wd.path(tmp_path, wd.PROMPTS).exists()


def test_slash_alternatives_read_as_or():
  data = config_lib.base_config().data
  data.name = "imagenet_lt"
  assert class_names_lib.text_names(data, ("baluster / handrail", "tench"), "t") == (
      "baluster or handrail", "tench")
  assert prompts.display_name("cardboard_box / carton") == "cardboard box or carton"


def test_source_upsample_scales_small_sources_up_only():
  image = np.random.default_rng(0).integers(0, 255, (32, 48, 3), np.uint8)
  assert upsample.upsample(image, 128).shape == (128, 192, 3)
  assert upsample.upsample(image, 0) is image
  assert upsample.upsample(image, 16) is image
  big = upsample.upsample(np.full((32, 32, 3), 77, np.uint8), 128)
  assert big.dtype == np.uint8 and np.all(big == 77)
  with pytest.raises(ValueError, match="diffusion.source_upsample"):
    upsample.upsample(image, -1)

  class Split:
    ids = ("x",)

    def image(self, index):
      del index
      return image

    def __len__(self):
      return 1

  wrapped = upsample.upsampled(Split(), 128)
  assert wrapped.image(0).shape == (128, 192, 3) and wrapped.ids == ("x",) and len(wrapped) == 1


def test_cifar100_lt_follows_the_rebuttal_and_records_upsampling():
  c = config_lib.load_file(ROOT / "configs/cifar100_lt.py", "ir=100")
  assert c.diffusion.source_upsample == 128
  assert tuple(c.curriculum.levels) == (0.5, 0.6, 0.7, 0.8, 0.9)
  assert provenance.generation_fingerprint(c)["diffusion"]["source_upsample"] == 128
  demo = config_lib.load_file(ROOT / "configs/demo.py")
  assert "source_upsample" not in provenance.generation_fingerprint(demo)["diffusion"]


def test_tfds_class_names_file_replaces_wordnet_ids(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from discl_jax.data import datasets  # pylint: disable=g-import-not-at-top
  data = config_lib.base_config().data
  data.update(name="tfds", tfds_name="imagenet2012", tfds_test_split="validation",
              val_per_class=0, prepare=True)  # mock_data: a no-op download_and_prepare
  names = tmp_path / "names.txt"
  names.write_text("".join(f"class {i}\n" for i in range(1000)))
  with tfds.testing.mock_data(num_examples=4):
    assert datasets.load(data)["train"].class_names[0] == "n01440764"
    data.class_names_file = str(names)
    train = datasets.load(data)["train"]
    assert train.class_names[0] == "class 0"
    class_names_lib.check_readable(data, train.class_names, "texts")
    names.write_text("tench\n")
    with pytest.raises(ValueError, match="has 1 names; imagenet2012 has 1000 classes"):
      datasets.load(data)
