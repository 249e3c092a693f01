"""experiments/imagenet_lt_table.py: its aggregation beside the paper's rows, and a smoke run
on a stand-in ImageNet-LT (tiny PNGs, tiny models) that runs every row and resumes."""

import json

import pytest

import experiment_scripts
import test_longtail_base


@pytest.fixture(scope="module")
def table():
  return experiment_scripts.load("imagenet_lt_table")


def test_summary_puts_the_papers_rows_beside_ours(table):
  runs = [{"method": "ce_discl", "seed": s, "val": {"many": 0.5, "medium": 0.3, "few": f,
                                                     "all": 0.4}} for s, f in [(0, 0.2), (1, 0.3)]]
  runs.append({"method": "base", "seed": 0,
               "val": {"many": 0.577, "medium": 0.266, "few": 0.044, "all": 0.358}})
  rows = table.summarize(runs, ["base", "ce_discl", "bs"])
  assert [r["method"] for r in rows] == ["CE (the base as it is)", "CE + DisCL"]
  assert rows[1]["few_mean"] == pytest.approx(25.0) and rows[1]["few_std"] > 0
  markdown = table.to_markdown(rows)
  assert "| CE (the base as it is) | 57.7 ± 0.0 | 26.6 ± 0.0 | 4.4 ± 0.0 | 35.8 ± 0.0 | " \
         "57.70 | 26.60 | 4.40 | 35.80 |" in markdown
  assert "| CE + DisCL | 50.0 ± 0.0 | 30.0 ± 0.0 | 25.0 ± 7.1 | 40.0 ± 0.0 | - | - | 23.64 | " \
         "39.82 |" in markdown


def test_bad_methods_are_named(table):
  with pytest.raises(ValueError, match=r"--methods='base,ce_dscl': unknown \['ce_dscl'\]"):
    table.protocol_of(table.parse_args(["--base=x", "--methods=base,ce_dscl"]))


def _stand_in(tmp_path):
  """The stand-in ImageNet-LT and the --set overrides that size every run for it."""
  lists = test_longtail_base._write_imagenet_lt(tmp_path)  # 12 / 6 / 2 train images
  names = tmp_path / "classes.txt"
  names.write_text("goldfish\nkoala\ngreat white shark\n")
  return [f"--set=data.root={tmp_path}", f"--set=data.train_list={lists['train']}",
          f"--set=data.val_list={lists['val']}", f"--set=data.test_list={lists['test']}",
          f"--set=data.class_names_file={names}", "--set=data.image_size=32",
          "--set=data.num_workers=0", "--set=data.many_threshold=10",
          "--set=data.few_threshold=4", "--set=prompts.source=templates",
          "--set=diffusion.tiny=True", "--set=diffusion.model=", "--set=diffusion.dtype=float32",
          "--set=diffusion.grid_sources=1", "--set=score.tiny=True", "--set=score.model=",
          "--set=score.batch_size=8", "--set=score.threshold=-1.0",
          "--set=score.regenerate=False", "--set=train.model=tiny", "--set=train.batch_size=4",
          "--set=eval.batch_size=4", "--set=curriculum.tail_share=0.5"]


def test_smoke_table_runs_every_row_and_resumes(table, tmp_path):
  args = ["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--base=train",
          "--config_arg=runlocal", "--seeds=0"] + _stand_in(tmp_path)
  report = table.main(args + ["--methods=base,bs_discl,ce_resample"], compile_cache=False)
  work = tmp_path / "work"
  assert [r["method"] for r in report["table"]] == [
      "CE (the base as it is)", "BS + DisCL", "CE + resampling"]
  # The base row is the trained base evaluated as it is; every other run starts from it.
  base = json.loads((work / "runs" / "base" / "seed0" / "train_result.json").read_text())
  assert base["evaluated_as_is"] and base["epochs"] == 0
  trained_base = json.loads((work / "base_train" / "train_result.json").read_text())
  # ckpt/ of a run gives its best validation epoch's weights: the figures it reported then.
  for key in ("val/all", "test/all", "test/few"):
    assert base[key] == pytest.approx(trained_base[key])
  for method in ("bs_discl", "ce_resample"):
    config = json.loads((work / "runs" / method / "seed0" / "config.json").read_text())["train"]
    assert config["train"]["init_checkpoint"] == str(work / "base_train" / "ckpt")
  # DisCL runs train on the one shared spectrum; the others on real images only.
  metrics = [json.loads(l) for l in
             (work / "runs" / "bs_discl" / "seed0" / "metrics.jsonl").read_text().splitlines()]
  assert metrics[0]["num_synthetic"] > 0
  assert not (work / "runs" / "bs_discl" / "seed0" / "spectrum").exists()
  for key in ("table", "table_best_test_epoch", "table_last_epoch"):
    for row in report[key]:
      assert 0.0 <= row["all_mean"] <= 100.0
  for run in report["runs"]:  # the paper's way never reads below the val-chosen epoch
    assert run["test"]["all"] >= run["val"]["all"]
  written = (tmp_path / "out" / "imagenet_lt_table.md").read_text()
  assert "the paper's way of reporting" in written and "| paper All |" in written
  # A rerun reads every finished run back and trains only an added row; another config in
  # the same workdir is refused.
  again = table.main(args + ["--methods=base,bs_discl,ce_resample,bs"], compile_cache=False)
  assert all(r["trained_now"] for r in report["runs"])
  assert [r["trained_now"] for r in again["runs"]] == [False, False, False, True]
  assert again["table"][:3] == report["table"] and again["table"][3]["method"] == "BS"
  with pytest.raises(ValueError, match="its runs used overrides"):
    table.main(args + ["--set=train.learning_rate=1e-4"], compile_cache=False)
