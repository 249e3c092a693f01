"""The paper's protocol in the shipped configs (issue #22): epoch plan, augmentation, recipes."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax import config_checks
from discl_jax import workdir as wd
from discl_jax.curriculum import CurriculumSpec, plan_epoch
from discl_jax.data import transforms
from discl_jax.data.records import LabeledImages

ROOT = pathlib.Path(__file__).resolve().parents[1]
GROUPS = np.array(["many", "medium", "few", "few"])


def _config(name, arg=None):
  return config_checks.validate(config_lib.load_file(ROOT / "configs" / f"{name}.py", arg))


def _train_and_rows(levels):
  labels = np.repeat([0, 1, 2, 3], [40, 20, 4, 2])
  train = LabeledImages(ids=np.array([f"img{i}" for i in range(len(labels))]), labels=labels,
                        class_names=("a", "b", "c", "d"),
                        pixels=np.zeros([len(labels), 1, 1, 3], np.uint8))
  rows = [{"label": int(labels[i]), "image_guidance": level, "source_id": train.ids[i]}
          for i in np.flatnonzero(labels >= 2) for level in levels]
  return train, rows


def epoch_levels(config):
  """Returns the level each epoch of `config` trains on ("real" for real-only epochs)."""
  train, rows = _train_and_rows(config.curriculum.levels)
  spec = CurriculumSpec.from_config(config.curriculum, train=train, groups=GROUPS,
                                    synthetic_rows=rows, seed=0)
  state, out = spec.initial_state(), []
  for epoch in range(config.train.epochs):
    state, plan = plan_epoch(spec, state, epoch)
    out.append("real" if plan.level is None else plan.level)
  return out


def test_imagenet_lt_trains_the_reference_plan_14_15_15_17_then_4_real():
  config = _config("imagenet_lt")
  assert config.curriculum.stage_epochs == (14, 15, 15, 17) and config.train.epochs == 65
  assert epoch_levels(config) == [0.1] * 14 + [0.3] * 15 + [0.5] * 15 + ["real"] * 21


def test_equal_stages_without_stage_epochs_and_bad_stage_epochs_are_refused():
  config = _config("cifar100_lt")  # 60 curriculum epochs over 5 levels and real: 10 each
  assert epoch_levels(config)[:60] == sum(([v] * 10 for v in (0.5, 0.6, 0.7, 0.8, 0.9)), []) + [
      "real"] * 10
  config = _config("imagenet_lt")
  config.curriculum.stage_epochs = (14, 15, 15)
  with pytest.raises(ValueError, match=r"curriculum.stage_epochs=\(14, 15, 15\) has 3 entries; "
                                       r".*has 4 stages"):
    config_checks.validate(config)
  config.curriculum.stage_epochs = (14, 15, 15, 16)
  with pytest.raises(ValueError, match="sums to 60, not curriculum.curriculum_epochs=61"):
    config_checks.validate(config)
  config.curriculum.schedule = "none"  # a schedule without stages does not use the key
  assert config_checks.validate(config).curriculum.stage_epochs == (14, 15, 15, 16)


@pytest.mark.parametrize("name", ["imagenet_lt", "cifar100_lt", "inat2018"])
def test_paper_configs_use_the_reference_augmentation(name):
  config = _config(name)
  assert tuple(config.data.crop_scale) == (0.08, 1.0) and config.data.color_jitter == 0.4


def test_the_demo_keeps_its_augmentation_values():
  for arg in (None, "base"):
    config = _config("demo", arg)
    assert not config.data.augment
    assert tuple(config.data.crop_scale) == transforms.CROP_SCALE == (0.35, 1.0)
    assert config.data.color_jitter == transforms.JITTER == 0.2


def test_crop_scale_and_jitter_reach_the_transform():
  image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  whole = transforms.train_view("resnet", image, 64, np.random.default_rng(1),
                                crop_scale=(1.0, 1.0), jitter=0.0)
  assert np.array_equal(whole, image) or np.array_equal(whole, image[:, ::-1])
  small = [transforms.train_view("resnet", image, 64, np.random.default_rng(s),
                                 crop_scale=(0.08, 0.08), jitter=0.0) for s in range(3)]
  assert not any(np.array_equal(v, image) for v in small)


def test_imagenet_lt_regenerates_and_cifar_base_takes_ldmlr_recipe():
  imagenet = _config("imagenet_lt")
  assert imagenet.score.regenerate and imagenet.score.max_regenerations == 5
  base = _config("cifar100_lt", "base").train
  assert (base.optimizer, base.learning_rate, base.weight_decay) == ("sgd", 0.1, 5e-4)
  assert tuple(base.lr_milestones) == (100, 150) and base.lr_decay == 0.1
  assert (base.epochs, base.mixup_alpha, base.batch_size) == (200, 0.5, 64)


def _discl(*args):
  return subprocess.run([sys.executable, "-m", "discl_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)


def test_epochs_zero_reports_the_shipped_base_classifier_as_it_is(tmp_path):
  # The README's command runs every stage; the spectrum stages do not touch an evaluation
  # of the base, so this runs its train and eval stages only.
  flags = ["--config=configs/demo.py", "--config.curriculum.schedule=none",
           "--config.train.epochs=0", f"--workdir={tmp_path}"]
  for stage in ("train", "eval"):
    result = _discl(*flags, f"--stage={stage}")
    assert result.returncode == 0, result.stderr[-3000:]
  result = json.loads((tmp_path / wd.TRAIN_RESULT).read_text())
  assert result["evaluated_as_is"] and result["epochs"] == 0 and result["best_epoch"] == 0
  # The README's base row: Many 95.0 / Medium 96.7 / Few 18.0 / All 57.0 (test top-1, %).
  got = [100 * result[f"test/{g}"] for g in ("many", "medium", "few", "all")]
  assert got == pytest.approx([95.0, 96.7, 18.0, 57.0], abs=0.5)
  assert not (tmp_path / wd.CKPT).exists() or not any((tmp_path / wd.CKPT).iterdir())
  report = (tmp_path / wd.REPORT).read_text()
  assert "## Result of train.init_checkpoint as it is (train.epochs=0)" in report
  # Without the base there is nothing to evaluate: refused before any stage.
  config = _config("demo")
  config.train.update(epochs=0, init_checkpoint="")
  with pytest.raises(ValueError, match="train.epochs=0 evaluates train.init_checkpoint as it is; "
                                       "set train.init_checkpoint.*set curriculum.schedule='none'"):
    config_checks.validate(config)
