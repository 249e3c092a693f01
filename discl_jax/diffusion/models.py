"""Stable Diffusion 1.x/2.x and SDXL checkpoints for the spectrum sampler (our Flax modules).

`load_sd` reads a checkpoint in the diffusers folder layout from a local
directory or a hub id into discl_jax.models' UNet, AutoencoderKL and CLIP text
encoders, with whatever weights each sub-folder holds (Flax msgpack, PyTorch
safetensors converted without torch: models/weights.py). The family comes
from `model_index.json`: SDXL base (two text encoders) and refiner
(`text_encoder_2` only), docs/design.md §5.1. `models/tiny.py` writes tiny
random checkpoints in the same layouts; they load through the same code.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from discl_jax import hub
from discl_jax.models import clip as clip_lib
from discl_jax.models import unet as unet_lib
from discl_jax.models import vae as vae_lib

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                   "scheduler")
FAMILIES = ("sd", "sdxl_base", "sdxl_refiner")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPES = tuple(_DTYPES)  # diffusion.dtype

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
# The scheduler config SDXL base and refiner 1.0 ship (Euler-discrete, docs/design.md §5.4).
SDXL_SCHEDULER_CONFIG = dict(
    SD_SCHEDULER_CONFIG, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
    use_karras_sigmas=False)


@dataclasses.dataclass
class SDModels:
  """A loaded checkpoint: our Flax modules, their params and the scheduler config."""
  tokenizer: object
  text_encoder: object
  vae: object
  unet: object
  scheduler_config: dict
  params: dict
  dtype: object = jnp.float32
  family: str = "sd"                   # sd | sdxl_base | sdxl_refiner
  tokenizer_2: object = None           # SDXL: the OpenCLIP bigG tokenizer
  text_encoder_2: object = None        # SDXL: CLIPTextModelWithProjection
  force_zeros_for_empty_prompt: bool = False
  requires_aesthetics_score: bool = False
  vae_dtype: object = jnp.float32      # SDXL with force_upcast: float32 whatever `dtype`

  @property
  def is_sdxl(self):
    """Returns whether this is an SDXL checkpoint (base or refiner)."""
    return self.family != "sd"

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


def resolve(model):
  """Returns a local checkpoint directory for `model` (a local dir or a hub id).

  Raises FileNotFoundError naming the directory when a path does not exist and
  hub.HubUnavailable (one line) when a hub id can be had neither from the cache
  nor the hub; a hub id downloads only the files `hub.select` picks.
  """
  if not model:
    raise ValueError("diffusion.model is empty: give a checkpoint directory or a hub id")
  path = pathlib.Path(model).expanduser()
  if path.is_dir():
    return path
  if not hub.is_hub_id(model):
    raise FileNotFoundError(f"Stable Diffusion checkpoint directory {str(path)!r} does not exist")
  return hub.download(model, hub.DIFFUSION, "diffusion.model")


def _read_index(root):
  """Returns the checkpoint's model_index.json as a dict ({} when it has none)."""
  index_file = root / "model_index.json"
  if not index_file.is_file():
    return {}
  try:
    return json.loads(index_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(index_file)!r} is not valid JSON: {e}") from e


def family_of(index):
  """Returns the checkpoint family (sd | sdxl_base | sdxl_refiner) that `model_index.json` names."""
  present = lambda k: isinstance(index.get(k), list) and index[k][0] is not None
  if "XL" in str(index.get("_class_name", "")) or present("text_encoder_2"):
    return "sdxl_base" if present("text_encoder") else "sdxl_refiner"
  return "sd"


def _required_folders(family):
  return {"sd": SUBFOLDERS, "sdxl_base": SDXL_SUBFOLDERS,
          "sdxl_refiner": ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")}[family]


def _check_layout(root, family="sd"):
  expected = _required_folders(family)
  missing = [s for s in expected if not (root / s).is_dir()]
  if missing:
    raise FileNotFoundError(
        f"checkpoint {str(root)!r} ({family}) lacks the diffusers sub-folder(s) {missing}; "
        f"expected {list(expected)}")


def _vae_force_upcast(root):
  """Returns the VAE config's `force_upcast` (diffusers' default True when absent)."""
  config_file = root / "vae" / "config.json"
  return bool(json.loads(config_file.read_text()).get("force_upcast", True)) if (
      config_file.is_file()) else True


def load_sd(model, dtype="float32"):
  """Returns the SDModels of checkpoint `model` (local dir or hub id) with params in `dtype`.

  SD 1.x/2.x or SDXL base/refiner, as `model_index.json` says (docs/design.md §5.1).
  SDXL keeps its VAE in float32 when the VAE config says `force_upcast`, as
  diffusers' SDXL pipelines do.
  The networks are discl_jax.models' UNet, AutoencoderKL and CLIPTextModel(s), each
  with the numerics its config.json records (default: PyTorch's).
  """
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  dtype = _dtype(dtype)
  root = resolve(model)
  index = _read_index(root)
  family = family_of(index)
  _check_layout(root, family)
  vae_dtype = jnp.float32 if family != "sd" and _vae_force_upcast(root) else dtype
  encoders, tokenizers, params = {}, {}, {}
  unet, params["unet"] = unet_lib.load(root / "unet", dtype)
  vae, params["vae"] = vae_lib.load(root / "vae", vae_dtype)
  for name in ("text_encoder", "text_encoder_2"):
    if name in _required_folders(family):
      encoders[name], params[name] = clip_lib.load_text_encoder(
          root / name, dtype, projection=name == "text_encoder_2")
  for name in ("tokenizer", "tokenizer_2"):
    if name in _required_folders(family):
      tokenizers[name] = CLIPTokenizer.from_pretrained(str(root / name))
  scheduler_file = root / "scheduler" / "scheduler_config.json"
  if not scheduler_file.is_file():
    raise FileNotFoundError(f"missing scheduler config {str(scheduler_file)!r}")
  params = jax.tree.map(np.asarray, params)
  params = {k: cast(v, vae_dtype if k == "vae" else dtype) for k, v in params.items()}
  return SDModels(tokenizer=tokenizers.get("tokenizer"), text_encoder=encoders.get("text_encoder"),
                  vae=vae, unet=unet, scheduler_config=json.loads(scheduler_file.read_text()),
                  params=params, dtype=dtype, family=family,
                  tokenizer_2=tokenizers.get("tokenizer_2"),
                  text_encoder_2=encoders.get("text_encoder_2"),
                  force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
                  requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
                  vae_dtype=vae_dtype)


def _sdxl_model_index(family):
  text = ["transformers", "CLIPTextModel"] if family == "sdxl_base" else [None, None]
  tokenizer = ["transformers", "CLIPTokenizer"] if family == "sdxl_base" else [None, None]
  return {
      "_class_name": ("StableDiffusionXLPipeline" if family == "sdxl_base"
                      else "StableDiffusionXLImg2ImgPipeline"),
      "force_zeros_for_empty_prompt": family == "sdxl_base",
      **({"requires_aesthetics_score": True} if family == "sdxl_refiner" else {}),
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": text,
      "tokenizer": tokenizer,
      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
      "tokenizer_2": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", "EulerDiscreteScheduler"],
  }


def write_pipeline_files(root, scheduler_config, family="sd"):
  """Writes model_index.json and scheduler/ of a diffusers layout of `family` under `root`; returns it."""
  root = pathlib.Path(root)
  (root / "scheduler").mkdir(parents=True, exist_ok=True)
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
  if family != "sd":
    (root / "model_index.json").write_text(json.dumps(_sdxl_model_index(family), indent=2))
    return root
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
