"""Where a user's route meets a broken input: one line naming the file, never a traceback."""

import os
import shutil
import pathlib
import subprocess
import sys
import textwrap
import tomllib

import pytest

from discl_jax import digit_models
from discl_jax.models import unet

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _discl(*args, env=None):
  return subprocess.run([sys.executable, "-m", "discl_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_a_truncated_unet_msgpack_is_named(tmp_path):
  shutil.copytree(pathlib.Path(digit_models.path("sd"), "unet"), tmp_path / "unet")
  weights = tmp_path / "unet" / "diffusion_flax_model.msgpack"
  os.truncate(weights, weights.stat().st_size // 2)
  with pytest.raises(ValueError, match=rf"cannot read model weights '{weights}' .*truncated or "
                     "damaged"):
    unet.load(tmp_path / "unet")  # the loader load_sd calls for the UNet


@pytest.mark.parametrize("body, error", [
    ("def get_config(arg=None):\n  raise RuntimeError('no such dataset here')\n",
     "RuntimeError: no such dataset here"),
    ("def get_config(arg=None)\n  return None\n", "SyntaxError: expected ':'"),
    ("import not_a_module_anywhere\n", "ModuleNotFoundError: No module named"),
])
def test_a_config_file_that_fails_to_load_is_one_line(tmp_path, body, error):
  config = tmp_path / "my_config.py"
  config.write_text(body)
  result = _discl(f"--config={config}:runlocal", f"--workdir={tmp_path / 'work'}")
  assert result.returncode != 0 and not (tmp_path / "work").exists()
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f"discl: config file '{config}' failed to load: {error}")


def test_cifar100_preparation_names_the_prepare_extra(tmp_path):
  """In a clean install (no TensorFlow, no importlib_resources) data.prepare=True names the extra.

  TFDS's cifar100 builder imports importlib_resources before it downloads
  anything, so this runs the real builder offline.
  """
  script = textwrap.dedent(f"""
      import sys
      sys.modules["importlib_resources"] = None  # as in a clean install
      from discl_jax.data import tfds_source
      try:
        tfds_source.builder("cifar100", {str(tmp_path / 'tfds')!r}, prepare=True)
      except ImportError as e:
        print("ERROR", e)
  """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT),
                                                                  os.environ.get("PYTHONPATH")))))
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert "ERROR data.prepare=True: preparing TFDS dataset 'cifar100' needs 'importlib_resources'" \
      in out.stdout, out.stderr[-2000:]
  assert "pip install 'discl-jax[prepare]'" in out.stdout
  assert not list((tmp_path / "tfds").rglob("*.tar.gz"))  # nothing was downloaded
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  assert {r.split(">")[0] for r in extras["prepare"]} == {"tensorflow", "importlib_resources"}
