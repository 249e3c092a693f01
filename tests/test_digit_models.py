"""The shipped digit generator and digit CLIP: intact, loadable, and far above chance."""

import numpy as np

from discl_jax import digit_models
from discl_jax import parallel
from discl_jax.data import digits
from discl_jax.diffusion import models as sd_models
from discl_jax.scoring import clip

ZERO_SHOT_FLOOR = 0.85  # measured 0.968 on the whole test split; chance is 0.1


def test_checksums_match():
  assert digit_models.verify() == 19


def test_generator_loads_through_load_sd():
  models = sd_models.load_sd(digit_models.path("sd"))
  assert set(models.params) == {"unet", "vae", "text_encoder"}


def test_digit_clip_zero_shot_accuracy_on_a_fixed_test_batch():
  split = digits.load(0, imbalance_ratio=20.0, max_per_class=120)["test"]
  rows = np.arange(0, len(split), 5)  # 100 images, 10 per class
  scorer = clip.ClipScorer(clip.load_clip(digit_models.path("clip")), parallel.make_mesh(), 50)
  texts = scorer.text_embeddings([f"a photo of the digit {c}" for c in digits.CLASS_NAMES])
  images = scorer.image_embeddings([split.image(i) for i in rows])
  accuracy = np.mean(np.argmax(images @ texts.T, axis=1) == split.labels[rows])
  assert accuracy >= ZERO_SHOT_FLOOR, accuracy
