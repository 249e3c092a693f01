"""The generation job list: hard images x strengths x seeds, and the resolution policy.

A job is a manifest row (see `spectrum_store.make_row`): its id, its source
image, the prompt, the strength and the per-level seed index. The sampler gets
the source image (optionally first resized to a fixed `diffusion.source_size`)
at a size whose sides are multiples of `multiple` (8 or the model's total
down-sampling factor): at `resolution=0` its own size rounded down with a
LANCZOS resize, as diffusers' image processor does (docs/design.md §5.3), else
scaled to that shorter side, aspect kept.
"""

import collections

import numpy as np
from PIL import Image

from discl_jax import provenance
from discl_jax.data import records
from discl_jax.data import spectrum_store as ss


def check_provenance(config, workdir, store, *, record=True):
  """Checks the generation fingerprint at `store`'s generation.json (`provenance.check_stage`);
  returns True when it recorded it, a fresh spectrum.

  `record=False` only compares (`generate` checks so before its model loads and
  records once it loaded, so a model that fails to load leaves no record that
  would refuse the corrected config); writes nothing then.
  """
  fingerprint = provenance.fingerprint(config, "generate")
  target, outputs = store.root / ss.GENERATION, [store.root]
  if not record:
    provenance.check_stage_unchanged(workdir, "generate", fingerprint, target=target,
                                     outputs=outputs)
    return False
  return provenance.check_stage(workdir, "generate", config, fingerprint, target=target,
                                outputs=outputs)

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


def grid_rows(rows, diffusion_config):
  """Returns the manifest `rows` that are jobs of this config's grid, in order.

  The grid is `diffusion.strengths` x seed indices below `diffusion.seeds_per_level`
  (regeneration attempts of those jobs included). A store may hold more: a
  run with a larger grid adds images to it, and every stage that reads the
  store takes only its own config's jobs, so both configs keep working.
  """
  wanted = {f"{float(s):.3f}" for s in diffusion_config.strengths}
  seeds = int(diffusion_config.seeds_per_level)
  return [row for row in rows
          if f"{float(row['strength']):.3f}" in wanted and int(row["seed"]) < seeds]


def build_rows(hard_rows, prompt_by_source, strengths, seeds_per_level):
  """Returns every job's manifest row: each hard image x strength x seed index.

  `prompt_by_source` maps a source id to its prompts per seed index
  (prompts.json "sources"). Raises KeyError naming a hard image that has no
  prompt, ValueError when its list is not one prompt per seed index.
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
    per_seed = prompt_by_source[source]
    if not isinstance(per_seed, list) or len(per_seed) < int(seeds_per_level):
      raise ValueError(f"prompts.json gives hard image {source!r} {per_seed!r}, not a prompt "
                       f"per seed index 0..{int(seeds_per_level) - 1} "
                       "(diffusion.seeds_per_level): rerun the `prompts` stage")
    for strength in strengths:
      for seed in range(int(seeds_per_level)):
        rows.append(ss.make_row(
            source_id=source, label=hard["label"], class_name=hard["class_name"],
            strength=strength, seed=seed, prompt=per_seed[seed]))
  paths = collections.Counter(row["path"] for row in rows)
  clashes = [p for p, n in paths.items() if n > 1]
  if clashes:
    raise ValueError(f"two jobs would write the same file, e.g. {clashes[0]}: image ids "
                     "or class names that differ only in unsafe characters")
  return rows


def target_size(height, width, resolution=0, multiple=8):
  """Returns (height, width) for generation: multiples of `multiple`.

  `resolution` 0: the input's own size rounded down (docs/design.md §5.3);
  otherwise the shorter side becomes `resolution`, aspect kept (rounded).
  """
  height, width = int(height), int(width)
  if height < 1 or width < 1:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if resolution < 0:
    raise ValueError(f"diffusion.resolution must be >= 0, got {resolution}")
  if resolution == 0:
    return tuple(max(multiple, n // multiple * multiple) for n in (height, width))
  scale = resolution / min(height, width)
  snap = lambda n: max(multiple, int(round(n * scale / multiple)) * multiple)
  return snap(height), snap(width)


def source_size(height, width, fixed=(0, 0)):
  """Returns (height, width) of a source after the fixed pre-resize `fixed` = (width, height).

  (0, 0) leaves the size alone; ValueError names a malformed `diffusion.source_size`.
  """
  fixed = tuple(int(v) for v in fixed)
  if len(fixed) != 2 or min(fixed) < 0 or (0 in fixed and fixed != (0, 0)):
    raise ValueError(f"diffusion.source_size must be (width, height) > 0 or (0, 0), got {fixed}")
  return (int(height), int(width)) if fixed == (0, 0) else (fixed[1], fixed[0])


def resize(image, size, resample="bicubic"):
  """Returns uint8 H x W x 3 `image` resized to `size` (height, width), bicubic or lanczos."""
  image = np.asarray(image)
  if image.shape[:2] == tuple(size):
    return image
  filters = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
  resized = Image.fromarray(image).resize((size[1], size[0]), filters[resample])
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
