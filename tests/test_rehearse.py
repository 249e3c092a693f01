"""The real-geometry rehearsal (experiments/rehearse.py --quick) and the slot-memory model."""

import collections
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from discl_jax.diffusion import slot_memory

import experiment_scripts

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "rehearse.py"
GIB = slot_memory.GIB

Stats = collections.namedtuple("Stats", ["argument_size_in_bytes", "output_size_in_bytes",
                                         "alias_size_in_bytes", "temp_size_in_bytes",
                                         "generated_code_size_in_bytes"])


@pytest.fixture(scope="module")
def rehearse():
  return experiment_scripts.load("rehearse")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("rehearse") / "rehearse.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  subprocess.run([sys.executable, str(SCRIPT), "--quick", f"--out={out}"], check=True, env=env,
                 cwd=ROOT, timeout=900)
  return json.loads(out.read_text())


# ------------------------------------------------------------------ slot memory


def test_footprint_counts_donated_outputs_once():
  stats = Stats(argument_size_in_bytes=100, output_size_in_bytes=40, alias_size_in_bytes=30,
                temp_size_in_bytes=7, generated_code_size_in_bytes=3)
  assert slot_memory.footprint(stats) == 100 + 40 - 30 + 7 + 3


def test_linear_fit_recovers_the_line():
  fixed, per_slot = slot_memory.linear_fit(1, 1000 + 250, 4, 1000 + 4 * 250)
  assert (fixed, per_slot) == (1000, 250)
  assert slot_memory.projected_bytes(fixed, per_slot, 64) == 1000 + 64 * 250
  assert slot_memory.projected_bytes(fixed, per_slot, 64, devices=8) == 1000 + 8 * 250
  assert slot_memory.projected_bytes(fixed, per_slot, 9, devices=8) == 1000 + 2 * 250


@pytest.mark.parametrize("a, b", [((2, 500), (2, 600)), ((1, 500), (2, 400)), ((1, 500), (3, 2000))])
def test_linear_fit_rejects_unusable_measurements(a, b):
  with pytest.raises(ValueError, match="slot"):
    slot_memory.linear_fit(*a, *b)


def test_max_slots_is_the_largest_count_that_fits():
  # 90 % of 1000 B leaves 900 - 100 = 800 B for slots of 30 B: 26 slots (780 B), not 27 (810 B).
  best = slot_memory.max_slots(100, 30, 1000, headroom=0.9)
  assert best == 26
  assert slot_memory.projected_bytes(100, 30, best) <= 900 < slot_memory.projected_bytes(100, 30, 27)
  assert slot_memory.max_slots(100, 30, 1000, headroom=0.9, devices=4) == 104  # 26 per device
  assert slot_memory.max_slots(100, 30, 1000, headroom=1.0) == 30  # exactly full fits
  assert slot_memory.max_slots(990, 30, 1000, headroom=1.0) == 0  # not even one slot
  with pytest.raises(ValueError, match="headroom"):
    slot_memory.max_slots(100, 30, 1000, headroom=1.5)
  with pytest.raises(ValueError, match="per_slot_bytes"):
    slot_memory.max_slots(100, 0, 1000)


# ------------------------------------------------------------------ the script's options


def test_attention_is_passed_only_when_not_the_default(rehearse, monkeypatch):
  calls = []
  monkeypatch.setattr(rehearse.sampler_lib, "SpectrumSampler",
                      lambda models, **kwargs: calls.append(kwargs))
  rehearse.make_sampler("models", 4, "ddim")
  rehearse.make_sampler("models", 16, "ddim", "chunked")
  rehearse.make_sampler("models", 16, "ddim", "xla")
  assert "attention" not in calls[0] and calls[0]["slots"] == 4
  assert calls[1]["attention"] == "chunked" and calls[1]["slots"] == 16
  assert calls[2]["attention"] == "xla"
  assert rehearse.parse_args([]).attention == []


def test_attention_memory_compares_compiled_steps(rehearse, monkeypatch):
  seen = []

  class Sampler:  # compiles to a footprint of 1 GiB per slot for xla, half for chunked

    def __init__(self, models, slots, attention, **unused):
      self.bytes = slots * GIB // (1 if attention == "xla" else 2)
      seen.append((slots, attention))

    def lower_step(self, latent, size):
      del latent, size
      stats = Stats(self.bytes, 0, 0, 0, 0)
      compiled = type("Compiled", (), {"memory_analysis": lambda _: stats})()
      return type("Lowered", (), {"compile": lambda _: compiled})()

  monkeypatch.setattr(rehearse.sampler_lib, "SpectrumSampler", Sampler)
  args = rehearse.parse_args(["--attention=xla,chunked"])
  out = rehearse.attention_memory("models", "ddim", (4, 64, 64), (512, 512), args)
  assert out == {"slots": 16, "gib": {"xla": 16.0, "chunked": 8.0}}
  assert seen == [(16, "xla"), (16, "chunked")]


def test_bad_options_are_rejected(rehearse, capsys):
  for argv, word in ((["--only=sd15,vit"], "vit"), (["--attention=flash"], "flash"),
                     (["--memory_slots=2"], "memory_slots")):
    with pytest.raises(SystemExit):
      rehearse.parse_args(argv)
    assert word in capsys.readouterr().err
  args = rehearse.parse_args(["--only=sd15", "--attention=xla,chunked", "--memory_slots=4,2"])
  assert args.only == ["sd15"] and args.attention == ["xla", "chunked"]
  assert args.memory_slots == [2, 4]


# ------------------------------------------------------------------ the quick rehearsal


def test_every_family_and_stage_is_measured(report):
  names = {s["name"] for s in report["stages"]}
  assert {"tiny", "clip_tiny_p16", "clip_tiny_p8", "clip_tiny_p8_flyp"} <= names
  for family in ("sd15", "refiner"):
    assert {f"{family}_build", f"{family}_step_1slot", f"{family}_step_2slot",
            f"{family}_vae_encode", f"{family}_vae_decode"} <= names
  for s in report["stages"]:
    assert s["params"] > 0 and s["params"] == sum(s["components"].values()), s["name"]
    assert 0 < s["rss_before_gib"] and 0 < s["peak_rss_gib"] >= s["rss_after_gib"], s["name"]
    if "flops" in s:
      assert s["flops"] > 0 and s["compile_s"] > 0 and s["xla_bytes"] > 0, s["name"]
    if (s["name"].endswith(("_encode", "_decode", "_step_1slot"))
        or s["family"] in ("resnet", "clip")):
      assert s["step_s"] > 0, s["name"]
  assert report["peak_rss_gib"] >= max(s["peak_rss_gib"] for s in report["stages"])


def test_model_components_are_the_families_own(report):
  stages = {s["name"]: s for s in report["stages"]}
  assert set(stages["sd15_build"]["components"]) == {"unet", "vae", "text_encoder"}
  assert set(stages["refiner_build"]["components"]) == {"unet", "vae", "text_encoder_2"}
  for family in ("sd15", "refiner"):
    build = stages[f"{family}_build"]["components"]
    assert stages[f"{family}_step_1slot"]["params"] == build["unet"]
    assert stages[f"{family}_vae_encode"]["params"] == build["vae"]
    # Twice the slots, twice the step's FLOPs (within the fixed per-step work).
    one, two = stages[f"{family}_step_1slot"]["flops"], stages[f"{family}_step_2slot"]["flops"]
    assert 1.9 * one < two < 2.1 * one
  # CLIP's text embedding table keeps the real vocabulary (49,408 rows) even with a tiny tokenizer.
  text = stages["clip_tiny_p16"]["components"]["text_model"]
  assert text >= 49408 * 32


def test_projection_arithmetic(report):
  peak = report["accelerator_tflops"] * 1e12 * report["mfu"]
  spectra = [p for p in report["projections"] if p["what"].startswith("spectrum")]
  assert {p["what"] for p in spectra} == {"spectrum imagenet_lt (refiner)",
                                          "spectrum imagenet_lt (sd15)",
                                          "spectrum iwildcam (refiner)"}
  score = next(s for s in report["stages"] if s["family"] == "clip")["flops_per_item"]
  for p in spectra:
    d = report["diffusion"]["refiner" if "refiner" in p["what"] else "sd15"]
    hard = p["hard_images"]
    if "imagenet_lt" in p["what"]:  # 10 strengths x 8 seeds; 5 + 10 + ... + 50 = 275 steps
      assert (p["jobs"], p["unet_evals"], p["area_scale"]) == (hard * 80, hard * 8 * 275, 1.0)
    else:  # iWildCam: strengths 0.1 ... 0.5, at 480x264 against the rehearsed size
      assert (p["jobs"], p["unet_evals"]) == (hard * 40, hard * 8 * 75)
      assert p["area_scale"] == pytest.approx(264 * 480 / (d["size"][0] * d["size"][1]), rel=1e-3)
    scale = p["area_scale"]
    assert p["unet_flops"] == pytest.approx(p["unet_evals"] * d["unet_flops_per_eval"] * scale,
                                            rel=1e-3)
    assert p["vae_flops"] == pytest.approx(p["jobs"] * d["vae_flops_per_job"] * scale, rel=1e-3)
    assert p["clip_flops"] == pytest.approx(p["jobs"] * score)
    assert p["flops"] == pytest.approx(p["unet_flops"] + p["vae_flops"] + p["clip_flops"])
    assert p["seconds"] == pytest.approx(p["flops"] / peak)
  epochs = {p["what"]: p for p in report["projections"] if p["what"].startswith("epoch")}
  assert set(epochs) == {"epoch imagenet_lt (tiny)", "epoch iwildcam (clip_tiny_p8_flyp)"}
  stages = {s["name"]: s for s in report["stages"]}
  for what, name, rows in (("epoch imagenet_lt (tiny)", "tiny", 115_846),
                           ("epoch iwildcam (clip_tiny_p8_flyp)", "clip_tiny_p8_flyp",
                            2 * 129_809)):
    assert epochs[what]["flops"] == pytest.approx(
        stages[name]["flops"] / stages[name]["batch"] * rows)
    assert epochs[what]["seconds"] == pytest.approx(epochs[what]["flops"] / peak)


def test_slot_memory_rows_follow_the_fitted_line(report):
  rows = {r["config"]: r for r in report["slot_memory"]}
  assert set(rows) == {"imagenet_lt", "iwildcam", "cifar100_lt", "inat2018"}
  assert rows["inat2018"]["family"] == "sd15" and rows["imagenet_lt"]["family"] == "refiner"
  for row in rows.values():
    d = report["diffusion"][row["family"]]
    assert row["slots"] == 64  # the shipped configs' diffusion.slots
    assert row["projected_gib"] == pytest.approx(
        (d["fixed_bytes"] + 64 * d["per_slot_bytes"]) / GIB, abs=1e-3)
    assert row["fits"] and row["use_slots"] == 64 and row["max_slots"] >= 64
  assert report["refusals"] == [] and report["partial"] is False


def test_slots_that_do_not_fit_are_refused_or_lowered(rehearse, report):
  d = report["diffusion"]["sd15"]
  device_gib = (d["fixed_bytes"] + 10.5 * d["per_slot_bytes"]) / GIB  # 10 slots fit at 100 %
  args = rehearse.parse_args([f"--device_memory_gib={device_gib}", "--headroom=1.0"])
  rows, refusals = rehearse.check_slots({"sd15": d}, args)
  assert [r["config"] for r in rows] == ["inat2018"] and not rows[0]["fits"]
  assert len(refusals) == 1 and "diffusion.slots=64" in refusals[0]
  assert "32x32" in refusals[0] and "configs/inat2018.py" in refusals[0]
  assert rows[0]["max_slots"] == 10 and rows[0]["use_slots"] == 64
  args.lower_slots = True
  with pytest.warns(UserWarning, match="lowering to diffusion.slots=10"):
    rows, refusals = rehearse.check_slots({"sd15": d}, args)
  assert refusals == [] and rows[0]["use_slots"] == 10
  with pytest.raises(SystemExit) as exit_info:
    rehearse.refuse(["configs/x.py: diffusion.slots=64 at 512x512 ..."])
  assert exit_info.value.code == 2
  assert math.isfinite(rows[0]["projected_gib"])
