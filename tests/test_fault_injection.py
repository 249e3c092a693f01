"""Fault injection on a finished runlocal demo: every kind of file a workdir holds is damaged,
one at a time, and the README command (`discl --config=... --workdir=...`, through discl's
main) is run again. Each case ends with the undamaged run's results, byte for byte, or with
a one-line error that names the damaged file. Two fresh runs give the same results bytes.

One finished run is the module's fixture; each case damages a copy of it.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from discl_jax import workdir as wd
from discl_jax.data import spectrum_store

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What a run reports: two runs of one config give these bytes (timings live elsewhere).
RESULTS = (wd.METRICS, wd.REPORT, wd.TRAIN_RESULT, wd.PREDICTIONS)


def _discl(workdir):
  """Runs the README's demo command (runlocal size) on `workdir`; returns the process."""
  return subprocess.run(
      [sys.executable, "-m", "discl_jax.main", "--config=configs/demo.py:runlocal",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _results(workdir):
  return {name: wd.path(workdir, name).read_bytes() for name in RESULTS}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("fault_injection") / "demo"
  proc = _discl(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _rows(workdir):
  return spectrum_store.SpectrumStore(wd.path(workdir, wd.SPECTRUM), 0, 1).rows()


def _accepted_images(workdir):
  """Returns the paths of the images the curriculum trains on (their damage changes results)."""
  return [wd.path(workdir, wd.SPECTRUM, r["path"]) for r in _rows(workdir)
          if r["clip_text"] >= 0.6 and r["image_guidance"] > 0.6]


def _cut(path, keep=0.5):
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  return path


def _pngs_truncated_overwritten_and_replaced(w):
  """Damages three accepted images three ways (one file kind, one rerun); returns the first."""
  paths = _accepted_images(w)[:3]
  _cut(paths[0])                                             # truncated
  data = bytearray(paths[1].read_bytes())
  data[len(data) // 2:len(data) // 2 + 8] = b"\0" * 8        # overwritten in the middle
  paths[1].write_bytes(bytes(data))
  shutil.copy(_accepted_images(w)[-1], paths[2])             # replaced by another valid image
  return paths[0]


def _manifest_torn(w):
  return _cut(wd.path(w, wd.SPECTRUM, "manifest-00000.jsonl"), 0.995)


def _manifest_garbled_line(w):
  path = wd.path(w, wd.SPECTRUM, "manifest-00000.jsonl")
  lines = path.read_text().splitlines(keepends=True)
  lines[3] = lines[3][:40] + "\n"
  path.write_text("".join(lines))
  return path


def _score_shard_torn(w):
  return _cut(wd.path(w, wd.SPECTRUM, "scores-00000.jsonl"), 0.99)


def _foreign_score_shard(w):
  path = wd.path(w, wd.SPECTRUM, "scores-00000.old.jsonl")
  path.write_text("".join(json.dumps(dict(job_id=r["job_id"], clip_text=0.0, clip_source=0.0,
                                          error=None)) + "\n" for r in _rows(w)))
  return path


def _acceptance_garbled(w):
  return _cut(wd.path(w, "acceptance.json"))


def _metrics_last_line_lost(w):
  path = wd.path(w, wd.METRICS)
  path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
  return path


def _predictions_garbled(w):
  return _cut(wd.path(w, wd.PREDICTIONS))


def _latest_checkpoint_damaged(w):
  steps = sorted(int(p.name) for p in wd.path(w, wd.CKPT).iterdir() if p.name.isdigit())
  return _cut(wd.path(w, wd.CKPT, str(steps[-1]), "state", "manifest.ocdbt"), 0.2)


def _train_provenance_garbled(w):
  return _cut(wd.path(w, wd.PROVENANCE % "train"))


def _generation_record_garbled(w):
  return _cut(wd.path(w, wd.SPECTRUM, spectrum_store.GENERATION))


# One rerun per file kind (a deleted metrics.jsonl: tests/test_faults.py), and whether the
# rerun repairs it (True) or stops with one line naming the file (False).
DAMAGES = [(_pngs_truncated_overwritten_and_replaced, True), (_manifest_torn, True),
           (_manifest_garbled_line, False), (_score_shard_torn, True),
           (_foreign_score_shard, True), (_acceptance_garbled, True),
           (_metrics_last_line_lost, True), (_predictions_garbled, True),
           (_latest_checkpoint_damaged, True), (_train_provenance_garbled, False),
           (_generation_record_garbled, False)]


@pytest.mark.parametrize("damage,repaired", DAMAGES,
                         ids=[f.__name__.strip("_") for f, _ in DAMAGES])
def test_a_damaged_file_gives_the_same_results_or_one_line_naming_it(finished, tmp_path,
                                                                     damage, repaired):
  workdir = tmp_path / "demo"
  shutil.copytree(finished, workdir)
  damaged = damage(workdir)
  proc = _discl(workdir)
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  assert (proc.returncode == 0) == repaired, proc.stderr[-3000:]
  if repaired:
    assert _results(workdir) == _results(finished), proc.stderr[-3000:]
    if damage is _pngs_truncated_overwritten_and_replaced:       # made again, not skipped
      assert "3 image(s) no longer match their manifest row" in proc.stderr
      for path in _accepted_images(finished)[:3]:
        assert wd.path(workdir, path.relative_to(finished)).read_bytes() == path.read_bytes()
  else:
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("discl: ") and str(damaged) in last, proc.stderr[-3000:]


def test_two_fresh_runs_give_byte_identical_results(finished, tmp_path):
  again = tmp_path / "again"
  proc = _discl(again)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _results(again) == _results(finished)
  assert "seconds" not in wd.path(finished, wd.METRICS).read_text()
  timings = wd.read_jsonl(wd.path(again, wd.TIMINGS))
  assert [t["epoch"] for t in timings] == [0, 1] and all(t["seconds"] > 0 for t in timings)
  assert "| train |" in wd.path(again, wd.TIMINGS_REPORT).read_text()
  with np.load(wd.path(again, wd.PREDICTIONS)) as saved:
    assert int(saved["epoch"]) == json.loads(
        wd.path(again, wd.TRAIN_RESULT).read_text())["best_epoch"]
