"""The spectrum grid after `score`: each cell's CLIP score, rejected cells framed in red."""

import numpy as np

from discl_jax import workdir as wd
from discl_jax.data import records
from discl_jax.data import spectrum_store
from discl_jax.evaluation import spectrum_grid


def test_scored_grid_frames_rejected_cells_and_captions_scores(tmp_path):
  store = spectrum_store.SpectrumStore(wd.path(tmp_path, wd.SPECTRUM), 0, 1)
  scores = {0.3: 0.41, 0.7: 0.12}  # strength -> clip_text; threshold 0.3 rejects 0.7
  for strength, score in scores.items():
    row = spectrum_store.make_row(source_id="s1", label=9, class_name="nine",
                                  strength=strength, seed=0, prompt="a nine")
    store.add(row, np.full((16, 16, 3), 90, np.uint8))
    store.add_scores([{"job_id": row["job_id"], "clip_text": score, "clip_source": 0.9,
                       "error": None}])
  rows = store.rows()
  hard = [{"source_id": "s1", "class_name": "nine"}]
  real = lambda source: np.full((16, 16, 3), 120, np.uint8)
  written = spectrum_grid.write_scored_grids(tmp_path, rows, hard, real, 0.3, 4)
  assert written == [tmp_path / "spectrum_grid_nine.png"]
  grid = records.read_rgb(written[0])
  cell, pad = 96, 2
  assert grid.shape[:2] == spectrum_grid.grid_size(1, 3)
  top = spectrum_grid.HEADER + pad
  red = np.array(spectrum_grid.REJECTED, np.uint8)
  # Columns: real, lambda 0.70 (strength 0.3, accepted), lambda 0.30 (strength 0.7, rejected).
  frames = [np.all(grid[top + cell // 2, pad + c * (cell + pad) + 1] == red) for c in range(3)]
  assert frames == [False, False, True]
  captions, rejected = spectrum_grid.score_marks(
      spectrum_grid.cell_rows(["s1"], rows, [0.7, 0.3])[0], 0.3)
  assert captions == ["", "0.410", "0.120"] and rejected == [False, False, True]
  # The caption strip at the bottom of a scored cell holds dark text on white.
  strip = grid[top + cell - 12:top + cell - 4, pad + cell + pad + 4:pad + 2 * cell]
  assert strip.min() < 60 and strip.max() > 240
