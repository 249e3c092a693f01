# The embedded default: digits-LT, tiny models, a laptop CPU.
#   discl --config=configs/demo.py --workdir=workdir/demo
#   discl --config=configs/demo.py:runlocal --workdir=/tmp/smoke   # smoke-test size
"""Demo config: long-tailed digits with tiny diffusion, CLIP and ResNet models."""

from discl_jax import config as config_lib
from discl_jax import digit_models


def get_config(arg=None):
  """Returns the demo ConfigDict; `arg` may be "runlocal"."""
  arg = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.base_config()
  c.seed = 0
  c.data.name = "digits_lt"
  c.data.imbalance_ratio = 20.0
  c.data.max_per_class = 120
  c.data.val_per_class = 5
  c.data.image_size = 32
  c.data.many_threshold = 60
  c.data.few_threshold = 15

  c.prompts.templates = ("a photo of the digit {c}", "a handwritten digit {c}")
  # The project-trained digit generator and digit CLIP (discl_jax/assets/digits).
  c.diffusion.model = digit_models.path("sd")
  c.diffusion.strengths = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
  c.diffusion.seeds_per_level = 2
  c.diffusion.num_inference_steps = 10
  c.diffusion.guidance_scale = 7.5
  c.diffusion.slots = 16

  c.score.model = digit_models.path("clip")
  c.score.text_template = "a photo of the digit {c}"
  c.score.threshold = 0.60  # keeps about 87 % of the demo spectrum (median score 0.65)

  c.data.augment = False  # random crops cut 8x8-pixel digits apart
  c.train.model = "resnet8"
  c.train.learning_rate = 1e-2
  c.train.batch_size = 64
  c.train.epochs = 20
  c.train.log_every_steps = 10
  c.curriculum.schedule = "syn_to_real"
  c.curriculum.levels = (0.1, 0.3, 0.5)
  c.curriculum.curriculum_epochs = 15

  if arg.runlocal:
    config_lib.smoke_sized(c)
  return c
