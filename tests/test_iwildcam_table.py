"""experiments/iwildcam_table.py: its aggregation, and a smoke run on the tiny iWildCam fixture."""

import json

import numpy as np
import pytest

import experiment_scripts
import iwildcam_fixture
import test_iwildcam


@pytest.fixture(scope="module")
def table():
  return experiment_scripts.load("iwildcam_table")


def test_summary_is_mean_and_sample_std_over_seeds(table):
  runs = [{"schedule": "none", "seed": s, "val": {"id": i, "ood": o}}
          for s, i, o in [(0, 0.5, 0.3), (1, 0.6, 0.4)]]
  runs.append({"schedule": "adaptive", "seed": 0, "val": {"id": 0.55, "ood": 0.38}})
  rows = table.summarize(runs)
  assert [r["method"] for r in rows] == ["FLYP", "FLYP + DisCL (adaptive)"]
  assert rows[0]["id_mean"] == pytest.approx(55.0)
  assert rows[0]["ood_std"] == pytest.approx(np.std([30.0, 40.0], ddof=1))
  assert "| FLYP + DisCL (adaptive) | 38.0 ± 0.0 | 55.0 ± 0.0 |" in table.to_markdown(rows)


def _fixture_overrides(data):
  """Tiny models and sizes for the fixture (the real run only sets data.metadata_csv)."""
  return [f"--set=data.metadata_csv={data / 'metadata.csv'}", "--set=data.num_workers=0",
          "--set=diffusion.tiny=True", "--set=diffusion.model=", "--set=diffusion.dtype=float32",
          "--set=diffusion.resolution=32", "--set=diffusion.strengths=0.5,0.7",
          "--set=diffusion.slots=8", "--set=diffusion.grid_sources=1",
          "--set=score.tiny=True", "--set=score.model=", "--set=score.batch_size=8",
          "--set=score.threshold=-1.0", "--set=train.clip_model=", "--set=train.batch_size=8",
          "--set=train.warmup_steps=2", "--set=train.learning_rate=1e-3",
          "--set=eval.batch_size=16", "--set=curriculum.levels=0.3,0.5",
          "--set=curriculum.val_sources=3", "--set=curriculum.uniform_rows=16",
          # The baseline gets every fixture image right, so the hard set also takes the
          # images of lowest true-class probability (a DisCL run needs a spectrum).
          "--set=hard.prob_quantile=0.5"]


def test_smoke_table_on_the_tiny_fixture_runs_both_steps_and_resumes(table, tmp_path):
  iwildcam_fixture.write_tiny_iwildcam(tmp_path / "data", per_class=test_iwildcam.PER_CLASS)
  args = ["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
          "--config_arg=runlocal", "--seeds=0"] + _fixture_overrides(tmp_path / "data")
  report = table.main(args, compile_cache=False)
  work = tmp_path / "work"
  # Step 2 took its hard set from the baseline's checkpoint, without "empty".
  config = json.loads((work / "discl" / "seed0" / "config.json").read_text())["train"]
  assert config["hard"]["model_checkpoint"] == str(work / "baseline" / "seed0" / "ckpt")
  hard = [json.loads(l) for l in (work / "spectrum" / "hard.jsonl").read_text().splitlines()]
  assert all(r["class_name"] != "empty" for r in hard)
  assert report["hard"]["num_hard"] == len(hard)
  assert [r["method"] for r in report["table"]] == ["FLYP", "FLYP + DisCL (adaptive)"]
  for key in ("table", "table_id_val_epoch", "table_best_test_epoch", "table_last_epoch"):
    for row in report[key]:
      assert 0.0 <= row["id_mean"] <= 100.0 and 0.0 <= row["ood_mean"] <= 100.0
  metrics = [json.loads(l) for l in
             (work / "discl" / "seed0" / "metrics.jsonl").read_text().splitlines()]
  assert metrics[0]["curriculum_phases"][0] == "uniform"
  for run in report["runs"]:  # the paper's way: the best OOD test epoch
    assert run["test"]["ood"] >= run["val"]["ood"]
  written = json.loads((tmp_path / "out" / "iwildcam_table.json").read_text())
  assert written["table"] == report["table"]
  # A rerun reads every finished run back; another config in the same workdir is refused.
  again = table.main(args, compile_cache=False)
  assert [r["trained_now"] for r in report["runs"]] == [True, True]
  assert [r["trained_now"] for r in again["runs"]] == [False, False]
  assert again["table"] == report["table"]
  with pytest.raises(ValueError, match="its runs used overrides"):
    table.main(args + ["--set=train.learning_rate=1e-4"], compile_cache=False)
