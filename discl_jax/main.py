"""discl: DisCL (diffusion curriculum) in JAX, from hard images to a trained classifier.

USAGE: discl --config=CONFIG[:VARIANTS] --workdir=DIR [--stage=STAGE] [--config.KEY=VALUE ...]
       discl --config=CONFIG[:VARIANTS] --stage=fetch [--config.KEY=VALUE ...]

Stages run in this order (--stage=all, the default) or one at a time; each
reads and writes only files in --workdir, skips what is done and resumes
where it was killed:
%(stages)s
--stage=fetch runs no stage: it downloads the hub weights the config's stages
load into the Hugging Face cache (no --workdir needed), so that a later run
works offline (HF_HUB_OFFLINE=1), e.g. on compute nodes without internet.

CONFIG is a config file (configs/demo.py) or the name of a shipped config
(demo); VARIANTS are comma-separated KEY=VALUE arguments of that config,
and every config key can be overridden with --config.KEY=VALUE:
%(configs)s

Examples:
  discl --config=configs/demo.py --workdir=workdir/demo
  discl --config=demo:runlocal --workdir=/tmp/smoke
  discl --config=cifar100_lt:ir=50,loss=balanced_softmax --workdir=runs/c100 --stage=train \\
      --config.train.epochs=10

Errors print one line; --verbosity=1 adds the traceback.
"""

import logging as std_logging
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from discl_jax import config as config_lib
from discl_jax import config_checks
from discl_jax import host_devices
from discl_jax import hub
from discl_jax import parallel
from discl_jax import pipeline
from discl_jax import shipped_configs
from discl_jax import progress
from discl_jax import stages

# What each stage writes into the workdir (shown by --help).
STAGE_OUTPUTS = {
    "hard": "hard.jsonl: the images that get a spectrum (hard.rule)",
    "prompts": "prompts.json: one prompt per hard image",
    "generate": "spectrum/ (PNGs + manifest), spectrum_grid_*.png",
    "score": "CLIP scores in spectrum/, acceptance.json, acceptance.png",
    "train": "ckpt/, metrics.jsonl, tb/, train_result.json",
    "eval": "report.md, curves.png",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file or shipped config name, e.g. configs/demo.py:runlocal or "
    "demo:runlocal.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage's files.")
FETCH = "fetch"  # --stage=fetch: download the config's hub weights, run no stage
_STAGE = flags.DEFINE_enum(
    "stage", "all", ("all",) + stages.ORDER + (FETCH,),
    "Which stage to run; all runs them in order; fetch downloads the hub weights they load.")
flags.mark_flag_as_required("config")
flags.register_multi_flags_validator(
    ["workdir", "stage"], lambda values: bool(values["workdir"]) or values["stage"] == FETCH,
    message="--workdir is required (except with --stage=fetch)")

_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")


def help_text():
  """Returns the --help text: usage, stages and what they write, shipped configs, examples."""
  stage_lines = "\n".join(f"  {name:<9} {STAGE_OUTPUTS.get(name, '')}" for name in stages.ORDER)
  config_lines = []
  for name in shipped_configs.names():
    summary, variants = shipped_configs.describe(name)
    config_lines.append(f"  {name:<12} {summary}")
    config_lines.append(f"  {'':<12} configs/{name}.py; variants: "
                        f"{', '.join(variants) if variants else 'none'}")
  return __doc__ % {"stages": stage_lines, "configs": "\n".join(config_lines)}


def one_line(error):
  """Returns `error` as one line: its type and message, the message's lines joined."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else error
  text = " | ".join(line.strip() for line in str(message).splitlines() if line.strip())
  return f"{type(error).__name__}: {text}"


def _quiet_library_info(record):
  """Keeps warnings from every library but INFO lines only from discl_jax."""
  return record.levelno >= std_logging.WARNING or "discl_jax" in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_library_info)
  names = stages.ORDER if _STAGE.value == "all" else (_STAGE.value,)
  try:
    try:
      config = config_checks.validate(_CONFIG.value)
    except (KeyError, TypeError, ValueError) as e:
      filename = config_flags.get_config_filename(flags.FLAGS["config"])
      raise type(e)(f"bad config {filename!r}: {e.args[0] if e.args else e}") from e
    if _STAGE.value == FETCH:
      skips = pipeline.skip_reasons(config, stages.ORDER)
      hub.fetch(config, [name for name in stages.ORDER if name not in skips])
      return
    host_devices.configure(config.mesh.cpu_devices, config.train.batch_size)
    parallel.initialize(config)
    progress.enable_compilation_cache()
    pipeline.run_stages(config, _WORKDIR.value, names)
  except Exception as e:  # pylint: disable=broad-except
    # Every error is one line naming the file, key or value; the traceback
    # stays available with --verbosity=1.
    logging.debug("traceback of the error below", exc_info=True)
    sys.exit(f"discl: {one_line(e)}")


def _parse_flags(argv):
  """Returns the arguments absl leaves; a bad flag or config file exits with one line."""
  verbose = any(a.startswith(("--verbosity=", "-v=")) and not a.endswith(("=0", "=-1"))
                for a in argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and not verbose:  # a config file that raised: where, then what
      lines = [lines[0].rstrip(":"), lines[-1]]
    sys.exit("discl: " + " | ".join(lines))
  except Exception as e:  # pylint: disable=broad-except  (a config file that raised or does not parse)
    if verbose:
      traceback.print_exc()
    sys.exit(f"discl: config file {_config_file(argv)!r} failed to load: {one_line(e)}")


def _config_file(argv):
  """Returns the config file path that --config names in `argv` (without its variants)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _resolve_config_flag(argv):
  """Returns `argv` with the --config value resolved (a shipped name becomes its file).

  Exits with one line when the config file does not exist.
  """
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec, prefix = arg[len("--config="):], "--config="
    elif arg == "--config" and i + 1 < len(argv):
      spec, prefix, i = argv[i + 1], "", i + 1
    else:
      continue
    try:
      argv[i] = prefix + shipped_configs.resolve(spec)
    except ValueError as e:
      sys.exit(f"discl: {e}")
  return argv


def run():
  """Console-script entry point."""
  if any(arg in _HELP_FLAGS for arg in sys.argv[1:]):
    print(help_text())
    print("flags:")
    print(flags.FLAGS.module_help(flags.FLAGS.find_module_defining_flag("workdir")))
    sys.exit(0)
  argv = _resolve_config_flag(sys.argv)
  try:
    config_lib.check_override_flags(argv[1:])
  except KeyError as e:
    sys.exit(f"discl: {e.args[0]}")
  app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
