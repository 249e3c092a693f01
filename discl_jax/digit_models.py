"""The project-trained digit models shipped with the package.

The generator ("sd") and CLIP ("clip") were made by
`experiments/train_digit_models.py`, the base classifier ("classifier", a
ResNet-8 train-state item) by `configs/demo.py:base`; see assets/digits/README.md.
They load through the same `load_sd` / `load_clip` / `train.init_checkpoint`
paths as any other checkpoint.
"""

import hashlib
import importlib.resources
import pathlib

ROOT = pathlib.Path(str(importlib.resources.files("discl_jax").joinpath("assets", "digits")))
# The digits-LT partition the shipped models were trained beside: they saw the
# pool of `digits.partition(TRAINED_SPLIT_SEED, TRAINED_TEST_PER_CLASS)`, never its test split.
TRAINED_SPLIT_SEED = 0
TRAINED_TEST_PER_CLASS = 50
KINDS = ("sd", "clip", "classifier")


def path(kind):
  """Returns the checkpoint directory (str) of `kind`: "sd", "clip" or "classifier"."""
  if kind not in KINDS:
    raise ValueError(f"unknown digit model {kind!r}; valid: {', '.join(KINDS)}")
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

  The shipped models saw digits outside one fixed test split only, so a
  digits-LT config that uses them must keep that split (data.split_seed,
  data.test_per_class); the training `seed` is free.
  """
  used = {str(config.diffusion.model), str(config.score.model), str(config.train.clip_model),
          str(config.train.init_checkpoint)}
  if config.data.name != "digits_lt" or not used & {path(kind) for kind in KINDS}:
    return
  expected = {"split_seed": TRAINED_SPLIT_SEED, "test_per_class": TRAINED_TEST_PER_CLASS}
  for key, value in expected.items():
    if int(config.data[key]) != value:
      raise ValueError(
          f"data.{key}={config.data[key]} with the shipped digit models: they were trained on "
          f"digits outside the test split of data.{key}={value} only, so this test split would "
          f"hold training digits; keep data.{key}={value} (vary `seed` for repeated runs)")
