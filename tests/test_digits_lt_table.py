"""experiments/digits_lt_table.py: its aggregation, its guards, and a smoke-sized real run."""

import json

import numpy as np
import pytest

import experiment_scripts


@pytest.fixture(scope="module")
def table():
  return experiment_scripts.load("digits_lt_table")


def _protocol(table, *extra):
  return table.protocol_of(table.parse_args(list(extra)))


def test_summary_is_mean_and_sample_std_over_seeds(table):
  protocol = _protocol(table, "--losses=ce", "--schedules=none,syn_to_real")
  runs = [{"loss": "ce", "schedule": "none", "seed": s, "test/many": 1.0,
           "test/medium": m, "test/few": f, "test/all": 0.5}
          for s, m, f in [(0, 0.9, 0.2), (1, 0.8, 0.4), (2, 0.7, 0.6)]]
  runs.append({"loss": "ce", "schedule": "syn_to_real", "seed": 0, "test/many": 0.5,
               "test/medium": 0.5, "test/few": 0.5, "test/all": 0.5})
  rows = table.summarize(runs, protocol)
  assert [r["method"] for r in rows] == ["CE", "CE + DisCL syn_to_real"]
  assert rows[0]["medium_mean"] == pytest.approx(80.0)
  assert rows[0]["few_std"] == pytest.approx(np.std([20.0, 40.0, 60.0], ddof=1))
  assert rows[0]["many_std"] == 0.0 and rows[1]["few_std"] == 0.0  # one seed: no spread
  markdown = table.to_markdown(rows)
  assert "| CE | 100.0 ± 0.0 | 80.0 ± 10.0 | 40.0 ± 20.0 | 50.0 ± 0.0 |" in markdown
  assert markdown.count("\n") == 4


def test_bad_arguments_are_named(table):
  with pytest.raises(ValueError, match="--schedules='none,warp'"):
    _protocol(table, "--schedules=none,warp")
  with pytest.raises(ValueError, match="--curriculum_epochs=9"):
    _protocol(table, "--epochs=5", "--curriculum_epochs=9")


def test_a_workdir_keeps_its_protocol(table, tmp_path):
  table.check_protocol(tmp_path, _protocol(table, "--epochs=4", "--curriculum_epochs=2"))
  table.check_protocol(tmp_path, _protocol(table, "--epochs=4", "--curriculum_epochs=2",
                                           "--seeds=0,1,2,3"))  # more seeds: fine
  with pytest.raises(ValueError, match=r"protocol\.json: its runs used epochs=4, not 6"):
    table.check_protocol(tmp_path, _protocol(table, "--epochs=6", "--curriculum_epochs=2"))


def test_smoke_table_runs_every_stage_and_resumes(table, tmp_path):
  args = ["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
          "--config_arg=runlocal", "--seeds=0", "--losses=ce",
          "--schedules=none,resample,text_only", "--base_epochs=1", "--epochs=2",
          "--curriculum_epochs=1"]
  report = table.main(args, compile_cache=False)
  work = tmp_path / "work"
  # One spectrum from the shipped digit models, scored, shared by the runs.
  scores = (work / "spectrum" / "spectrum" / "scores-00000.jsonl").read_text().splitlines()
  assert len(scores) > 0
  config = json.loads((work / "runs" / "ce" / "text_only" / "seed0" / "config.json").read_text())
  assert config["train"]["data"]["spectrum_dir"] == str((work / "spectrum" / "spectrum").resolve())
  assert not (work / "runs" / "ce" / "text_only" / "seed0" / "spectrum").exists()
  # Each method run starts from its base run's checkpoint.
  config = json.loads((work / "runs" / "ce" / "none" / "seed0" / "config.json").read_text())
  assert config["train"]["train"]["init_checkpoint"] == str(work / "base" / "ce" / "seed0" / "ckpt")
  # The text-only run trained on synthetic images; the plain run on real ones only.
  metrics = [json.loads(line) for line in
             (work / "runs" / "ce" / "text_only" / "seed0" / "metrics.jsonl").read_text().splitlines()]
  assert metrics[0]["num_synthetic"] > 0 and metrics[0]["curriculum_levels"] == [0.0]
  # The resampling baseline: real images only, sampled as the text-only run's real
  # images (non-tail subsampled, the tail share held with real tail images).
  plain, resampled = (
      [json.loads(line) for line in
       (work / "runs" / "ce" / name / "seed0" / "metrics.jsonl").read_text().splitlines()]
      for name in ("none", "resample"))
  for row in resampled:
    assert row["num_synthetic"] == 0 and row["curriculum_phase"] == "real"
    assert row["num_real"] == metrics[0]["num_real"] + metrics[0]["num_synthetic"]
    assert row["num_real"] < plain[0]["num_real"]
  assert [r["method"] for r in report["table"]] == [
      "CE", "CE + resampling", "CE + DisCL text_only"]
  for row in report["table"]:
    assert 0.0 <= row["all_mean"] <= 100.0
  # The paper's way beside it: each run at its best test epoch, never below the val-chosen one.
  for run in report["runs"]:
    assert run["best_test/all"] >= run["test/all"] and run["best_test_epoch"] in (0, 1)
  assert [r["method"] for r in report["table_best_test_epoch"]] == [
      r["method"] for r in report["table"]]
  written = json.loads((tmp_path / "out" / "digits_lt_table.json").read_text())
  assert written["table"] == report["table"]
  assert (tmp_path / "out" / "digits_lt_table.md").read_text() == table.to_markdown(report["table"])
  # A rerun reads every finished run back instead of training it again.
  metrics_files = sorted(work.glob("*/ce/**/metrics.jsonl"))
  assert len(metrics_files) == 4
  stamps = [p.stat().st_mtime_ns for p in metrics_files]
  again = table.main(args, compile_cache=False)
  assert [p.stat().st_mtime_ns for p in metrics_files] == stamps
  assert [r["trained_now"] for r in report["runs"]] == [True, True, True]
  assert [r["trained_now"] for r in again["runs"]] == [False, False, False]
  assert again["table"] == report["table"]
  assert again["table_last_epoch"] == report["table_last_epoch"]
  # A subset reuses the finished runs of the larger call.
  subset = table.main(args[:-4] + ["--schedules=resample", "--base_epochs=1", "--epochs=2",
                                   "--curriculum_epochs=1"], compile_cache=False)
  assert [r["trained_now"] for r in subset["runs"]] == [False]
  assert subset["table"] == report["table"][1:2]
