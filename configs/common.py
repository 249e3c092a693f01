"""Config pieces the experiment files share (big_vision keeps its shared pieces so).

The reference's generator and training recipes and the smoke-test size; each
function changes a `config_lib.base_config()` in place and returns it. Not a
config itself: `shipped_configs.names` lists only files with a `get_config`.
"""

from discl_jax import config as config_lib

SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"  # the paper's generator


def reference_generator(config, model=SDXL_REFINER):
  """Returns `config` with the reference's generation settings (docs/design.md §1.3, §5) for `model`.

  Euler, 50 steps, text guidance 10, strengths 0.1 ... 1.0, 8 seeds per level,
  no negative prompt, aesthetic scores 6.0 / 2.5 (SDXL refiner), each input at
  its own size rounded down to a multiple of 8, bf16.
  """
  config.diffusion.model = model
  config.diffusion.dtype = "bfloat16"
  config.diffusion.scheduler = "euler"
  config.diffusion.num_inference_steps = 50
  config.diffusion.guidance_scale = 10.0
  config.diffusion.strengths = config_lib.DEFAULT_STRENGTHS
  config.diffusion.seeds_per_level = 8
  config.diffusion.negative_prompt = ""
  config.diffusion.aesthetic_score = 6.0
  config.diffusion.negative_aesthetic_score = 2.5
  config.diffusion.resolution = 0
  return config


def paper_longtail_recipe(config, *, model, loss, schedule):
  """Returns `config` with the paper's long-tail training recipe set (docs/design.md 1.5-1.6).

  Adam 1e-3, weight decay 1e-5, batch 128, 65 epochs of which the first 60 run
  the curriculum (levels 0.1 -> 0.3 -> 0.5), non-tail subsampled to 30 %;
  Stable Diffusion in bf16 at 512 px and a CLIPScore threshold of 0.30.
  """
  config.diffusion.dtype = "bfloat16"
  config.diffusion.resolution = 512
  config.diffusion.slots = 64
  config.score.threshold = 0.30
  config.train.model = model
  config.train.loss = loss
  config.train.optimizer = "adam"
  config.train.learning_rate = 1e-3
  config.train.weight_decay = 1e-5
  config.train.batch_size = 128
  config.train.epochs = 65
  config.curriculum.schedule = schedule
  config.curriculum.levels = (0.1, 0.3, 0.5)
  config.curriculum.curriculum_epochs = 60
  config.curriculum.nontail_fraction = 0.3
  return config


def reference_augmentation(config):
  """Returns `config` with the reference's ResNet training augmentation (docs/design.md §6):
  RandomResizedCrop scale (0.08, 1.0), colour jitter 0.4."""
  config.data.crop_scale = (0.08, 1.0)
  config.data.color_jitter = 0.4
  return config


def reference_base_recipe(config):
  """Returns `config` set to train the long-tail base classifier as the reference did (docs/design.md §6).

  SGD lr 0.1, Nesterov momentum 0.9, weight decay 2e-4, 5 warm-up epochs,
  x0.1 at epochs 60 and 80, 100 epochs, batch 128, mixup alpha 0.2; real
  data only (no curriculum, no synthetic images), from scratch.
  """
  config.train.update(
      optimizer="sgd", learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=2e-4,
      lr_schedule="step", lr_milestones=(60, 80), lr_decay=0.1, warmup_epochs=5,
      epochs=100, batch_size=128, mixup_alpha=0.2, init_checkpoint="",
      require_init_checkpoint=False)
  config.curriculum.schedule = "none"
  return config


def smoke_sized(config):
  """Returns `config` shrunk in place to a smoke-test size (the `runlocal` arg)."""
  config.diffusion.seeds_per_level = 1
  config.diffusion.num_inference_steps = min(config.diffusion.num_inference_steps, 4)
  config.diffusion.strengths = (0.3, 0.7, 1.0)
  config.diffusion.slots = 8
  config.train.epochs = 2
  config.train.batch_size = 32
  config.curriculum.curriculum_epochs = 1
  config.curriculum.stage_epochs = ()
  config.curriculum.levels = (0.3,)
  config.eval.batch_size = 64
  return config
