"""The `hard` and `generate` stages: job lists, kill + resume, bad inputs, grids.

The generate runs use the tiny SD model the stage builds into the workdir, on
the demo's digits-LT with one Few class (6 images) x 2 strengths x 2 seeds.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax import provenance
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.data import datasets
from discl_jax.data import records
from discl_jax.data import spectrum_store as ss
from discl_jax.diffusion import jobs
from discl_jax.evaluation import spectrum_grid
from discl_jax.stages import generate_stage
from discl_jax.stages import hard_stage
from discl_jax.stages import prompts_stage
from discl_jax.train import hard_selection

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUM_HARD = 6  # digit "nine" is the only class below few_threshold=7 (6 images)


def make_config():
  """Returns the demo's runlocal config shrunk to 24 fast jobs."""
  c = config_lib.load_file(ROOT / "configs" / "demo.py", "runlocal")
  c.data.imbalance_ratio = 20.0  # the ratio these counts were made for ("nine": 6 images)
  c.diffusion.tiny, c.diffusion.model = True, ""  # unit tests keep the random tiny SD
  c.data.few_threshold = 7
  c.diffusion.strengths = (0.5, 1.0)
  c.diffusion.seeds_per_level = 2
  c.diffusion.num_inference_steps = 4
  c.diffusion.slots = 2
  c.diffusion.grid_sources = 2
  return c


# Run as a script by the kill test: hard, prompts, generate on argv[1].
_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_generate_stage import make_config
from discl_jax import pipeline
pipeline.run_stages(make_config(), sys.argv[1], ("hard", "prompts", "generate"))
"""

# Process argv[3] of 2 sharing one workdir (CPU jax.distributed with gloo collectives).
_TWO_PROCESS_SCRIPT = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{{sys.argv[2]}}", num_processes=2,
                           process_id=int(sys.argv[3]))
sys.path.insert(0, {tests!r})
from test_generate_stage import make_config
from discl_jax import pipeline
pipeline.run_stages(make_config(), sys.argv[1], ("hard", "prompts", "generate"))
"""


# --- hard stage ---------------------------------------------------------------


def test_hard_stage_takes_every_image_of_few_classes(tmp_path):
  config = make_config()
  hard_stage.run(config, tmp_path)
  rows = wd.read_jsonl(wd.path(tmp_path, wd.HARD))
  train = datasets.load(config.data)["train"]
  nines = [str(i) for i in train.ids[train.labels == 9]]
  assert [r["source_id"] for r in rows] == nines and len(rows) == NUM_HARD
  assert {(r["label"], r["class_name"], r["reason"], r["class_count"]) for r in rows} == {
      (9, "nine", "few_class", NUM_HARD)}
  config.data.few_threshold = 15  # demo: seven, eight and nine are Few
  assert {r["class_name"] for r in hard_selection.select_hard(config, {"train": train}, tmp_path)} == {
      "seven", "eight", "nine"}


def test_hard_stage_explicit_classes_and_errors(tmp_path):
  config = make_config()
  train = datasets.load(config.data)["train"]
  config.hard.classes = ("two", "nine")
  rows = hard_selection.select_hard(config, {"train": train}, tmp_path)
  assert {r["class_name"] for r in rows} == {"two", "nine"}
  assert len(rows) == train.class_counts()[2] + train.class_counts()[9]
  assert {r["reason"] for r in rows} == {"listed_class"}
  config.hard.classes = ("two", "ten")
  with pytest.raises(ValueError, match=r"unknown class\(es\) \['ten'\].*'zero'"):
    hard_selection.select_hard(config, {"train": train}, tmp_path)
  config.hard.classes = ()
  config.hard.rule = "hardest"
  with pytest.raises(ValueError, match="'hardest'.*few_classes"):
    hard_selection.select_hard(config, {"train": train}, tmp_path)


# --- job list -----------------------------------------------------------------


@pytest.mark.parametrize("strengths,bad", [
    ((0.5, 1.5), "1.5"), ((0.0,), "0.0"), ((-0.2, 0.5), "-0.2"), (("x",), "'x'"),
    ((0.5, 0.503), "0.503"), ((), "empty")])
def test_validate_strengths_names_the_bad_value(strengths, bad):
  with pytest.raises(ValueError, match="diffusion.strengths") as e:
    jobs.validate_strengths(strengths)
  assert bad in str(e.value)


def test_build_rows_and_resolution_policy():
  hard = [dict(source_id="a", label=1, class_name="one"),
          dict(source_id="b", label=1, class_name="one")]
  rows = jobs.build_rows(hard, {"a": ["pa0", "pa1", "pa2"], "b": ["pb"] * 3}, (0.3, 1.0), 3)
  assert len(rows) == 2 * 2 * 3 and len({r["job_id"] for r in rows}) == 12
  assert rows[0]["job_id"] == "a|s0.300|seed0" and rows[0]["image_guidance"] == 0.7
  assert {r["prompt"] for r in rows if r["source_id"] == "b"} == {"pb"}
  assert [r["prompt"] for r in rows if r["source_id"] == "a"] == ["pa0", "pa1", "pa2"] * 2
  with pytest.raises(KeyError, match="'b'.*prompts"):
    jobs.build_rows(hard, {"a": ["pa"]}, (0.3,), 1)
  with pytest.raises(ValueError, match="'a'.*per seed index 0..2.*rerun the `prompts` stage"):
    jobs.build_rows(hard, {"a": "pa", "b": ["pb"] * 3}, (0.3,), 3)
  assert jobs.target_size(32, 32) == (32, 32)
  # resolution 0: rounded down to a multiple of 8, as diffusers' image processor (docs/design.md §5.3)
  assert jobs.target_size(270, 480) == (264, 480)
  assert jobs.target_size(375, 500) == (368, 496)
  assert jobs.target_size(270, 480, resolution=256, multiple=64) == (256, 448)
  assert jobs.target_size(3, 5) == (8, 8)
  assert jobs.resize(np.zeros((30, 50, 3), np.uint8), (32, 48)).shape == (32, 48, 3)
  # iWildCam's fixed pre-resize (width, height) = (480, 270), then 480x264
  assert jobs.source_size(1536, 2048, (480, 270)) == (270, 480)
  assert jobs.source_size(1536, 2048) == (1536, 2048)
  with pytest.raises(ValueError, match="diffusion.source_size"):
    jobs.source_size(10, 10, (480, 0))
  gradient = np.tile(np.arange(50, dtype=np.uint8)[None, :, None] * 5, (30, 1, 3))
  lanczos = jobs.resize(gradient, (24, 48), "lanczos")
  assert not np.array_equal(lanczos, jobs.resize(gradient, (24, 48)))


def test_fingerprint_counts_description_file_content_not_path(tmp_path):
  config = make_config()
  config.prompts.source = "file"
  config.prompts.descriptions_file = str(tmp_path / "a.json")
  with pytest.raises(FileNotFoundError, match="a.json"):
    provenance.generation_fingerprint(config)
  (tmp_path / "a.json").write_text('{"nine": ["a nine on a wall"]}')
  (tmp_path / "b.json").write_text('{"nine": ["a nine on a wall"]}')
  first = provenance.generation_fingerprint(config)
  config.prompts.descriptions_file = str(tmp_path / "b.json")
  assert provenance.generation_fingerprint(config) == first
  (tmp_path / "b.json").write_text('{"nine": ["a nine on a boat"]}')
  assert provenance.generation_fingerprint(config) != first


# --- generate: bad inputs ---------------------------------------------------------


def _prepare(tmp_path, config):
  hard_stage.run(config, tmp_path)
  prompts_stage.run(config, tmp_path)


def test_generate_rejects_strength_outside_range(tmp_path):
  config = make_config()
  config.diffusion.strengths = (0.5, 1.5)
  with pytest.raises(ValueError, match="strength 1.5 is outside"):
    generate_stage.run(config, tmp_path)


def test_generate_names_unreadable_source_image(tmp_path, monkeypatch):
  config = make_config()
  train = datasets.load(config.data)["train"]
  nines = np.flatnonzero(train.labels == 9)
  paths = np.empty(len(train), dtype=object)
  for i in range(len(train)):
    paths[i] = str(tmp_path / "images" / f"{i}.png")
  (tmp_path / "images").mkdir()
  for i in nines:
    wd.atomic_write_bytes(paths[i], ss.encode_png(train.pixels[i]))
  pathlib.Path(paths[nines[3]]).write_bytes(b"\x89PNG truncated")
  on_disk = records.LabeledImages(ids=train.ids, labels=train.labels,
                                  class_names=train.class_names, paths=paths)
  monkeypatch.setattr(datasets, "load", lambda *_: {"train": on_disk})
  workdir = tmp_path / "work"
  _prepare(workdir, config)
  with pytest.raises(records.BadImageError, match=rf"(?s)1 unreadable.*/{nines[3]}\.png"):
    generate_stage.run(config, workdir)
  assert not list((workdir / wd.SPECTRUM).rglob("*.png"))


# --- generate: kill, resume, fingerprint, grid -----------------------------------------


def _run_script(workdir, cache, source=_SCRIPT, args=()):
  """Starts hard, prompts, generate on `workdir` in a subprocess; returns the Popen.

  Its output goes to `proc.log` (a file: a full pipe would stall the child). All
  runs share a persistent compilation cache so later runs skip most compiling.
  """
  name = "_".join([workdir.name, *map(str, args[1:])])
  script = workdir.parent / f"run_{name}.py"
  script.write_text(source.format(tests=str(ROOT / "tests")))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  log = workdir.parent / f"run_{name}.{time.monotonic_ns()}.log"
  with open(log, "wb") as out:
    proc = subprocess.Popen([sys.executable, str(script), str(workdir), *map(str, args)],
                            env=env, stdout=out, stderr=subprocess.STDOUT)
  proc.log = log
  return proc


def _finish(proc, timeout=600):
  """Waits for `proc` (killing it on timeout); returns the tail of its output."""
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, jax_cache):
  """Runs generate in a subprocess, SIGKILLs it once images exist, damages, reruns."""
  workdir = tmp_path_factory.mktemp("generate")
  cache = jax_cache
  manifest = workdir / wd.SPECTRUM / "manifest-00000.jsonl"
  proc = _run_script(workdir, cache)
  deadline = time.monotonic() + 600
  while proc.poll() is None:
    if (manifest.exists() and len(wd.read_jsonl(manifest)) >= 2) or time.monotonic() > deadline:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005)
  output = _finish(proc)
  assert proc.returncode == -signal.SIGKILL, f"generate ended before the kill:\n{output}"
  killed_rows = wd.read_jsonl(manifest)
  config = make_config()
  expected = {r["job_id"]: r for r in jobs.build_rows(
      wd.read_jsonl(wd.path(workdir, wd.HARD)),
      json.loads(wd.path(workdir, wd.PROMPTS).read_text())["sources"],
      config.diffusion.strengths, config.diffusion.seeds_per_level)}
  # What a kill between the image write and the manifest append leaves behind,
  # on top of the real kill: a row-less image, a torn last line, a temp file.
  store = ss.SpectrumStore(workdir / wd.SPECTRUM, 0, 1)
  done = {r["job_id"] for r in killed_rows}
  rowless = next(r for r in expected.values() if r["job_id"] not in done)
  rowless_image = np.full((32, 32, 3), 77, np.uint8)
  wd.atomic_write_bytes(store.image_path(rowless), ss.encode_png(rowless_image))
  temp = store.image_path(rowless).parent / ".lambda0.50_seed9.png.x1y2z3ab.tmp"
  temp.write_bytes(b"half")
  with open(manifest, "a", encoding="utf-8") as f:
    f.write('{"job_id": "digits/')
  rerun = _run_script(workdir, cache)
  output = _finish(rerun)
  assert rerun.returncode == 0, output
  return dict(workdir=workdir, config=config, expected=expected, killed_rows=killed_rows,
              rowless=rowless, rowless_image=rowless_image)


def test_killed_generate_resumes_to_exactly_the_expected_images(killed_then_resumed):
  k = killed_then_resumed
  root = k["workdir"] / wd.SPECTRUM
  assert 2 <= len(k["killed_rows"]) < len(k["expected"])
  lines = (root / "manifest-00000.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  assert len(rows) == len(k["expected"]) == NUM_HARD * 2 * 2
  assert {r["job_id"] for r in rows} == set(k["expected"])
  for row in rows:   # each with the checksum of its image
    sha256, size = ss.image_digest((root / row["path"]).read_bytes())
    assert row == dict(k["expected"][row["job_id"]], sha256=sha256, bytes=size)
  pngs = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
  assert pngs == sorted(r["path"] for r in rows)
  assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
  # Images finished before the kill were kept, not regenerated; the row-less one re-added.
  store = ss.SpectrumStore(root, 0, 1)
  np.testing.assert_array_equal(records.read_rgb(store.image_path(k["rowless"])),
                                k["rowless_image"])
  for row in store.rows():
    image = records.read_rgb(store.image_path(row))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_rerun_of_finished_generate_changes_nothing(killed_then_resumed):
  k = killed_then_resumed
  manifest = k["workdir"] / wd.SPECTRUM / "manifest-00000.jsonl"
  before = manifest.read_bytes()
  generate_stage.run(k["config"], k["workdir"])
  assert manifest.read_bytes() == before


def test_generate_refuses_a_store_from_another_generation_config(killed_then_resumed):
  k = killed_then_resumed
  config = make_config()
  config.diffusion.guidance_scale = 3.0
  with pytest.raises(ValueError, match="diffusion.guidance_scale is 3.0 now but was 7.5"):
    generate_stage.run(config, k["workdir"])
  config = make_config()
  config.diffusion.strengths = (0.5, 0.7, 1.0)  # more levels extend the store
  assert provenance.generation_fingerprint(config) == provenance.generation_fingerprint(k["config"])


def test_spectrum_grid_has_real_column_and_one_per_level(killed_then_resumed):
  k = killed_then_resumed
  grid = records.read_rgb(k["workdir"] / "spectrum_grid_nine.png")
  assert grid.shape[:2] == spectrum_grid.grid_size(num_rows=2, num_cols=1 + 2)
  assert not list(k["workdir"].glob("spectrum_grid_[!n]*.png"))
  cell = 96
  top, left = spectrum_grid.HEADER + 2, 2 + (cell + 2)  # row 0, first level column
  assert not (grid[top:top + cell, left:left + cell] == spectrum_grid.MISSING).all()


def test_two_processes_share_one_workdir(killed_then_resumed, jax_cache, tmp_path):
  workdir = tmp_path / "two"
  shutil.copytree(killed_then_resumed["workdir"] / wd.MODELS, workdir / wd.MODELS)
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  procs = [_run_script(workdir, jax_cache, _TWO_PROCESS_SCRIPT, (port, p)) for p in range(2)]
  outputs = [_finish(proc) for proc in procs]
  assert [proc.returncode for proc in procs] == [0, 0], outputs
  root = workdir / wd.SPECTRUM
  shards = [wd.read_jsonl(root / f"manifest-{p:05d}.jsonl") for p in range(2)]
  assert all(shards)
  for p, shard in enumerate(shards):
    assert all(seeding.process_owns(r["job_id"], p, 2) for r in shard)
  ids = [r["job_id"] for shard in shards for r in shard]
  assert sorted(ids) == sorted(killed_then_resumed["expected"])
  assert len(list(root.rglob("*.png"))) == len(ids)
  assert (workdir / "spectrum_grid_nine.png").exists()


def test_jobs_split_across_processes_cover_everything_once():
  hard = [dict(source_id=f"s{i}", label=0, class_name="c") for i in range(8)]
  rows = jobs.build_rows(hard, {f"s{i}": ["p", "p"] for i in range(8)}, (0.5, 1.0), 2)
  owners = [[p for p in range(3) if seeding.process_owns(r["job_id"], p, 3)] for r in rows]
  assert all(len(o) == 1 for o in owners)
  assert {o[0] for o in owners} == {0, 1, 2}
