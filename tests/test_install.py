"""A non-editable install: the wheel ships the configs and `--config=demo:runlocal` works."""

import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

_CHECK = """
import pathlib, sys
import discl_jax
from discl_jax import config as config_lib, config_checks, shipped_configs
assert "site" in discl_jax.__file__, discl_jax.__file__
spec = shipped_configs.resolve("demo:runlocal")
file, _, arg = spec.partition(":")
config = config_checks.validate(config_lib.load_file(file, arg))
assert config.train.epochs == 2 and pathlib.Path(config.diffusion.model).is_dir()
print("OK", spec)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """Builds the wheel from a copy of the source tree and installs it into a folder."""
  pytest.importorskip("setuptools")
  root = tmp_path_factory.mktemp("install")
  source = root / "src"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  for name in ("discl_jax", "configs"):
    shutil.copytree(REPO / name, source / name, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
  subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(root / "dist"), str(source)], check=True, timeout=600)
  wheel = next((root / "dist").glob("*.whl"))
  subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(root / "site"),
                        str(wheel)], check=True, timeout=600)
  return wheel, root / "site"


def test_the_wheel_ships_every_config(installed):
  wheel, _ = installed
  names = zipfile.ZipFile(wheel).namelist()
  for config in (REPO / "configs").glob("*.py"):
    assert f"discl_jax/configs/{config.name}" in names


def test_a_shipped_config_runs_by_name_from_the_installed_package(installed, tmp_path):
  _, site = installed
  env = dict(os.environ, PYTHONPATH=str(site))
  result = subprocess.run([sys.executable, "-c", _CHECK], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "OK" in result.stdout and str(site) in result.stdout


def test_installed_jax_and_flax_are_inside_the_declared_bounds():
  text = (REPO / "pyproject.toml").read_text()
  for package in ("jax", "flax"):
    line = next(l for l in text.splitlines() if l.strip().startswith(f'"{package}>='))
    low, high = line.strip().strip('",').split(">=")[1].split(",<")
    version = tuple(int(p) for p in importlib.metadata.version(package).split(".")[:2])
    assert tuple(int(p) for p in low.split(".")) <= version < tuple(
        int(p) for p in high.split(".")), (package, version, line)
  assert '"huggingface_hub' in text


def test_runtime_needs_no_diffusers_and_pins_no_hugging_face_release():
  """Our own models (discl_jax/models): diffusers is a test extra; transformers (tokenizers) and
  huggingface_hub take any current release."""
  import tomllib  # pylint: disable=g-import-not-at-top
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  runtime = {d.split(">")[0].split("<")[0].split("=")[0].strip(): d for d in project["dependencies"]}
  assert "diffusers" not in runtime
  for name in ("transformers", "huggingface_hub"):
    assert "<" not in runtime[name] and "==" not in runtime[name], runtime[name]
  assert any(d.startswith("diffusers") for d in project["optional-dependencies"]["torch"])
