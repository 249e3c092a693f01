"""The low-quality path end to end on a tiny iWildCam-shaped dataset.

hard (zero-shot CLIP misclassifications) -> prompts (common names) -> generate
(tiny SD, 2 strengths) -> score (tiny CLIP) -> train (FLYP on the tiny CLIP,
adaptive curriculum) -> eval, run in subprocesses sharing an XLA compilation
cache:
  one     the whole pipeline on 1 device,
  eight   the whole pipeline on 8 fake CPU devices (same chosen levels),
  broken  train only, on a copy of one's hard..score outputs: SIGTERM inside the
          first synthetic phase (mid-epoch checkpoint), resume in the same
          process, SIGKILL after epoch 2's metrics row (before its checkpoint),
          then a fresh process resumes: same metrics and levels as `one`.
Bad input not covered here: a metadata.csv row pointing at a missing image
(named with its csv line), an unknown split in metadata.csv and a missing
metadata.csv are tested in tests/test_filelists.py.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import iwildcam_fixture
from discl_jax import config as config_lib
from discl_jax import workdir as wd
from discl_jax.data import class_names as class_names_lib
from discl_jax.data import datasets
from discl_jax.stages import hard_stage
from discl_jax.train import hard_selection
from discl_jax.train import loop

TESTS = pathlib.Path(__file__).resolve().parent
EPOCHS = 4
# Images per class and split: few train images keep the generate jobs (hard images x 2
# strengths) few; 2 OOD val images per class for the model selection.
PER_CLASS = {"train": 8, "id_val": 1, "id_test": 1, "val": 2, "test": 1}
STAGES = ("hard", "prompts", "generate", "score", "train", "eval")


def make_config(data_root):
  """Returns the tiny low-quality config: iWildCam layout, tiny SD and CLIP, FLYP, adaptive."""
  c = config_lib.base_config()
  c.data.name = "iwildcam"
  c.data.metadata_csv = str(pathlib.Path(data_root) / "metadata.csv")
  c.data.image_size = 32
  c.hard.rule = "misclassified"
  c.hard.model_checkpoint = "zero_shot"  # tests/test_hardness.py covers a trained checkpoint
  c.hard.exclude_classes = ("empty",)
  c.prompts.templates = ("a photo of {c} in the wild",)
  c.diffusion.tiny = True
  c.diffusion.model = ""
  c.diffusion.strengths = (0.25, 0.5)  # levels (image guidance) 0.75 and 0.5
  c.diffusion.seeds_per_level = 1
  c.diffusion.num_inference_steps = 4
  c.diffusion.resolution = 32
  c.diffusion.slots = 8
  c.diffusion.grid_sources = 1
  c.score.tiny = True
  c.score.model = ""
  c.score.batch_size = 8
  c.score.text_template = "a photo of {c} in the wild"
  c.score.threshold = -1.0  # keep every synthetic image: the tiny CLIP is random
  c.train.model = "clip"
  c.train.loss = "flyp"
  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 0.2
  c.train.warmup_steps = 2
  c.train.batch_size = 8
  c.train.epochs = EPOCHS
  c.train.log_every_steps = 1
  c.train.wise_ft_alpha = 0.9
  c.curriculum.schedule = "adaptive"
  c.curriculum.levels = (0.5, 0.75)
  c.curriculum.curriculum_epochs = EPOCHS
  c.curriculum.uniform_rows = 24  # uniform phases of 3 steps (12 images x 2 captions)
  c.curriculum.val_sources = 3
  # Every real image each epoch, and a tail share above the hard classes' 3/4 so the
  # synthetic phases draw synthetic rows on top of the real hard images.
  c.curriculum.nontail_fraction = 1.0
  c.curriculum.tail_share = 0.9
  c.eval.batch_size = 16
  c.eval.splits = ("id_val", "id_test", "val", "test")
  c.eval.select_split = "val"
  c.eval.select_metric = "macro_f1"
  return c


def sources_as_spectrum(data_root, workdir):
  """Overwrites every generated image with its (real) source image; returns the count.

  The tiny SD is random, so its images teach nothing and the adaptive rule
  would always pick real. With the sources in their place every level
  ties with real on the curriculum validation images, argmax takes the
  first candidate, curriculum.levels[0], and the synthetic phases train on
  synthetic rows: the test knows the choice and exercises synthetic epochs.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from discl_jax.data import spectrum_store  # pylint: disable=g-import-not-at-top
  store = spectrum_store.SpectrumStore(pathlib.Path(workdir, "spectrum"))
  rows = store.rows()
  for row in rows:
    with Image.open(pathlib.Path(data_root, "train", row["source_id"])) as image:
      image.convert("RGB").save(store.image_path(row), format="PNG")
  return len(rows)


_CHILD = textwrap.dedent("""
    import os
    import signal
    import sys

    import jax
    jax.config.update("jax_compilation_cache_dir", sys.argv[4])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    sys.path.insert(0, %(tests)r)

    from test_iwildcam import make_config, sources_as_spectrum
    from discl_jax import pipeline
    from discl_jax import workdir as wd
    from discl_jax.train import flyp

    data_root, workdir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    config = make_config(data_root)
    if mode == "pipeline":
      pipeline.run_stages(config, workdir, %(stages)r[:4])
      sources_as_spectrum(data_root, workdir)
      pipeline.run_stages(config, workdir, %(stages)r[4:])
    elif mode == "broken":
      # 1) SIGTERM at the 2nd step of epoch 1 (a synthetic phase): checkpoint, return.
      make_step = flyp.make_train_step
      calls = {"n": 0}
      def make_train_step(*args, **kwargs):
        step = make_step(*args, **kwargs)
        def counted(state, batch, lr):
          calls["n"] += 1
          if calls["n"] == int(sys.argv[5]) + 2:
            os.kill(os.getpid(), signal.SIGTERM)
          return step(state, batch, lr)
        return counted
      flyp.make_train_step = make_train_step
      from discl_jax.stages import train_stage
      result = train_stage.train_and_evaluate(config, workdir)
      assert result["preempted"] and result["epoch"] == 1, result
      flyp.make_train_step = make_step
      # 2) resume here; SIGKILL once epoch 2's row is written (before its checkpoint).
      append = wd.append_jsonl
      def append_then_die(target, rows):
        append(target, rows)
        if rows[-1].get("epoch") == 2:
          os.kill(os.getpid(), signal.SIGKILL)
      wd.append_jsonl = append_then_die
      train_stage.train_and_evaluate(config, workdir)
    else:  # resume: train and eval after the kill
      pipeline.run_stages(config, workdir, ("train", "eval"))
    print("DONE")
""") % {"tests": str(TESTS), "stages": STAGES}


def _run(root, workdir, mode, *extra, devices=1):
  script = root / "child.py"
  script.write_text(_CHILD)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
      [sys.executable, str(script), str(root / "data"), str(workdir), mode,
       str(root / "xla_cache"), *extra],
      env=env, capture_output=True, text=True, timeout=900)


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("iwildcam")
  iwildcam_fixture.write_tiny_iwildcam(root / "data", per_class=PER_CLASS)
  return root


@pytest.fixture(scope="module")
def one(root):
  proc = _run(root, root / "one", "pipeline")
  assert proc.returncode == 0, proc.stderr[-4000:]
  return root / "one"


def test_pipeline_runs_the_low_quality_path(one):
  hard = [json.loads(l) for l in (one / "hard.jsonl").read_text().splitlines()]
  assert hard and all(r["reason"] == "misclassified" for r in hard)
  assert all(r["class_name"] != "empty" for r in hard)
  assert all(r["pred_class_name"] != r["class_name"] for r in hard)
  names = {c[2]: c[3] for c in iwildcam_fixture.CLASSES}
  assert all(r["caption_name"] == names[r["class_name"]] for r in hard)
  figures = json.loads((one / wd.HARD_SUMMARY).read_text())
  assert figures["num_hard"] == len(hard)
  assert sum(v["hard"] for v in figures["per_class"].values()) == len(hard)
  prompts = json.loads((one / "prompts.json").read_text())
  assert {p for per_seed in prompts["sources"].values() for p in per_seed} <= {
      f"a photo of {n} in the wild" for n in names.values()}

  rows = _metrics(one)
  assert [r["epoch"] for r in rows] == list(range(EPOCHS))
  # FLYP's epoch: every (image, caption) pair of the 29 usable real images (32 less 3 held
  # out for the curriculum), ceil(2 * 29 / 8) = 8 steps; the adaptive phases stream across
  # epochs: uniform 24 rows = 3 steps, synthetic (21 hard at g*, 8 non-hard real) 8 steps:
  # epochs of 3 + 5, 3 + 3 + 2, 6 + 2, 1 + 7 steps.
  assert [r["step"] for r in rows] == [8, 16, 24, 32]
  assert [r["curriculum_phases"] for r in rows] == [
      ["uniform", "synthetic"], ["synthetic", "uniform", "synthetic"],
      ["synthetic", "uniform"], ["uniform", "synthetic"]]
  assert [r["curriculum_phase_index"] for r in rows] == [1, 3, 4, 5]
  assert all(r["num_real"] + r["num_synthetic"] == 64 and r["num_synthetic"] > 0 for r in rows)
  # Ties (see sources_as_spectrum) go to the first level, 0.5, at every pick (none in epoch 2).
  assert all(r["curriculum_levels"] == [0.5] for r in rows)
  assert [r.get("curriculum_choice") for r in rows] == [0, 0, None, 0]
  assert all(len(set(r["curriculum_gains"])) == 1 for r in rows if "curriculum_gains" in r)
  for split in ("id_val", "id_test", "val", "test"):
    for metric in ("all", "macro_f1", "loss"):
      assert np.isfinite(rows[-1][f"{split}/{metric}"])
  result = json.loads((one / "train_result.json").read_text())
  best = max(range(EPOCHS), key=lambda e: (rows[e]["val/macro_f1"], -e))
  assert result["best_epoch"] == best and result["selected_on"] == "val/macro_f1"
  assert result["id_test/macro_f1"] == rows[best]["id_test/macro_f1"]
  report = (one / "report.md").read_text()
  assert "id_val" in report and "macro-F1" in report and "`val/macro_f1`" in report
  assert "## Adaptive curriculum choices" in report and "| 0 | 0.50 |" in report
  assert "## Result at the epoch chosen on id_val" in report
  assert "## Hard images" in report and f"{len(hard)} of {figures['num_images']}" in report
  assert (one / "curves.png").exists() and any((one / "tb").iterdir())
  with np.load(one / "predictions.npz") as saved:
    assert {"id_val_pred", "id_test_pred", "val_pred", "test_pred"} <= set(saved.files)


def test_killed_and_resumed_training_equals_uninterrupted(root, one):
  broken = root / "broken"
  broken.mkdir()
  for name in ("hard.jsonl", "prompts.json", "spectrum", "models"):
    src = one / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, broken / name)
  steps_epoch0 = _metrics(one)[0]["step"]
  proc = _run(root, broken, "broken", str(steps_epoch0))
  assert proc.returncode == -9, proc.stderr[-4000:]
  assert "preempted: saved epoch 1" in proc.stderr
  assert [r["epoch"] for r in _metrics(broken)] == [0, 1, 2]
  proc = _run(root, broken, "resume")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert _metrics(broken) == _metrics(one)
  assert (json.loads((broken / "train_result.json").read_text())
          == json.loads((one / "train_result.json").read_text()))


def test_eight_devices_choose_the_same_levels(root, one):
  # The spectrum and its scores are one device's (generation and scoring on
  # eight devices are test_sdxl's and test_clip's); hard, prompts and the
  # adaptive training run again on eight.
  workdir = root / "eight"
  workdir.mkdir()
  for name in ("spectrum", "models"):
    shutil.copytree(one / name, workdir / name)
  proc = _run(root, workdir, "pipeline", devices=8)
  assert proc.returncode == 0, proc.stderr[-4000:]
  hard_ids = [[json.loads(l)["source_id"] for l in (w / "hard.jsonl").read_text().splitlines()]
              for w in (one, workdir)]
  assert hard_ids[0] == hard_ids[1]
  first, eight = _metrics(one), _metrics(workdir)
  assert [r["curriculum_level"] for r in eight] == [r["curriculum_level"] for r in first]
  assert [r.get("curriculum_choice") for r in eight] == [r.get("curriculum_choice") for r in first]
  assert [r["num_synthetic"] for r in eight] == [r["num_synthetic"] for r in first]
  np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in first],
                             rtol=1e-3)
  np.testing.assert_allclose([r["test/loss"] for r in eight], [r["test/loss"] for r in first],
                             rtol=1e-3)


# --- bad input ----------------------------------------------------------------


def test_class_without_common_name_is_named(root, tmp_path):
  data = tmp_path / "data"
  shutil.copytree(root / "data", data)
  labels = data / "labels.csv"
  lines = labels.read_text().splitlines()
  lines[3] = lines[3].rsplit(",", 1)[0] + ","  # y=2 (dasyprocta punctata): empty common name
  labels.write_text("\n".join(lines) + "\n")
  config = make_config(data)
  train = datasets.load(config.data)["train"]
  with pytest.raises(ValueError, match=r"labels.csv.*2 \('dasyprocta punctata'\)"):
    class_names_lib.caption_names(config.data, train.class_names)
  with pytest.raises(ValueError, match="dasyprocta punctata"):
    hard_stage.run(config, tmp_path / "work")


def test_unknown_eval_split_is_named(root):
  config = make_config(root / "data")
  splits = datasets.load(config.data)
  config.eval.splits = ("id_val", "ood_val")
  with pytest.raises(ValueError, match=r"no split 'ood_val'.*'id_test'"):
    loop.check_eval_splits(config.eval, splits, "iwildcam")
  config.eval.splits = ("id_val", "test")
  config.eval.select_split = "test"
  with pytest.raises(ValueError, match="never on a test split"):
    loop.check_eval_splits(config.eval, splits, "iwildcam")
  config.eval.select_split = "id_val"
  config.eval.select_metric = "f1"
  with pytest.raises(ValueError, match="eval.select_metric='f1'"):
    loop.check_eval_splits(config.eval, splits, "iwildcam")


def test_flyp_needs_the_clip_model():
  config = make_config("/nonexistent")
  config.train.model = "tiny"
  with pytest.raises(ValueError, match="train.loss='flyp' needs train.model='clip'"):
    loop.make_trainer(config, None, None, None)


def test_misclassified_rule_needs_the_clip_model(root):
  config = make_config(root / "data")
  config.train.model = "resnet32"
  splits = datasets.load(config.data)
  with pytest.raises(ValueError, match="hard.rule='misclassified'.*train.model='resnet32'"):
    hard_selection.select_hard(config, splits, root / "unused")
