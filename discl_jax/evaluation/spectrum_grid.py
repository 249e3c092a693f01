"""The spectrum grid: one row per source image, the real image then one column per level.

`generate` draws it from the images; `score` draws it again with each cell's
CLIP text score, rejected cells (below `score.threshold`, or unreadable)
framed in red.
"""

import collections

import numpy as np
from absl import logging
from PIL import Image
from PIL import ImageDraw

from discl_jax import workdir as wd
from discl_jax.data import records
from discl_jax.data import spectrum_store
from discl_jax.scoring import acceptance

HEADER = 14       # pixels of column titles above the cells
BACKGROUND = 255  # page colour
MISSING = 200     # grey cell where an image does not exist (yet)
REJECTED = (220, 30, 30)  # frame of a cell the score stage rejected
FRAME = 3         # its width in pixels


def grid_size(num_rows, num_cols, cell=96, pad=2):
  """Returns (height, width) in pixels of a grid of `num_rows` x `num_cols` cells."""
  return (HEADER + num_rows * (cell + pad) + pad, num_cols * (cell + pad) + pad)


def _fit(image, cell):
  """Returns `image` scaled to fit a `cell` square, centred on the background."""
  out = np.full((cell, cell, 3), BACKGROUND, np.uint8)
  if image is None:
    out[:] = MISSING
    return out
  image = Image.fromarray(np.asarray(image, np.uint8))
  scale = cell / max(image.size)
  w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
  image = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))
  top, left = (cell - h) // 2, (cell - w) // 2
  out[top:top + h, left:left + w] = image
  return out


def make_grid(cells, column_titles, cell=96, pad=2, captions=None, rejected=None):
  """Returns a uint8 H x W x 3 grid of `cells` (rows of images or None) under titles.

  Every row must have len(column_titles) entries; None draws a grey cell.
  `captions` (rows of text or None, like `cells`) are written on the cells'
  bottom edge; cells marked True in `rejected` get a red frame.
  """
  num_cols = len(column_titles)
  for r, row in enumerate(cells):
    if len(row) != num_cols:
      raise ValueError(f"grid row {r} has {len(row)} cells, expected {num_cols}")
  height, width = grid_size(len(cells), num_cols, cell, pad)
  canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
  for r, row in enumerate(cells):
    for c, image in enumerate(row):
      top, left = HEADER + pad + r * (cell + pad), pad + c * (cell + pad)
      canvas[top:top + cell, left:left + cell] = _fit(image, cell)
  picture = Image.fromarray(canvas)
  draw = ImageDraw.Draw(picture)
  for c, title in enumerate(column_titles):
    draw.text((pad + c * (cell + pad) + 2, 1), str(title), fill=(0, 0, 0))
  for r in range(len(cells)):
    for c in range(num_cols):
      top, left = HEADER + pad + r * (cell + pad), pad + c * (cell + pad)
      if rejected is not None and rejected[r][c]:
        draw.rectangle((left, top, left + cell - 1, top + cell - 1), outline=REJECTED,
                       width=FRAME)
      text = captions[r][c] if captions is not None else None
      if text:
        draw.rectangle((left + FRAME, top + cell - 13, left + 6 * len(text) + FRAME + 3,
                        top + cell - FRAME - 1), fill=(255, 255, 255))
        draw.text((left + FRAME + 1, top + cell - 13), text, fill=(0, 0, 0))
  return np.asarray(picture)


def spectrum_cells(sources, rows, levels, load, seed=0):
  """Returns grid rows: for each (source_id, real image), the real image then each level.

  `rows` are manifest rows, `load(row)` returns a row's image, `levels` are the
  image-guidance values (one column each); the per-level seed `seed` is shown.
  """
  return [[real] + [None if row is None else load(row) for row in line]
          for (_, real), line in zip(sources, cell_rows([s for s, _ in sources], rows, levels,
                                                        seed))]


def cell_rows(source_ids, rows, levels, seed=0):
  """Returns per source id the manifest row (or None) of each level at per-level seed `seed`."""
  by_key = {(row["source_id"], f"{row['image_guidance']:.2f}", row["seed"]): row
            for row in rows if not row.get("attempt")}  # first images, not regenerations
  return [[by_key.get((source_id, f"{level:.2f}", seed)) for level in levels]
          for source_id in source_ids]


def score_marks(line_rows, threshold):
  """Returns (captions, rejected) of one grid row's manifest rows: the CLIP text score
  as text ("" for the real column, "error" for an unreadable image) and whether
  the score stage rejected the cell."""
  captions, rejected = [""], [False]
  for row in line_rows:
    scored = row is not None and acceptance.is_scored(row)
    if not scored:
      captions.append("")
    elif row.get("score_error") is not None:
      captions.append("error")
    else:
      captions.append(f"{row['clip_text']:.3f}")
    rejected.append(scored and not acceptance.is_accepted(row, threshold))
  return captions, rejected


def write_scored_grids(workdir, rows, hard_rows, real_image, threshold, sources_per_class):
  """Writes workdir/spectrum_grid_{class}.png with CLIP scores and rejected cells; returns paths.

  `rows` are the scored manifest rows, `real_image(source_id)` returns a
  source's uint8 image (BadImageError draws a grey cell).
  """
  if sources_per_class <= 0 or not rows:
    return []
  levels = sorted({float(r["image_guidance"]) for r in rows}, reverse=True)
  by_class = collections.defaultdict(list)
  for hard in hard_rows:
    if len(by_class[hard["class_name"]]) < sources_per_class:
      by_class[hard["class_name"]].append(hard["source_id"])
  root = wd.path(workdir, wd.SPECTRUM)
  titles = ["real"] + [f"lambda {level:.2f}" for level in levels]
  written = []
  for class_name, sources in by_class.items():
    lines = cell_rows(sources, rows, levels)
    cells, captions, rejected = [], [], []
    for source, line in zip(sources, lines):
      cells.append([_read_or_none(lambda: real_image(source))] + [
          None if row is None else _read_or_none(lambda row=row: records.read_rgb(root / row["path"]))
          for row in line])
      text, marks = score_marks(line, threshold)
      captions.append(text)
      rejected.append(marks)
    grid = make_grid(cells, titles, captions=captions, rejected=rejected)
    target = wd.path(workdir, f"spectrum_grid_{spectrum_store.safe_component(class_name)}.png")
    wd.atomic_write_bytes(target, spectrum_store.encode_png(grid))
    written.append(target)
  logging.info("score: drew %d spectrum grid(s) with CLIP scores (rejected cells framed red)",
               len(written))
  return written


def _read_or_none(read):
  try:
    return read()
  except records.BadImageError:
    return None


def write_spectrum_grids(config, workdir, store, train_image, index, hard_rows):
  """Writes workdir/spectrum_grid_{class}.png per hard class; returns their paths.

  `train_image(i)` is the (upsampled) source image of train row i; `index` maps source id -> i.
  """
  if config.diffusion.grid_sources <= 0:
    return []
  levels = sorted({spectrum_store.image_guidance(s) for s in config.diffusion.strengths},
                  reverse=True)
  rows = store.rows()
  by_class = collections.defaultdict(list)
  for hard in hard_rows:
    if len(by_class[hard["class_name"]]) < config.diffusion.grid_sources:
      by_class[hard["class_name"]].append(hard["source_id"])
  titles = ["real"] + [f"lambda {level:.2f}" for level in levels]
  load = lambda row: records.read_rgb(store.image_path(row))
  written = []
  for class_name, sources in by_class.items():
    real = []
    for source in sources:
      try:
        real.append((source, train_image(index[source])))
      except records.BadImageError:
        real.append((source, None))
    cells = spectrum_cells(real, rows, levels, load)
    grid = make_grid(cells, titles)
    target = wd.path(workdir, f"spectrum_grid_{spectrum_store.safe_component(class_name)}.png")
    wd.atomic_write_bytes(target, spectrum_store.encode_png(grid))
    written.append(target)
  logging.info("generate: wrote %d spectrum grid(s) to %s", len(written), workdir)
  return written
