"""Config schema, config files, and the CLI's handling of bad configs."""

import pathlib
import subprocess
import sys

import ml_collections
import pytest

from discl_jax import config as config_lib
from discl_jax import config_checks

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config_file(name, arg=None):
  return config_lib.load_file(CONFIGS / f"{name}.py", arg)


@pytest.mark.parametrize("name,arg", [
    ("demo", None), ("demo", "runlocal"),
    ("cifar100_lt", "ir=100"), ("cifar100_lt", "ir=50,schedule=none,loss=balanced_softmax"),
    ("imagenet_lt", None), ("imagenet_lt", "schedule=adaptive,runlocal"),
    ("inat2018", None), ("iwildcam", None), ("iwildcam", "runlocal"),
])
def test_every_config_file_validates(name, arg):
  config = load_config_file(name, arg)
  assert config_checks.validate(config) is config


def test_cifar_variant_arguments_reach_the_config():
  config = load_config_file("cifar100_lt", "ir=50,schedule=adaptive,loss=balanced_softmax")
  assert config.data.imbalance_ratio == 50.0
  assert config.curriculum.schedule == "adaptive"
  assert config.train.loss == "balanced_softmax"


def test_runlocal_shrinks_to_smoke_size():
  full, small = load_config_file("cifar100_lt"), load_config_file("cifar100_lt", "runlocal")
  assert small.train.epochs < full.train.epochs
  assert small.diffusion.num_inference_steps < full.diffusion.num_inference_steps


def test_unknown_key_in_a_config_names_its_path():
  config = config_lib.base_config()
  config.train.lerning_rate = 0.1
  with pytest.raises(KeyError, match="train.lerning_rate.*did you mean 'learning_rate'"):
    config_checks.validate(config)


def test_unknown_section_names_it():
  config = config_lib.base_config()
  config.trian = ml_collections.ConfigDict({"epochs": 3})
  with pytest.raises(KeyError, match="'trian'"):
    config_checks.validate(config)


def test_parse_arg_types_and_unknown_names():
  parsed = config_lib.parse_arg("ir=50,runlocal", ir=100, runlocal=False, loss="ce")
  assert parsed.ir == 50 and parsed.runlocal is True and parsed.loss == "ce"
  with pytest.raises(ValueError, match="'irr'"):
    config_lib.parse_arg("irr=3", ir=100)


def test_override_flag_check_names_the_key():
  config_lib.check_override_flags(["--config.train.epochs=3", "--workdir=x"])
  with pytest.raises(KeyError, match="train.epoch.*did you mean 'epochs'"):
    config_lib.check_override_flags(["--config.train.epoch=3"])


def _discl(*args):
  return subprocess.run(
      [sys.executable, "-m", "discl_jax.main", *args],
      capture_output=True, text=True, cwd=CONFIGS.parent, timeout=300)


def test_cli_rejects_unknown_override_with_clear_message(tmp_path):
  result = _discl("--config=configs/demo.py", f"--workdir={tmp_path}",
                  "--config.train.fooo=1")
  assert result.returncode != 0
  assert "unknown config key 'train.fooo'" in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_rejects_unknown_key_set_by_a_config_file(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(
      "from discl_jax import config as config_lib\n"
      "def get_config(arg=None):\n"
      "  c = config_lib.base_config()\n"
      "  c.curriculum.shedule = 'none'\n"
      "  return c\n")
  result = _discl(f"--config={bad}", f"--workdir={tmp_path / 'w'}", "--stage=hard")
  assert result.returncode != 0
  assert "curriculum.shedule" in result.stderr and str(bad) in result.stderr


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
  result = _discl("--config=configs/demo.py:runlocal", f"--workdir={tmp_path}",
                  "--stage=generate", "--config.diffusion.strengths=(0.5, 1.5)")
  assert result.returncode != 0
  assert "1.5" in result.stderr and "Traceback" not in result.stderr
