"""Real-geometry rehearsal: random-weight models of the real architectures, a few real steps each.

No download: SD 1.5 (UNet + VAE + CLIP-L text encoder), the SDXL refiner 1.0
(UNet + VAE + OpenCLIP bigG text encoder), CLIP ViT-B/32 and ViT-B/16 and
ResNet-10 / ResNet-50 are built from their real configs with random float32
weights. Each stage is compiled (XLA cost and memory analysis) and run for a
few steps at real resolution and a small batch:

  sd15      a packed SpectrumSampler step at 512x512 (64x64 latents), VAE encode and decode
  refiner   the same at 384x512 (48x64 latents), Euler, the SDXL micro-conditioning
  clip      a CLIP ViT-B/32 and ViT-B/16 scoring batch at 224 (image embeddings), and
            ViT-B/16's FLYP train step (iWildCam's classifier)
  resnet    a ResNet-10 and ResNet-50 train step at 224 (the project's train step, Adam)

It prints a table and writes experiments/results/rehearse.json: parameters,
compile and step seconds, peak resident memory, XLA FLOPs per step, and the
projected time of one spectrum and one epoch at `--mfu` of `--accelerator_tflops`.
From the sampler step's compiled memory at two slot counts it projects the
memory of each shipped config's `diffusion.slots` per device and exits with
status 2 naming the config, `diffusion.slots` and the resolution when one does
not fit `--device_memory_gib` (`--lower_slots`: the largest count that fits,
with a warning). Families run one after the other, each freed before the
next, smallest first, so the process's peak RSS after a family is that
family's peak (`--only` runs a subset).

  python experiments/rehearse.py --quick                  # tiny geometry, every code path (~30 s)
  python experiments/rehearse.py --only=sd15              # one family at real geometry
  python experiments/rehearse.py --only=refiner --step_repeats=0   # compile, FLOPs, memory, VAE only
  python experiments/rehearse.py                          # everything (the refiner needs ~24 GiB)
"""

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from discl_jax import config as config_lib
from discl_jax import host_devices
from discl_jax import parallel
from discl_jax import shipped_configs
from discl_jax.diffusion import attention as attention_lib
from discl_jax.diffusion import models as models_lib
from discl_jax.diffusion import sampler as sampler_lib
from discl_jax.diffusion import schedules
from discl_jax.diffusion import slot_memory
from discl_jax.models import resnet
from discl_jax.models import clip as clip_models
from discl_jax.models import tiny
from discl_jax.models import unet as unet_lib
from discl_jax.models import vae as vae_lib
from discl_jax.scoring import clip as clip_lib
from discl_jax.scoring import preprocess
from discl_jax.train import flyp, losses, optim, state as state_lib, steps as steps_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
FAMILIES = ("resnet", "clip", "sd15", "refiner")  # run order: smallest first
ATTENTION = ("xla", "chunked", "cudnn", "auto")
GIB = slot_memory.GIB
CLIP_VOCAB = 49408  # CLIP's BPE vocabulary (the embedding table; the tokenizer here is tiny)
# Training images per epoch (the datasets' train splits).
EPOCH_IMAGES = {"imagenet_lt": 115_846, "iwildcam": 129_809, "inat2018": 437_513}
# Shipped configs whose diffusion.slots are checked, and the rehearsed family of their generator.
SLOT_CONFIGS = ("imagenet_lt", "iwildcam", "cifar100_lt", "inat2018")

# --------------------------------------------------------------- real configs

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768)
SD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
    scaling_factor=0.18215)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                   projection_dim=768)
# stabilityai/stable-diffusion-xl-refiner-1.0 (docs/design.md §5.1): 2.26 B UNet parameters.
REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(384, 768, 1536, 1536), attention_head_dim=(6, 12, 24, 24),
    transformer_layers_per_block=4, cross_attention_dim=1280, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560)
REFINER_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025)
BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                 projection_dim=1280)
CLIP_TEXT = dict(vocab_size=CLIP_VOCAB, hidden_size=512, intermediate_size=2048,
                 num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77)
CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, image_size=224)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Sizes of one rehearsal: real (the defaults) or `--quick`."""
  quick: bool
  sd_size: tuple = (512, 512)          # SD 1.5 image (H, W)
  refiner_size: tuple = (384, 512)     # SDXL refiner image (H, W)
  clip_image: int = 224
  clip_patches: tuple = (32, 16)
  resnet_image: int = 224
  resnet_models: tuple = ("resnet10", "resnet50")
  batch: int = 2                       # images per CLIP / ResNet batch


REAL = Geometry(quick=False)
QUICK = Geometry(quick=True, sd_size=(32, 32), refiner_size=(32, 48), clip_image=32,
                 clip_patches=(16, 8), resnet_image=32, resnet_models=("tiny",))
# --quick's refiner: the tiny SDXL-refiner config cut to two blocks (fewer ops to compile).
QUICK_REFINER_UNET = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
    attention_head_dim=(2, 4))


# --------------------------------------------------------------- measuring


def rss_bytes():
  """Returns this process's resident set size now."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_PEAK_RSS = [0]  # the largest resident size seen by peak_rss_bytes


def peak_rss_bytes():
  """Returns this process's peak resident set size so far, never below an earlier answer.

  Linux updates ru_maxrss (KiB) lazily, so the resident size read now can
  exceed it; the running maximum of both keeps every later peak >= any earlier one.
  """
  now = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_bytes())
  _PEAK_RSS[0] = max(_PEAK_RSS[0], now)
  return _PEAK_RSS[0]


def count(tree):
  """Returns the number of scalars in the arrays of `tree`."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def random_tree(shape_tree, seed):
  """Returns float32 device arrays for `shape_tree`: LeCun-normal kernels, N(0, 0.02) others.

  Norm scales are 1; drawn leaf by leaf in float32 and moved to the device at
  once, so a multi-GiB model never has two host copies.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shape_tree).items():
    shape, name = tuple(leaf.shape), path[-1]
    if name == "scale":
      value = np.ones(shape, np.float32)
    else:
      value = rng.standard_normal(shape, np.float32)
      value *= (1.0 / math.sqrt(max(1, int(np.prod(shape[:-1]))))) if name == "kernel" else 0.02
    flat[path] = jnp.asarray(value)
    del value
  return traverse_util.unflatten_dict(flat)


def compile_stats(lowered):
  """Returns (compiled, compile seconds, XLA flops, footprint bytes) of a `jax.stages.Lowered`."""
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, seconds, float(cost["flops"]), slot_memory.footprint(compiled.memory_analysis())


def timed(fn, repeats):
  """Returns the mean seconds of `repeats` calls of `fn` (its result blocked on)."""
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) / repeats


def measure_train_step(row, step, state, batch, learning_rate, repeats):
  """Fills `row` with a jitted train step's compile stats, mean step seconds and FLOPs per image."""
  compiled, row["compile_s"], row["flops"], row["xla_bytes"] = compile_stats(
      step.lower(state, batch, learning_rate))
  holder = [state]

  def one_step():
    holder[0], metrics = compiled(holder[0], batch, learning_rate)
    return metrics
  one_step()
  row["step_s"] = timed(one_step, repeats)
  row["flops_per_item"] = row["flops"] / len(batch["label"])


class Stages(list):
  """The stage rows so far, also written to `out` as partial JSON after each one (a killed run keeps them)."""

  def __init__(self, out):
    super().__init__()
    self.out = out

  def append(self, row):
    super().append(row)
    self.out.parent.mkdir(parents=True, exist_ok=True)
    self.out.write_text(json.dumps({"partial": True, "stages": list(self)}, indent=2))


@contextlib.contextmanager
def stage(results, family, name, **fields):
  """Records a stage's row (filled by the block) with its RSS before/after and peak RSS."""
  row = dict(family=family, name=name, **fields)
  before = rss_bytes()
  start = time.perf_counter()
  yield row
  row["wall_s"] = round(time.perf_counter() - start, 2)
  row["rss_before_gib"] = round(before / GIB, 3)
  row["rss_after_gib"] = round(rss_bytes() / GIB, 3)
  row["peak_rss_gib"] = round(peak_rss_bytes() / GIB, 3)
  results.append(row)
  print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in row.items()
                                   if k not in ("family", "name", "components")), flush=True)


# --------------------------------------------------------------- ResNet


def rehearse_resnet(results, geo, args):
  """Compiles and times the project's ResNet train step (Adam, cross-entropy) per model."""
  train = ml_collections.ConfigDict(dict(optimizer="adam", learning_rate=1e-3,
                                         weight_decay=1e-5, momentum=0.9, nesterov=False))
  tx = optim.make_optimizer(train)
  mesh = parallel.make_mesh((1,))
  rng = np.random.default_rng(0)
  for name in geo.resnet_models:
    with stage(results, "resnet", name, batch=geo.batch, input=f"{geo.resnet_image}px") as row:
      model = resnet.get_model(name, 1000)
      state = parallel.put_replicated(
          state_lib.create(model, tx, jax.random.key(0), geo.resnet_image), mesh)
      row["params"] = count(state.params)
      row["components"] = {"model": row["params"]}
      step = steps_lib.make_train_step(model, tx, losses.cross_entropy, mesh)
      batch = parallel.put_batch({
          "image": rng.normal(size=(geo.batch, geo.resnet_image, geo.resnet_image, 3)
                              ).astype(np.float32),
          "label": rng.integers(0, 1000, geo.batch).astype(np.int32)}, mesh)
      measure_train_step(row, step, state, batch, 1e-3, args.steps)


# --------------------------------------------------------------- CLIP


def clip_config(geo, patch):
  """Returns the ClipConfig of ViT-B/`patch` (real) or a tiny one (`--quick`)."""
  if geo.quick:
    text = dict(CLIP_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=geo.clip_image, patch_size=patch)
    return clip_models.clip_config(
        {"text_config": text, "vision_config": vision, "projection_dim": 16})
  return clip_models.clip_config({"text_config": CLIP_TEXT,
                                  "vision_config": dict(CLIP_VISION, patch_size=patch),
                                  "projection_dim": 512})


def rehearse_clip(results, geo, args):
  """Compiles and times a CLIP scoring batch (normalised image embeddings) per ViT-B patch size."""
  rng = np.random.default_rng(0)
  for patch in geo.clip_patches:
    name = f"clip_vit_b{patch}" if not geo.quick else f"clip_tiny_p{patch}"
    with stage(results, "clip", name, batch=geo.batch, input=f"{geo.clip_image}px") as row:
      model = clip_models.CLIPModel(clip_config(geo, patch))
      params = random_tree(jax.eval_shape(model.init_weights, jax.random.key(0)), 0)
      row["params"] = count(params)
      row["components"] = {k: count(v) for k, v in params.items()}
      spec = preprocess.ClipPreprocess(size=geo.clip_image, crop=(geo.clip_image,) * 2)
      embed = jax.jit(functools.partial(clip_lib.embed_images, model, spec))
      pixels = jnp.asarray(rng.integers(0, 256, (geo.batch, geo.clip_image, geo.clip_image, 3),
                                        dtype=np.uint8))
      compiled, row["compile_s"], row["flops"], row["xla_bytes"] = compile_stats(
          embed.lower(params, pixels))
      compiled(params, pixels).block_until_ready()
      row["step_s"] = timed(lambda: compiled(params, pixels), args.steps)
      row["flops_per_item"] = row["flops"] / geo.batch
    if patch == geo.clip_patches[-1]:
      rehearse_flyp(results, geo, args, name, model, params)


def rehearse_flyp(results, geo, args, name, model, params):
  """Compiles and times the project's FLYP train step (AdamW) of `model`: iWildCam's training."""
  train = ml_collections.ConfigDict(dict(optimizer="adamw", learning_rate=1e-5,
                                         weight_decay=0.2, momentum=0.9, nesterov=False))
  tx = optim.make_optimizer(train)
  mesh = parallel.make_mesh((1,))
  rng = np.random.default_rng(0)
  classes, length = 182, model.config.text_config.max_position_embeddings
  with stage(results, "clip", f"{name}_flyp", batch=geo.batch, input=f"{geo.clip_image}px") as row:
    row["params"] = count(params)
    row["components"] = {k: count(v) for k, v in params.items()}
    ids = rng.integers(0, CLIP_VOCAB, (2, classes, length)).astype(np.int32)
    step = flyp.make_train_step(model, tx, mesh, ids, np.ones_like(ids))
    state = parallel.put_replicated(flyp.create_state(params, tx), mesh)
    batch = parallel.put_batch({
        "image": rng.normal(size=(geo.batch, geo.clip_image, geo.clip_image, 3)
                            ).astype(np.float32),
        "label": rng.integers(0, classes, geo.batch).astype(np.int32),
        "template": rng.integers(0, 2, geo.batch).astype(np.int32)}, mesh)
    measure_train_step(row, step, state, batch, 1e-5, args.steps)


# --------------------------------------------------------------- Stable Diffusion


def text_config(base, tokenizer, quick):
  """Returns a CLIPTextConfig dict of `base` (tiny when `quick`) with the tokenizer's special ids."""
  if quick:
    base = dict(base, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, projection_dim=32)
  return dict(base, vocab_size=max(CLIP_VOCAB, len(tokenizer.get_vocab())),
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.eos_token_id)


def build_sd(family, quick, folder):
  """Returns SDModels of the SD 1.5 or SDXL-refiner geometry with random float32 params.

  The tokenizer is tiny (its vocabulary does not change the text encoder's
  cost); the embedding table keeps CLIP's 49,408 rows.
  """
  refiner = family == "refiner"
  tokenizer = tiny.write_tokenizer(folder / "tokenizer",
                                   pad_token="!" if refiner else "<|endoftext|>")
  if quick:
    vocab = len(tokenizer.get_vocab())
    configs = (tiny.sdxl_configs("sdxl_refiner", vocab, 0, 1) if refiner
               else tiny.sd_configs(vocab, 0, 1))
    unet_cfg, vae_cfg = configs[0], configs[1]
    if refiner:
      unet_cfg = dict(unet_cfg, **QUICK_REFINER_UNET)
  else:
    unet_cfg, vae_cfg = (REFINER_UNET, REFINER_VAE) if refiner else (SD15_UNET, SD_VAE)
  text_cfg = text_config(BIGG_TEXT if refiner else CLIP_L_TEXT, tokenizer, quick)
  key = jax.random.PRNGKey(0)
  unet = unet_lib.from_config(dict(unet_cfg), source=f"{family} UNet config")
  vae = vae_lib.from_config(dict(vae_cfg), source=f"{family} VAE config")
  text = clip_models.CLIPTextModel(clip_models.text_config(text_cfg), projection=refiner)
  params = {"unet": random_tree(jax.eval_shape(unet.init_weights, key), 1),
            "vae": random_tree(jax.eval_shape(vae.init_weights, key), 2)}
  encoder = "text_encoder_2" if refiner else "text_encoder"
  params[encoder] = random_tree(jax.eval_shape(text.init_weights, key), 3)
  common = dict(vae=vae, unet=unet, params=params, dtype=jnp.float32)
  if refiner:
    return models_lib.SDModels(
        tokenizer=None, text_encoder=None, tokenizer_2=tokenizer, text_encoder_2=text,
        scheduler_config=models_lib.SDXL_SCHEDULER_CONFIG, family="sdxl_refiner",
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, **common)
  return models_lib.SDModels(tokenizer=tokenizer, text_encoder=text,
                             scheduler_config=models_lib.SD_SCHEDULER_CONFIG, family="sd",
                             **common)


def make_sampler(models, slots, scheduler, attention=None):
  """Returns a 50-step SpectrumSampler on one device (the slot memory model is per device);
  `attention` is passed only when given (else its default)."""
  extra = {} if attention is None else {"attention": attention}
  return sampler_lib.SpectrumSampler(models, num_inference_steps=50, guidance_scale=10.0,
                                     scheduler=scheduler, slots=slots,
                                     mesh=parallel.make_mesh((1,)), **extra)


def rehearse_vae(results, family, models, size, args):
  """Compiles and times a VAE encode (posterior mean) and decode of one image of `size`."""
  vae, params = models.vae, models.params["vae"]
  h, w = size
  f = models.vae_scale_factor
  pixels = jnp.zeros((1, 3, h, w), jnp.float32)
  latents = jnp.zeros((1, vae.config.latent_channels, h // f, w // f), jnp.float32)
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode).latent_dist.mean)
  decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode).sample)
  rows = {}
  for name, fn, x in (("vae_encode", encode, pixels), ("vae_decode", decode, latents)):
    with stage(results, family, f"{family}_{name}", batch=1, input=f"{h}x{w}") as row:
      compiled, row["compile_s"], row["flops"], row["xla_bytes"] = compile_stats(
          fn.lower(params, x))
      row["params"] = count(params)
      row["components"] = {"vae": row["params"]}
      row["step_s"] = timed(lambda: compiled(params, x), args.vae_steps)
      row["flops_per_item"] = row["flops"]
      rows[name] = row
  return rows


def rehearse_sd(results, family, geo, args):
  """Compiles the packed sampler step at two slot counts, times the VAE, and the step through `run`.

  Returns the family's summary: per-eval FLOPs, VAE FLOPs per job and the
  fitted (fixed, per-slot) memory line.
  """
  size = geo.refiner_size if family == "refiner" else geo.sd_size
  attention = args.attention[0] if args.attention else None
  scheduler = "euler" if family == "refiner" else "ddim"
  with tempfile.TemporaryDirectory() as tmp:
    with stage(results, family, f"{family}_build", input=f"{size[0]}x{size[1]}") as row:
      models = build_sd(family, geo.quick, pathlib.Path(tmp))
      row["components"] = {k: count(v) for k, v in models.params.items()}
      row["params"] = sum(row["components"].values())
    f = models.vae_scale_factor
    latent = (models.unet.config.in_channels, size[0] // f, size[1] // f)
    memory = {}
    for slots in args.memory_slots:
      name = f"{family}_step_{slots}slot"
      with stage(results, family, name, batch=slots, input=f"{size[0]}x{size[1]}",
                 cfg_rows=2 * slots) as row:
        sampler = make_sampler(models, slots, scheduler, attention)
        row["params"] = count(models.params["unet"])
        row["components"] = {"unet": row["params"]}
        compiled, row["compile_s"], row["flops"], row["xla_bytes"] = compile_stats(
            sampler.lower_step(latent, size))
        row["flops_per_item"] = row["flops"] / slots
        if args.step_repeats and slots == min(args.memory_slots):
          row["step_s"] = time_step(compiled, sampler.step_inputs(latent, size), args.step_repeats)
        memory[slots] = row
        del compiled, sampler
    with stage(results, family, f"{family}_step_flops", batch=1, input=f"{size[0]}x{size[1]}",
               cfg_rows=2) as flops_row:
      flops_row["params"] = count(models.params["unet"])
      flops_row["components"] = {"unet": flops_row["params"]}
      flops_row["loop_free_flops"] = loop_free_step_flops(models, scheduler, latent, size)
      flops_row["flops_per_item"] = flops_row["loop_free_flops"]
    vae_rows = rehearse_vae(results, family, models, size, args)
    by_attention = attention_memory(models, scheduler, latent, size, args) if (
        len(args.attention) > 1) else None
    del models
  a, b = sorted(memory)[:2]
  fixed, per_slot = slot_memory.linear_fit(a, memory[a]["xla_bytes"], b, memory[b]["xla_bytes"])
  return dict(family=family, size=list(size), latent=list(latent),
              unet_flops_per_eval=flops_row["loop_free_flops"],
              vae_flops_per_job=vae_rows["vae_encode"]["flops"] + vae_rows["vae_decode"]["flops"],
              fixed_bytes=fixed, per_slot_bytes=per_slot, attention_memory=by_attention)


def loop_free_step_flops(models, scheduler, latent, size):
  """Returns the FLOPs of a 1-slot step with one-shot `xla` attention, as an accelerator runs it.

  XLA's cost analysis counts a loop's body once, so the CPU lowering (attention
  over blocks of (batch, head) pairs or query chunks under `lax.map`) would
  undercount; this lowers the step with no attention loop (not compiled).
  """
  saved = attention_lib.CACHE_SCORES
  attention_lib.CACHE_SCORES = 2**62  # every (batch, head) pair in one block: no loop
  jax.clear_caches()
  try:
    lowered = make_sampler(models, 1, scheduler, "xla").lower_step(latent, size)
    cost = lowered.cost_analysis()
  finally:
    attention_lib.CACHE_SCORES = saved
    jax.clear_caches()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def time_step(compiled, inputs, repeats):
  """Returns the mean seconds of `repeats` packed steps after one untimed step, state carried over."""
  *fixed, state = inputs
  state = jax.block_until_ready(compiled(*fixed, state))
  start = time.perf_counter()
  for _ in range(repeats):
    state = compiled(*fixed, state)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / repeats


def attention_memory(models, scheduler, latent, size, args):
  """Returns {implementation: GiB} of the compiled step at `--attention_slots` slots (compile only)."""
  out = {}
  for attention in args.attention:
    sampler = make_sampler(models, args.attention_slots, scheduler, attention)
    compiled = sampler.lower_step(latent, size).compile()
    out[attention] = round(slot_memory.footprint(compiled.memory_analysis()) / GIB, 3)
    del sampler, compiled
  return {"slots": args.attention_slots, "gib": out}


# --------------------------------------------------------------- projections


def generator_family(config):
  """Returns the rehearsed family of a config's generator: refiner (SDXL refiner) or sd15."""
  return "refiner" if "xl-refiner" in config.diffusion.model else "sd15"


def evals_per_image(config):
  """Returns (jobs, UNet evaluations) of one hard image's spectrum under `config.diffusion`.

  A job at strength s runs int(steps x s) steps (docs/design.md §5.4); each
  evaluation is one slot-step (its two CFG rows).
  """
  d = config.diffusion
  steps = sum(d.num_inference_steps - schedules.start_index(d.num_inference_steps, s)
              for s in d.strengths)
  return len(d.strengths) * d.seeds_per_level, steps * d.seeds_per_level


def seconds_at(flops, args):
  """Returns the seconds `flops` take at `--mfu` of `--accelerator_tflops`."""
  return flops / (args.accelerator_tflops * 1e12 * args.mfu)


def spectrum_projections(diffusion, stages, args):
  """Returns the projected cost of one spectrum per (config, generator) from measured FLOPs.

  iWildCam runs the refiner at 480x264; its FLOPs are the rehearsed
  resolution's scaled by latent area (an approximation: convolutions scale
  with area, attention slightly faster).
  """
  score = next((r for r in stages if r["family"] == "clip"), None)
  rows = []
  for name, hard, size in (("imagenet_lt", args.imagenet_lt_hard, None),
                           ("iwildcam", args.iwildcam_hard, (264, 480))):
    config = config_lib.load_file(shipped_configs.path(name))
    for family in ("refiner", "sd15"):
      if family not in diffusion or (name == "iwildcam" and family != "refiner"):
        continue
      d = diffusion[family]
      scale = 1.0 if size is None else (size[0] * size[1]) / (d["size"][0] * d["size"][1])
      jobs, evals = evals_per_image(config)
      unet = hard * evals * d["unet_flops_per_eval"] * scale
      vae = hard * jobs * d["vae_flops_per_job"] * scale
      clip = hard * jobs * (score["flops_per_item"] if score else 0.0)
      total = unet + vae + clip
      rows.append(dict(
          what=f"spectrum {name} ({family})", hard_images=hard, jobs=hard * jobs,
          unet_evals=hard * evals, area_scale=round(scale, 4),
          assumption=(f"{hard} hard images x {len(config.diffusion.strengths)} strengths x "
                      f"{config.diffusion.seeds_per_level} seeds, "
                      f"{config.diffusion.num_inference_steps} steps x strength, CFG doubled; "
                      f"VAE encode+decode and CLIP score per job"),
          unet_flops=unet, vae_flops=vae, clip_flops=clip, flops=total,
          seconds=seconds_at(total, args)))
  return rows


def epoch_projections(stages, args):
  """Returns the projected cost of one training epoch of each rehearsed classifier."""
  datasets = {"resnet10": "imagenet_lt", "resnet50": "inat2018", "tiny": "imagenet_lt"}
  rows = []
  for row in stages:
    if row["family"] != "resnet":
      continue
    dataset = datasets[row["name"]]
    flops = row["flops_per_item"] * EPOCH_IMAGES[dataset]
    rows.append(dict(what=f"epoch {dataset} ({row['name']})", images=EPOCH_IMAGES[dataset],
                     assumption=f"{EPOCH_IMAGES[dataset]} images x train-step FLOPs per image",
                     flops=flops, seconds=seconds_at(flops, args)))
  for row in stages:
    if not row["name"].endswith("_flyp"):
      continue
    pairs = 2 * EPOCH_IMAGES["iwildcam"]  # FLYP: one row per (image, caption template), 2 templates
    flops = row["flops_per_item"] * pairs
    rows.append(dict(what=f"epoch iwildcam ({row['name']})", images=pairs,
                     assumption=f"{pairs} image-caption rows (2 per image) x train-step FLOPs "
                                "per row",
                     flops=flops, seconds=seconds_at(flops, args)))
  return rows


def check_slots(diffusion, args):
  """Returns one row per shipped config: its diffusion.slots' projected memory per device.

  Raises SystemExit (status 2) naming the config, `diffusion.slots` and the
  resolution when it does not fit, unless `args.lower_slots` (then the row
  carries the largest count that fits and a warning is printed).
  """
  device = args.device_memory_gib * GIB
  rows, refusals = [], []
  for name in SLOT_CONFIGS:
    config = config_lib.load_file(shipped_configs.path(name))
    family = generator_family(config)
    if family not in diffusion:
      continue
    d = diffusion[family]
    slots = int(config.diffusion.slots)
    need = slot_memory.projected_bytes(d["fixed_bytes"], d["per_slot_bytes"], slots, args.devices)
    fits = need <= args.headroom * device
    best = slot_memory.max_slots(d["fixed_bytes"], d["per_slot_bytes"], device, args.headroom,
                                 args.devices)
    resolution = f"{d['size'][0]}x{d['size'][1]}"
    row = dict(config=name, family=family, resolution=resolution, slots=slots,
               projected_gib=round(need / GIB, 3), fits=fits, max_slots=best, use_slots=slots)
    if not fits:
      message = (f"configs/{name}.py: diffusion.slots={slots} at {resolution} ({family}) needs "
                 f"{need / GIB:.1f} GiB per device, over {args.headroom:.0%} of "
                 f"{args.device_memory_gib} GiB; at most {best} slots fit")
      if args.lower_slots and best > 0:
        warnings.warn(message + f"; lowering to diffusion.slots={best}")
        row["use_slots"] = best
      else:
        refusals.append(message)
    rows.append(row)
  return rows, refusals


# --------------------------------------------------------------- report


def _fmt(value, digits=3):
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}g}"
  return str(value)


def print_report(report):
  """Prints the stages, projections and slot-memory tables."""
  print(f"\n{'stage':<26} {'params':>13} {'batch':>5} {'compile s':>9} {'step s':>9} "
        f"{'GFLOP/step':>11} {'XLA GiB':>8} {'peak RSS GiB':>12}")
  for r in report["stages"]:
    print(f"{r['name']:<26} {r.get('params', 0):>13,} {_fmt(r.get('batch')):>5} "
          f"{_fmt(r.get('compile_s')):>9} {_fmt(r.get('step_s')):>9} "
          f"{_fmt(r['flops'] / 1e9 if 'flops' in r else None):>11} "
          f"{_fmt(r['xla_bytes'] / GIB if 'xla_bytes' in r else None):>8} "
          f"{r['peak_rss_gib']:>12.2f}")
  print(f"\nprojections at {report['mfu']:.0%} of {report['accelerator_tflops']} TFLOP/s:")
  for p in report["projections"]:
    print(f"  {p['what']:<34} {p['flops'] / 1e15:10.3f} PFLOP {p['seconds']:11.1f} s"
          f" ({p['seconds'] / 3600:.2f} h)"
          f"   ({p['assumption']})")
  print(f"\ndiffusion.slots per device ({report['devices']} device(s) of "
        f"{report['device_memory_gib']} GiB, headroom {report['headroom']:.0%}; XLA {report['backend']}"
        f" memory of the float32 step: bfloat16 on an accelerator needs about half):")
  for s in report["slot_memory"]:
    print(f"  {s['config']:<12} {s['family']:<8} {s['resolution']:<8} slots {s['slots']:>4}: "
          f"{s['projected_gib']:8.2f} GiB  fits={s['fits']}  max {s['max_slots']}")
  for family, d in report["diffusion"].items():
    if d.get("attention_memory"):
      a = d["attention_memory"]
      print(f"  {family} step at {a['slots']} slots, compiled memory by attention: "
            + ", ".join(f"{k} {v:.2f} GiB" for k, v in a["gib"].items()))


def parse_args(argv=None):
  """Returns the parsed command line."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny models and sizes (the test's path)")
  p.add_argument("--only", default=",".join(FAMILIES),
                 help=f"comma list of families to run: {','.join(FAMILIES)}")
  p.add_argument("--steps", type=int, default=2, help="timed steps per ResNet / CLIP stage")
  p.add_argument("--vae_steps", type=int, default=1, help="timed VAE encodes / decodes")
  p.add_argument("--step_repeats", type=int, default=1,
                 help="timed packed sampler steps at the smallest slot count, after one untimed "
                      "(0: none; a 512x512 step takes about a minute on a 2-core CPU)")
  p.add_argument("--memory_slots", default="1,2",
                 help="two slot counts whose compiled step memory fits the per-slot line")
  p.add_argument("--accelerator_tflops", type=float, default=989.0,
                 help="accelerator peak TFLOP/s (default: H100/H200 dense bf16)")
  p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak assumed")
  p.add_argument("--device_memory_gib", type=float, default=80.0)
  p.add_argument("--headroom", type=float, default=0.9, help="usable fraction of device memory")
  p.add_argument("--devices", type=int, default=1, help="data-parallel devices sharing the slots")
  p.add_argument("--lower_slots", action="store_true",
                 help="lower diffusion.slots to what fits instead of refusing")
  p.add_argument("--attention", default="",
                 help=f"comma list of SpectrumSampler attention implementations ({'|'.join(ATTENTION)})"
                      ": the first runs every stage (empty: the sampler's default, not passed); "
                      "two or more also compare the compiled step's memory at --attention_slots")
  p.add_argument("--attention_slots", type=int, default=16)
  p.add_argument("--imagenet_lt_hard", type=int, default=1500,
                 help="hard (Few-class) images of ImageNet-LT assumed for the spectrum projection")
  p.add_argument("--iwildcam_hard", type=int, default=7715,
                 help="hard images of iWildCam (docs/design.md §6: 7,715 of 129,809)")
  p.add_argument("--out", default=str(RESULTS / "rehearse.json"))
  args = p.parse_args(argv)
  args.only = [f for f in args.only.split(",") if f]
  unknown = [f for f in args.only if f not in FAMILIES]
  if unknown:
    p.error(f"--only: unknown families {unknown}; valid: {','.join(FAMILIES)}")
  args.attention = [a for a in args.attention.split(",") if a]
  bad = [a for a in args.attention if a not in ATTENTION]
  if bad:
    p.error(f"--attention: unknown {bad}; valid: {','.join(ATTENTION)}")
  args.memory_slots = sorted({int(s) for s in args.memory_slots.split(",")})
  if len(args.memory_slots) < 2 or args.memory_slots[0] < 1:
    p.error(f"--memory_slots needs two positive slot counts, got {args.memory_slots}")
  return args


def main(argv=None):
  """Runs the rehearsal; returns the report dict (exits with status 2 when slots do not fit)."""
  args = parse_args(argv)
  geo = QUICK if args.quick else REAL
  start = time.perf_counter()
  out = pathlib.Path(args.out)
  stages, diffusion = Stages(out), {}
  for family in FAMILIES:
    if family not in args.only:
      continue
    print(f"[{family}]", flush=True)
    if family == "resnet":
      rehearse_resnet(stages, geo, args)
    elif family == "clip":
      rehearse_clip(stages, geo, args)
    else:
      diffusion[family] = rehearse_sd(stages, family, geo, args)
    gc.collect()
    jax.clear_caches()
  slot_rows, refusals = check_slots(diffusion, args)
  report = dict(
      quick=args.quick, families=args.only, machine=dict(
          platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
          backend=jax.default_backend(), jax=jax.__version__),
      accelerator_tflops=args.accelerator_tflops, mfu=args.mfu,
      device_memory_gib=args.device_memory_gib, headroom=args.headroom, devices=args.devices,
      attention=args.attention, dtype="float32", backend=jax.default_backend(),
      partial=False, stages=list(stages), diffusion=diffusion,
      projections=spectrum_projections(diffusion, stages, args) + epoch_projections(stages, args),
      slot_memory=slot_rows, refusals=refusals, peak_rss_gib=round(peak_rss_bytes() / GIB, 3),
      wall_s=round(time.perf_counter() - start, 1))
  out.write_text(json.dumps(report, indent=2))
  print_report(report)
  print(f"\nwall {report['wall_s']} s, peak RSS {report['peak_rss_gib']} GiB; wrote {out}")
  if refusals:
    refuse(refusals)
  return report


def refuse(refusals):
  """Prints each slot refusal to stderr and exits with status 2."""
  print("\n".join(["refused:"] + refusals), file=sys.stderr)
  raise SystemExit(2)


if __name__ == "__main__":
  print(f"devices: {host_devices.configure()}")  # one XLA host device per core on CPU
  main()
