"""The shipped digit generator, digit CLIP and base classifier: intact, loadable, far above chance."""

import pathlib

import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax import digit_models
from discl_jax import parallel
from discl_jax.data import datasets
from discl_jax.data import digits
from discl_jax.diffusion import models as sd_models
from discl_jax.scoring import clip
from discl_jax.train import loop

DEMO_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
ZERO_SHOT_FLOOR = 0.85  # measured 0.968 on the whole test split; chance is 0.1


def test_checksums_match():
  assert digit_models.verify() == 36   # sd 12, clip 7, classifier 17 files


def test_generator_loads_through_load_sd():
  models = sd_models.load_sd(digit_models.path("sd"))
  assert set(models.params) == {"unet", "vae", "text_encoder"}


def test_digit_clip_zero_shot_accuracy_on_a_fixed_test_batch():
  split = digits.load(digit_models.TRAINED_SPLIT_SEED, imbalance_ratio=20.0, max_per_class=120)["test"]
  rows = np.arange(0, len(split), 5)  # 100 images, 10 per class
  scorer = clip.ClipScorer(clip.load_clip(digit_models.path("clip")), parallel.make_mesh(), 50)
  texts = scorer.text_embeddings([f"a photo of the digit {c}" for c in digits.CLASS_NAMES])
  images = scorer.image_embeddings([split.image(i) for i in rows])
  accuracy = np.mean(np.argmax(images @ texts.T, axis=1) == split.labels[rows])
  assert accuracy >= ZERO_SHOT_FLOOR, accuracy


def test_base_classifier_loads_through_init_checkpoint_and_is_trained():
  """The demo's starting point: measured 0.570 test top-1 (Many 0.95, Few 0.18) when it was
  made; chance is 0.1."""
  config = config_lib.load_file(DEMO_CONFIG)
  assert config.train.init_checkpoint == digit_models.path("classifier")
  splits = datasets.load(config.data)
  trainer = loop.Trainer(config, splits["train"].class_counts(), parallel.make_mesh())
  out = trainer.predict(trainer.initial_state(), splits["test"])
  assert np.mean(out["pred"] == out["label"]) == pytest.approx(0.57, abs=0.01)


def test_demo_refuses_a_split_the_shipped_models_trained_on():
  config = config_lib.load_file(DEMO_CONFIG)
  digit_models.check_heldout(config)
  config.seed = 3                      # a training seed is free
  digit_models.check_heldout(config)
  config.data.split_seed = 1
  with pytest.raises(ValueError, match=r"data\.split_seed=1 with the shipped digit models"):
    digit_models.check_heldout(config)
  config.diffusion.model = config.score.model = ""
  with pytest.raises(ValueError, match="data.split_seed=1"):   # the base classifier too
    digit_models.check_heldout(config)
  config.train.init_checkpoint = ""                        # other models: any split
  digit_models.check_heldout(config)
