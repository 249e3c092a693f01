"""The project-trained digit generator and digit CLIP shipped with the package.

Made by `experiments/train_digit_models.py` (see assets/digits/README.md); they
load through the same `load_sd` / `load_clip` paths as hub weights.
"""

import hashlib
import importlib.resources
import pathlib

ROOT = pathlib.Path(str(importlib.resources.files("discl_jax").joinpath("assets", "digits")))
# The digits-LT partition the shipped models were trained beside: they saw the
# pool of `digits.partition(TRAINED_SPLIT_SEED, TRAINED_TEST_PER_CLASS)`, never its test split.
TRAINED_SPLIT_SEED = 0
TRAINED_TEST_PER_CLASS = 50


def path(kind):
  """Returns the checkpoint directory (str) of `kind`: "sd" or "clip"."""
  if kind not in ("sd", "clip"):
    raise ValueError(f"unknown digit model {kind!r}; valid: sd, clip")
  return str(ROOT / kind)


def verify():
  """Returns the number of files checked against SHA256SUMS; ValueError names a mismatch."""
  lines = (ROOT / "SHA256SUMS").read_text().splitlines()
  for line in lines:
    digest, name = line.split(maxsplit=1)
    actual = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()
    if actual != digest:
      raise ValueError(f"{ROOT / name}: sha256 {actual} does not match SHA256SUMS ({digest})")
  return len(lines)


def check_heldout(config):
  """Returns None; ValueError if a shipped digit model would be tested on digits it trained on.

  The shipped models saw every digit outside one fixed test split, so a
  digits-LT config that uses them must keep that split (data.split_seed,
  data.test_per_class); the training `seed` is free.
  """
  used = {str(config.diffusion.model), str(config.score.model), str(config.train.clip_model)}
  if config.data.name != "digits_lt" or not used & {path("sd"), path("clip")}:
    return
  expected = {"split_seed": TRAINED_SPLIT_SEED, "test_per_class": TRAINED_TEST_PER_CLASS}
  for key, value in expected.items():
    if int(config.data[key]) != value:
      raise ValueError(
          f"data.{key}={config.data[key]} with the shipped digit models: they were trained on "
          f"every digit outside the test split of data.{key}={value}, so this test split would "
          f"hold training digits; keep data.{key}={value} (vary `seed` for repeated runs)")
