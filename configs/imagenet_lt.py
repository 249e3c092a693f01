# ImageNet-LT with ResNet-10, the paper's main long-tail table (docs/design.md 1.5-1.7).
# Needs ImageNet images under data.root and the ImageNet-LT split files:
#   discl --config=configs/imagenet_lt.py --workdir=runs/inlt \
#     --config.data.root=/data/imagenet --config.data.train_list=/data/ImageNet_LT_train.txt \
#     --config.data.val_list=/data/ImageNet_LT_val.txt --config.data.test_list=/data/ImageNet_LT_test.txt
#   variants: :schedule=none (CE baseline), :loss=balanced_softmax, :schedule=adaptive, ...
# Like the reference, every variant fine-tunes a long-tail base ResNet-10 and refuses to start
# without one: --config.train.init_checkpoint=PATH (LDMLR's PyTorch checkpoint, or this
# project's), or train it first with :base (the reference's base recipe, real data only):
#   discl --config=configs/imagenet_lt.py:base --workdir=runs/inlt_base --stage=train ...
# Descriptions: the reference asked gpt-3.5-turbo-0125 for 10 per class and never published
# them; --config.prompts.source=llm asks any OpenAI-compatible endpoint the same
# (prompts.llm_base_url, $OPENAI_API_KEY) and caches them in the workdir.
# The generator is the paper's SDXL refiner 1.0 at each image's own size (rounded down to a
# multiple of 8); :sd=stable-diffusion-v1-5/stable-diffusion-v1-5 (or any SD / SDXL checkpoint) swaps it.
"""ImageNet-LT (file lists) with ResNet-10, Adam 1e-3, 65 epochs (syn_to_real: 14/15/15/17 + 4)."""

from discl_jax import config as config_lib
from discl_jax.configs import common


def get_config(arg=None):
  """Returns the ImageNet-LT ConfigDict; arg: schedule, loss, sd, runlocal, base."""
  arg = config_lib.parse_arg(
      arg, schedule="syn_to_real", loss="ce",
      sd=common.SDXL_REFINER, runlocal=False, base=False)
  c = config_lib.base_config()
  c.data.name = "imagenet_lt"
  c.data.image_size = 224
  c.data.on_bad_image = "skip"
  c.data.num_workers = 8

  c.prompts.source = "file"
  # JSON {class name: [descriptions]}: the reference's LLM-written scene descriptions.
  c.prompts.descriptions_file = "prompts/imagenet_lt_descriptions.json"
  c.prompts.description_format = "a 8k real photo: {d}"
  common.paper_longtail_recipe(c, model="resnet10", loss=arg.loss, schedule=arg.schedule)
  common.reference_generator(c, arg.sd)
  c.train.require_init_checkpoint = True  # docs/design.md §6: DisCL fine-tunes a long-tail base
  if arg.base:
    common.reference_base_recipe(c)
  c.curriculum.tail_fill = "pooled"  # the reference's one tail pool (docs/design.md §6)
  common.reference_augmentation(c)
  c.score.regenerate = True  # the reference's CLIP-guided retry, up to 5 attempts
  c.score.max_regenerations = 5
  if c.curriculum.schedule == "syn_to_real":
    # The reference's syn_to_real plan: 14 / 15 / 15 epochs at 0.1 / 0.3 / 0.5, a real stage
    # of 17, then the last 4 of 65 epochs real.
    c.curriculum.curriculum_epochs = 61
    c.curriculum.stage_epochs = (14, 15, 15, 17)

  if arg.runlocal:
    common.smoke_sized(c)
  return c
