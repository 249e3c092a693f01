"""The spectrum grid: one row per source image, the real image then one column per level."""

import numpy as np
from PIL import Image
from PIL import ImageDraw

HEADER = 14       # pixels of column titles above the cells
BACKGROUND = 255  # page colour
MISSING = 200     # grey cell where an image does not exist (yet)


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


def make_grid(cells, column_titles, cell=96, pad=2):
  """Returns a uint8 H x W x 3 grid of `cells` (rows of images or None) under titles.

  Every row must have len(column_titles) entries; None draws a grey cell.
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
  return np.asarray(picture)


def spectrum_cells(sources, rows, levels, load, seed=0):
  """Returns grid rows: for each (source_id, real image), the real image then each level.

  `rows` are manifest rows, `load(row)` returns a row's image, `levels` are the
  image-guidance values (one column each); the per-level seed `seed` is shown.
  """
  by_key = {(row["source_id"], f"{row['image_guidance']:.2f}", row["seed"]): row
            for row in rows if not row.get("attempt")}  # first images, not regenerations
  cells = []
  for source_id, real in sources:
    line = [real]
    for level in levels:
      row = by_key.get((source_id, f"{level:.2f}", seed))
      line.append(None if row is None else load(row))
    cells.append(line)
  return cells
