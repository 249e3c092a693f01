# iNaturalist 2018 through TFDS (naturally long-tailed; needs the TFDS build in data_dir):
#   discl --config=configs/inat2018.py --workdir=runs/inat --config.data.data_dir=/data/tfds
"""iNaturalist 2018 (TFDS i_naturalist2018) with ResNet-50 and a DisCL curriculum."""

from discl_jax import config as config_lib
from discl_jax.configs import common


def get_config(arg=None):
  """Returns the iNaturalist 2018 ConfigDict; arg: schedule, loss, runlocal."""
  arg = config_lib.parse_arg(arg, schedule="syn_to_real", loss="ce", runlocal=False)
  c = config_lib.base_config()
  c.data.name = "tfds"
  c.data.tfds_name = "i_naturalist2018"
  c.data.imbalance_ratio = 1.0
  c.data.val_per_class = 1
  c.data.image_size = 224
  c.data.num_workers = 8
  common.reference_augmentation(c)

  c.prompts.templates = ("a photo of a {c}", "a {c} in the wild")
  c.diffusion.model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  c.diffusion.dtype = "bfloat16"
  c.diffusion.resolution = 512
  c.diffusion.slots = 64

  c.train.model = "resnet50"
  c.train.loss = arg.loss
  c.train.batch_size = 256
  c.train.epochs = 90
  c.curriculum.schedule = arg.schedule
  c.curriculum.curriculum_epochs = 80

  if arg.runlocal:
    common.smoke_sized(c)
  return c
