"""Every enum, range and input path of a config, checked once before the first stage.

`check_values(config)` raises one ValueError listing every bad value, with a
"did you mean" suggestion for a near-miss enum value; `check_inputs(config,
stages)` raises one FileNotFoundError naming every missing file or folder the
chosen stages read. A typo fails in seconds, not hours later in the stage
that reads the key.

Adding a key: an enum is one line in `enums()`, `"section.key": VALUES`, with
the tuple imported from the module that interprets the key (so a value added
there is accepted here without an edit); a number range is one line in
`RANGES`. Keys a config does not have are skipped.
"""

import difflib
import math
import pathlib

from discl_jax import hub
from discl_jax.data import class_names


def enums():
  """Returns {dotted key: tuple of allowed values}, each from the module that owns it."""
  # pylint: disable=g-import-not-at-top  (heavy modules, imported when checking)
  from discl_jax.curriculum import state as curriculum_state
  from discl_jax.data import datasets
  from discl_jax.data import filelists
  from discl_jax.diffusion import attention as diffusion_attention
  from discl_jax.diffusion import models as diffusion_models
  from discl_jax.diffusion import prompts
  from discl_jax.diffusion import schedules
  from discl_jax.models import resnet
  from discl_jax.scoring import clip
  from discl_jax.train import hard_selection
  from discl_jax.train import losses
  from discl_jax.train import loop
  from discl_jax.train import optim
  return {
      "data.name": datasets.NAMES,
      "data.on_bad_image": filelists.ON_BAD_IMAGE,
      "data.verify_images": filelists.VERIFY,
      "hard.rule": tuple(hard_selection.RULES),
      "prompts.source": prompts.SOURCES,
      "prompts.choice": prompts.CHOICES,
      "diffusion.dtype": diffusion_models.DTYPES,
      "diffusion.tiny_family": diffusion_models.FAMILIES,
      "diffusion.scheduler": schedules.KINDS,
      "diffusion.attention": diffusion_attention.IMPLEMENTATIONS,
      "score.dtype": tuple(clip.DTYPES),
      "train.model": tuple(resnet.MODELS) + (CLIP_MODEL,),
      "train.loss": losses.LOSSES + (FLYP_LOSS,),
      "train.optimizer": optim.OPTIMIZERS,
      "train.lr_schedule": optim.LR_SCHEDULES,
      "curriculum.schedule": curriculum_state.SCHEDULES,
      "curriculum.signal": curriculum_state.SIGNALS,
      "curriculum.tail_fill": curriculum_state.TAIL_FILLS,
      "eval.select_metric": loop.SELECT_METRICS,
  }


CLIP_MODEL = "clip"  # train.model: FLYP fine-tuning of a CLIP (train/clip_trainer.py)
FLYP_LOSS = "flyp"   # train.loss of train.model="clip"


class Range:
  """A number range; `integer` asks for an int, `each` for a non-empty sequence of numbers."""

  def __init__(self, low=None, high=None, *, low_open=False, high_open=False,
               integer=False, each=False):
    self.low, self.high = low, high
    self.low_open, self.high_open = low_open, high_open
    self.integer, self.each = integer, each

  def describe(self):
    """Returns the range in words, e.g. "an integer >= 1" or "in (0, 1]"."""
    kind = "an integer" if self.integer else "a number"
    if self.low is not None and self.high is not None:
      return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, "
              f"{self.high:g}{')' if self.high_open else ']'}")
    if self.low is not None:
      return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
    return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"

  def holds(self, value):
    """Returns True when the single `value` is in the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if self.integer and int(value) != value:
      return False
    if not math.isfinite(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    if self.high is not None and (value >= self.high if self.high_open else value > self.high):
      return False
    return True


def _count(low):
  return Range(low, integer=True)


def _unit(*, low_open=False, high_open=False):
  return Range(0.0, 1.0, low_open=low_open, high_open=high_open)


RANGES = {
    "mesh.cpu_devices": _count(0),
    "data.imbalance_ratio": Range(1.0),
    "data.max_per_class": _count(0),
    "data.val_per_class": _count(0),
    "data.test_per_class": _count(0),
    "data.image_size": _count(1),
    "data.many_threshold": _count(0),
    "data.few_threshold": _count(0),
    "data.num_workers": _count(0),
    "data.max_skip_fraction": _unit(),
    "data.crop_scale": Range(0.0, 1.0, low_open=True, each=True),
    "data.color_jitter": _unit(high_open=True),
    "hard.prob_quantile": _unit(high_open=True),
    "prompts.llm_descriptions": _count(1),
    "diffusion.strengths": Range(0.0, 1.0, low_open=True, each=True),
    "diffusion.seeds_per_level": _count(1),
    "diffusion.seed": _count(-1),
    "diffusion.num_inference_steps": _count(1),
    "diffusion.guidance_scale": Range(0.0),
    "diffusion.resolution": _count(0),
    "diffusion.slots": _count(0),
    "diffusion.vae_batch": _count(0),
    "diffusion.grid_sources": _count(0),
    "diffusion.source_upsample": _count(0),
    "score.threshold": Range(-1.0, 1.0),
    "score.batch_size": _count(1),
    "score.max_regenerations": _count(0),
    "train.learning_rate": Range(0.0, low_open=True),
    "train.weight_decay": Range(0.0),
    "train.momentum": _unit(high_open=True),
    "train.warmup_steps": _count(0),
    "train.warmup_epochs": _count(0),
    "train.lr_decay": Range(0.0, 1.0, low_open=True),
    "train.lr_milestones": Range(0, integer=True, each=True),
    "train.mixup_alpha": Range(0.0),
    "train.batch_size": _count(1),
    "train.epochs": _count(0),  # 0: evaluate train.init_checkpoint as it is
    "train.log_every_steps": _count(1),
    "train.keep_checkpoints": _count(1),
    "train.checkpoint_every_steps": _count(0),
    "train.wise_ft_alpha": _unit(),
    "curriculum.levels": Range(0.0, 1.0, high_open=True, each=True),
    "curriculum.curriculum_epochs": _count(0),
    "curriculum.nontail_fraction": _unit(low_open=True),
    "curriculum.tail_share": _unit(high_open=True),
    "curriculum.val_sources": _count(0),
    "curriculum.uniform_rows": _count(0),
    "eval.batch_size": _count(1),
}

_MISSING = object()


def get(config, dotted):
  """Returns the value at `dotted` ("train.epochs") in `config`, or _MISSING."""
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def suggestion(value, allowed):
  """Returns " (did you mean 'x'?)" for the allowed value closest to `value`, or ""."""
  close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def enum_error(key, value, allowed):
  """Returns the message for `key`=`value` outside `allowed`, or None when it is allowed."""
  if value in allowed:
    return None
  return (f"{key}={value!r} is not one of {', '.join(map(str, allowed))}"
          f"{suggestion(value, allowed)}")


def range_error(key, value, allowed):
  """Returns the message for `key`=`value` outside Range `allowed`, or None when it is in it."""
  if allowed.each:
    values = list(value) if isinstance(value, (list, tuple)) else None
    if not values:
      return f"{key}={value!r} must be a non-empty sequence, each {allowed.describe()}"
    bad = [v for v in values if not allowed.holds(v)]
    return f"{key}={value!r}: {bad[0]!r} is not {allowed.describe()}" if bad else None
  return None if allowed.holds(value) else f"{key}={value!r} must be {allowed.describe()}"


def _rule_errors(config):
  """Yields the messages of rules that tie several keys together."""
  model, loss = get(config, "train.model"), get(config, "train.loss")
  if (model == CLIP_MODEL) != (loss == FLYP_LOSS) and _MISSING not in (model, loss):
    yield (f"train.model={model!r} with train.loss={loss!r}: train.model='clip' trains "
           f"with train.loss='flyp' and train.loss='flyp' needs train.model='clip'")
  splits = get(config, "eval.splits")
  select = get(config, "eval.select_split")
  if splits is not _MISSING and not splits:
    yield "eval.splits is empty; name the splits evaluated every epoch (e.g. ('val', 'test'))"
  elif select is not _MISSING and splits is not _MISSING:
    if select not in splits:
      yield (f"eval.select_split={select!r} is not one of eval.splits={tuple(splits)}"
             f"{suggestion(select, splits)}")
    elif "test" in select:
      yield (f"eval.select_split={select!r}: the best epoch is chosen on a validation "
             "split, never on a test split")
  few, many = get(config, "data.few_threshold"), get(config, "data.many_threshold")
  if isinstance(few, int) and isinstance(many, int) and few > many:
    yield f"data.few_threshold={few} is above data.many_threshold={many}"
  template = get(config, "score.text_template")
  if isinstance(template, str) and "{c}" not in template:
    yield f"score.text_template={template!r} must contain '{{c}}' (the class name)"
  yield from _prompt_errors(config)
  yield from _protocol_errors(config)
  schedule, levels = get(config, "curriculum.schedule"), get(config, "curriculum.levels")
  if schedule == "fixed" and levels is not _MISSING and len(levels) != 1:
    yield f"curriculum.schedule='fixed' trains on one level; curriculum.levels={tuple(levels)}"
  shape = get(config, "mesh.shape")
  if shape is not _MISSING and (len(shape) != 1 or not (shape[0] == -1 or shape[0] >= 1)):
    yield f"mesh.shape={tuple(shape)} must be one entry: -1 (every device) or a device count"
  if get(config, "data.name") == "tfds" and not get(config, "data.tfds_name"):
    yield "data.name='tfds' needs data.tfds_name (e.g. imagenet2012, i_naturalist2018)"


def _prompt_errors(config):
  from discl_jax.diffusion import prompts  # pylint: disable=g-import-not-at-top
  source = get(config, "prompts.source")
  if source == "templates":
    try:
      prompts.expand_templates(get(config, "prompts.templates"))
    except ValueError as e:
      yield str(e)
  elif source == "file":
    if not get(config, "prompts.descriptions_file"):
      yield "prompts.source='file' needs prompts.descriptions_file"
  if source in ("file", "llm"):
    fmt = get(config, "prompts.description_format")
    if isinstance(fmt, str) and "{d}" not in fmt:
      yield f"prompts.description_format={fmt!r} must contain '{{d}}' (the description)"
  if source == "llm":
    url = get(config, "prompts.llm_base_url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
      yield f"prompts.llm_base_url={url!r} must be an http:// or https:// URL"
    if not get(config, "prompts.llm_model"):
      yield "prompts.source='llm' needs prompts.llm_model (e.g. gpt-3.5-turbo-0125)"


def _protocol_errors(config):
  """Yields the messages of the crop range, the epoch plan and the evaluate-only run (epochs=0:
  the ResNet of train.init_checkpoint, or the CLIP as loaded for train.model='clip')."""
  from discl_jax.curriculum import state as curriculum_state  # pylint: disable=g-import-not-at-top
  crop = get(config, "data.crop_scale")
  if isinstance(crop, (list, tuple)) and (len(crop) != 2 or crop[0] > crop[1]):
    yield f"data.crop_scale={tuple(crop)} must be (low, high) with low <= high"
  if get(config, "curriculum.stage_epochs") not in (_MISSING, (), []):
    try:
      curriculum_state.check_stage_epochs(
          get(config, "curriculum.schedule"), get(config, "curriculum.levels"),
          get(config, "curriculum.curriculum_epochs"), get(config, "curriculum.stage_epochs"))
    except ValueError as e:
      yield str(e)
  if get(config, "train.epochs") == 0:
    if not get(config, "train.init_checkpoint") and get(config, "train.model") != CLIP_MODEL:
      yield "train.epochs=0 evaluates train.init_checkpoint as it is; set train.init_checkpoint"
    if get(config, "curriculum.schedule") != "none":
      yield ("train.epochs=0 evaluates train.init_checkpoint without training; set "
             f"curriculum.schedule='none' (it is {get(config, 'curriculum.schedule')!r})")


def value_errors(config):
  """Returns the list of messages of every bad value in `config` (empty when all are fine)."""
  errors = []
  for key, allowed in enums().items():
    value = get(config, key)
    if value is not _MISSING:
      errors.append(enum_error(key, value, allowed))
  for key, allowed in RANGES.items():
    value = get(config, key)
    if value is not _MISSING:
      errors.append(range_error(key, value, allowed))
  errors.extend(_rule_errors(config))
  return [e for e in errors if e]


def check_values(config):
  """Returns `config`; ValueError lists every bad enum value, range and rule at once."""
  errors = value_errors(config)
  if errors:
    raise ValueError("bad config value(s): " + "; ".join(errors))
  return config


def level_errors(config):
  """Returns messages for curriculum levels that no job of `diffusion.strengths` makes.

  A level is image guidance lambda = 1 - strength; `text_only` trains on
  lambda 0 (strength 1.0); `none` and `resample` read no spectrum.
  """
  # pylint: disable=g-import-not-at-top  (heavy modules, imported when checking)
  from discl_jax.curriculum import sampling
  from discl_jax.curriculum import state as curriculum_state
  schedule = config.curriculum.schedule
  if schedule in curriculum_state.REAL_ONLY_SCHEDULES:
    return []
  strengths = tuple(config.diffusion.strengths)
  made = [1.0 - float(s) for s in strengths]
  if schedule == "text_only":
    levels, key = (curriculum_state.TEXT_ONLY_LEVEL,), "curriculum.schedule='text_only'"
  else:
    levels = tuple(config.curriculum.levels)
    key = f"curriculum.levels={levels}"
  empty = [level for level in levels
           if not any(abs(level - m) < sampling.LEVEL_ATOL for m in made)]
  if not empty:
    return []
  needed = ", ".join(f"{1.0 - level:g}" for level in empty)
  return [f"{key} trains on lambda {', '.join(f'{v:g}' for v in empty)}, which no job of "
          f"diffusion.strengths={strengths} makes (lambda = 1 - strength): add strength(s) "
          f"{needed} or drop the level(s), else its synthetic epochs get no synthetic images"]


# Stages that read the dataset (the `prompts` stage reads only hard.jsonl).
DATA_STAGES = ("hard", "generate", "score", "train", "eval")


def _looks_like_path(name):
  """Returns True when model `name` is a local path rather than a hub id ("owner/name").

  The rule `diffusion.models.resolve` and `scoring.clip.load_clip` apply.
  """
  return name.startswith(("/", ".", "~")) or name.count("/") != 1 or "\\" in name


def _model_input(key, name):
  """Returns (key, path, "directory") for a model that must be a local folder, else None."""
  if not name:
    return None
  path = pathlib.Path(name).expanduser()
  if path.exists() or _looks_like_path(name):
    return key, path, "directory"
  return None


# `train.init_checkpoint` is never a hub id: a checkpoint directory of this project, a
# workdir holding one, or a PyTorch file (.pth, .pt, .checkpoint, .safetensors), as
# `train.checkpoint.load_variables` accepts.
CHECKPOINT = "file or directory"
# Stages that build text from class names (prompts, CLIP texts, FLYP captions).
TEXT_STAGES = ("prompts", "score")


def _needs_readable_names(data):
  """Returns True when `data` gives label numbers or WordNet ids as class names unless
  `data.class_names_file` is set (ImageNet-LT's split files, TFDS ImageNet)."""
  return data.name == "imagenet_lt" or (
      data.name == "tfds" and str(data.tfds_name).startswith("imagenet"))


def _name_inputs(data, stages):
  """Yields the inputs the class names text is built from, for the `stages` that build it."""
  if stages & set(TEXT_STAGES) and _needs_readable_names(data) and not data.class_names_file:
    yield ("data.class_names_file (readable class names for prompts and CLIP texts, one per "
           "line in label order: see the README's 'Class names for text')", None, "file")
  # iWildCam's common names: in hard.jsonl (for the prompts), CLIP texts, FLYP captions and heads.
  if (data.name == "iwildcam" and data.metadata_csv and not data.allow_scientific_names
      and stages & {"hard", "score", "train", "eval"}):
    yield (f"{class_names.LABELS_CSV} beside data.metadata_csv (FLYP's common names for "
           "captions and prompts; or set data.allow_scientific_names=True)",
           pathlib.Path(data.metadata_csv).parent / class_names.LABELS_CSV, "file")


def _data_inputs(data):
  """Yields (key, path or None when unset, kind) of every file or folder `data` reads."""
  name = data.name
  if data.class_names_file:
    yield "data.class_names_file", pathlib.Path(data.class_names_file), "file"
  if name == "imagenet_lt":
    yield "data.root", pathlib.Path(data.root or "."), "directory"
    for split in ("train", "val", "test"):
      listed = data[f"{split}_list"]
      if listed or split != "val":  # an empty val_list carves val from train
        yield f"data.{split}_list", pathlib.Path(listed) if listed else None, "file"
  elif name == "iwildcam":
    if not data.metadata_csv:
      yield "data.metadata_csv", None, "file"
      return
    csv_path = pathlib.Path(data.metadata_csv)
    yield "data.metadata_csv", csv_path, "file"
    if data.root:
      yield "data.root", pathlib.Path(data.root), "directory"
    elif csv_path.is_file():
      yield "data.root (default: train/ beside metadata.csv)", csv_path.parent / "train", "directory"
  elif name in ("tfds", "cifar100_lt"):
    if data.data_dir and not data.prepare:
      yield "data.data_dir", pathlib.Path(data.data_dir), "directory"
    if data.manual_dir:
      yield "data.manual_dir", pathlib.Path(data.manual_dir), "directory"


def inputs(config, stages):
  """Returns [(key, path, "file" | "directory" | "file or directory")] of every input `stages`
  read (path None: unset)."""
  stages = set(stages)
  found = []
  if stages & set(DATA_STAGES):
    found.extend(_data_inputs(config.data))
  found.extend(_name_inputs(config.data, stages))
  if "prompts" in stages and config.prompts.source == "file" and config.prompts.descriptions_file:
    found.append(("prompts.descriptions_file", pathlib.Path(config.prompts.descriptions_file), "file"))
  models = []
  if "generate" in stages and not config.diffusion.tiny:
    models.append(("diffusion.model", config.diffusion.model))
  uses_clip = (config.train.model == CLIP_MODEL and stages & {"train", "eval"}) or (
      config.hard.rule == "misclassified" and not config.hard.classes and "hard" in stages)
  if uses_clip:
    models.append(("train.clip_model", config.train.clip_model))
  if ("score" in stages or (uses_clip and not config.train.clip_model)) and not config.score.tiny:
    models.append(("score.model", config.score.model))
  if "train" in stages:
    if config.train.init_checkpoint:
      checkpoint = pathlib.Path(config.train.init_checkpoint).expanduser()
      found.append(("train.init_checkpoint", checkpoint, CHECKPOINT))
    if config.data.spectrum_dir:
      found.append(("data.spectrum_dir", pathlib.Path(config.data.spectrum_dir), "directory"))
  found.extend(filter(None, (_model_input(key, name) for key, name in models)))
  return found


_KIND_EXISTS = {"file": pathlib.Path.is_file, "directory": pathlib.Path.is_dir,
                CHECKPOINT: pathlib.Path.exists}


def check_inputs(config, stages):
  """Returns None; FileNotFoundError names every input of `stages` that does not exist.

  Then hub weights: hub.HubUnavailable when one can be had neither from the cache nor the hub.
  """
  missing = []
  for key, path, kind in inputs(config, stages):
    if path is None:
      missing.append(f"{key} is not set (data.name={config.data.name!r} reads it)")
    elif not _KIND_EXISTS[kind](path):
      missing.append(f"{key} {str(path)!r} (no such {kind})")
  if missing:
    raise FileNotFoundError("missing input(s): " + "; ".join(missing))
  hub.check_models(config, stages)
