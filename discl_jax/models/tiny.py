"""Tiny random checkpoints for tests, the demo's `tiny` options and the rehearsal.

Each builder writes a real checkpoint layout (diffusers' for Stable Diffusion,
transformers' for CLIP) with random weights drawn by `random_params`, so it
loads through exactly the code a downloaded checkpoint goes through.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
from flax import traverse_util

from discl_jax import parallel
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.diffusion import models as sd_models
from discl_jax.models import clip as clip_lib
from discl_jax.models import unet as unet_lib
from discl_jax.models import vae as vae_lib

TINY_WORDS = ("a", "photo", "of", "the", "in", "wild", "real", "8k", "digit", "class",
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


def write_tokenizer(folder, words=TINY_WORDS, model_max_length=77, pad_token="<|endoftext|>"):
  """Writes a small CLIP BPE tokenizer (byte alphabet + merges spelling `words`) into `folder`; returns it.

  `pad_token="!"` pads as SDXL's OpenCLIP bigG tokenizer (`tokenizer_2`) does.
  """
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  alphabet = list(_bytes_to_unicode().values())
  vocab = alphabet + [c + "</w>" for c in alphabet]
  merges = []
  for word in words:
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
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
  tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                            model_max_length=model_max_length, pad_token=pad_token)
  tokenizer.save_pretrained(str(folder))
  return tokenizer


def random_params(shape_tree, seed, component):
  """Returns float32 numpy params for `shape_tree` drawn from (seed, component, parameter path).

  Kernels LeCun-normal, embeddings N(0, 0.02), norm scales 1 + N(0, 0.02),
  biases N(0, 0.02), a CLIP logit scale log(1 / 0.07): every parameter matters
  to the output. Drawn with numpy (compiling a module's init costs minutes on a
  small CPU).
  """
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shape_tree).items():
    rng = seeding.numpy_rng(seed, "tiny-sd", component, *path)
    shape, name = tuple(leaf.shape), path[-1]
    if name == "kernel":
      value = rng.normal(0.0, 1.0 / np.sqrt(max(1, int(np.prod(shape[:-1])))), shape)
    elif name == "scale":
      value = 1.0 + rng.normal(0.0, 0.02, shape)
    elif name == "logit_scale":
      value = np.full(shape, np.log(1 / 0.07))
    else:
      value = rng.normal(0.0, 0.02, shape)
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _init(module, seed, component):
  return random_params(jax.eval_shape(module.init_weights, jax.random.PRNGKey(0)), seed, component)


# ---------------------------------------------------------------- Stable Diffusion


def sd_configs(vocab_size, bos_id, eos_id):
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


def sdxl_configs(family, vocab_size, bos_id, eos_id):
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
  _, vae, _ = sd_configs(vocab_size, bos_id, eos_id)
  vae.update(scaling_factor=0.13025, force_upcast=True)
  return unet, vae, encoders


def _write_unet_vae(root, unet_cfg, vae_cfg, seed):
  unet = unet_lib.from_config(unet_cfg)
  unet_lib.save(root / "unet", unet, _init(unet, seed, "unet"))
  vae = vae_lib.from_config(vae_cfg)
  vae_lib.save(root / "vae", vae, _init(vae, seed, "vae"))


def _write_text_encoder(folder, text_cfg, seed, name, projection=False):
  module = clip_lib.CLIPTextModel(clip_lib.text_config(text_cfg), projection)
  clip_lib.save_text_encoder(folder, module, _init(module, seed, name))


def build_sd(path, seed=0, unet_overrides=None):
  """Writes a tiny random SD 1.x-style checkpoint (diffusers layout, Flax msgpack) at `path`; returns it.

  `unet_overrides` replaces UNet config entries (the benchmark's "small" geometry).
  """
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  tokenizer = write_tokenizer(root / "tokenizer")
  unet_cfg, vae_cfg, text_cfg = sd_configs(
      len(tokenizer.get_vocab()), tokenizer.bos_token_id, tokenizer.eos_token_id)
  _write_unet_vae(root, dict(unet_cfg, **(unet_overrides or {})), vae_cfg, seed)
  _write_text_encoder(root / "text_encoder", text_cfg, seed, "text_encoder")
  sd_models.write_pipeline_files(root, sd_models.SD_SCHEDULER_CONFIG)
  return root


def build_sdxl(path, seed=0, family="sdxl_refiner", unet_overrides=None):
  """Writes a tiny random SDXL-shaped checkpoint (diffusers layout, Flax msgpack) at `path`; returns it.

  `family`: sdxl_refiner | sdxl_base (see `sdxl_configs`); `unet_overrides`
  replaces UNet config entries (the benchmark's geometries).
  """
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  tokenizer = write_tokenizer(root / "tokenizer_2", pad_token="!")
  if family == "sdxl_base":
    write_tokenizer(root / "tokenizer")
  unet_cfg, vae_cfg, text_cfgs = sdxl_configs(
      family, len(tokenizer.get_vocab()), tokenizer.bos_token_id, tokenizer.eos_token_id)
  _write_unet_vae(root, dict(unet_cfg, **(unet_overrides or {})), vae_cfg, seed)
  for name, text_cfg in text_cfgs.items():
    _write_text_encoder(root / name, text_cfg, seed, name, projection=name == "text_encoder_2")
  sd_models.write_pipeline_files(root, sd_models.SDXL_SCHEDULER_CONFIG, family)
  return root


# ---------------------------------------------------------------- CLIP


def clip_config(vocab_size, bos_id, eos_id):
  """Returns the config.json dict of the tiny CLIP (32x32 images, width 32, 16-d embeddings)."""
  text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
              bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, image_size=32, patch_size=8)
  return {"text_config": text, "vision_config": vision, "projection_dim": 16}


def write_preprocessor(folder, size):
  """Writes CLIPImageProcessor's preprocessor_config.json (resize + center crop to `size`)."""
  config = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711]}
  (pathlib.Path(folder) / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def build_clip(path, seed=0, weights_format="msgpack", config=None):
  """Writes a tiny random CLIP (config, weights, tokenizer, preprocessor) at `path`; returns it.

  `weights_format` is "msgpack" (Flax) or "safetensors" (PyTorch layout);
  `config` (a config.json dict) replaces the tiny geometry. The folder
  appears atomically (built aside, then renamed).
  """
  if weights_format not in ("msgpack", "safetensors"):
    raise ValueError(f"weights_format must be msgpack or safetensors, got {weights_format!r}")

  def write(staging):
    tokenizer = write_tokenizer(staging, words=())
    entries = config or clip_config(len(tokenizer.get_vocab()), tokenizer.bos_token_id,
                                    tokenizer.eos_token_id)
    module = clip_lib.CLIPModel(clip_lib.clip_config(entries))
    clip_lib.save_clip_model(staging, module, _init(module, seed, "clip"), weights_format)
    write_preprocessor(staging, module.config.vision_config.image_size)
  return wd.atomic_folder(path, write)


# ---------------------------------------------------------------- built once per workdir


def build_once(target, build, marker, barrier_name):
  """Returns `target` (a Path) once it holds `marker`: process 0 builds it, the others wait.

  `build(staging)` writes the model into a fresh staging folder that then
  replaces `target` in one rename, so a killed build leaves no half model.
  Every process must call it.
  """
  target = pathlib.Path(target)
  if wd.is_main_process() and not (target / marker).exists():
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
      build(staging)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
  parallel.barrier(barrier_name)
  return target
