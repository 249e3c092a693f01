"""Stable Diffusion 1.x/2.x and SDXL checkpoints for the spectrum sampler (diffusers/transformers Flax classes).

`load_sd` reads a checkpoint in the diffusers folder layout from a local
directory or a hub id, with Flax msgpack weights (through the classes'
`from_pretrained`) or PyTorch safetensors (converted in-process by
`convert.py`, no torch). The family comes from `model_index.json`: SDXL base
(two text encoders) and refiner (`text_encoder_2` only), docs/design.md §5.1.
`build_tiny` / `build_tiny_sdxl` write tiny random checkpoints in the same
layouts; they load through exactly the same code.
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
from discl_jax import workdir as wd
from discl_jax.diffusion import convert
from discl_jax.models import unet as unet_lib

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                   "scheduler")
FAMILIES = ("sd", "sdxl_base", "sdxl_refiner")
# Weight files per sub-folder, in order of preference (one format is downloaded).
_WEIGHT_STEMS = {"unet": ("diffusion_flax_model", "diffusion_pytorch_model"),
                 "vae": ("diffusion_flax_model", "diffusion_pytorch_model"),
                 "text_encoder": ("flax_model", "model"), "text_encoder_2": ("flax_model", "model")}
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
  """A loaded checkpoint: Flax modules, their params and the scheduler config."""
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
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    index = json.loads(pathlib.Path(
        huggingface_hub.hf_hub_download(model, "model_index.json")).read_text())
    patterns = hub_patterns(index, huggingface_hub.list_repo_files(model))
    return pathlib.Path(huggingface_hub.snapshot_download(model, allow_patterns=patterns))
  except Exception as e:  # pylint: disable=broad-except
    raise OSError(
        f"{model!r} is not a local directory and could not be fetched as a hub id: {e}") from e


def hub_patterns(model_index, repo_files):
  """Returns the files of a hub repo the pipeline needs: its sub-folders' configs and one weight format.

  Per weight sub-folder: Flax msgpack if the repo has it, else PyTorch
  safetensors (full precision before `.fp16`; sharded with its index). The
  single-file checkpoints at the repo root and other components are left out.
  """
  folders = [f for f in SDXL_SUBFOLDERS if isinstance(model_index.get(f), list)
             and model_index[f][0] is not None]
  patterns = ["model_index.json"]
  for folder in folders:
    patterns += [f"{folder}/*.json", f"{folder}/*.txt"]
    names = {f.split("/", 1)[1] for f in repo_files if f.startswith(folder + "/")}
    for stem in _WEIGHT_STEMS.get(folder, ()):
      if stem.endswith("flax_model"):
        if f"{stem}.msgpack" in names:
          patterns.append(f"{folder}/{stem}.msgpack")
          break
        continue
      picked = [n for n in (f"{stem}.safetensors", f"{stem}.fp16.safetensors") if n in names]
      shards = sorted(n for n in names if n.startswith(f"{stem}-") and n.endswith(".safetensors"))
      if picked:
        patterns.append(f"{folder}/{picked[0]}")
        break
      if shards:
        patterns += [f"{folder}/{n}" for n in shards]
        break
  return patterns


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


def _load_diffusers(cls, root, subfolder, dtype):
  """Returns (module, float32 params) of a diffusers Flax class from msgpack or safetensors."""
  folder = root / subfolder
  if (folder / "diffusion_flax_model.msgpack").is_file():
    with wd.reading_weights(folder / "diffusion_flax_model.msgpack"):
      return cls.from_pretrained(str(root), subfolder=subfolder, dtype=dtype)
  files = convert.safetensors_files(folder, "diffusion_pytorch_model")
  if not files:
    raise FileNotFoundError(
        f"no diffusion_flax_model.msgpack or diffusion_pytorch_model*.safetensors in {str(folder)!r}")
  module = cls.from_config(cls.load_config(str(folder)), dtype=dtype)
  shapes = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
  params = convert.convert_state_dict(convert.read_safetensors(files), shapes, source=str(folder))
  return module, params


def _load_text_encoder(root, dtype, subfolder="text_encoder", projection=False):
  """Returns (FlaxCLIPTextModel[WithProjection], float32 params) from msgpack or safetensors."""
  import transformers  # pylint: disable=g-import-not-at-top
  cls = (transformers.FlaxCLIPTextModelWithProjection if projection
         else transformers.FlaxCLIPTextModel)
  folder = root / subfolder
  if (folder / "flax_model.msgpack").is_file():
    with wd.reading_weights(folder / "flax_model.msgpack"):
      return cls.from_pretrained(str(folder), dtype=dtype, _do_init=False)
  files = convert.safetensors_files(folder, "model")
  if not files:
    raise FileNotFoundError(f"no flax_model.msgpack or model*.safetensors in {str(folder)!r}")
  module = cls(transformers.CLIPTextConfig.from_pretrained(str(folder)), dtype=dtype,
               _do_init=False)
  params = convert.convert_state_dict(
      convert.read_safetensors(files), module.params_shape_tree, source=str(folder))
  return module, params


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
  The UNet is unet.UNet with the numerics its config.json records (default: PyTorch's).
  """
  from diffusers import FlaxAutoencoderKL  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  dtype = _dtype(dtype)
  root = resolve(model)
  index = _read_index(root)
  family = family_of(index)
  _check_layout(root, family)
  vae_dtype = jnp.float32 if family != "sd" and _vae_force_upcast(root) else dtype
  encoders, tokenizers, params = {}, {}, {}
  with quiet():
    unet, params["unet"] = unet_lib.load(root / "unet", dtype)
    vae, params["vae"] = _load_diffusers(FlaxAutoencoderKL, root, "vae", vae_dtype)
    for name in ("text_encoder", "text_encoder_2"):
      if name in _required_folders(family):
        encoders[name], params[name] = _load_text_encoder(
            root, dtype, name, projection=name == "text_encoder_2")
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


def write_tiny_tokenizer(folder, model_max_length=77, pad_token="<|endoftext|>"):
  """Writes a small CLIP BPE tokenizer (byte alphabet + merges of a few words) into `folder`.

  `pad_token="!"` pads as SDXL's OpenCLIP bigG tokenizer (`tokenizer_2`) does.
  """
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
                            model_max_length=model_max_length, pad_token=pad_token)
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


def tiny_sdxl_configs(family, vocab_size, bos_id, eos_id):
  """Returns (unet, vae, {encoder folder: text config}) dicts of a tiny SDXL-shaped checkpoint.

  Refiner-shaped: blocks Down/CrossAttn/CrossAttn/Down, `text_encoder_2` only,
  5 micro-conditions; base-shaped: Down/CrossAttn/CrossAttn, two encoders whose
  penultimate states concatenate, 6 micro-conditions. The VAE has two blocks
  (2x) so 40x56 images keep 20x28 latents (docs/design.md §5.11).
  """
  if family not in ("sdxl_refiner", "sdxl_base"):
    raise ValueError(f"tiny SDXL family must be sdxl_refiner or sdxl_base, got {family!r}")
  text = lambda hidden, act: dict(
      vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2 + 5,
      num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
      projection_dim=hidden, hidden_act=act, bos_token_id=bos_id, eos_token_id=eos_id,
      pad_token_id=eos_id)
  time_dim = 8
  if family == "sdxl_refiner":
    encoders = {"text_encoder_2": text(32, "gelu")}
    blocks = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                  "UpBlock2D"),
                  block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4),
                  transformer_layers_per_block=1)
    micro = 5
  else:
    encoders = {"text_encoder": text(32, "quick_gelu"), "text_encoder_2": text(48, "gelu")}
    blocks = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
                  transformer_layers_per_block=(1, 1, 2))
    micro = 6
  pooled = encoders["text_encoder_2"]["projection_dim"]
  unet = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
              cross_attention_dim=sum(e["hidden_size"] for e in encoders.values()),
              use_linear_projection=True, addition_embed_type="text_time",
              addition_time_embed_dim=time_dim,
              projection_class_embeddings_input_dim=pooled + micro * time_dim, **blocks)
  _, vae, _ = tiny_configs(vocab_size, bos_id, eos_id)
  vae["scaling_factor"] = 0.13025
  return unet, vae, encoders


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


def build_tiny_sdxl(path, seed=0, family="sdxl_refiner", unet_overrides=None):
  """Writes a tiny random SDXL-shaped checkpoint (diffusers layout, Flax msgpack) at `path`; returns it.

  `family`: sdxl_refiner | sdxl_base (see `tiny_sdxl_configs`); `unet_overrides`
  replaces UNet config entries (the benchmark's geometries).
  """
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  tokenizer = write_tiny_tokenizer(root / "tokenizer_2", pad_token="!")
  if family == "sdxl_base":
    write_tiny_tokenizer(root / "tokenizer")
  unet_cfg, vae_cfg, text_cfgs = tiny_sdxl_configs(
      family, len(tokenizer.encoder), tokenizer.bos_token_id, tokenizer.eos_token_id)
  unet_cfg.update(unet_overrides or {})
  with quiet():
    unet = FlaxUNet2DConditionModel(**unet_cfg)
    unet.save_pretrained(str(root / "unet"), params=random_params(
        jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)), seed, "unet"))
    vae = FlaxAutoencoderKL(**vae_cfg)
    vae.save_pretrained(str(root / "vae"), params=random_params(
        jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0)), seed, "vae"))
    for name, text_cfg in text_cfgs.items():
      cls = FlaxCLIPTextModelWithProjection if name == "text_encoder_2" else FlaxCLIPTextModel
      text = cls(CLIPTextConfig(**text_cfg), _do_init=False)
      text.save_pretrained(str(root / name),
                           params=random_params(text.params_shape_tree, seed, name))
  vae_config = root / "vae" / "config.json"
  vae_config.write_text(json.dumps(dict(json.loads(vae_config.read_text()), force_upcast=True),
                                   indent=2))
  write_pipeline_files(root, SDXL_SCHEDULER_CONFIG, family)
  return root


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
