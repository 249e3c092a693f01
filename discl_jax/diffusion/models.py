"""Stable Diffusion 1.x/2.x checkpoints for the spectrum sampler (diffusers/transformers Flax classes).

`load_sd` reads a checkpoint in the diffusers folder layout from a local
directory or a hub id, with Flax msgpack weights (through the classes'
`from_pretrained`) or PyTorch safetensors (converted in-process by
`convert.py`, no torch). `build_tiny` writes a tiny random checkpoint in the
same layout; it loads through exactly the same code.
"""

import contextlib
import dataclasses
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from discl_jax import seeding
from discl_jax.diffusion import convert
from discl_jax.diffusion import unet as unet_lib

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Scheduler of SD 1.x (betas, offsets) under the DDIM class; the sampler reads the numbers.
SD_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


@dataclasses.dataclass
class SDModels:
  """A loaded checkpoint: Flax modules, their params and the scheduler config."""
  tokenizer: object
  text_encoder: object
  vae: object
  unet: object
  scheduler_config: dict
  params: dict
  dtype: object = jnp.float32

  @property
  def vae_scale_factor(self):
    """Returns the pixel-to-latent downsampling of the VAE."""
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def size_multiple(self):
    """Returns what image height and width must be multiples of: the VAE's downsampling.

    The UNet takes any latent size (PyTorch's forward_upsample_size, unet.py).
    """
    return self.vae_scale_factor


@contextlib.contextmanager
def quiet():
  """Silences the pinned libraries' per-module Flax deprecation messages inside the block."""
  from diffusers.utils import logging as diffusers_logging  # pylint: disable=g-import-not-at-top
  from transformers.utils import logging as transformers_logging  # pylint: disable=g-import-not-at-top
  levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
  diffusers_logging.set_verbosity_error()
  transformers_logging.set_verbosity_error()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    diffusers_logging.set_verbosity(levels[0])
    transformers_logging.set_verbosity(levels[1])


def _dtype(dtype):
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"diffusion dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]
  return jnp.dtype(dtype).type if dtype is not None else jnp.float32


def cast(params, dtype):
  """Returns `params` with floating leaves cast to `dtype` (jax.tree.map; to_bf16 is broken)."""
  return jax.tree.map(
      lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _looks_like_path(model):
  return model.startswith(("/", ".", "~")) or model.count("/") != 1 or "\\" in model


def resolve(model):
  """Returns a local checkpoint directory for `model` (a local dir or a hub id).

  Raises FileNotFoundError naming the directory when a path does not exist and
  OSError naming the id when a hub id cannot be fetched.
  """
  if not model:
    raise ValueError("diffusion.model is empty: give a checkpoint directory or a hub id")
  path = pathlib.Path(model).expanduser()
  if path.is_dir():
    return path
  if _looks_like_path(model) or path.exists():
    raise FileNotFoundError(f"Stable Diffusion checkpoint directory {str(path)!r} does not exist")
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  try:
    return pathlib.Path(snapshot_download(
        model, allow_patterns=["*.json", "*.txt", "*.msgpack", "*.safetensors"],
        ignore_patterns=["safety_checker/*", "feature_extractor/*"]))
  except Exception as e:  # pylint: disable=broad-except
    raise OSError(
        f"{model!r} is not a local directory and could not be fetched as a hub id: {e}") from e


def _check_layout(root):
  missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
  if missing:
    raise FileNotFoundError(
        f"checkpoint {str(root)!r} lacks the diffusers sub-folder(s) {missing}; "
        f"expected {list(SUBFOLDERS)}")


def _load_diffusers(cls, root, subfolder, dtype):
  """Returns (module, float32 params) of a diffusers Flax class from msgpack or safetensors."""
  folder = root / subfolder
  if (folder / "diffusion_flax_model.msgpack").is_file():
    return cls.from_pretrained(str(root), subfolder=subfolder, dtype=dtype)
  files = convert.safetensors_files(folder, "diffusion_pytorch_model")
  if not files:
    raise FileNotFoundError(
        f"no diffusion_flax_model.msgpack or diffusion_pytorch_model*.safetensors in {str(folder)!r}")
  module = cls.from_config(cls.load_config(str(folder)), dtype=dtype)
  shapes = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
  params = convert.convert_state_dict(convert.read_safetensors(files), shapes, source=str(folder))
  return module, params


def _load_text_encoder(root, dtype):
  """Returns (FlaxCLIPTextModel, float32 params) from msgpack or safetensors."""
  from transformers import CLIPTextConfig, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  folder = root / "text_encoder"
  if (folder / "flax_model.msgpack").is_file():
    return FlaxCLIPTextModel.from_pretrained(str(folder), dtype=dtype, _do_init=False)
  files = convert.safetensors_files(folder, "model")
  if not files:
    raise FileNotFoundError(f"no flax_model.msgpack or model*.safetensors in {str(folder)!r}")
  module = FlaxCLIPTextModel(CLIPTextConfig.from_pretrained(str(folder)), dtype=dtype, _do_init=False)
  params = convert.convert_state_dict(
      convert.read_safetensors(files), module.params_shape_tree, source=str(folder))
  return module, params


def load_sd(model, dtype="float32"):
  """Returns the SDModels of checkpoint `model` (local dir or hub id) with params in `dtype`.

  The UNet is unet.UNet with the numerics its config.json records (default: PyTorch's).
  """
  from diffusers import FlaxAutoencoderKL  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  dtype = _dtype(dtype)
  root = resolve(model)
  _check_layout(root)
  with quiet():
    unet, unet_params = unet_lib.load(root / "unet", dtype)
    vae, vae_params = _load_diffusers(FlaxAutoencoderKL, root, "vae", dtype)
    text_encoder, text_params = _load_text_encoder(root, dtype)
  tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
  scheduler_file = root / "scheduler" / "scheduler_config.json"
  if not scheduler_file.is_file():
    raise FileNotFoundError(f"missing scheduler config {str(scheduler_file)!r}")
  params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}
  params = cast(jax.tree.map(np.asarray, params), dtype)
  return SDModels(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                  scheduler_config=json.loads(scheduler_file.read_text()), params=params,
                  dtype=dtype)


# ---------------------------------------------------------------- tiny model

_TINY_WORDS = ("a", "photo", "of", "the", "in", "wild", "real", "8k", "digit", "class",
               "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _bytes_to_unicode():
  """Returns CLIP's byte -> printable unicode table (the GPT-2 byte-level BPE alphabet)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
               + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
  codes, extra = list(printable), 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      codes.append(256 + extra)
      extra += 1
  return dict(zip(printable, (chr(c) for c in codes)))


def write_tiny_tokenizer(folder, model_max_length=77):
  """Writes a small CLIP BPE tokenizer (byte alphabet + merges of a few words) into `folder`."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  alphabet = list(_bytes_to_unicode().values())
  vocab = alphabet + [c + "</w>" for c in alphabet]
  merges = []
  for word in _TINY_WORDS:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
      pair = (symbols[0], symbols[1])
      if " ".join(pair) not in merges:
        merges.append(" ".join(pair))
        vocab.append("".join(pair))
      symbols = ["".join(pair)] + symbols[2:]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  vocab_ids = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
  (folder / "vocab.json").write_text(json.dumps(vocab_ids))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                            model_max_length=model_max_length, pad_token="<|endoftext|>")
  tokenizer.save_pretrained(str(folder))
  return tokenizer


def tiny_configs(vocab_size, bos_id, eos_id):
  """Returns (unet, vae, text) config dicts of the tiny SD geometry used by tests and the demo."""
  unet = dict(sample_size=16, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
              cross_attention_dim=32)
  vae = dict(in_channels=3, out_channels=3,
             down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
             up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
             block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
             norm_num_groups=32, sample_size=32, scaling_factor=0.18215)
  text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
              bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
  return unet, vae, text


def random_params(shape_tree, seed, component):
  """Returns float32 numpy params for `shape_tree` drawn from (seed, component, parameter path).

  Kernels are LeCun-normal, embeddings N(0, 0.02), norm scales 1 + N(0, 0.02) and
  biases N(0, 0.02), so every parameter matters to the output. Drawn with numpy:
  jit-compiling the modules' own `init_weights` costs minutes on a small CPU.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shape_tree).items():
    rng = seeding.numpy_rng(seed, "tiny-sd", component, *path)
    shape, name = tuple(leaf.shape), path[-1]
    if name == "kernel":
      std = 1.0 / np.sqrt(max(1, int(np.prod(shape[:-1]))))
      value = rng.normal(0.0, std, shape)
    elif name == "scale":
      value = 1.0 + rng.normal(0.0, 0.02, shape)
    else:
      value = rng.normal(0.0, 0.02, shape)
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def build_tiny(path, seed=0, unet_overrides=None):
  """Writes a tiny random SD 1.x-style checkpoint (diffusers layout, Flax msgpack) at `path`; returns it.

  `unet_overrides` replaces UNet config entries (the benchmark's "small" geometry).
  """
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  tokenizer = write_tiny_tokenizer(root / "tokenizer")
  unet_cfg, vae_cfg, text_cfg = tiny_configs(
      len(tokenizer.encoder), tokenizer.bos_token_id, tokenizer.eos_token_id)
  unet_cfg.update(unet_overrides or {})
  with quiet():
    unet = FlaxUNet2DConditionModel(**unet_cfg)
    unet.save_pretrained(str(root / "unet"), params=random_params(
        jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)), seed, "unet"))
    vae = FlaxAutoencoderKL(**vae_cfg)
    vae.save_pretrained(str(root / "vae"), params=random_params(
        jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0)), seed, "vae"))
    text = FlaxCLIPTextModel(CLIPTextConfig(**text_cfg), _do_init=False)
    text.save_pretrained(str(root / "text_encoder"),
                         params=random_params(text.params_shape_tree, seed, "text_encoder"))
  write_pipeline_files(root, SD_SCHEDULER_CONFIG)
  return root


def write_pipeline_files(root, scheduler_config):
  """Writes model_index.json and scheduler/ of a diffusers SD layout under `root`; returns it."""
  root = pathlib.Path(root)
  (root / "scheduler").mkdir(parents=True, exist_ok=True)
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
  (root / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusionPipeline",
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", "DDIMScheduler"],
      "safety_checker": [None, None],
      "feature_extractor": [None, None],
  }, indent=2))
  return root
