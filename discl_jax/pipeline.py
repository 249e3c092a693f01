"""Runs stages in order on one workdir; importable from a notebook."""


from absl import logging

from discl_jax import digit_models
from discl_jax import stages
from discl_jax import workdir as wd


def run_stages(config, workdir, names=stages.ORDER):
  """Runs each stage in `names` on `workdir`; returns None.

  Checks the config first (`preflight`), then records it in
  `workdir/config.json` (process 0 only).
  """
  preflight(config, names)
  wd.path(workdir).mkdir(parents=True, exist_ok=True)
  if wd.is_main_process():
    wd.atomic_write_text(wd.path(workdir, wd.CONFIG), config.to_json_best_effort(indent=2) + "\n")
  for name in names:
    logging.info("stage %s: start", name)
    stages.get(name)(config, workdir)
    logging.info("stage %s: done", name)


def preflight(config, names):
  """Returns None; raises ValueError before any stage runs when `config` cannot run `names`."""
  digit_models.check_heldout(config)
  tc = config.train
  if "train" in names and tc.require_init_checkpoint and not tc.init_checkpoint:
    raise ValueError(
        "train.init_checkpoint is empty, but this config fine-tunes a long-tail base classifier "
        "as the reference does (train.require_init_checkpoint=True). Either import one: "
        "--config.train.init_checkpoint=PATH (a PyTorch ResNet .pth/.pt/.safetensors, e.g. "
        "LDMLR's ImageNet-LT ResNet-10, or a ckpt directory of this project); or train one "
        "first with this config's `:base` variant and pass its WORKDIR/ckpt")
