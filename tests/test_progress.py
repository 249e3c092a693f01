"""Progress you can watch: the epoch log line, compile notices, quiet bars, the compile cache."""

import os
import subprocess
import sys
import textwrap

from discl_jax import progress
from discl_jax.train import loop


def test_epoch_line_gives_groups_in_percent_and_seconds():
  row = {"epoch": 2, "loss": 0.25, "curriculum_phase": "synthetic", "curriculum_level": 0.3,
         "val/many": 0.9, "val/medium": 0.8, "val/few": 0.5,
         "val/all": 0.75, "test/many": 1.0, "test/medium": 0.875, "test/few": 0.25,
         "test/all": 0.7}
  line = loop.epoch_line(row, 10, ("val", "test"), images=512, seconds=6.5, train_seconds=4.0)
  assert line == ("epoch 2 (3/10): loss 0.2500 | val Many 90.0 Medium 80.0 Few 50.0 All 75.0 % "
                  "test Many 100.0 Medium 87.5 Few 25.0 All 70.0 % | synthetic level 0.30 | "
                  "6.5 s (128 img/s training)")
  row.update(curriculum_phase="real", curriculum_level=None)
  assert "| real level real |" in loop.epoch_line(row, 10, ("val",), 0, 1.0)


def test_compiling_is_announced_once_per_name(caplog):
  calls = []
  step = progress.first_call_notice(lambda x: calls.append(x) or x, "a test step")
  with caplog.at_level("INFO", logger="absl"):  # absl may be at WARNING after flag parsing
    assert [step(1), step(2)] == [1, 2]
    progress.compiling("a test step")
  assert calls == [1, 2]
  assert caplog.text.count("compiling a test step ...") == 1


def test_bars_are_quiet_when_stderr_is_not_a_terminal(capsys):
  items = list(progress.counted(range(5), 5, "quiet", lambda item: 1))
  assert items == [0, 1, 2, 3, 4]
  assert capsys.readouterr().err == ""


def test_persistent_compilation_cache_is_written_to_the_configured_dir(tmp_path):
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from discl_jax import progress
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
      print("DIR", progress.enable_compilation_cache())
      jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(4)).block_until_ready()
  """)
  env = dict(os.environ, DISCL_JAX_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"DIR {tmp_path / 'cache'}" in out.stdout
  assert any((tmp_path / "cache").iterdir())
