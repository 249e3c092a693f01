# WILDS iWildCam, the paper's low-quality task (docs/design.md 1.1, 1.5, 1.6): CLIP ViT-B/16,
# FLYP fine-tuning, adaptive curriculum. Needs the WILDS v2.0 layout (images in train/
# beside metadata.csv, categories.csv) plus FLYP's labels.csv (y,name,english: the common
# names for captions and prompts) beside metadata.csv (data.metadata_csv).
# Two steps, as the reference (docs/design.md §6): the hard images are those a model trained
# on iWildCam gets wrong on the train split (about 6 %), so first the FLYP baseline, then
# DisCL from its checkpoint (a DisCL schedule without hard.model_checkpoint is refused):
#   discl --config=configs/iwildcam.py:schedule=none --workdir=runs/flyp \
#     --config.data.metadata_csv=/data/iwildcam_v2.0/metadata.csv
#   discl --config=configs/iwildcam.py --workdir=runs/discl \
#     --config.data.metadata_csv=/data/iwildcam_v2.0/metadata.csv \
#     --config.hard.model_checkpoint=runs/flyp/ckpt
# experiments/iwildcam_table.py runs both over seeds. The `empty` class gets no spectrum.
# The best epoch is chosen on the OOD validation split's macro-F1 (eval.select_*).
"""iWildCam with FLYP-style CLIP fine-tuning and the adaptive (DoCL-style) curriculum."""

from discl_jax import config as config_lib
from discl_jax.configs import common


def get_config(arg=None):
  """Returns the iWildCam ConfigDict; arg: schedule, sd, runlocal."""
  arg = config_lib.parse_arg(arg, schedule="adaptive", sd=common.SDXL_REFINER, runlocal=False)
  c = config_lib.base_config()
  c.data.name = "iwildcam"
  c.data.image_size = 224
  c.data.num_workers = 8

  c.hard.rule = "misclassified"
  c.hard.exclude_classes = ("empty",)
  c.prompts.templates = ("a photo of {c} in the wild",)
  # The reference's generator (SDXL refiner 1.0; :sd= swaps it), every image resized to
  # 480x270 first and run at 480x264 (rounded down to a multiple of 8).
  common.reference_generator(c, arg.sd)
  c.diffusion.source_size = (480, 270)
  # The reference kept image guidance >= 0.5 for iWildCam.
  c.diffusion.strengths = (0.1, 0.2, 0.3, 0.4, 0.5)
  c.diffusion.slots = 64
  c.score.model = "openai/clip-vit-base-patch32"
  c.score.text_template = "a photo of {c} in the wild"
  c.score.threshold = 0.25

  c.train.model = "clip"
  c.train.loss = "flyp"
  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-5
  c.train.weight_decay = 0.2
  c.train.warmup_steps = 500
  c.train.batch_size = 256
  c.train.epochs = 20
  c.train.clip_model = "openai/clip-vit-base-patch16"
  c.train.clip_templates = ("a photo of {c}.", "{c} in the wild.")  # the FLYP/DisCL captions
  c.train.wise_ft_alpha = 1.0  # < 1: WiSE-FT with the zero-shot weights at evaluation
  # ID (id_val, id_test) and OOD (val, test) splits; the best epoch is chosen on the
  # OOD validation split's macro-F1, WILDS' model-selection rule for iWildCam.
  c.eval.splits = ("id_val", "id_test", "val", "test")
  c.eval.select_split = "val"
  c.eval.select_metric = "macro_f1"
  c.curriculum.schedule = arg.schedule
  c.curriculum.levels = (0.5, 0.6, 0.7, 0.8, 0.9)
  c.curriculum.curriculum_epochs = 15
  # DoCL as the reference (docs/design.md §6): uniform phases of 30,000 real image-caption rows,
  # synthetic phases of every accepted row at g* plus the non-hard real images, 2,000
  # validation images with every level.
  c.curriculum.uniform_rows = 30_000
  c.curriculum.merge_real = True
  c.curriculum.val_sources = 2_000

  if arg.runlocal:
    common.smoke_sized(c)
  return c
