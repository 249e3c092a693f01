"""The eval stage and report: report.md and curves.png from a metrics.jsonl the test writes."""

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from discl_jax import config as config_lib
from discl_jax import workdir as wd
from discl_jax.evaluation import report
from discl_jax.stages import eval_stage

SPLITS = ("val", "test")


def _rows(epochs=6):
  """A syn_to_real-like log: 0.1, 0.3, 0.5 then real; val peaks at epoch 4."""
  levels = [[0.1], [0.1], [0.3], [0.5], [], []]
  val_all = [0.30, 0.40, 0.45, 0.50, 0.62, 0.55]
  rows = []
  for e in range(epochs):
    row = {"epoch": e, "step": 10 * (e + 1), "loss": 2.0 - 0.2 * e,
           "curriculum_phase": "synthetic" if levels[e] else "real",
           "curriculum_level": levels[e][0] if levels[e] else None,
           "curriculum_levels": levels[e], "num_real": 100, "num_synthetic": 20 if levels[e] else 0}
    for split in SPLITS:
      shift = 0.0 if split == "val" else -0.05
      row.update({f"{split}/many": val_all[e] + 0.2 + shift, f"{split}/medium": val_all[e] + shift,
                  f"{split}/few": val_all[e] - 0.2 + shift, f"{split}/all": val_all[e] + shift,
                  f"{split}/macro_f1": val_all[e] - 0.01 + shift})
    rows.append(row)
  return rows


def _write_workdir(tmp_path, rows, best_epoch=4):
  wd.append_jsonl(wd.path(tmp_path, wd.METRICS), rows)
  best = rows[best_epoch]
  wd.atomic_write_json(wd.path(tmp_path, wd.TRAIN_RESULT), {
      "epochs": len(rows), "best_epoch": best_epoch,
      **{k: v for k, v in best.items() if k.startswith(("val/", "test/"))}})


def _demo_config():
  return config_lib.load_file(
      pathlib.Path(__file__).resolve().parent.parent / "configs" / "demo.py")


def test_eval_stage_writes_report_and_curves(tmp_path):
  rows = _rows()
  _write_workdir(tmp_path, rows)
  config = _demo_config()
  labels = np.repeat(np.arange(10), 5)
  preds = labels.copy()
  preds[labels == 9] = 0  # class 9 always wrong
  buffer = io.BytesIO()
  np.savez(buffer, epoch=4, test_pred=preds, test_label=labels, test_prob_true=np.ones(50),
           val_pred=preds, val_label=labels, val_prob_true=np.ones(50))
  wd.atomic_write_bytes(wd.path(tmp_path, wd.PREDICTIONS), buffer.getvalue())

  report_path, curves_path = eval_stage.run(config, tmp_path)

  text = report_path.read_text()
  assert "best validation epoch (4)" in text
  # Best epoch (4): test Many/Medium/Few/All/macro-F1 = 0.77 / 0.57 / 0.37 / 0.57 / 0.56.
  assert "| test | 77.00 | 57.00 | 37.00 | 57.00 | 56.00 |" in text
  assert "| val | 82.00 | 62.00 | 42.00 | 62.00 | 61.00 |" in text
  assert "## Last epoch (5)" in text
  assert "| 2 | synthetic | 0.30 | 100 | 20 |" in text
  assert "| 4 | real | real | 100 | 0 |" in text
  assert "schedule `syn_to_real`" in text
  # digits-LT demo (ratio 100): class "nine" is Few with 1 training image; always wrong here.
  assert "| nine | few | 1 | 5 | 0.00 |" in text
  assert "| zero | many | 120 | 5 | 100.00 |" in text
  assert f"]({report.CURVES})" in text
  with Image.open(curves_path) as image:
    assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 300


def test_report_without_final_or_predictions_picks_best_val(tmp_path):
  rows = _rows()
  rows[1]["curriculum_levels"] = [0.1, 0.3, 0.5]  # a mixed (all_levels) epoch
  rows[1]["curriculum_level"] = None
  del rows[3]["test/few"]  # partial rows still render
  report_path, curves_path = report.write_report(tmp_path, rows)
  text = report_path.read_text()
  assert "best validation epoch (4)" in text
  assert "| 1 | synthetic | 0.10+0.30+0.50 |" in text
  assert "Per-class" not in text
  assert curves_path.stat().st_size > 0


def test_per_class_table_values():
  table = report.per_class_table(
      preds=np.array([0, 1, 1, 1]), labels=np.array([0, 0, 1, 1]), class_names=("a", "b", "c"),
      groups=np.array(["many", "few", "few"]), train_counts=np.array([50, 5, 3]))
  lines = table.splitlines()
  assert lines[2] == "| a | many | 50 | 2 | 50.00 |"
  assert lines[3] == "| b | few | 5 | 2 | 100.00 |"
  assert lines[4] == "| c | few | 3 | 0 | - |"


def test_eval_stage_without_metrics_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    eval_stage.run(_demo_config(), tmp_path)


def test_eval_stage_rejects_a_corrupt_result_file(tmp_path):
  wd.append_jsonl(wd.path(tmp_path, wd.METRICS), _rows())
  wd.path(tmp_path, wd.TRAIN_RESULT).write_text("{not json")
  with pytest.raises(ValueError, match="train_result.json"):
    eval_stage.run(_demo_config(), tmp_path)


def test_torn_last_metrics_line_is_ignored(tmp_path):
  rows = _rows()
  path = wd.path(tmp_path, wd.METRICS)
  wd.append_jsonl(path, rows)
  with open(path, "a") as f:
    f.write(json.dumps({"epoch": 6})[:5])  # a killed writer's half line
  report_path, _ = eval_stage.run(_demo_config(), tmp_path)
  assert "## Last epoch (5)" in report_path.read_text()


def test_iwildcam_report_adds_the_epoch_chosen_on_id_val():
  rows = []
  for e, (id_val, val) in enumerate([(0.2, 0.1), (0.6, 0.3), (0.5, 0.4), (0.6, 0.2)]):
    rows.append({"epoch": e, **{f"{s}/macro_f1": v for s, v in
                                (("id_val", id_val), ("val", val), ("test", val - 0.05),
                                 ("id_test", id_val - 0.05))}})
  final = {"best_epoch": 2, "selected_on": "val/macro_f1"}
  assert report.id_val_row(rows, "val/macro_f1")["epoch"] == 1  # the first of the ties
  assert report.id_val_row(rows, "id_val/macro_f1") is None
  text = report.render_markdown(rows, final=final)
  assert "## Result at the best validation epoch (2)" in text
  assert "## Result at the epoch chosen on id_val (1)" in text and "## Last epoch (3)" in text
  section = text.split("## Result at the epoch chosen on id_val (1)")[1].split("##")[0]
  assert "| id_test | - | - | - | - | 55.00 |" in section
  assert "epoch chosen on id_val" not in report.render_markdown(_rows())  # no id_val split


def test_best_test_epoch_section_is_labelled_the_papers_way_beside_the_val_headline():
  rows = _rows()
  rows[5]["test/all"] = 0.9  # test peaks at epoch 5, val at epoch 4
  text = report.render_markdown(rows, final={"best_epoch": 4, "selected_on": "val/all"})
  headline = text.index("## Result at the best validation epoch (4)")
  paper = text.index("## Best test epoch (5): the paper's way of reporting")
  assert headline < paper
  section = text[paper:text.index("## Last epoch")]
  assert "| test | " in section and "| 90.00 |" in section
  assert "picked the best epoch on the test split" in section
  # One epoch (an evaluate-only run): no such section.
  assert "Best test epoch" not in report.render_markdown(rows[:1], final={"best_epoch": 0})


def test_an_unfinished_run_is_reported_as_unfinished(tmp_path, caplog):
  rows = _rows()                                  # 6 of the demo's 20 epochs: a stopped run
  _write_workdir(tmp_path, rows)
  config = _demo_config()
  with caplog.at_level("WARNING"):
    report_path, _ = eval_stage.run(config, tmp_path)
  text = report_path.read_text()
  assert "**Warning: unfinished run: 6 of 20 epochs trained; rerun the train stage" in text
  assert "unfinished run: 6 of 20 epochs trained" in caplog.text
  finished = config_lib.load_file(pathlib.Path(__file__).resolve().parent.parent /
                                  "configs" / "demo.py", "runlocal")
  finished.train.epochs = 6
  assert "unfinished" not in report.render_markdown(
      rows, final={"best_epoch": 4}, config=finished)
  assert "train_result.json is missing" in report.render_markdown(rows, config=finished)


def test_a_damaged_predictions_file_is_one_line_naming_it(tmp_path):
  _write_workdir(tmp_path, _rows())
  target = wd.path(tmp_path, wd.PREDICTIONS)
  target.write_bytes(b"PK\x03\x04 not a whole zip file")
  with pytest.raises(ValueError, match=rf"{target} is damaged \(BadZipFile: .*rerun the train "
                     "stage"):
    eval_stage.run(_demo_config(), tmp_path)
