"""The config schema every experiment file fills in, and its entry: config files and flags.

Experiment files under `configs/` build on `base_config()` and change values
(shared pieces: `configs/common.py`); `config_checks.validate` checks keys and
values. This module imports nothing of the project, so every layer may read it.
"""

import difflib
import importlib.util
import pathlib

import ml_collections

DEFAULT_STRENGTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def parse_arg(arg, **defaults):
  """Returns a ConfigDict of `defaults` updated from "k=v,k2=v2" in `arg`.

  Values are converted to the type of the default; a bare key sets a boolean
  default to True (so `:runlocal` works like `:runlocal=True`).
  """
  parsed = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(
          f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      parsed[key] = value.lower() in ("", "1", "true", "yes")
    elif default is None:
      parsed[key] = value
    else:
      parsed[key] = type(default)(value)
  return parsed


def load_file(path, arg=None):
  """Returns `get_config(arg)` of the config file at `path` (as `--config=path:arg` would)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def base_config():
  """Returns the full schema with defaults: every key a config may set."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = dict(shape=(-1,), multi_host=False,
                cpu_devices=0)  # XLA host devices on a CPU-only host; 0: one per usable core

  c.data = dict(
      name="digits_lt",        # digits_lt | cifar100_lt | tfds | imagenet_lt | iwildcam
      split_seed=0,            # draws the dataset itself (test/val carve-out, long-tail subsample);
                               # fixed while `seed` varies, so every training seed sees one dataset
      tfds_name="",            # for name=tfds (imagenet2012, i_naturalist2018, ...)
      tfds_test_split="",      # for name=tfds; "": validation if the dataset has it, else test
      data_dir="",             # TFDS data_dir
      prepare=False,           # TFDS: download and prepare a dataset missing from data_dir
      manual_dir="",           # TFDS manual_dir (imagenet2012)
      root="",                 # image root for file-list datasets
      train_list="",           # ImageNet-LT style "path label" files
      val_list="",
      test_list="",
      metadata_csv="",         # WILDS iWildCam metadata.csv
      allow_scientific_names=False,  # iwildcam without labels.csv beside metadata.csv: caption
                               # with the scientific names instead of refusing
      class_names_file="",     # readable class names, one per line in label order (file lists,
                               # name=tfds); text refuses label numbers and WordNet ids
      imbalance_ratio=100.0,   # n_max / n_min of the exponential profile
      max_per_class=0,         # n_max for the LT profile; 0: the largest class
      val_per_class=0,         # held-out validation images per class
      test_per_class=50,       # digits_lt: held-out balanced test images per class
      image_size=32,           # classifier input size
      many_threshold=100,      # >= this: Many
      few_threshold=20,        # < this: Few
      on_bad_image="error",    # error | skip (skipped files are counted and listed)
      max_skip_fraction=0.01,  # on_bad_image=skip: more of a split unreadable than this is an error
      verify_images="exists",  # file lists at load: exists | header | decode
      augment=True,
      crop_scale=(0.35, 1.0),  # ResNet train crop: area fraction range of RandomResizedCrop
                               # (the paper configs: the reference's (0.08, 1.0))
      color_jitter=0.2,        # ResNet train: brightness / contrast / saturation in 1 +- this
                               # (the paper configs: the reference's 0.4)
      num_workers=0,           # grain worker processes (0: in-process)
      spectrum_dir="",         # train on another workdir's spectrum (WORKDIR/spectrum; its
                               # hard.jsonl beside it); "": this workdir's own
  )
  c.hard = dict(
      rule="few_classes",      # few_classes | misclassified
      classes=(),              # explicit class names; overrides the rule's split
      prob_quantile=0.0,       # misclassified: also mark true-class prob below this quantile
      model_checkpoint="",     # misclassified: ckpt dir of a schedule=none run whose train errors
                               # are hard ("zero_shot": the CLIP as loaded); a DisCL schedule needs it
      exclude_classes=(),      # class names never hard (iwildcam: ("empty",))
  )
  c.prompts = dict(
      source="templates",      # templates | file | llm
      templates=("a photo of a {c}",),
      descriptions_file="",    # JSON {class: [descriptions]}
      # source=llm: descriptions per class from an OpenAI-compatible chat endpoint (the
      # reference's request; key from $OPENAI_API_KEY), cached in workdir/llm_descriptions.json
      llm_base_url="https://api.openai.com/v1",  # or a local vLLM / Ollama / llama.cpp server
      llm_model="gpt-3.5-turbo-0125",  # the reference's
      llm_descriptions=10,     # descriptions asked for (and kept) per class
      description_format="a 8k real photo: {d}",
      choice="per_seed",       # per_seed: per (class, image, generation seed), the reference | per_image
  )
  c.diffusion = dict(
      model="",                # local dir or hub id (SD 1.x/2.x, SDXL base or refiner); "" with tiny=True builds one
      tiny=False,              # build a tiny random checkpoint into the workdir
      tiny_family="sd",        # tiny=True: sd | sdxl_refiner | sdxl_base (SDXL-shaped)
      dtype="float32",         # float32 | bfloat16
      scheduler="ddim",        # ddim | euler
      strengths=DEFAULT_STRENGTHS,
      seeds_per_level=8,
      num_inference_steps=50,
      guidance_scale=10.0,
      negative_prompt="",      # "": none (diffusers' None: SDXL base zeros, others encode "")
      aesthetic_score=6.0,     # SDXL refiner micro-conditioning of the prompt branch
      negative_aesthetic_score=2.5,  # ... and of the negative branch
      source_size=(0, 0),      # (width, height) every source is first resized to (bicubic); (0, 0): off
      resolution=0,            # shorter side; 0: the input's size rounded down to a multiple of 8 (LANCZOS)
      source_upsample=0,       # scale smaller source images up to this shorter side (LANCZOS)
                               # before generation; 0: off (CIFAR100-LT: 128, the rebuttal's)
      slots=16,                # jobs in flight per sampler step (global); 0: auto (CPU 8, GPU/TPU
                               # the most up to 64 per device whose step fits device memory)
      vae_batch=0,             # images per VAE encode/decode call; 0: the slot count
      attention="auto",        # UNet attention: auto | xla | cudnn (GPU, half precision) | chunked
      grid_sources=4,          # sources per class in the spectrum grid
      seed=-1,                 # the spectrum's seed (prompts, sampling); < 0: the top-level seed
  )
  c.score = dict(
      model="openai/clip-vit-base-patch32",  # local dir or hub id (Flax msgpack or PyTorch safetensors)
      tiny=False,              # build a tiny random CLIP into workdir/models/clip
      dtype="float32",         # float32 | bfloat16
      text_template="a photo of {c}",
      threshold=0.30,          # keep clip_text >= threshold; a cosine in [-1, 1]
      batch_size=64,           # global images per jitted batch
      regenerate=False,        # regenerate images at or below threshold (new prompt + noise), keep the best
      max_regenerations=5,     # attempts after the first (the reference: 5)
  )
  c.train = dict(
      model="resnet32",        # resnet10 | resnet32 | resnet50 | tiny | clip
      loss="ce",               # ce | balanced_softmax | flyp
      optimizer="adam",        # adam | adamw | sgd
      learning_rate=1e-3,
      weight_decay=1e-5,
      momentum=0.9,
      nesterov=False,          # sgd: Nesterov momentum (PyTorch's)
      lr_schedule="cosine",    # cosine: per step over the run | step: x lr_decay at each milestone
      lr_milestones=(60, 80),  # lr_schedule=step: epochs from which the rate is x lr_decay once more
      lr_decay=0.1,
      warmup_epochs=0,         # rate x (epoch + 1) / warmup_epochs in the first epochs
      warmup_steps=0,
      mixup_alpha=0.0,         # mixup: one lambda ~ Beta(alpha, alpha) per batch; 0: off
      batch_size=128,
      epochs=65,
      init_checkpoint="",      # start from: a ckpt dir of this project, or a PyTorch ResNet file
                               # (.pth/.pt/.checkpoint or .safetensors; models/resnet_weights.py)
      require_init_checkpoint=False,  # the train stage refuses to start with init_checkpoint empty
      log_every_steps=50,
      keep_checkpoints=2,       # newest checkpoints kept; the best epoch's is kept beside them
      checkpoint_every_steps=0,  # also checkpoint inside an epoch every N global steps (0: epoch ends)
      # train.model="clip" (FLYP): the CLIP to fine-tune ("" uses score.model, or the
      # workdir's tiny CLIP with score.tiny), caption templates ({c}: the class's common
      # name), WiSE-FT weight at evaluation (1.0: fine-tuned weights only).
      clip_model="",
      clip_templates=("a photo of {c}.", "{c} in the wild."),
      wise_ft_alpha=1.0,
  )
  c.curriculum = dict(
      schedule="syn_to_real",  # none | resample | syn_to_real | real_to_syn | fixed | all_levels | text_only | random | adaptive
      levels=(0.1, 0.3, 0.5),  # image guidance lambda = 1 - strength
      curriculum_epochs=60,
      stage_epochs=(),         # stage schedules: epochs of each stage (syn_to_real: each level, then
                               # real), summing to curriculum_epochs; (): equal stages. Unused
                               # by none, resample and adaptive
      nontail_fraction=0.3,
      tail_share=0.0,          # tail share of each epoch; 0: tail classes / all classes (13.6 % on ImageNet-LT)
      tail_fill="per_class",   # per_class: fill split evenly per tail class | pooled: one pool (the reference)
      signal="prob_gain",      # adaptive: prob_gain | loss_decrease
      val_sources=100,         # adaptive: hard images (every level accepted) held out to measure
                               # progress, with their synthetic images (reference: 2,000)
      uniform_rows=0,          # adaptive: training rows per uniform phase (FLYP: image-caption
                               # rows; reference 30,000); 0: every real image once
      merge_real=True,         # adaptive: synthetic phases also train on the non-hard real images
  )
  c.eval = dict(
      batch_size=256,
      splits=("val", "test"),  # evaluated every epoch (iwildcam: id_val, id_test, val, test)
      select_split="val",      # the best epoch is chosen on {select_split}/{select_metric}
      select_metric="all",     # all (top-1) | macro_f1 | many | medium | few
  )
  return c


def suggestion(value, allowed):
  """Returns " (did you mean 'x'?)" for the allowed value closest to `value`, or ""."""
  close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def check_override_flags(argv):
  """Returns `argv` after checking each `--config.a.b=v` names a schema key.

  Raises KeyError naming the flag and the unknown key, before absl's parser
  would fail on it with a traceback.
  """
  schema = base_config()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--config."):].split("=", 1)[0]
    node, walked = schema, []
    for part in dotted.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(walked) or "the top level"
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise KeyError(
            f"unknown config key {dotted!r} in flag {arg!r}{suggestion(part, valid)}; "
            f"valid keys at {where}: {valid}")
      node = node[part]
      walked.append(part)
  return argv
