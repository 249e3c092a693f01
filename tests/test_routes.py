"""The README's paper routes, run through `discl` as a user would, on stand-ins the test writes.

Each command is read from the README's "Paper routes" section and run verbatim
(`python -m discl_jax.main`, in a directory whose `configs` is the repo's and
whose `runs/` holds the workdirs), with only the values of the input keys the
command names swapped for stand-ins (tests/routes_fixture.py), `runlocal` added
to the config's variants, the model keys pointed at tiny hub-snapshot folders,
and the size keys below. One module-wide directory holds the stand-ins and the
compilation cache, so each program compiles once: every SDXL route generates at
32 x 32 with the one tiny refiner, so they share one compiled sampler.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import iwildcam_fixture
import routes_fixture
from discl_jax import workdir as wd

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytest.importorskip("torch", reason="the stand-ins are written with torch, as the hub's are")

# Random tiny CLIPs score every image near 0: keep every synthetic image.
KEEP_ALL = {"score.threshold": -1.0}
SMALL_IMAGES = {"data.image_size": 32, "data.num_workers": 0, "diffusion.dtype": "float32",
                "train.batch_size": 4, "eval.batch_size": 16}
# What train and eval write: left out when a route starts from another route's spectrum.
TRAIN_AND_EVAL_FILES = ("ckpt", "metrics.jsonl", "train_result.json", "predictions.npz", "tb",
                        "timings.jsonl", "timings.md", "train.provenance.json", "report.md",
                        "curves.png", "stage_times.json")


def readme_routes():
  """Returns the argv (after `discl`) of every command in the README's "Paper routes" section."""
  text = (ROOT / "README.md").read_text()
  section = text.split("\n## Paper routes\n", 1)[1].split("\n## ", 1)[0]
  commands = []
  for block in re.findall(r"```bash\n(.*?)\n```", section, flags=re.S):
    for command in block.replace("\\\n", " ").splitlines():
      words = shlex.split(command)
      assert words[0] == "discl", command
      commands.append(words[1:])
  return commands


def route(workdir):
  """Returns the README command whose --workdir is `workdir`."""
  found = [argv for argv in readme_routes() if f"--workdir={workdir}" in argv]
  assert len(found) == 1, f"the README's Paper routes give {len(found)} commands for {workdir}"
  return found[0]


def standin_argv(argv, inputs, overrides):
  """Returns `argv` with the values of `inputs`' keys swapped, runlocal added, `overrides` appended.

  Every key of `inputs` must be one the README command sets; every /data path must be swapped.
  """
  out, seen = [], set()
  for arg in argv:
    if arg.startswith("--config="):
      spec = arg[len("--config="):]
      arg = f"--config={spec},runlocal" if ":" in spec else f"--config={spec}:runlocal"
    elif arg.startswith("--config."):
      key, value = arg[len("--config."):].split("=", 1)
      assert key in inputs or not value.startswith("/data/"), (
          f"the route's input {key}={value} has no stand-in")
      if key in inputs:
        seen.add(key)
        arg = f"--config.{key}={inputs[key]}"
    out.append(arg)
  assert seen == set(inputs), f"inputs the README command does not name: {set(inputs) - seen}"
  return out + [f"--config.{k}={v}" for k, v in overrides.items()]


def test_every_readme_route_has_a_test_here():
  """A command added to the README's Paper routes without a test here fails."""
  workdirs = {a.split("=", 1)[1] for argv in readme_routes() for a in argv
              if a.startswith("--workdir=")}
  tested = set(re.findall(r'route\("([^"]+)"\)', pathlib.Path(__file__).read_text()))
  assert workdirs == tested


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """The module's run directory: `configs` linked to the repo's, the compile cache, `runs/`."""
  path = tmp_path_factory.mktemp("routes")
  (path / "configs").symlink_to(ROOT / "configs")
  return path


def discl(base, argv):
  """Runs `discl ARGV` in `base` offline; returns the CompletedProcess (its return code checked)."""
  path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             DISCL_JAX_CACHE_DIR=str(base / "jax_cache"))
  result = subprocess.run([sys.executable, "-m", "discl_jax.main", *argv], cwd=base, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, f"discl {shlex.join(argv)}\n{result.stderr[-4000:]}"
  assert not re.search(r"\d+/\d+ \[", result.stderr), "a progress bar printed into a pipe"
  return result


@pytest.fixture(scope="module")
def models(base):
  """Tiny hub-snapshot folders: the SDXL refiner, SD 1.x, CLIP."""
  return {"sdxl_refiner": routes_fixture.write_tiny_pipeline(base / "hub/refiner", "sdxl_refiner"),
          "sd": routes_fixture.write_tiny_pipeline(base / "hub/sd15", "sd"),
          "clip": routes_fixture.write_tiny_clip(base / "hub/clip")}


def _finished_discl_run(workdir, trains_on_synthetic=True):
  """Asserts what a whole DisCL run leaves in `workdir`: spectrum, scores, model, report."""
  assert (workdir / "report.md").is_file() and (workdir / "curves.png").is_file()
  result = json.loads(wd.path(workdir, wd.TRAIN_RESULT).read_text())
  assert "test/all" in result or any(k.endswith("/macro_f1") for k in result), result
  assert json.loads((workdir / "acceptance.json").read_text()), "score wrote no acceptance"
  assert list((workdir / wd.SPECTRUM).rglob("*.png"))
  rows = wd.read_jsonl(wd.path(workdir, wd.METRICS))
  assert any(row["curriculum_phase"] == "synthetic" for row in rows)
  if trains_on_synthetic:
    assert sum(row["num_synthetic"] for row in rows) > 0, "no synthetic image was trained on"


# ImageNet-LT ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imagenet(base):
  inputs = routes_fixture.write_oltr(base / "data/ImageNet_LT")
  inputs["train.init_checkpoint"] = str(routes_fixture.write_ldmlr_resnet10(
      base / "data/ldmlr/imagenet_lt_resnet10.pth", num_classes=len(routes_fixture.WNIDS)))
  return inputs


def _imagenet_models(models):
  return {"diffusion.model": models["sdxl_refiner"], "score.model": models["clip"]}


@pytest.fixture(scope="module")
def imagenet_base(base, imagenet):
  argv = route("runs/inlt_base")
  inputs = {k: v for k, v in imagenet.items() if f"--config.{k}=" in " ".join(argv)}
  return discl(base, standin_argv(argv, inputs, SMALL_IMAGES)), base / "runs/inlt_base"


def test_imagenet_lt_base_trains_only_the_base(imagenet_base):
  _, workdir = imagenet_base
  rows = wd.read_jsonl(wd.path(workdir, wd.METRICS))
  assert len(rows) == 2 and not (workdir / "hard.jsonl").exists()  # runlocal: 2 epochs, train only
  assert list((workdir / "ckpt").iterdir())


@pytest.fixture(scope="module")
def inlt_from_base(base, imagenet, imagenet_base, models):
  """The ImageNet-LT DisCL route from the `:base` run; returns its workdir."""
  argv = route("runs/inlt_from_base")
  inputs = {k: v for k, v in imagenet.items() if k != "train.init_checkpoint"}
  discl(base, standin_argv(argv, inputs, {**SMALL_IMAGES, **KEEP_ALL, **_imagenet_models(models)}))
  return base / "runs/inlt_from_base"


def test_imagenet_lt_discl_from_the_base(inlt_from_base):
  _finished_discl_run(inlt_from_base)


def test_imagenet_lt_discl_from_ldmlr_pth(base, imagenet, models, inlt_from_base):
  # The spectrum does not depend on the classifier: the workdir starts with the other
  # route's finished hard / prompts / generate / score outputs, so the command trains only
  # (and would refuse, naming the key, if any of their fingerprints differed).
  workdir = base / "runs/inlt"
  shutil.copytree(inlt_from_base, workdir, ignore=shutil.ignore_patterns(*TRAIN_AND_EVAL_FILES))
  argv = route("runs/inlt")
  result = discl(base, standin_argv(argv, imagenet, {**SMALL_IMAGES, **KEEP_ALL,
                                                    **_imagenet_models(models)}))
  assert re.search(r"generate: \d+ jobs in all, \d+ for this process, 0 still to do",
                   result.stderr), result.stderr[-3000:]
  _finished_discl_run(workdir)
  record = json.loads((workdir / "train.provenance.json").read_text())
  assert record["config"]["train"]["init_checkpoint"].endswith(".pth")
  assert record["fingerprint"]["train.init_checkpoint_sha256"]


# CIFAR100-LT ------------------------------------------------------------------------------

# ir=100 from 10 images a class down to 1, the Few threshold scaled to that (74 classes of
# 1-2 images, 83 hard images), one strength (runlocal's one level): 83 jobs.
CIFAR_SIZES = {**KEEP_ALL, "data.max_per_class": 10, "data.val_per_class": 1,
               "data.few_threshold": 3, "train.batch_size": 8,
               "diffusion.resolution": 32, "diffusion.source_upsample": 0,
               "diffusion.strengths": "(0.7,)", "diffusion.dtype": "float32",
               "eval.batch_size": 64}


def test_cifar100_lt_base_then_discl(base, models):
  tfds_dir = routes_fixture.write_tfds("cifar100", base / "data/tfds_cifar",
                                       {"train": (11,) * 100, "test": (1,) * 100}, (32, 32))
  inputs = {"data.data_dir": tfds_dir}
  discl(base, standin_argv(route("runs/c100lt_base"), inputs, CIFAR_SIZES))
  assert list((base / "runs/c100lt_base/ckpt").iterdir())
  discl(base, standin_argv(route("runs/c100lt"), inputs, {
      **CIFAR_SIZES, "diffusion.model": models["sdxl_refiner"], "score.model": models["clip"]}))
  _finished_discl_run(base / "runs/c100lt")


# iNaturalist 2018 -------------------------------------------------------------------------

def test_inat2018(base, models):
  tfds_dir = routes_fixture.write_tfds("i_naturalist2018", base / "data/tfds_inat",
                                       {"train": (24, 3, 2), "validation": (2, 2, 2)}, (36, 44))
  discl(base, standin_argv(route("runs/inat"), {"data.data_dir": tfds_dir}, {
      **SMALL_IMAGES, **KEEP_ALL, "diffusion.resolution": 32,
      "diffusion.model": models["sd"], "score.model": models["clip"]}))
  # 3 of i_naturalist2018's 8,142 classes have images here, so the per-class tail fill gives
  # each of 8,141 tail classes a share that rounds to no synthetic image.
  _finished_discl_run(base / "runs/inat", trains_on_synthetic=False)


# iWildCam ---------------------------------------------------------------------------------

def _iwildcam_sizes(models):
  return {**SMALL_IMAGES, **KEEP_ALL, "diffusion.source_size": "(32, 32)", "train.batch_size": 8,
          "train.warmup_steps": 2, "curriculum.uniform_rows": 24, "curriculum.val_sources": 3,
          "diffusion.model": models["sdxl_refiner"], "score.model": models["clip"],
          "train.clip_model": models["clip"]}


@pytest.fixture(scope="module")
def flyp(base, models):
  """Step 1 of the iWildCam route (the FLYP baseline); returns (result, workdir)."""
  data = iwildcam_fixture.write_tiny_iwildcam(base / "data/iwildcam_v2.0")
  argv = standin_argv(route("runs/flyp"), {"data.metadata_csv": str(data.metadata_csv)},
                      _iwildcam_sizes(models))
  return discl(base, argv), base / "runs/flyp"


def test_iwildcam_flyp_step_makes_no_spectrum(flyp):
  _, workdir = flyp
  assert (workdir / "train_result.json").is_file()
  assert not (workdir / wd.SPECTRUM).exists() and not (workdir / "acceptance.json").exists()


def test_iwildcam_discl_from_the_flyp_checkpoint(base, flyp, models):
  workdir = base / "runs/discl"
  data = base / "data/iwildcam_v2.0"
  discl(base, standin_argv(route("runs/discl"), {"data.metadata_csv": str(data / "metadata.csv")},
                           _iwildcam_sizes(models)))
  assert (flyp[1] / "ckpt").is_dir()
  hard = wd.read_jsonl(workdir / "hard.jsonl")
  assert hard and all(row["label"] != 0 for row in hard)  # `empty` never gets a spectrum
  # Adaptive: the synthetic phase trains on the level g* with the largest validation gain,
  # which for tiny random models may be the real images; the phase itself must run.
  _finished_discl_run(workdir, trains_on_synthetic=False)
