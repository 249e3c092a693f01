"""Provenance: each stage records its fingerprint, continues on the same one, refuses another."""

import json
import pathlib

import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax import pipeline
from discl_jax import provenance
from discl_jax import workdir as wd
from discl_jax.data import spectrum_store
from discl_jax.stages import eval_stage
from discl_jax.stages import hard_stage
from discl_jax.stages import prompts_stage
from discl_jax.stages import score_stage


def _demo_config():
  return config_lib.load_file(
      pathlib.Path(__file__).resolve().parent.parent / "configs" / "demo.py")


def test_check_records_continues_and_names_the_first_differing_key(tmp_path):
  target = tmp_path / "x.provenance.json"
  first = {"train.model": "tiny", "train.epochs": 20, "curriculum.levels": (0.1, 0.3)}
  assert provenance.check(target, first, what="train", outputs=["ckpt"], write=True)
  assert not provenance.check(target, dict(first, **{"curriculum.levels": [0.1, 0.3]}),
                              what="train", outputs=["ckpt"], write=True)
  changed = dict(first, **{"train.epochs": 10, "curriculum.levels": (0.5,)})
  with pytest.raises(ValueError) as e:
    provenance.check(target, changed, what="train", outputs=["ckpt"], write=True)
  message = str(e.value)
  assert message.startswith("train was made with a different config: train.epochs is 10 now "
                            "but was 20")
  assert "curriculum.levels" in message and "another --workdir" in message
  assert "delete ckpt" in message


def test_hard_and_prompts_refuse_a_changed_key_and_keep_config_json(tmp_path):
  config = _demo_config()
  hard_stage.run(config, tmp_path)
  prompts_stage.run(config, tmp_path)
  hard_stage.run(config, tmp_path)  # same fingerprint: continues
  recorded = json.loads(wd.path(tmp_path, wd.CONFIG).read_text())
  assert set(recorded) == {"hard", "prompts"}
  assert recorded["hard"]["hard"]["rule"] == "few_classes"

  changed = _demo_config()
  changed.hard.classes = ("nine",)
  with pytest.raises(ValueError, match=r"^hard: .*hard\.classes is \['nine'\] now but was \[\]"):
    hard_stage.run(changed, tmp_path)
  changed = _demo_config()
  changed.prompts.templates = ("a drawing of a {c}",)
  with pytest.raises(ValueError, match=r"prompts\.templates is .* now .*delete .*prompts\.json"):
    prompts_stage.run(changed, tmp_path)
  assert json.loads(wd.path(tmp_path, wd.CONFIG).read_text()) == recorded


@pytest.mark.parametrize("key,value", [("model", "/nowhere/clip"),
                                       ("text_template", "a drawing of {c}"),
                                       ("dtype", "bfloat16")])
def test_score_refuses_another_model_dtype_or_template(tmp_path, key, value):
  config = _demo_config()
  root = wd.path(tmp_path, wd.SPECTRUM)
  root.mkdir()
  provenance.check_stage(tmp_path, "score", config, provenance.fingerprint(config, "score"),
                         target=root / spectrum_store.SCORE_PROVENANCE, outputs=[root])
  config.score[key] = value
  with pytest.raises(ValueError, match=rf"^score: .*score\.{key} is '{value}' now"):
    score_stage.run(config, tmp_path)


def _write_scored_spectrum(workdir, config):
  """Writes 4 spectrum images (2 levels x 2 sources), one scored below the threshold."""
  store = spectrum_store.SpectrumStore(wd.path(workdir, wd.SPECTRUM), 0, 1)
  # a generation.json of the older format: the bare fingerprint
  wd.atomic_write_json(store.root / spectrum_store.GENERATION,
                       {"diffusion": {"model": "my/generator", "tiny": False}})
  scores = []
  for source in ("a", "b"):
    for strength in (0.3, 0.7):
      row = spectrum_store.make_row(source_id=source, label=9, class_name="nine",
                                    strength=strength, seed=0, prompt="a photo of a nine")
      store.add(row, np.zeros((8, 8, 3), np.uint8))
      scores.append({"job_id": row["job_id"], "clip_source": 0.9, "error": None,
                     "clip_text": 0.1 if (source, strength) == ("b", 0.7) else 0.9})
  store.add_scores(scores)
  provenance.check_stage(workdir, "score", config, provenance.fingerprint(config, "score"),
                         target=store.root / spectrum_store.SCORE_PROVENANCE, outputs=[])
  wd.atomic_write_bytes(wd.path(workdir, wd.ACCEPTANCE_PNG), b"png")


def test_report_describes_the_stored_run_config_not_the_flags(tmp_path):
  trained = _demo_config()
  provenance.check_stage(tmp_path, "train", trained, {"seed": 0},
                         target=wd.path(tmp_path, wd.PROVENANCE % "train"), outputs=[])
  _write_scored_spectrum(tmp_path, trained)
  pipeline.record_time(tmp_path, "train", 4.0)
  pipeline.record_time(tmp_path, "train", 6.0)
  rows = [{"epoch": 0, "step": 5, "loss": 1.0, "val/all": 0.5, "test/all": 0.4,
           "num_synthetic": 3},
          {"epoch": 1, "step": 10, "loss": 0.5, "val/all": 0.6, "test/all": 0.5,
           "num_synthetic": 2}]
  wd.append_jsonl(wd.path(tmp_path, wd.METRICS), rows)
  wd.append_jsonl(wd.path(tmp_path, wd.TIMINGS), [
      {"epoch": epoch, "images": 5 * trained.train.batch_size, "seconds": 4.0}
      for epoch in (0, 1)])
  flags = _demo_config()
  flags.curriculum.schedule = "none"
  flags.train.epochs = 99
  flags.score.threshold = 0.95
  report_path, _ = eval_stage.run(flags, tmp_path)
  text = report_path.read_text()
  assert f"schedule `{trained.curriculum.schedule}`" in text
  assert f"{trained.train.epochs} epochs" in text and "99 epochs" not in text
  # The synthetic data at the run's own threshold (0.6 in the demo), not the flag's.
  assert (f"Generator `my/generator`, CLIP `{trained.score.model}`, CLIPScore threshold "
          f"{trained.score.threshold}: 3 of 4 generated images accepted; 5 synthetic") in text
  assert "| 0.70 | 2 | 2 |" in text and "| 0.30 | 2 | 1 |" in text
  assert f"]({wd.ACCEPTANCE_PNG})" in text
  assert "Code: commit `" in text and "jax " in text
  # Timings live in timings.md, so report.md depends on results only: 10 s of train wall time
  # in two runs; images/s over the epochs' training time (8 s, timings.jsonl).
  assert "| train |" not in text and f"]({wd.TIMINGS_REPORT})" in text
  batch = trained.train.batch_size
  times = wd.path(tmp_path, wd.TIMINGS_REPORT).read_text()
  assert f"| train | 10.0 | 2 | {10 * batch} | {10 * batch / 8:.1f} |" in times
