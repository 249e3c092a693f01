"""The CPU device count a run starts with: one per core, XLA_FLAGS, or mesh.cpu_devices."""

import os
import pathlib
import subprocess
import sys

import pytest

from discl_jax import host_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_default_is_one_device_per_usable_core():
  count, reason = host_devices.choose(0, "", 4)
  assert count == 4 and "one per usable core" in reason


def test_xla_flags_count_is_kept_by_default():
  count, reason = host_devices.choose(0, "--foo --xla_force_host_platform_device_count=3", 4)
  assert count is None and "device_count=3" in reason


def test_config_key_overrides_flags_and_cores():
  assert host_devices.choose(1, "--xla_force_host_platform_device_count=3", 4) == (
      1, "mesh.cpu_devices=1")


def test_default_takes_the_most_cores_that_divide_the_batch():
  count, reason = host_devices.choose(0, "", 3, batch_size=64)
  assert count == 2 and "2 divide train.batch_size=64" in reason
  assert host_devices.choose(0, "", 4, batch_size=64)[0] == 4


def test_negative_count_is_refused_naming_the_key():
  with pytest.raises(ValueError, match="mesh.cpu_devices"):
    host_devices.choose(-1, "", 2)


def _startup_line(*flags, xla_flags=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  proc = subprocess.run(
      [sys.executable, "-m", "discl_jax.main", "--config=configs/demo.py:runlocal",
       "--workdir=" + str(pathlib.Path(flags[0])), "--stage=hard", *flags[1:]],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
  return next(line for line in proc.stderr.splitlines() if "device(s)" in line)


def test_discl_starts_the_chosen_number_of_devices(tmp_path):
  cores = host_devices.usable_cores()
  assert f"cpu: {cores} device(s)" in _startup_line(tmp_path / "a")
  line = _startup_line(tmp_path / "b", xla_flags="--xla_force_host_platform_device_count=3")
  assert "cpu: 3 device(s)" in line and "XLA_FLAGS sets" in line
  line = _startup_line(tmp_path / "c", "--config.mesh.cpu_devices=1",
                       xla_flags="--xla_force_host_platform_device_count=3")
  assert "cpu: 1 device(s)" in line and "mesh.cpu_devices=1" in line
