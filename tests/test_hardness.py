"""Hard samples of low-quality data: the rule on a constructed example, and the hard set
of a trained model's checkpoint on the tiny iWildCam fixture (with `empty` excluded)."""

import json
import pathlib

import jax
import numpy as np
import pytest

import iwildcam_fixture
import test_iwildcam
from discl_jax import config as config_lib
from discl_jax import parallel
from discl_jax import pipeline
from discl_jax.data import datasets
from discl_jax.train import checkpoint as checkpoint_lib
from discl_jax.train import clip_trainer
from discl_jax.train import hard_selection
from discl_jax.train import hardness

ROOT = pathlib.Path(__file__).resolve().parents[1]

CLASSES = ("empty", "peccary", "agouti")
IDS = np.array([f"img{i}" for i in range(8)])
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2])
PREDS = np.array([0, 1, 0, 1, 0, 2, 2, 1])            # 1, 4 and 7 are wrong
PROBS = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.7, 0.3, 0.6])


def test_misclassified_rule():
  sel = hardness.select_hard(PROBS, PREDS, LABELS, 3)
  np.testing.assert_array_equal(np.flatnonzero(sel.mask), [1, 4, 7])
  assert sel.prob_threshold is None and not sel.low_prob.any()
  np.testing.assert_array_equal(sel.hard_per_class, [1, 1, 1])
  np.testing.assert_array_equal(sel.total_per_class, [3, 2, 3])


def test_quantile_rule_alone_and_combined():
  # sorted probs 0.1 0.2 0.3 0.5 0.6 0.7 0.8 0.9: the 0.3 quantile sits at
  # position 0.3 * 7 = 2.1, between 0.3 and 0.5: 0.3 + 0.1 * (0.5 - 0.3) = 0.32
  sel = hardness.select_hard(PROBS, PREDS, LABELS, 3, misclassified=False, prob_quantile=0.3)
  assert sel.prob_threshold == pytest.approx(0.32)
  np.testing.assert_array_equal(np.flatnonzero(sel.mask), [1, 4, 6])
  np.testing.assert_array_equal(sel.hard_per_class, [1, 1, 1])
  assert not sel.misclassified.any()

  both = hardness.select_hard(PROBS, PREDS, LABELS, 3, misclassified=True, prob_quantile=0.3)
  np.testing.assert_array_equal(np.flatnonzero(both.mask), [1, 4, 6, 7])
  np.testing.assert_array_equal(both.hard_per_class, [1, 1, 2])
  np.testing.assert_array_equal(np.flatnonzero(both.misclassified), [1, 4, 7])
  np.testing.assert_array_equal(np.flatnonzero(both.low_prob), [1, 4, 6])


def test_rows_and_summary_for_hard_jsonl_and_report():
  sel = hardness.select_hard(PROBS, PREDS, LABELS, 3, prob_quantile=0.3)
  rows = hardness.hard_rows(sel, IDS, LABELS, CLASSES, PROBS, PREDS)
  assert [r["id"] for r in rows] == ["img1", "img4", "img6", "img7"]
  assert rows[3] == {"id": "img7", "label": 2, "class_name": "agouti", "true_prob": 0.6,
                     "pred": 1, "pred_class_name": "peccary", "misclassified": True,
                     "low_prob": False}
  assert rows[2]["misclassified"] is False and rows[2]["low_prob"] is True
  json.dumps(rows)  # JSON-ready
  report = hardness.summary(sel, CLASSES, misclassified=True, prob_quantile=0.3)
  assert report["rule"] == {"misclassified": True, "prob_quantile": 0.3, "excluded_classes": []}
  assert report["prob_threshold"] == pytest.approx(0.32)
  assert (report["num_images"], report["num_hard"], report["hard_share"]) == (8, 4, 0.5)
  assert (report["num_misclassified"], report["num_low_prob"]) == (3, 3)
  assert report["per_class"] == {"empty": {"hard": 1, "total": 3},
                                 "peccary": {"hard": 1, "total": 2},
                                 "agouti": {"hard": 2, "total": 3}}
  json.dumps(report)


def test_excluded_classes_are_never_hard():
  sel = hardness.select_hard(PROBS, PREDS, LABELS, 3, prob_quantile=0.3, exclude_labels=[0])
  np.testing.assert_array_equal(np.flatnonzero(sel.mask), [4, 6, 7])  # img1 is "empty"
  np.testing.assert_array_equal(sel.hard_per_class, [0, 1, 2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(prob_quantile=1.0), "hard.prob_quantile must be in"),
    (dict(prob_quantile=-0.1), "hard.prob_quantile must be in"),
    (dict(misclassified=False), "no criterion"),
    (dict(probs=np.append(PROBS[:-1], 1.5)), r"true_probs\[7\] = 1.5"),
    (dict(probs=np.append(PROBS[:-1], np.nan)), r"true_probs\[7\] = nan"),
    (dict(probs=PROBS[:-1]), "true_probs has shape"),
    (dict(preds=np.append(PREDS[:-1], 3)), r"preds outside \[0, 3\)"),
    (dict(labels=np.append(LABELS[:-1], -1)), r"labels outside \[0, 3\)"),
])
def test_bad_input_names_the_problem(kwargs, message):
  probs = kwargs.pop("probs", PROBS)
  preds = kwargs.pop("preds", PREDS)
  labels = kwargs.pop("labels", LABELS)
  with pytest.raises(ValueError, match=message):
    hardness.select_hard(probs, preds, labels, 3, **kwargs)


# --- the hard set of a trained model (hard.model_checkpoint) ------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The fixture, its config, and a checkpoint whose CLIP differs from the zero-shot one."""
  root = tmp_path_factory.mktemp("hard_ckpt")
  iwildcam_fixture.write_tiny_iwildcam(root / "data", per_class=test_iwildcam.PER_CLASS)
  config = test_iwildcam.make_config(root / "data")
  train = datasets.load(config.data)["train"]
  mesh = parallel.make_mesh(config.mesh.shape)
  trainer = clip_trainer.ClipTrainer(config, train.class_names, mesh, root / "work")
  state = trainer.initial_state()
  # A stand-in for a trained model: the zero-shot weights moved by a fixed random step.
  leaves, treedef = jax.tree.flatten(jax.device_get(state.params))
  rng = np.random.default_rng(0)
  moved = [x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype) * (np.std(x) + 1e-3)
           for x in leaves]
  # step 1: the trainer caches its eval head per step, and the zero-shot state is step 0.
  state = state.replace(params=parallel.put_replicated(jax.tree.unflatten(treedef, moved), mesh),
                        step=state.step + 1)
  ckpt = checkpoint_lib.Checkpointer(root / "baseline" / "ckpt", enable_async=False)
  ckpt.save(4, state=state, curriculum={}, data_iter=None, picks=np.zeros([0, 2]),
            meta={"epoch": 4})
  ckpt.close()
  return root, config, train, trainer, state


def test_hard_set_is_the_checkpoint_models_errors_without_empty(trained):
  root, config, train, trainer, state = trained
  config.hard.model_checkpoint = str(root / "baseline" / "ckpt")
  config.hard.exclude_classes = ("empty",)
  config.hard.prob_quantile = 0.99
  rows, figures = hard_selection.select_hard_with_figures(config, {"train": train}, root / "work")
  out = trainer.predict(state, train)
  labels = np.asarray(train.labels)
  unexcluded = hardness.select_hard(out["prob_true"], out["pred"], labels, 4, prob_quantile=0.99)
  expected = unexcluded.mask & (labels != 0)  # label 0 is "empty"
  assert np.any(unexcluded.mask & (labels == 0))  # the rule alone would take some "empty" images
  assert [r["source_id"] for r in rows] == [str(i) for i in train.ids[expected]]
  np.testing.assert_allclose([r["true_prob"] for r in rows], out["prob_true"][expected], rtol=1e-6)
  zero_shot = trainer.predict(trainer.initial_state(), train)
  assert np.max(np.abs(zero_shot["prob_true"] - out["prob_true"])) > 1e-3  # another model
  assert figures["per_class"]["empty"]["hard"] == 0
  assert figures["hard_share"] == pytest.approx(expected.sum() / len(train))
  assert figures["model"] == config.hard.model_checkpoint
  config.hard.exclude_classes = ("emptty",)
  with pytest.raises(ValueError, match=r"hard.exclude_classes names unknown class\(es\) \['emptty'\]"):
    hard_selection.select_hard_with_figures(config, {"train": train}, root / "work")
  config.hard.exclude_classes = ()
  config.hard.model_checkpoint = str(root / "missing")
  with pytest.raises(ValueError, match="hard.model_checkpoint=.*missing"):
    hard_selection.select_hard_with_figures(config, {"train": train}, root / "work")


def test_a_discl_schedule_without_the_checkpoint_is_refused_before_any_stage(tmp_path):
  config = test_iwildcam.make_config(tmp_path / "data")
  config.hard.model_checkpoint = ""
  with pytest.raises(ValueError, match="needs hard.model_checkpoint"):
    pipeline.run_stages(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()  # no stage ran, not even the config record
  iwildcam = config_lib.load_file(ROOT / "configs" / "iwildcam.py", "runlocal")
  assert iwildcam.hard.exclude_classes == ("empty",)
  with pytest.raises(ValueError, match="needs hard.model_checkpoint"):
    pipeline.run_stages(iwildcam, tmp_path / "work")
  iwildcam.curriculum.schedule = "none"  # step 1 of the protocol: the FLYP baseline
  pipeline.preflight(iwildcam)
