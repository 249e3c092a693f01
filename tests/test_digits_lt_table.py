"""experiments/digits_lt_table.py: its aggregation, its guards, and a smoke-sized real run."""

import json
import pathlib

import numpy as np
import pytest

import experiment_scripts
from discl_jax.data import digits


@pytest.fixture(scope="module")
def table():
  return experiment_scripts.load("digits_lt_table")


def _protocol(table, *extra):
  return table.protocol_of(table.parse_args(list(extra)))


def test_summary_is_mean_and_sample_std_over_seeds(table):
  protocol = _protocol(table, "--losses=ce", "--schedules=none,syn_to_real")
  runs = [{"loss": "ce", "schedule": "none", "seed": s, "test/many": 1.0,
           "test/medium": m, "test/few": f, "test/all": 0.5, "test_per_class": [1.0, f]}
          for s, m, f in [(0, 0.9, 0.2), (1, 0.8, 0.4), (2, 0.7, 0.6)]]
  runs.append({"loss": "ce", "schedule": "syn_to_real", "seed": 0, "test/many": 0.5,
               "test/medium": 0.5, "test/few": 0.5, "test/all": 0.5,
               "test_per_class": [0.5, 0.25]})
  rows = table.summarize(runs, protocol)
  assert [r["method"] for r in rows] == ["CE", "CE + DisCL syn_to_real"]
  assert rows[0]["medium_mean"] == pytest.approx(80.0)
  assert rows[0]["few_std"] == pytest.approx(np.std([20.0, 40.0, 60.0], ddof=1))
  assert rows[0]["many_std"] == 0.0 and rows[1]["few_std"] == 0.0  # one seed: no spread
  markdown = table.to_markdown(rows)
  assert "| CE | 100.0 ± 0.0 | 80.0 ± 10.0 | 40.0 ± 20.0 | 50.0 ± 0.0 |" in markdown
  assert markdown.count("\n") == 4
  assert rows[0]["per_class_mean"] == pytest.approx([100.0, 40.0])  # mean over the seeds
  per_class = table.per_class_markdown(rows, ["zero", "one"], [120, 6])
  assert "| method | zero (120) | one (6) |" in per_class
  assert "| CE + DisCL syn_to_real | 50 | 25 |" in per_class


def test_fixed_row_is_its_best_level_on_val_and_differences_pair_seeds(table):
  protocol = _protocol(table, "--losses=ce", "--schedules=resample,fixed",
                       "--imbalance_ratios=20,100", "--fixed_levels=0.1,0.5")
  assert protocol["imbalance_ratios"] == [20.0, 100.0] and protocol["fixed_levels"] == [0.1, 0.5]

  def run(schedule, level, seed, val, few):
    return {"imbalance_ratio": 100.0, "loss": "ce", "schedule": schedule, "level": level,
            "seed": seed, "val/all": val, **{f"{p}{g}": 0.5 for p in ("test/", "last/")
                                              for g in table.GROUPS},
            "test/few": few, "last/few": few, "test_per_class": [0.5, few]}
  runs = [run("resample", None, s, 0.9, f) for s, f in [(0, 0.40), (1, 0.50), (2, 0.60)]]
  runs += [run("fixed", 0.1, s, 0.8, 0.99) for s in range(3)]  # best on test, worse on val
  runs += [run("fixed", 0.5, s, 0.85, f) for s, f in [(0, 0.50), (1, 0.58), (2, 0.72)]]
  assert table.choose_fixed_level(runs, "ce") == 0.5
  rows = table.summarize(runs, protocol)
  assert [(r["method"], r["level"]) for r in rows] == [
      ("CE + resampling", None), ("CE + DisCL fixed 0.5", 0.5)]
  pairs = table.paired_differences(runs, protocol)
  assert [(p["imbalance_ratio"], p["epoch"]) for p in pairs] == [
      (100.0, "val-chosen"), (100.0, "last")]  # ratio 20 has no runs: no pair
  few = pairs[0]["few"]
  assert few["differences"] == pytest.approx([10.0, 8.0, 12.0])
  assert few["mean"] == pytest.approx(10.0) and few["std"] == pytest.approx(2.0)
  assert few["se"] == pytest.approx(2.0 / np.sqrt(3)) and few["beyond_2se"]
  assert pairs[0]["all"]["mean"] == 0.0 and not pairs[0]["all"]["beyond_2se"]
  markdown = table.paired_markdown(pairs)
  assert "| 100 | CE + DisCL fixed 0.5 | val-chosen | 3 | +10.0 ± 2.0 (se 1.2) **\\*** |" in markdown


def test_the_ratio_moves_the_train_split_only():
  low, high = (digits.load(0, imbalance_ratio=r, max_per_class=120, val_per_class=5)
               for r in (20.0, 100.0))
  for split in ("val", "test"):  # the shipped digit models' held-out test split stays put
    assert list(low[split].ids) == list(high[split].ids)
  assert set(high["train"].ids) < set(low["train"].ids)
  assert list(high["train"].class_counts()) == [120, 71, 43, 25, 15, 9, 5, 3, 2, 1]


def test_bad_arguments_are_named(table):
  with pytest.raises(ValueError, match="--schedules='none,warp'"):
    _protocol(table, "--schedules=none,warp")
  with pytest.raises(ValueError, match="--curriculum_epochs=9"):
    _protocol(table, "--epochs=5", "--curriculum_epochs=9")
  with pytest.raises(ValueError, match="--imbalance_ratios='20,0.5'"):
    _protocol(table, "--imbalance_ratios=20,0.5")
  with pytest.raises(ValueError, match="--fixed_levels='0.3,x'"):
    _protocol(table, "--fixed_levels=0.3,x")
  with pytest.raises(KeyError, match="--set curriculum.tail_shar: unknown config key"):
    _protocol(table, "--set=curriculum.tail_shar=0.3")


def test_every_run_is_at_its_ratio_with_the_overrides(table):
  protocol = _protocol(table, "--set=curriculum.tail_share=0.3", "--imbalance_ratios=20,100")
  assert protocol["overrides"] == {"curriculum.tail_share": "0.3"}
  base = table.base_config("ce", 1, protocol, 20.0)
  fixed = table.method_config("balanced_softmax", "fixed", 2, protocol, "/b/ckpt", 20.0, 0.3)
  for c in (base, fixed):
    assert c.data.imbalance_ratio == 20.0 and c.curriculum.tail_share == 0.3
  assert base.curriculum.schedule == "none" and base.seed == 1
  assert fixed.curriculum.levels == (0.3,) and fixed.train.init_checkpoint == "/b/ckpt"
  assert table.demo_config(protocol).data.imbalance_ratio == 100.0  # the demo's
  assert table.ratio_dir("/w", 100.0, protocol) == pathlib.Path("/w")
  assert table.ratio_dir("/w", 20.0, protocol) == pathlib.Path("/w/ratio20")


def test_a_workdir_keeps_its_protocol(table, tmp_path):
  table.check_protocol(tmp_path, _protocol(table, "--epochs=4", "--curriculum_epochs=2"))
  table.check_protocol(tmp_path, _protocol(table, "--epochs=4", "--curriculum_epochs=2",
                                           "--seeds=0,1,2,3"))  # more seeds: fine
  with pytest.raises(ValueError, match=r"protocol\.json: its runs used epochs=4, not 6"):
    table.check_protocol(tmp_path, _protocol(table, "--epochs=6", "--curriculum_epochs=2"))
  # Ratios are added; a record made before the root's ratio was recorded holds 20 there.
  recorded = json.loads((tmp_path / "protocol.json").read_text())
  del recorded["root_imbalance_ratio"]
  (tmp_path / "protocol.json").write_text(json.dumps(recorded))
  protocol = _protocol(table, "--epochs=4", "--curriculum_epochs=2", "--imbalance_ratios=20,100")
  table.check_protocol(tmp_path, protocol)
  assert table.ratio_dir(tmp_path, 20.0, protocol) == tmp_path
  # A workdir made when the demo's ratio was 50 keeps 50 in its root, under
  # either the old key or the new, and the demo's ratio of now (100) in its own folder.
  for key in ("demo_imbalance_ratio", "root_imbalance_ratio"):
    recorded = {k: v for k, v in recorded.items() if k != "root_imbalance_ratio"}
    recorded[key] = 50.0
    (tmp_path / "protocol.json").write_text(json.dumps(recorded))
    protocol = _protocol(table, "--epochs=4", "--curriculum_epochs=2")
    table.check_protocol(tmp_path, protocol)
    assert table.ratio_dir(tmp_path, 50.0, protocol) == tmp_path
    assert table.ratio_dir(tmp_path, 100.0, protocol) == tmp_path / "ratio100"


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
  # images (the demo keeps every non-tail image, curriculum.nontail_fraction=1.0, and
  # holds the tail share with real tail images drawn again: more than the plain epoch).
  plain, resampled = (
      [json.loads(line) for line in
       (work / "runs" / "ce" / name / "seed0" / "metrics.jsonl").read_text().splitlines()]
      for name in ("none", "resample"))
  for row in resampled:
    assert row["num_synthetic"] == 0 and row["curriculum_phase"] == "real"
    assert row["num_real"] == metrics[0]["num_real"] + metrics[0]["num_synthetic"]
    assert row["num_real"] > plain[0]["num_real"]
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
  # The study: a second ratio beside the demo's, whose finished runs above are read back.
  study_args = args[:-4] + ["--schedules=resample,text_only", "--imbalance_ratios=100,10",
                            "--base_epochs=1", "--epochs=2", "--curriculum_epochs=1"]
  study = table.main(study_args, compile_cache=False)
  assert [(r["imbalance_ratio"], r["schedule"], r["trained_now"]) for r in study["runs"]] == [
      (10.0, "resample", True), (10.0, "text_only", True),
      (100.0, "resample", False), (100.0, "text_only", False)]
  ratio10 = work / "ratio10"
  config = json.loads((ratio10 / "runs" / "ce" / "text_only" / "seed0" / "config.json").read_text())
  assert config["train"]["data"]["imbalance_ratio"] == 10.0
  assert config["train"]["data"]["spectrum_dir"] == str((ratio10 / "spectrum" / "spectrum").resolve())
  assert config["train"]["train"]["init_checkpoint"] == str(ratio10 / "base" / "ce" / "seed0" / "ckpt")
  assert [t["imbalance_ratio"] for t in study["ratios"]] == [10.0, 100.0]
  assert study["ratios"][1]["table"] == report["table"][1:]
  assert [r["method"] for r in study["ratios"][0]["table"]] == [
      "CE + resampling", "CE + DisCL text_only"]
  pairs = study["paired_differences"]
  assert [(p["imbalance_ratio"], p["epoch"]) for p in pairs] == [
      (10.0, "val-chosen"), (10.0, "last"), (100.0, "val-chosen"), (100.0, "last")]
  by_key = {(r["imbalance_ratio"], r["schedule"]): r for r in study["runs"]}
  for pair in pairs:
    discl, resampled = (by_key[(pair["imbalance_ratio"], s)] for s in ("text_only", "resample"))
    prefix = "test/" if pair["epoch"] == "val-chosen" else "last/"
    assert pair["few"]["differences"] == pytest.approx(
        [100.0 * (discl[f"{prefix}few"] - resampled[f"{prefix}few"])])
    assert pair["few"]["se"] is None and not pair["few"]["beyond_2se"]  # one seed
  out = tmp_path / "out"
  markdown = (out / "digits_lt_ratios.md").read_text()
  for ratio_table in study["ratios"]:
    assert table.to_markdown(ratio_table["table"]) in markdown
  assert table.paired_markdown(pairs) in markdown
  assert (out / "digits_lt_ratios.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((out / "digits_lt_ratios.json").read_text())["ratios"] == study["ratios"]
  again = table.main(study_args, compile_cache=False)
  assert not any(r["trained_now"] for r in again["runs"])
  assert again["ratios"] == study["ratios"]
