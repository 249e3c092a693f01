"""The seams between config checks, provenance and the pipeline (issue 19).

Each test here failed on the main of 2478b3a: an init checkpoint file refused
as "no such directory", a failed model load that locked the workdir, a job-grid
change that trained on every stored row, a refusal that came after `score` had
rewritten its report, unused stages run for a real-data schedule, inputs named
only when a late stage read them, curriculum levels without images, an empty or
file --workdir, and a multi-host start without a coordinator.
"""

import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax import config_checks
from discl_jax import main as main_lib
from discl_jax import parallel
from discl_jax import pipeline
from discl_jax import provenance
from discl_jax import stages
from discl_jax import workdir as wd
from discl_jax.data import class_names as class_names_lib
from discl_jax.data import spectrum_store
from discl_jax.stages import generate_stage
from discl_jax.stages import score_stage
from discl_jax.stages import train_stage

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _demo():
  return config_lib.load_file(ROOT / "configs" / "demo.py", "runlocal")


def _tree(root):
  """Returns {relative path: (size, mtime_ns)} of every file under `root` but the run's lock."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file() and p.name != wd.LOCK}


# --- 1. train.init_checkpoint takes every form the loader takes ----------------------


def test_init_checkpoint_files_and_workdirs_pass_the_input_check(tmp_path, monkeypatch):
  config = _demo()
  for name in ("base.pth", "base.pt", "ldmlr.checkpoint", "base.safetensors"):
    (tmp_path / name).write_bytes(b"weights")
    config.train.init_checkpoint = str(tmp_path / name)
    config_checks.check_inputs(config, ("train",))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs" / "base" / "ckpt").mkdir(parents=True)
  for given in ("runs/base", "runs/base/ckpt"):  # a workdir, its ckpt (one "/": not a hub id)
    config.train.init_checkpoint = given
    config_checks.check_inputs(config, ("train",))
  config.train.init_checkpoint = "runs/typo"
  with pytest.raises(FileNotFoundError,
                     match=r"train.init_checkpoint 'runs/typo' \(no such file or directory\)"):
    config_checks.check_inputs(config, ("train",))


def test_main_fine_tunes_from_an_ldmlr_pth(tmp_path):
  torch = pytest.importorskip("torch")
  from test_import_torch import TorchResNet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = TorchResNet(True, 1, (64, 128, 256, 512), 10).eval()  # LDMLR's ResNet-10, 10 digits
  base = tmp_path / "resnet10_ldmlr.pth"
  torch.save({"state_dict": {"model": {f"module.{k}": v for k, v in model.state_dict().items()}},
              "train_info": {"epoch": 100}}, base)
  work = tmp_path / "work"
  result = subprocess.run(
      [sys.executable, "-m", "discl_jax.main", "--config=configs/demo.py:runlocal",
       f"--workdir={work}", "--stage=train", "--config.train.model=resnet10",
       f"--config.train.init_checkpoint={base}", "--config.curriculum.schedule=none",
       "--config.train.epochs=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"initialised from {base}" in result.stderr
  record = json.loads(wd.path(work, wd.PROVENANCE % "train").read_text())
  assert record["fingerprint"]["train.init_checkpoint_sha256"]
  assert "test/all" in json.loads(wd.path(work, wd.TRAIN_RESULT).read_text())


# --- 2. a model that fails to load leaves the workdir usable ---------------------------


def test_a_failed_model_load_records_nothing_and_the_corrected_rerun_works(tmp_path):
  config = _demo()
  config.data.imbalance_ratio = 20.0
  config.data.few_threshold = 7          # one Few class: the 6 images of "nine"
  config.diffusion.update(strengths=(1.0,), seeds_per_level=1, num_inference_steps=2,
                          slots=2, grid_sources=0)
  (tmp_path / "not_a_model").mkdir()     # exists, so it passes the input check
  config.diffusion.model = str(tmp_path / "not_a_model")
  work = tmp_path / "work"
  generation = wd.path(work, wd.SPECTRUM, spectrum_store.GENERATION)
  with pytest.raises(FileNotFoundError, match="lacks the diffusers sub-folder"):
    pipeline.run_stages(config, work, ("hard", "prompts", "generate"))
  assert not generation.exists()
  config.diffusion.model = str(tmp_path / "typo")  # the stage alone: no input check before it
  with pytest.raises(FileNotFoundError, match="typo"):
    generate_stage.run(config, work)
  assert not generation.exists()
  config.diffusion.update(model="", tiny=True)   # the corrected command, same workdir
  pipeline.run_stages(config, work, ("generate",))
  assert json.loads(generation.read_text())["fingerprint"]["diffusion"]["tiny"] is True
  assert len(spectrum_store.SpectrumStore(wd.path(work, wd.SPECTRUM), 0, 1).rows()) == 6


# --- 3 and 4. the job grid; every refusal before any stage writes ----------------------


def _scored_store(workdir, strengths=(0.3, 0.7), seeds=(0, 1)):
  """Writes an accepted spectrum image of source "a" (a nine) per strength and seed."""
  store = spectrum_store.SpectrumStore(wd.path(workdir, wd.SPECTRUM), 0, 1)
  rows = [spectrum_store.make_row(source_id="a", label=9, class_name="nine", strength=s,
                                  seed=seed, prompt="a photo of the digit nine")
          for s in strengths for seed in seeds]
  for row in rows:
    store.add(row, np.zeros((8, 8, 3), np.uint8))
  store.add_scores([{"job_id": r["job_id"], "clip_text": 0.9, "clip_source": 0.9, "error": None}
                    for r in rows])
  return rows


def test_train_and_score_read_only_the_config_job_grid(tmp_path):
  _scored_store(tmp_path)  # 2 strengths x 2 seeds: a larger grid's run added images
  config = _demo()
  config.diffusion.update(strengths=(0.7,), seeds_per_level=1)
  assert [r["job_id"] for r in train_stage.accepted_rows(config, tmp_path)] == ["a|s0.700|seed0"]
  score_stage.run(config, tmp_path)  # every row is scored: only the report is written
  report = json.loads(wd.path(tmp_path, score_stage.ACCEPTANCE_JSON).read_text())
  assert report["overall"]["scored"] == 1
  config.diffusion.update(strengths=(0.3, 0.7), seeds_per_level=2)
  assert len(train_stage.accepted_rows(config, tmp_path)) == 4


def _trained(workdir, config):
  """Records `config`'s train fingerprint, as a finished train stage leaves it."""
  ids = [r["job_id"] for r in train_stage.accepted_rows(config, workdir)]
  provenance.check_stage(workdir, "train", config, train_stage.train_fingerprint(config, workdir, ids),
                         target=wd.path(workdir, wd.PROVENANCE % "train"), outputs=[])
  wd.atomic_write_json(wd.path(workdir, "acceptance.json"), {"overall": {"accepted": 1}})


@pytest.mark.parametrize("key,value", [("diffusion.seeds_per_level", 2),
                                       ("diffusion.strengths", (0.7, 1.0)),
                                       ("score.threshold", 0.7),
                                       ("score.regenerate", True)])
def test_a_change_train_would_refuse_is_refused_before_any_stage(tmp_path, key, value):
  work = tmp_path / "work"
  _scored_store(work, strengths=(0.3, 0.7, 1.0), seeds=(0,))
  original = _demo()
  _trained(work, original)
  before = _tree(work)
  changed = _demo()
  section, name = key.split(".")
  changed[section][name] = value
  with pytest.raises(ValueError) as info:
    pipeline.run_stages(changed, work)
  message = str(info.value)
  assert message.startswith(f"train: the output in {work} was made with a different config: "
                            f"{key} is ")
  remedy = message.split("or delete ", 1)[1]
  assert "ckpt" in remedy and str(wd.path(work, wd.SPECTRUM)) not in remedy
  assert _tree(work) == before  # no stage ran: acceptance.json, the store, all as they were
  pipeline.check_recorded(original, work, stages.ORDER)  # the original command goes on


# --- 5. a real-data schedule skips the stages it never reads ---------------------------


@pytest.mark.parametrize("schedule,runs", [("none", ["train", "eval"]),
                                           ("resample", ["hard", "train", "eval"])])
def test_a_real_data_schedule_skips_unused_stages_in_one_line(tmp_path, monkeypatch, caplog,
                                                              schedule, runs):
  ran = []
  monkeypatch.setattr(pipeline.stages, "get",
                      lambda name: lambda config, workdir: ran.append(name))
  config = _demo()
  config.curriculum.schedule = schedule
  config.diffusion.model = str(tmp_path / "no_generator")  # not read: not checked either
  # absl's own logger: an earlier in-process launcher may have left it at WARNING.
  with caplog.at_level(logging.INFO, logger="absl"):
    pipeline.run_stages(config, tmp_path / "work")
  assert ran == runs
  skipped = [name for name in stages.ORDER if name not in runs]
  lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert lines == [f"stages {', '.join(skipped)}: skipped, curriculum.schedule={schedule!r} "
                   "trains on real data only and never reads them (run one with --stage=NAME)"]
  ran.clear()
  with pytest.raises(FileNotFoundError, match="diffusion.model"):  # asked for by name: it runs
    pipeline.run_stages(config, tmp_path / "work", ("generate",))


# --- 6. inputs named up front -----------------------------------------------------------


def test_imagenet_lt_class_names_are_named_before_hard_runs(tmp_path):
  config = config_lib.load_file(ROOT / "configs" / "imagenet_lt.py", "runlocal")
  config.data.root = str(tmp_path)
  for split in ("train", "val", "test"):
    (tmp_path / f"{split}.txt").write_text("a.png 0\n")
    config.data[f"{split}_list"] = str(tmp_path / f"{split}.txt")
  (tmp_path / "descriptions.json").write_text("{}")
  config.prompts.descriptions_file = str(tmp_path / "descriptions.json")
  (tmp_path / "base" / "ckpt").mkdir(parents=True)
  config.train.init_checkpoint = str(tmp_path / "base")
  with pytest.raises(FileNotFoundError) as info:
    pipeline.run_stages(config, tmp_path / "work")
  assert str(info.value).startswith("missing input(s): data.class_names_file (readable class "
                                    "names for prompts and CLIP texts")
  assert "is not set" in str(info.value)
  assert not (tmp_path / "work").exists()
  config_checks.check_inputs(config, ("hard", "train", "eval"))  # no text: no names needed


def test_iwildcam_without_labels_csv_is_refused_unless_scientific_names_are_asked_for(tmp_path):
  (tmp_path / "train").mkdir()
  (tmp_path / "metadata.csv").write_text("")
  config = config_lib.load_file(ROOT / "configs" / "iwildcam.py", "schedule=none,runlocal")
  config.data.metadata_csv = str(tmp_path / "metadata.csv")
  config.train.clip_model, config.score.tiny = "", True  # no hub weights to check offline
  with pytest.raises(FileNotFoundError, match=r"labels.csv beside data.metadata_csv .*"
                     r"data.allow_scientific_names=True\) '.*labels.csv' \(no such file\)"):
    config_checks.check_inputs(config, ("train", "eval"))
  with pytest.raises(FileNotFoundError, match="data.allow_scientific_names=True"):
    class_names_lib.caption_names(config.data, ("tayassu pecari",))
  config.data.allow_scientific_names = True
  config_checks.check_inputs(config, ("train", "eval"))
  assert class_names_lib.caption_names(config.data, ("tayassu pecari",)) == ("tayassu pecari",)


# --- 7. curriculum levels without a job ---------------------------------------------------


def test_a_level_no_strength_makes_is_refused_naming_both_keys(tmp_path):
  config = _demo()  # levels (0.3,)
  config.diffusion.strengths = (0.5, 1.0)  # lambda 0.5 and 0
  with pytest.raises(ValueError, match=r"curriculum.levels=\(0.3,\) trains on lambda 0.3, which "
                     r"no job of diffusion.strengths=\(0.5, 1.0\) makes .* add strength\(s\) 0.7"):
    pipeline.run_stages(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()
  pipeline.preflight(config, ("hard", "prompts", "generate"))  # no train: no curriculum
  config.curriculum.schedule = "text_only"
  config.diffusion.strengths = (0.5,)
  with pytest.raises(ValueError, match=r"curriculum.schedule='text_only' trains on lambda 0"):
    pipeline.preflight(config, ("train",))


# --- 8 and 9. --workdir and multi-host start-up in one line --------------------------------


def _main(monkeypatch, config, workdir):
  """Runs discl's main on `config` and `workdir` (--stage=hard); returns its exit message."""
  monkeypatch.setattr(main_lib, "_CONFIG", type("Flag", (), {"value": config}))
  monkeypatch.setattr(main_lib, "_WORKDIR", type("Flag", (), {"value": workdir}))
  monkeypatch.setattr(main_lib, "_STAGE", type("Flag", (), {"value": "hard"}))
  monkeypatch.setattr(main_lib.progress, "enable_compilation_cache", lambda: None)
  with pytest.raises(SystemExit) as info:
    main_lib.main(["discl"])
  message = str(info.value)
  assert "\n" not in message
  return message


def test_an_empty_or_file_workdir_is_one_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert _main(monkeypatch, _demo(), "").startswith("discl: ValueError: --workdir is empty")
  assert not any(tmp_path.iterdir())  # nothing ran into the current directory
  (tmp_path / "notes.txt").write_text("mine")
  for given in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
    assert _main(monkeypatch, _demo(), str(given)) == (
        f"discl: NotADirectoryError: --workdir {str(given)!r}: "
        f"{str(tmp_path / 'notes.txt')!r} is a file, not a directory")
  assert (tmp_path / "notes.txt").read_text() == "mine"


_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES")


def test_multi_host_without_a_coordinator_is_one_line(tmp_path, monkeypatch):
  env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_ENV}
  result = subprocess.run(
      [sys.executable, "-m", "discl_jax.main", "--config=configs/demo.py:runlocal",
       f"--workdir={tmp_path / 'work'}", "--config.mesh.multi_host=True"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  lines = result.stderr.strip().splitlines()
  assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("discl: ValueError: mesh.multi_host=True, but "
                             "jax.distributed.initialize() found no coordinator")
  for part in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "Cloud TPU", "JAX_COORDINATOR_ADDRESS",
               "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "leave mesh.multi_host=False"):
    assert part in lines[0], part
  assert not (tmp_path / "work").exists()
  given = {}
  monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: given.update(kw))
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  config = _demo()
  config.mesh.multi_host = True
  parallel.initialize(config)
  assert given == {"num_processes": 2, "process_id": 1}
