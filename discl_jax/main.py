"""Command line: `discl --config=configs/demo.py:ARG --workdir=DIR --stage=all`.

Parses flags and dispatches to the stages; nothing else lives here.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from discl_jax import config as config_lib
from discl_jax import parallel
from discl_jax import pipeline
from discl_jax import progress
from discl_jax import stages

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py:runlocal.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage's files.")
_STAGE = flags.DEFINE_enum(
    "stage", "all", ("all",) + stages.ORDER, "Which stage to run; all runs them in order.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_library_info(record):
  """Keeps warnings from every library but INFO lines only from discl_jax."""
  return record.levelno >= std_logging.WARNING or "discl_jax" in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_library_info)
  try:
    config = config_lib.validate(_CONFIG.value)
  except (KeyError, TypeError) as e:
    filename = config_flags.get_config_filename(flags.FLAGS["config"])
    sys.exit(f"discl: bad config {filename!r}: {e.args[0]}")
  parallel.initialize(config)
  progress.enable_compilation_cache()
  names = stages.ORDER if _STAGE.value == "all" else (_STAGE.value,)
  try:
    pipeline.run_stages(config, _WORKDIR.value, names)
  except (stages.StageNotImplemented, ValueError, FileNotFoundError, KeyError) as e:
    # Bad input: our own message names the file, key or value; the traceback
    # stays available with --verbosity=1.
    logging.debug("traceback of the error below", exc_info=True)
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    sys.exit(f"discl: {type(e).__name__}: {message}")


def run():
  """Console-script entry point."""
  # The pinned diffusers / transformers warn once per Flax module they build.
  os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  try:
    config_lib.check_override_flags(sys.argv[1:])
  except KeyError as e:
    sys.exit(f"discl: {e.args[0]}")
  app.run(main)


if __name__ == "__main__":
  run()
