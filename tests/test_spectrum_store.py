"""The spectrum store: atomic images, manifest shards, reconcile, fingerprints, scores."""

import json

import ml_collections
import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax import pipeline
from discl_jax import provenance
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.data import records
from discl_jax.data import spectrum_store as ss
from discl_jax.diffusion import jobs


def _row(source="img7", strength=0.3, seed=0, label=2, class_name="two"):
  return ss.make_row(source_id=source, label=label, class_name=class_name,
                     strength=strength, seed=seed, prompt=f"a photo of a {class_name}")


def _image(value=0, size=8):
  return np.full((size, size, 3), value, np.uint8)


def test_row_fields_and_paths_follow_the_interface():
  row = _row(strength=0.3, seed=5)
  assert row["job_id"] == "img7|s0.300|seed5"
  assert row["image_guidance"] == 0.7
  assert row["path"] == "two/img7/lambda0.70_seed5.png"
  assert set(row) == set(ss.ROW_KEYS)
  odd = _row(source="dir/a b.jpg", class_name="great white/shark")
  assert odd["path"] == "great_white_shark/dir_a_b.jpg/lambda0.70_seed0.png"


def test_add_writes_png_and_manifest_and_rows_read_back(tmp_path):
  store = ss.SpectrumStore(tmp_path, 0, 1)
  store.reconcile()
  row = _row()
  store.add(row, _image(9))
  assert store.done_job_ids() == {row["job_id"]}
  path = store.image_path(row)
  assert path == tmp_path / "two/img7/lambda0.70_seed0.png"
  np.testing.assert_array_equal(records.read_rgb(path), _image(9))
  (got,) = ss.SpectrumStore(tmp_path, 0, 1).rows()
  sha256, size = ss.image_digest(path.read_bytes())
  assert got == dict(row, sha256=sha256, bytes=size, clip_text=None, clip_source=None,
                     score_error=None)
  assert not list(tmp_path.rglob("*.tmp"))


def test_add_rejects_bad_images_and_rows(tmp_path):
  store = ss.SpectrumStore(tmp_path, 0, 1)
  with pytest.raises(ValueError, match="uint8 H x W x 3"):
    store.add(_row(), np.zeros((4, 4), np.uint8))
  with pytest.raises(ValueError, match="lacks key"):
    store.add({"job_id": "x"}, _image())


def test_reconcile_drops_missing_files_duplicates_and_torn_line(tmp_path):
  store = ss.SpectrumStore(tmp_path, 0, 1)
  a, b, c = _row(seed=0), _row(seed=1), _row(seed=2)
  for r in (a, b, c):
    store.add(r, _image())
  store.image_path(b).unlink()
  with open(store.manifest_path, "a", encoding="utf-8") as f:
    f.write(json.dumps(a) + "\n")           # a duplicate row
    f.write('{"job_id": "img7|s0.300|se')   # torn by a kill mid-write
  counts = ss.SpectrumStore(tmp_path, 0, 1).reconcile()
  assert counts["kept"] == 2
  assert counts["dropped_missing"] == 1
  assert counts["dropped_duplicate"] == 1
  lines = store.manifest_path.read_text().splitlines()
  assert [json.loads(l)["job_id"] for l in lines] == [a["job_id"], c["job_id"]]
  store = ss.SpectrumStore(tmp_path, 0, 1)
  assert store.done_job_ids() == {a["job_id"], c["job_id"]}
  store.add(b, _image())                    # appends cleanly after the repair
  assert len(store.manifest_path.read_text().splitlines()) == 3
  assert ss.SpectrumStore(tmp_path, 0, 1).reconcile()["kept"] == 3


def test_reconcile_readds_known_orphans_removes_own_temp_and_never_deletes_stray_files(tmp_path):
  store = ss.SpectrumStore(tmp_path, 0, 1)
  known, unknown = _row(seed=0), _row(seed=1)
  # Files written just before a kill, with no manifest row.
  for r in (known, unknown):
    path = store.image_path(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ss.encode_png(_image(3)))
  temp = store.image_path(known).parent / ".lambda0.70_seed2.png.k2j4x9_a.tmp"
  temp.write_bytes(b"half a png")
  # Files a user put there: never ours to delete.
  strays = [store.image_path(known).parent / "my_pick.png", tmp_path / "notes" / "best.png",
            store.image_path(known).parent / ".my_pick.png.backup1.tmp"]
  for stray in strays:
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"user data")
  counts = store.reconcile(expected_rows=[known])
  assert counts["readded"] == 1 and counts["removed_temp"] == 1
  assert counts["left_unknown"] == 1 + len(strays)
  assert not temp.exists() and store.image_path(unknown).exists()
  assert all(stray.read_bytes() == b"user data" for stray in strays)
  assert store.done_job_ids() == {known["job_id"]}
  assert [r["job_id"] for r in ss.SpectrumStore(tmp_path, 0, 1).rows()] == [known["job_id"]]
  # A second reconcile changes nothing.
  again = store.reconcile(expected_rows=[known])
  assert again == dict(counts, readded=0, removed_temp=0)


def _other_image(size=8):
  """A valid PNG of the same size but other pixels (a replaced image)."""
  return ss.encode_png(_image(200, size))


def test_reconcile_drops_rows_of_damaged_images_so_generate_makes_them_again(tmp_path, caplog):
  store = ss.SpectrumStore(tmp_path, 0, 1)
  rows = [_row(seed=s) for s in range(5)]
  for r in rows:
    store.add(r, np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
  intact, truncated, overwritten, replaced, legacy = rows
  data = store.image_path(truncated).read_bytes()
  store.image_path(truncated).write_bytes(data[:len(data) // 2])
  middle = bytearray(data)
  middle[len(data) // 2] ^= 0xFF                              # same size, one byte flipped
  store.image_path(overwritten).write_bytes(bytes(middle))
  store.image_path(replaced).write_bytes(_other_image())      # another valid image
  # A row of an older store, without checksum: taken as it is.
  lines = store.manifest_path.read_text().splitlines()
  old = json.loads(lines[4])
  del old["sha256"], old["bytes"]
  store.manifest_path.write_text("\n".join(lines[:4] + [json.dumps(old)]) + "\n")
  store.image_path(legacy).write_bytes(_other_image())
  counts = ss.SpectrumStore(tmp_path, 0, 1).reconcile(expected_rows=rows)
  assert counts["dropped_damaged"] == 3 and counts["kept"] == 2 and counts["readded"] == 0
  assert "3 image(s) no longer match their manifest row" in caplog.text
  store = ss.SpectrumStore(tmp_path, 0, 1)
  assert store.done_job_ids() == {intact["job_id"], legacy["job_id"]}
  for r in (truncated, overwritten, replaced):                  # generate's rerun
    store.add(r, np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
  assert store.image_path(truncated).read_bytes() == data
  assert ss.SpectrumStore(tmp_path, 0, 1).reconcile(expected_rows=rows)["dropped_damaged"] == 0


def test_damaged_images_are_never_read_as_their_row(tmp_path):
  store = ss.SpectrumStore(tmp_path, 0, 1)
  row = _row()
  store.add(row, _image(9))
  np.testing.assert_array_equal(store.read_image(store.rows()[0]), _image(9))
  store.image_path(row).write_bytes(_other_image())
  (stored,) = store.rows()
  with pytest.raises(records.BadImageError,
                     match=rf"{store.image_path(row)} does not match its manifest row.*rerun "
                     "the generate stage"):
    store.read_image(stored)
  assert store.damaged([stored]) == [(store.image_path(row), "78 bytes, the manifest says 77")]


def test_a_score_of_other_bytes_than_the_rows_counts_as_none(tmp_path):
  store = ss.SpectrumStore(tmp_path, 0, 1)
  row = _row()
  store.add(row, _image(9))
  (stored,) = store.rows()
  store.add_scores([dict(job_id=row["job_id"], clip_text=0.7, clip_source=0.5, error=None,
                         sha256=stored["sha256"])])
  assert store.rows()[0]["clip_text"] == 0.7
  store.add_scores([dict(job_id=row["job_id"], clip_text=0.2, clip_source=0.5, error=None,
                         sha256="0" * 64)])              # the score of an image made before
  assert store.rows()[0]["clip_text"] is None


def test_only_the_shard_names_the_store_writes_are_read(tmp_path, caplog):
  store = ss.SpectrumStore(tmp_path, 0, 1)
  row = _row()
  store.add(row, _image())
  store.add_scores([dict(job_id=row["job_id"], clip_text=0.7, clip_source=0.5, error=None)])
  foreign = {"scores-00000.old.jsonl": dict(job_id=row["job_id"], clip_text=0.0,
                                              clip_source=0.0, error=None),
             "manifest-00000.bak.jsonl": dict(_row(seed=9))}
  for name, content in foreign.items():
    (tmp_path / name).write_text(json.dumps(content) + "\n")
  reader = ss.SpectrumStore(tmp_path, 0, 1)
  for _ in range(3):
    rows = reader.rows()
    assert [(r["job_id"], r["clip_text"]) for r in rows] == [(row["job_id"], 0.7)]
  warnings = [r.getMessage() for r in caplog.records if "not a shard name" in r.getMessage()]
  assert len(warnings) == 2                              # once per foreign file
  assert any("scores-00000.old.jsonl" in w for w in warnings)
  assert reader.reconcile()["kept"] == 1


def test_processes_write_own_shards_and_leave_foreign_files(tmp_path):
  rows = [_row(seed=s) for s in range(12)]
  stores = [ss.SpectrumStore(tmp_path, p, 2) for p in range(2)]
  for r in rows:
    owner = next(p for p in range(2) if seeding.process_owns(r["job_id"], p, 2))
    stores[owner].add(r, _image())
  assert (tmp_path / "manifest-00000.jsonl").exists()
  assert (tmp_path / "manifest-00001.jsonl").exists()
  merged = ss.SpectrumStore(tmp_path, 0, 2)
  assert {r["job_id"] for r in merged.rows()} == {r["job_id"] for r in rows}
  assert merged.done_job_ids() == {r["job_id"] for r in rows}
  # An unknown file with no row is another process's business when there are several.
  stray = tmp_path / "two/img7/lambda0.10_seed99.png"
  stray.write_bytes(ss.encode_png(_image()))
  counts = merged.reconcile()
  assert counts["left_foreign"] == 1 and stray.exists()
  assert counts["kept"] + ss.SpectrumStore(tmp_path, 1, 2).reconcile()["kept"] == 12


def _generation_config():
  config = config_lib.base_config()
  config.diffusion.update(tiny=True, guidance_scale=10.0, scheduler="ddim")
  return config


def test_generation_fingerprint_recorded_once_then_checked(tmp_path):
  store = ss.SpectrumStore(tmp_path / "spectrum", 0, 1)
  config = _generation_config()
  assert not jobs.check_provenance(config, tmp_path, store, record=False)
  assert not (store.root / ss.GENERATION).exists()  # compared only: nothing written
  assert jobs.check_provenance(config, tmp_path, store)
  record = json.loads((store.root / ss.GENERATION).read_text())
  assert record["fingerprint"]["seed"] == 0 and record["config"]["diffusion"]["tiny"] is True
  assert "generate" in json.loads((tmp_path / "config.json").read_text())
  assert not jobs.check_provenance(ml_collections.ConfigDict(config.to_dict()), tmp_path, store)
  config.diffusion.guidance_scale, config.seed = 7.5, 1
  with pytest.raises(ValueError) as e:
    jobs.check_provenance(config, tmp_path, store, record=False)
  message = str(e.value)
  assert message.startswith("generate: ") and "generation.json" in message
  assert "diffusion.guidance_scale" in message and "seed" in message
  assert "scheduler" not in message and "10.0" in message and "7.5" in message


def test_a_generation_json_of_the_older_format_still_reads(tmp_path):
  # Before generate used provenance.check_stage, generation.json held the bare fingerprint.
  store = ss.SpectrumStore(tmp_path / "spectrum", 0, 1)
  config = _generation_config()
  store.root.mkdir()
  old = json.dumps(provenance.canonical(provenance.generation_fingerprint(config)))
  (store.root / ss.GENERATION).write_text(old)
  assert not jobs.check_provenance(config, tmp_path, store)  # continues, rewrites nothing
  assert (store.root / ss.GENERATION).read_text() == old
  assert provenance.stored_fingerprint(store.root / ss.GENERATION)["diffusion"]["tiny"] is True
  pipeline.check_recorded(config, tmp_path, ("generate",))
  config.diffusion.scheduler = "euler"
  with pytest.raises(ValueError, match=r"^generate: .*diffusion\.scheduler is 'euler' now "
                                       r"but was 'ddim'"):
    jobs.check_provenance(config, tmp_path, store)
  with pytest.raises(ValueError, match=r"diffusion\.scheduler is 'euler' now"):
    pipeline.check_recorded(config, tmp_path, ("generate",))


def test_only_process_zero_records_the_fingerprint(tmp_path, monkeypatch):
  # Process 0's reconcile removes temp files of generation.json, so a second
  # writer could lose its rename (a two-process generate crashed on this).
  config = _generation_config()
  monkeypatch.setattr(wd, "is_main_process", lambda: False)
  jobs.check_provenance(config, tmp_path, ss.SpectrumStore(tmp_path / "spectrum", 1, 2))
  assert not (tmp_path / "spectrum" / ss.GENERATION).exists()


def test_scores_merge_into_rows(tmp_path):
  store = ss.SpectrumStore(tmp_path, 0, 1)
  a, b = _row(seed=0), _row(seed=1)
  store.add(a, _image())
  store.add(b, _image())
  store.add_scores([{"job_id": a["job_id"], "clip_text": 0.31, "clip_source": 0.8, "error": None}])
  ss.SpectrumStore(tmp_path, 1, 2).add_scores(
      [{"job_id": b["job_id"], "clip_text": None, "clip_source": None, "error": "bad"}])
  rows = {r["job_id"]: r for r in ss.SpectrumStore(tmp_path, 0, 1).rows()}
  assert rows[a["job_id"]]["clip_text"] == 0.31
  assert rows[a["job_id"]]["clip_source"] == 0.8
  assert rows[a["job_id"]]["score_error"] is None
  assert rows[b["job_id"]]["score_error"] == "bad"
  assert rows[b["job_id"]]["clip_text"] is None
  with pytest.raises(ValueError, match="job_id"):
    store.add_scores([{"clip_text": 0.1}])


def test_to_labeled_images(tmp_path):
  store = ss.SpectrumStore(tmp_path, 0, 1)
  rows = [_row(seed=0, label=1), _row(seed=1, label=1, strength=0.5)]
  for v, r in enumerate(rows):
    store.add(r, _image(v * 50))
  images = ss.to_labeled_images(store.rows(), ("zero", "one", "two"), tmp_path)
  assert list(images.ids) == [r["job_id"] for r in rows]
  assert list(images.labels) == [1, 1]
  assert images.class_names == ("zero", "one", "two")
  np.testing.assert_array_equal(images.image(1), _image(50))
