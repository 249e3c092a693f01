"""The generation job list: hard images x strengths x seeds, and the resolution policy.

A job is a manifest row (see `spectrum_store.make_row`): its id, its source
image, the prompt, the strength and the per-level seed index. The sampler gets
the source image resized to a size whose sides are multiples of `multiple`
(8 or the model's total down-sampling factor), keeping its aspect ratio.
"""

import collections
import hashlib
import pathlib

import numpy as np
from PIL import Image

from discl_jax import seeding
from discl_jax.data import records
from discl_jax.data import spectrum_store as ss

# The generation config keys that change a job's image: a store made under other
# values is refused. Strengths and seeds_per_level (they add or leave out jobs),
# slots and the mesh (outputs do not depend on batching) and data paths (source
# ids name the images) may change freely.
FINGERPRINT_KEYS = {
    "diffusion": ("model", "tiny", "dtype", "scheduler", "num_inference_steps",
                  "guidance_scale", "negative_prompt", "resolution"),
    "prompts": ("source", "templates", "description_format"),
    "data": ("name", "tfds_name"),
}


def generation_fingerprint(config):
  """Returns the dict of config values that determine each job's image.

  A descriptions file counts by its content (sha256), not its path.
  """
  fingerprint = {"seed": seeding.generation_seed(config)}
  for section, keys in FINGERPRINT_KEYS.items():
    fingerprint[section] = {k: config[section][k] for k in keys}
  descriptions = ""
  if config.prompts.source == "file":
    path = pathlib.Path(config.prompts.descriptions_file)
    if not path.is_file():
      raise FileNotFoundError(f"prompts.descriptions_file not found: {str(path)!r}")
    descriptions = hashlib.sha256(path.read_bytes()).hexdigest()
  fingerprint["prompts"]["descriptions_sha256"] = descriptions
  return fingerprint


def validate_strengths(strengths):
  """Returns `strengths` as a tuple of floats; ValueError names a bad value.

  Each must lie in (0, 1]; two strengths may not share a file name (lambda to
  two decimals) or a job id (strength to three decimals).
  """
  strengths = tuple(strengths)
  if not strengths:
    raise ValueError("diffusion.strengths is empty; give at least one strength in (0, 1]")
  out, seen = [], {}
  for s in strengths:
    try:
      value = float(s)
    except (TypeError, ValueError):
      raise ValueError(f"diffusion.strengths: {s!r} is not a number") from None
    if not 0.0 < value <= 1.0:
      raise ValueError(f"diffusion.strengths: strength {s!r} is outside (0, 1] "
                       f"(image guidance lambda = 1 - strength)")
    names = (f"lambda{ss.image_guidance(value):.2f}", f"s{value:.3f}")
    other = next((seen[n] for n in names if n in seen), None)
    if other is not None:
      raise ValueError(f"diffusion.strengths: {other!r} and {s!r} give the same file "
                       "name or job id; strengths must differ by at least 0.01")
    seen.update(dict.fromkeys(names, s))
    out.append(value)
  return tuple(out)


def build_rows(hard_rows, prompt_by_source, strengths, seeds_per_level):
  """Returns every job's manifest row: each hard image x strength x seed index.

  Raises KeyError naming a hard image that has no prompt.
  """
  strengths = validate_strengths(strengths)
  if int(seeds_per_level) < 1:
    raise ValueError(f"diffusion.seeds_per_level must be >= 1, got {seeds_per_level}")
  rows = []
  for hard in hard_rows:
    source = hard["source_id"]
    if source not in prompt_by_source:
      raise KeyError(f"prompts.json has no prompt for hard image {source!r}: "
                     "rerun the `prompts` stage after `hard`")
    for strength in strengths:
      for seed in range(int(seeds_per_level)):
        rows.append(ss.make_row(
            source_id=source, label=hard["label"], class_name=hard["class_name"],
            strength=strength, seed=seed, prompt=prompt_by_source[source]))
  paths = collections.Counter(row["path"] for row in rows)
  clashes = [p for p, n in paths.items() if n > 1]
  if clashes:
    raise ValueError(f"two jobs would write the same file, e.g. {clashes[0]}: image ids "
                     "or class names that differ only in unsafe characters")
  return rows


def target_size(height, width, resolution=0, multiple=8):
  """Returns (height, width) for generation: multiples of `multiple`, aspect kept.

  `resolution` 0 keeps the input's own size; otherwise it is the shorter side.
  """
  height, width = int(height), int(width)
  if height < 1 or width < 1:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if resolution < 0:
    raise ValueError(f"diffusion.resolution must be >= 0, got {resolution}")
  scale = 1.0 if resolution == 0 else resolution / min(height, width)
  snap = lambda n: max(multiple, int(round(n * scale / multiple)) * multiple)
  return snap(height), snap(width)


def resize(image, size):
  """Returns uint8 H x W x 3 `image` resized to `size` (height, width), bicubic."""
  image = np.asarray(image)
  if image.shape[:2] == tuple(size):
    return image
  resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC)
  return np.asarray(resized)


def source_sizes(split, indices):
  """Returns ({index: (height, width)}, [bad image messages]) for rows `indices`.

  Every image is decoded once so an unreadable file is found before any work.
  """
  sizes, bad = {}, []
  for i in indices:
    try:
      sizes[int(i)] = split.image(int(i)).shape[:2]
    except records.BadImageError as e:
      bad.append(str(e))
  return sizes, bad
