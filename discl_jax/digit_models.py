"""The project-trained digit generator and digit CLIP shipped with the package.

Made by `experiments/train_digit_models.py` (see assets/digits/README.md); they
load through the same `load_sd` / `load_clip` paths as hub weights.
"""

import hashlib
import importlib.resources
import pathlib

ROOT = pathlib.Path(str(importlib.resources.files("discl_jax").joinpath("assets", "digits")))


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
