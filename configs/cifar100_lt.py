# CIFAR100-LT with ResNet-32 (docs/design.md 1.6). Variants pick imbalance, schedule and loss:
#   discl --config=configs/cifar100_lt.py:ir=100 --workdir=runs/c100lt_ir100
#   discl --config=configs/cifar100_lt.py:ir=50,schedule=none,loss=balanced_softmax --workdir=runs/c100lt_bs
#   discl --config=configs/cifar100_lt.py:ir=100,runlocal --workdir=/tmp/smoke
# Every variant fine-tunes a long-tail base ResNet-32 (--config.train.init_checkpoint=PATH, e.g.
# LDMLR's PyTorch checkpoint) and refuses to start without one; :base trains it (the reference's
# base recipe, real data only):
#   discl --config=configs/cifar100_lt.py:ir=100,base --workdir=runs/c100lt_base --stage=train
# Generator: the SDXL refiner 1.0 with the reference's settings, the 32x32 images upscaled
# to 512; :sd=stable-diffusion-v1-5/stable-diffusion-v1-5 (or another checkpoint) swaps it.
"""CIFAR100-LT (TFDS cifar100, exponential profile) with a DisCL curriculum.

As in the reference's rebuttal, the 32 x 32 sources are scaled up to 128 x 128
before generation (LANCZOS here; the rebuttal used a super-resolution model)
and the curriculum runs the levels 0.5 -> 0.9.
"""

from discl_jax import config as config_lib
from discl_jax.configs import common


def get_config(arg=None):
  """Returns the CIFAR100-LT ConfigDict; arg: ir, schedule, loss, sd, runlocal, base."""
  arg = config_lib.parse_arg(
      arg, ir=100, schedule="syn_to_real", loss="ce",
      sd=common.SDXL_REFINER, runlocal=False, base=False)
  c = config_lib.base_config()
  c.data.name = "cifar100_lt"
  c.data.prepare = True  # downloads CIFAR-100 (160 MB) into data.data_dir on first use
  c.data.imbalance_ratio = float(arg.ir)
  c.data.max_per_class = 500
  c.data.val_per_class = 10
  c.data.image_size = 32

  c.prompts.templates = ("a photo of a {c}", "a blurry photo of a {c}", "a {c} in a natural scene")
  common.paper_longtail_recipe(c, model="resnet32", loss=arg.loss, schedule=arg.schedule)
  common.reference_generator(c, arg.sd)
  c.diffusion.resolution = 512  # 32x32 inputs: too small for the UNet's down-sampling
  c.diffusion.source_upsample = 128
  c.curriculum.levels = (0.5, 0.6, 0.7, 0.8, 0.9)
  c.train.require_init_checkpoint = True  # docs/design.md §6: DisCL fine-tunes a long-tail base
  common.reference_augmentation(c)
  if arg.base:
    common.reference_base_recipe(c)
    # LDMLR's CIFAR-100-LT recipe, as its released checkpoint's metadata records it (read by
    # the issue #22 audit): SGD 0.1, wd 5e-4, x0.1 at epochs 100 and 150, 200 epochs,
    # mixup 0.5, batch 64; momentum, Nesterov and the 5 warm-up epochs stay the ImageNet-LT
    # base recipe's.
    c.train.update(weight_decay=5e-4, lr_milestones=(100, 150), epochs=200, mixup_alpha=0.5,
                   batch_size=64)
  c.curriculum.tail_fill = "pooled"  # the reference's one tail pool (docs/design.md §6)

  if arg.runlocal:
    common.smoke_sized(c)
    c.data.max_per_class = 50
  return c
