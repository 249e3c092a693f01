"""The `score` stage on a hand-made spectrum store of digits-LT images (tiny CLIP)."""

import json
import shutil

import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax import parallel
from discl_jax import workdir as wd
from discl_jax.data import datasets
from discl_jax.data import records
from discl_jax.data import spectrum_store
from discl_jax.models import tiny
from discl_jax.scoring import acceptance
from discl_jax.scoring import clip
from discl_jax.stages import score_stage

STRENGTHS = (0.5, 0.9)
SEEDS = (0, 1)


def _config():
  c = config_lib.base_config()
  c.data.name = "digits_lt"
  c.data.imbalance_ratio = 10.0
  c.data.max_per_class = 30
  c.data.val_per_class = 2
  c.data.test_per_class = 5
  c.score.tiny = True
  c.score.model = ""
  c.score.batch_size = 4
  c.score.text_template = "a photo of the digit {c}"
  c.score.threshold = 0.0
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Returns (config, template workdir): a spectrum store of 3 classes x 2 sources
  x 2 levels x 2 seeds = 24 images plus the tiny CLIP under models/clip."""
  config = _config()
  base = tmp_path_factory.mktemp("score")
  tiny.build_clip(wd.path(base, wd.MODELS, clip.TINY_CLIP), seed=config.seed)
  train = datasets.load(config.data)["train"]
  store = spectrum_store.SpectrumStore(wd.path(base, wd.SPECTRUM))
  rng = np.random.default_rng(0)
  for label in (0, 3, 7):
    for index in np.flatnonzero(train.labels == label)[:2]:
      source = train.image(index)
      for strength in STRENGTHS:
        for seed in SEEDS:
          noise = rng.normal(0, 255 * strength, source.shape)
          image = np.clip(source + noise, 0, 255).astype(np.uint8)
          row = spectrum_store.make_row(
              source_id=train.ids[index], label=label, class_name=train.class_names[label],
              strength=strength, seed=seed, prompt=f"a photo of {train.class_names[label]}")
          store.add(row, image)
  return config, base


@pytest.fixture
def workdir(prepared, tmp_path):
  shutil.copytree(prepared[1], tmp_path / "w")
  return tmp_path / "w"


def _score_lines(workdir):
  lines = []
  for shard in sorted(wd.path(workdir, wd.SPECTRUM).glob("scores-*.jsonl")):
    lines.extend(wd.read_jsonl(shard))
  return lines


def test_scores_every_row_and_writes_the_report(prepared, workdir):
  config = _config()
  config.score.threshold = -0.4  # the tiny CLIP's similarities here span about -0.61 .. -0.25
  sources = {(r["source_id"], r["class_name"]) for r in
             spectrum_store.SpectrumStore(wd.path(workdir, wd.SPECTRUM)).rows()}
  wd.append_jsonl(wd.path(workdir, wd.HARD),
                  [{"source_id": s, "class_name": c} for s, c in sorted(sources)])
  report = score_stage.run(config, workdir)
  # Spectrum grids are drawn again, with the scores: one per class.
  assert len(list(workdir.glob("spectrum_grid_*.png"))) == 3
  rows = spectrum_store.SpectrumStore(wd.path(workdir, wd.SPECTRUM)).rows()
  assert len(rows) == 24 and all(r["clip_text"] is not None for r in rows)
  assert all(r["clip_source"] is not None and r["score_error"] is None for r in rows)
  on_disk = json.loads(wd.path(workdir, score_stage.ACCEPTANCE_JSON).read_text())
  assert on_disk == json.loads(json.dumps(report))
  png = wd.path(workdir, score_stage.ACCEPTANCE_PNG).read_bytes()
  assert png.startswith(b"\x89PNG")

  accepted = [r for r in rows if r["clip_text"] >= -0.4]
  assert 0 < len(accepted) < len(rows)  # the threshold separates this store's images
  assert report["overall"]["generated"] == 24 and report["overall"]["scored"] == 24
  assert report["overall"]["accepted"] == len(accepted)
  assert [e["image_guidance"] for e in report["per_level"]] == [0.1, 0.5]
  for entry in report["per_level"]:
    level_rows = [r for r in rows if r["image_guidance"] == entry["image_guidance"]]
    assert entry["generated"] == 12
    assert entry["accepted"] == sum(r["clip_text"] >= -0.4 for r in level_rows)
  assert [e["class_name"] for e in report["per_class"]] == ["zero", "three", "seven"]
  assert sum(e["accepted"] for e in report["per_class"]) == len(accepted)
  assert len(report["per_class_level"]) == 6
  empty = {(e["class_name"], e["image_guidance"]) for e in report["per_class_level"]
           if e["accepted"] == 0}
  assert len(report["warnings"]) == len(empty)
  assert acceptance.accepted_rows(rows, -0.4) == sorted(accepted, key=lambda r: r["job_id"])
  # Training reads the accepted rows in job-id order, whatever the manifest's row order.
  assert acceptance.accepted_rows(rows[::-1], -0.4) == acceptance.accepted_rows(rows, -0.4)


def test_scores_equal_direct_clip_similarities(prepared, workdir):
  config = _config()
  score_stage.run(config, workdir)
  store = spectrum_store.SpectrumStore(wd.path(workdir, wd.SPECTRUM))
  rows = store.rows()[:5]
  models = clip.load_clip(str(wd.path(workdir, wd.MODELS, clip.TINY_CLIP)))
  scorer = clip.ClipScorer(models, parallel.make_mesh(), batch_size=4)
  images = scorer.image_embeddings([records.read_rgb(store.image_path(r)) for r in rows])
  texts = scorer.text_embeddings([f"a photo of the digit {r['class_name']}" for r in rows])
  train = datasets.load(config.data)["train"]
  where = {i: n for n, i in enumerate(train.ids)}
  sources = scorer.image_embeddings([train.image(where[r["source_id"]]) for r in rows])
  np.testing.assert_allclose([r["clip_text"] for r in rows], np.sum(images * texts, 1), atol=1e-5)
  np.testing.assert_allclose([r["clip_source"] for r in rows], np.sum(images * sources, 1),
                             atol=1e-5)


def test_killed_run_resumes_and_scores_each_row_once(prepared, workdir, monkeypatch):
  real_add = spectrum_store.SpectrumStore.add_scores
  calls = []

  def add_then_die(self, score_rows):
    if len(calls) == 3:
      raise RuntimeError("killed after 3 batches")
    calls.append(len(score_rows))
    real_add(self, score_rows)

  monkeypatch.setattr(spectrum_store.SpectrumStore, "add_scores", add_then_die)
  with pytest.raises(RuntimeError, match="killed"):
    score_stage.run(_config(), workdir)
  assert len(_score_lines(workdir)) == 12
  assert not wd.path(workdir, score_stage.ACCEPTANCE_JSON).exists()

  monkeypatch.setattr(spectrum_store.SpectrumStore, "add_scores", real_add)
  report = score_stage.run(_config(), workdir)
  lines = _score_lines(workdir)
  job_ids = [line["job_id"] for line in lines]
  assert len(job_ids) == 24 and len(set(job_ids)) == 24
  assert report["overall"]["scored"] == 24

  score_stage.run(_config(), workdir)  # nothing left: no new score rows
  assert len(_score_lines(workdir)) == 24


def test_missing_and_corrupt_images_are_reported_by_path(prepared, workdir):
  store = spectrum_store.SpectrumStore(wd.path(workdir, wd.SPECTRUM))
  rows = store.rows()
  missing, corrupt = rows[1], rows[6]
  store.image_path(missing).unlink()
  store.image_path(corrupt).write_bytes(b"not a png at all")
  report = score_stage.run(_config(), workdir)
  errors = {e["path"]: e["error"] for e in report["errors"]}
  assert set(errors) == {missing["path"], corrupt["path"]}
  assert str(store.image_path(missing)) in errors[missing["path"]]
  assert "not found" in errors[missing["path"]]
  assert str(store.image_path(corrupt)) in errors[corrupt["path"]]
  assert report["overall"]["generated"] == 24
  assert report["overall"]["errors"] == 2 and report["overall"]["scored"] == 22
  merged = {r["job_id"]: r for r in store.rows()}
  for bad in (missing, corrupt):
    assert merged[bad["job_id"]]["clip_text"] is None
    assert merged[bad["job_id"]]["score_error"] is not None
  accepted = acceptance.accepted_rows(store.rows(), _config().score.threshold)
  assert {missing["job_id"], corrupt["job_id"]}.isdisjoint(r["job_id"] for r in accepted)
  # The next `score` retries the failed rows: a repaired image is scored, not an error forever.
  shutil.copy(wd.path(prepared[1], wd.SPECTRUM, corrupt["path"]), store.image_path(corrupt))
  report = score_stage.run(_config(), workdir)
  merged = {r["job_id"]: r for r in store.rows()}
  assert merged[corrupt["job_id"]]["clip_text"] is not None
  assert merged[corrupt["job_id"]]["score_error"] is None
  assert merged[missing["job_id"]]["score_error"] is not None
  assert report["overall"]["errors"] == 1 and report["overall"]["scored"] == 23
  assert len(_score_lines(workdir)) == 26          # 24 + the two retried rows


def test_an_image_replaced_after_scoring_is_never_accepted_as_its_row(prepared, workdir):
  score_stage.run(_config(), workdir)
  store = spectrum_store.SpectrumStore(wd.path(workdir, wd.SPECTRUM))
  rows = store.rows()
  replaced, donor = rows[2], rows[9]
  original = store.image_path(replaced).read_bytes()
  shutil.copy(store.image_path(donor), store.image_path(replaced))   # another valid image
  report = score_stage.run(_config(), workdir)
  (error,) = report["errors"]
  assert error["path"] == replaced["path"] and "does not match its manifest row" in error["error"]
  assert "rerun the generate stage" in error["error"]
  accepted = acceptance.accepted_rows(store.rows(), _config().score.threshold)
  assert replaced["job_id"] not in {r["job_id"] for r in accepted}
  store.image_path(replaced).write_bytes(original)                   # what generate makes again
  report = score_stage.run(_config(), workdir)
  assert not report["errors"] and report["overall"]["scored"] == 24


def test_a_torn_score_shard_is_trimmed_and_its_row_rescored(prepared, workdir):
  score_stage.run(_config(), workdir)
  shard = next(wd.path(workdir, wd.SPECTRUM).glob("scores-*.jsonl"))
  text = shard.read_text()
  shard.write_text(text[:-25])                     # a disk-full append: the last row torn
  report = score_stage.run(_config(), workdir)
  lines = shard.read_text().splitlines()
  assert len(lines) == 24 and all(json.loads(line) for line in lines)
  assert report["overall"]["scored"] == 24


def test_unreachable_threshold_warns_for_every_class_and_level(prepared, workdir):
  config = _config()
  config.score.threshold = 1.0
  report = score_stage.run(config, workdir)
  assert report["overall"]["accepted"] == 0
  assert len(report["warnings"]) == 6
  assert "class 'zero' has no accepted image at image guidance 0.10" in report["warnings"][0]


def test_bad_config_values_are_clear_errors(prepared, workdir, tmp_path):
  config = _config()
  config.score.threshold = 1.5
  with pytest.raises(ValueError, match="score.threshold=1.5 is outside"):
    score_stage.run(config, workdir)
  config = _config()
  config.score.text_template = "a photo of a digit"
  with pytest.raises(ValueError, match="must contain"):
    score_stage.run(config, workdir)
  config = _config()
  config.score.regenerate = True
  config.score.max_regenerations = -1
  with pytest.raises(ValueError, match="score.max_regenerations must be >= 0, got -1"):
    score_stage.run(config, workdir)
  with pytest.raises(FileNotFoundError, match="run the generate stage first"):
    score_stage.run(_config(), tmp_path / "empty")


def test_manifest_source_not_in_the_data_is_a_clear_error(prepared, workdir):
  store = spectrum_store.SpectrumStore(wd.path(workdir, wd.SPECTRUM))
  row = spectrum_store.make_row(source_id="digits/nope", label=0, class_name="zero",
                                strength=0.5, seed=0, prompt="a photo of zero")
  store.add(row, np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="digits/nope"):
    score_stage.run(_config(), workdir)
