"""CLIP-guided regeneration (`score.regenerate`) on the demo's shipped digit models.

One Few class ("nine", 6 images) x 2 strengths x 1 seed = 12 jobs, scored once;
the threshold is then put between the 6th and 7th score, so exactly 6 images
are rejected and regenerated (up to 2 attempts each).
"""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax import pipeline
from discl_jax import workdir as wd
from discl_jax.data import records
from discl_jax.data import spectrum_store as ss
from discl_jax.diffusion import regeneration
from discl_jax.scoring import acceptance
from discl_jax.stages import score_stage

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_REGENERATIONS = 2
NUM_JOBS = 12
REJECTED = 6

# Run as a script by the kill test: the score stage with regeneration on
# workdir argv[1] at threshold argv[2].
_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import test_regeneration as t
from discl_jax import pipeline
pipeline.run_stages(t.regenerating_config(float(sys.argv[2])), sys.argv[1], ("score",))
"""


def make_config():
  """Returns the demo config (shipped generator and CLIP) shrunk to 12 jobs."""
  c = config_lib.load_file(ROOT / "configs" / "demo.py", "runlocal")
  c.data.imbalance_ratio = 20.0  # the ratio these counts were made for ("nine": 6 images)
  c.data.few_threshold = 7  # only "nine" (6 images) is hard
  c.diffusion.strengths = (0.5, 1.0)
  c.diffusion.seeds_per_level = 1
  c.diffusion.num_inference_steps = 4
  c.diffusion.slots = 2
  c.diffusion.grid_sources = 0
  c.score.batch_size = 8
  return c


def regenerating_config(threshold):
  """Returns `make_config()` with regeneration on at `threshold`."""
  c = make_config()
  c.score.threshold = threshold
  c.score.regenerate = True
  c.score.max_regenerations = MAX_REGENERATIONS
  return c


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
  """Returns (template workdir, threshold): the spectrum generated and scored once."""
  workdir = tmp_path_factory.mktemp("regen") / "base"
  pipeline.run_stages(make_config(), workdir, ("hard", "prompts", "generate", "score"))
  scores = sorted(r["clip_text"] for r in ss.SpectrumStore(workdir / wd.SPECTRUM, 0, 1).rows())
  assert len(scores) == NUM_JOBS
  return workdir, (scores[REJECTED - 1] + scores[REJECTED]) / 2


@pytest.fixture(scope="module")
def uninterrupted(scored):
  """Returns the workdir of the score stage with regeneration, run once."""
  base, threshold = scored
  workdir = base.parent / "uninterrupted"
  shutil.copytree(base, workdir)
  score_stage.run(regenerating_config(threshold), workdir)
  return workdir


def _final(workdir, threshold):
  rows = ss.SpectrumStore(workdir / wd.SPECTRUM, 0, 1).rows()
  final = acceptance.final_rows(rows, MAX_REGENERATIONS)
  choice = {ss.original_job_id(r): r["job_id"] for r in final}
  scores = {r["job_id"]: r["clip_text"] for r in final}
  images = {r["job_id"]: records.read_rgb(workdir / wd.SPECTRUM / r["path"]) for r in final}
  return choice, scores, images, acceptance.accepted_rows(rows, threshold, MAX_REGENERATIONS)


def test_rejected_images_are_regenerated_and_acceptance_rises(scored, uninterrupted):
  _, threshold = scored
  workdir = uninterrupted
  rows = ss.SpectrumStore(workdir / wd.SPECTRUM, 0, 1).rows()
  first = {r["job_id"]: r for r in rows if ss.attempt_of(r) == 0}
  retries = [r for r in rows if ss.attempt_of(r) > 0]
  assert len(first) == NUM_JOBS
  # Exactly the rejected jobs got attempts; an attempt follows only rejected ones.
  rejected = {j for j, r in first.items() if r["clip_text"] <= threshold}
  assert len(rejected) == REJECTED
  assert {ss.original_job_id(r) for r in retries if r["attempt"] == 1} == rejected
  by_job = {}
  for r in sorted(retries, key=lambda r: r["attempt"]):
    by_job.setdefault(r["original_job_id"], []).append(r)
  for job, attempts in by_job.items():
    assert [r["attempt"] for r in attempts] == list(range(1, len(attempts) + 1))
    assert len(attempts) <= MAX_REGENERATIONS
    earlier = [first[job]] + attempts
    assert all(r["clip_text"] <= threshold for r in earlier[:-1])
    for previous, r in zip(earlier, attempts):  # own id and file, a fresh prompt, same job
      assert r["job_id"] == f"{job}|retry{r['attempt']}" and "_retry" in r["path"]
      assert r["prompt"] != previous["prompt"]  # the demo's other template
      assert (r["image_guidance"], r["seed"], r["label"]) == (
          first[job]["image_guidance"], first[job]["seed"], first[job]["label"])
  report = json.loads((workdir / score_stage.ACCEPTANCE_JSON).read_text())
  regen = report["regeneration"]
  assert regen["max_regenerations"] == MAX_REGENERATIONS
  assert regen["overall"]["accepted_before"] == NUM_JOBS - REJECTED
  assert regen["overall"]["accepted_after"] > NUM_JOBS - REJECTED
  assert regen["overall"]["regenerated_jobs"] == REJECTED
  assert regen["overall"]["attempts"] == len(retries)
  assert sum(e["accepted_after"] for e in regen["per_level"]) == regen["overall"]["accepted_after"]
  assert [e["image_guidance"] for e in regen["per_level"]] == [0.0, 0.5]
  # The report's counts and the trained-on set are each job's best attempt.
  final, _, _, accepted = _final(workdir, threshold)
  assert len(final) == NUM_JOBS
  assert report["overall"]["accepted"] == len(accepted) == regen["overall"]["accepted_after"]
  assert report["overall"]["generated"] == NUM_JOBS
  for row in accepted:
    job = ss.original_job_id(row)
    candidates = [first[job]] + by_job.get(job, [])
    assert row["clip_text"] == max(r["clip_text"] for r in candidates)
  # Regeneration off: the first attempts only, as before.
  assert len(acceptance.accepted_rows(rows, threshold)) == NUM_JOBS - REJECTED


def test_killed_regeneration_resumes_to_the_uninterrupted_set(scored, uninterrupted, tmp_path):
  base, threshold = scored
  workdir = tmp_path / "killed"
  shutil.copytree(base, workdir)
  manifest = workdir / wd.SPECTRUM / "manifest-00000.jsonl"
  script = tmp_path / "run_score.py"
  script.write_text(_SCRIPT.format(tests=str(ROOT / "tests")))
  log = tmp_path / "run_score.log"
  with open(log, "wb") as out:
    proc = subprocess.Popen([sys.executable, str(script), str(workdir), repr(threshold)],
                            stdout=out, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 600
  try:
    while proc.poll() is None:
      if any(ss.attempt_of(r) for r in wd.read_jsonl(manifest)) or time.monotonic() > deadline:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.005)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  output = log.read_text(errors="replace")[-3000:]
  assert proc.returncode == -signal.SIGKILL, f"regeneration ended before the kill:\n{output}"
  killed = {r["job_id"]: r for r in wd.read_jsonl(manifest) if ss.attempt_of(r)}
  assert killed
  killed_mtimes = {r["path"]: (workdir / wd.SPECTRUM / r["path"]).stat().st_mtime_ns
                   for r in killed.values()}
  # What a kill mid-append leaves behind, on top of the real kill: a torn score line.
  with open(workdir / wd.SPECTRUM / "scores-00000.jsonl", "a", encoding="utf-8") as f:
    f.write('{"job_id": "digits/')
  score_stage.run(regenerating_config(threshold), workdir)  # the rerun

  done = uninterrupted
  # The same final attempt of every job. Attempts made after the kill share the
  # sampler's slots with other jobs than before, which moves float32 rounding
  # (XLA:CPU kernel blocking; see test_sampler): a pixel may move by one level
  # and a score in its 5th decimal, never enough to cross this threshold.
  got, want = _final(workdir, threshold), _final(done, threshold)
  assert got[0] == want[0]
  assert got[1].keys() == want[1].keys()
  for job_id, score in got[1].items():
    assert score == pytest.approx(want[1][job_id], abs=1e-3)
    diff = np.abs(got[2][job_id].astype(int) - want[2][job_id].astype(int))
    assert diff.max() <= 2 and np.mean(diff > 0) < 0.01, job_id
  assert [r["job_id"] for r in got[3]] == [r["job_id"] for r in want[3]]
  lines = [json.loads(l) for l in manifest.read_text().splitlines()]
  reference = [json.loads(l) for l in
               (done / wd.SPECTRUM / "manifest-00000.jsonl").read_text().splitlines()]
  assert len({r["job_id"] for r in lines}) == len(lines)  # no attempt twice
  assert sorted(r["job_id"] for r in lines) == sorted(r["job_id"] for r in reference)
  scores = wd.read_jsonl(workdir / wd.SPECTRUM / "scores-00000.jsonl")
  assert sorted(s["job_id"] for s in scores) == sorted(r["job_id"] for r in lines)
  for row in killed.values():  # made before the kill: kept, not made again
    assert (workdir / wd.SPECTRUM / row["path"]).stat().st_mtime_ns == killed_mtimes[row["path"]]
  report = json.loads((workdir / score_stage.ACCEPTANCE_JSON).read_text())
  expected = json.loads((done / score_stage.ACCEPTANCE_JSON).read_text())
  for key in ("accepted_before", "accepted_after", "regenerated_jobs", "attempts"):
    assert report["regeneration"]["overall"][key] == expected["regeneration"]["overall"][key]
  # A rerun of the finished stage finds nothing left to do.
  before = manifest.read_bytes()
  score_stage.run(regenerating_config(threshold), workdir)
  assert manifest.read_bytes() == before


def test_needing_attempt_follows_the_scores():
  def row(job, attempt, score, error=None):
    r = ss.make_row(source_id=job, label=9, class_name="nine", strength=0.5, seed=0,
                    prompt="p", attempt=attempt)
    return dict(r, clip_text=score, score_error=error)
  rows = [row("a", 0, 0.1), row("a", 1, 0.2), row("b", 0, 0.1), row("b", 1, 0.9),
          row("c", 0, 0.9), row("d", 0, None, "unreadable"), row("e", 0, 0.1)]
  names = lambda rs: sorted(r["source_id"] for r in rs)
  assert names(regeneration.needing_attempt(rows, 0.5, 1)) == ["a", "b", "e"]
  assert names(regeneration.needing_attempt(rows, 0.5, 2)) == ["a"]  # e: attempt 1 not made yet
  final = {ss.original_job_id(r): r["job_id"] for r in acceptance.final_rows(rows, 1)}
  assert final[ss.job_id("b", 0.5, 0)] == ss.job_id("b", 0.5, 0, 1)
  assert final[ss.job_id("a", 0.5, 0)] == ss.job_id("a", 0.5, 0, 1)
  assert final[ss.job_id("d", 0.5, 0)] == ss.job_id("d", 0.5, 0)
  assert {r["job_id"] for r in acceptance.final_rows(rows, 0)} == {
      ss.job_id(s, 0.5, 0) for s in "abcde"}
