"""Spectrum generation speed: the packed multi-strength sampler against per-strength pipelines.

Methods (same weights, same jobs: N images x strengths x `--seeds` seeds, `--steps` steps):
  packed      our SpectrumSampler: every strength in one jitted step over `--slots` slots, the
              slots split over every device (on CPU one XLA host device per core: `--cpu_devices`)
  packed1     the same on a one-device mesh (the comparison one device vs all cores)
  flax        diffusers FlaxStableDiffusionImg2ImgPipeline (jit path), one call per strength
              with the N images batched (it compiles once per strength); SD geometries only
              (diffusers has no Flax SDXL img2img); runs only where diffusers < 0.40 and
              transformers < 5 are installed (later releases have no Flax classes), else skipped
  torch       diffusers PyTorch StableDiffusionImg2ImgPipeline (StableDiffusionXLImg2ImgPipeline
              for the refiner geometry), one call per strength, batched
  torch1      PyTorch, one call per (image, strength, seed) with batch 1 (the reference script)
Geometries: tiny / small are SD 1.x-shaped (DDIM); refiner is SDXL-refiner-shaped (blocks
Down/CrossAttn/CrossAttn/Down, text_encoder_2 only, 5 micro-conditions, Euler as the reference).
Each method runs the whole job set twice: the first pass includes compilation
(end to end), the second is steady state. UNet evaluations count both CFG halves;
"useful" excludes the packed sampler's idle slots.

Weights: with torch installed the checkpoint is written by PyTorch models as
safetensors and loaded for JAX by our converter; without torch, `models.tiny.build_sd(xl)`.

  python experiments/bench_generate.py --geometry=tiny --images=16 --seeds=2 --steps=20 \
      --methods=packed,flax,torch
  python experiments/bench_generate.py --geometry=tiny --images=4 --methods=packed,flax,torch,torch1
  python experiments/bench_generate.py --geometry=refiner --images=4 --methods=packed,torch,torch1
"""

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import jax
import numpy as np

from discl_jax import host_devices
from discl_jax import parallel
from discl_jax import seeding
from discl_jax.diffusion import models
from discl_jax.diffusion import sampler as sampler_lib
from discl_jax.models import clip as clip_models
from discl_jax.models import tiny

STRENGTHS = tuple(round(0.1 * i, 1) for i in range(1, 11))
PROMPTS = ("a photo of the digit seven", "a digit in the wild", "a real photo of a class")
GEOMETRIES = {
    # image size, UNet overrides of the family's tiny configs, family
    "tiny": (32, {}, "sd"),
    "small": (64, dict(block_out_channels=(64, 128), layers_per_block=2, attention_head_dim=4),
              "sd"),
    "refiner": (64, {}, "sdxl_refiner"),
}


def build_checkpoint(geometry, root, use_torch):
  """Returns (checkpoint dir, PyTorch modules dict or None) for `geometry`."""
  _, overrides, family = GEOMETRIES[geometry]
  if family != "sd":
    return _build_sdxl(root, family, overrides, use_torch)
  if not use_torch:
    return tiny.build_sd(root, seed=0, unet_overrides=overrides), None
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  tokenizer = tiny.write_tokenizer(root / "tokenizer")
  unet_cfg, vae_cfg, text_cfg = tiny.sd_configs(
      len(tokenizer.get_vocab()), tokenizer.bos_token_id, tokenizer.eos_token_id)
  unet_cfg.update(overrides)
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**unet_cfg).eval()
  vae = AutoencoderKL(**vae_cfg).eval()
  text = CLIPTextModel(CLIPTextConfig(**text_cfg)).eval()
  for sub, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
    module.save_pretrained(root / sub, safe_serialization=True)
  (root / "scheduler").mkdir(exist_ok=True)
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(models.SD_SCHEDULER_CONFIG))
  return root, dict(family="sd", unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer)


def _build_sdxl(root, family, overrides, use_torch):
  """Returns (tiny SDXL-shaped checkpoint dir, PyTorch modules dict or None)."""
  if not use_torch:
    return tiny.build_sdxl(root, seed=0, family=family, unet_overrides=overrides), None
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  modules = {"family": family,
             "tokenizer_2": tiny.write_tokenizer(root / "tokenizer_2", pad_token="!")}
  if family == "sdxl_base":
    modules["tokenizer"] = tiny.write_tokenizer(root / "tokenizer")
  tok = modules["tokenizer_2"]
  unet_cfg, vae_cfg, text_cfgs = tiny.sdxl_configs(
      family, len(tok.get_vocab()), tok.bos_token_id, tok.eos_token_id)
  unet_cfg.update(overrides)
  torch.manual_seed(0)
  modules["unet"] = UNet2DConditionModel(**unet_cfg).eval()
  modules["vae"] = AutoencoderKL(**vae_cfg).eval()
  for name, cfg in text_cfgs.items():
    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    modules[name] = cls(CLIPTextConfig(**cfg)).eval()
  for name in ("unet", "vae") + tuple(text_cfgs):
    modules[name].save_pretrained(root / name, safe_serialization=True)
  models.write_pipeline_files(root, models.SDXL_SCHEDULER_CONFIG, family)
  return root, modules


def _scheduler(sd):
  return "euler" if sd.is_sdxl else "ddim"


def make_jobs(n_images, strengths, size, seeds=1):
  """Returns the benchmark's jobs (images x strengths x seeds), longest (highest strength) first."""
  rng = seeding.numpy_rng(0, "bench-generate")
  images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n_images)]
  return [sampler_lib.Job(f"img{i}|s{s:.3f}|seed{seed}", images[i], PROMPTS[i % len(PROMPTS)],
                          s, seed)
          for s in sorted(strengths, reverse=True) for seed in range(seeds)
          for i in range(n_images)]


def _useful_evals(jobs, steps):
  return 2 * sum(int(steps * j.strength) for j in jobs)


def _by_strength(jobs):
  groups = {}
  for j in jobs:
    groups.setdefault(j.strength, []).append(j)
  return groups


def _timed_passes(run_once):
  t0 = time.perf_counter()
  run_once()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  run_once()
  return first, time.perf_counter() - t0


def bench_packed(sd, jobs, args, devices=None):
  """Returns the packed sampler's timings and counts on a mesh of `devices` (default: all)."""
  mesh = parallel.make_mesh((-1,), devices)
  s = sampler_lib.SpectrumSampler(sd, num_inference_steps=args.steps, guidance_scale=10.0,
                                  slots=args.slots, vae_batch=args.vae_batch,
                                  scheduler=_scheduler(sd), mesh=mesh)
  first, steady = _timed_passes(lambda: sum(1 for _ in s.run(jobs)))
  # stats cover both passes; x2 for the CFG halves, /2 for the passes.
  return dict(first_s=first, steady_s=steady, unet_evals=s.stats["slot_evals"],
              useful_evals=s.stats["useful_evals"], slots=s.slots, vae_batch=s.vae_batch,
              dispatches_per_pass=s.stats["dispatches"] // 2, steps_per_pass=s.stats["steps"] // 2)


def flax_pipeline_missing():
  """Returns why the `flax` method cannot run here (diffusers >= 0.40 has no Flax classes), or None."""
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "diffusers is not installed"
  if not hasattr(diffusers, "FlaxStableDiffusionImg2ImgPipeline"):
    return f"diffusers {diffusers.__version__} has no Flax pipelines (they need diffusers < 0.40)"
  if not hasattr(transformers, "FlaxCLIPTextModel"):
    return f"transformers {transformers.__version__} has no Flax CLIP (it needs transformers < 5)"
  return None


def _unconfigured(config):
  return {k: v for k, v in config.items() if k not in ("numerics", "attention")}


def bench_flax(sd, jobs, args):
  """diffusers' Flax img2img pipeline with diffusers' / transformers' own Flax modules, our params."""
  from diffusers import FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxStableDiffusionImg2ImgPipeline, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from flax.jax_utils import replicate  # pylint: disable=g-import-not-at-top
  from flax.training.common_utils import shard  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  scheduler = FlaxDDIMScheduler.from_config(sd.scheduler_config)
  unet = FlaxUNet2DConditionModel.from_config(_unconfigured(sd.unet.config), dtype=sd.dtype)
  vae = FlaxAutoencoderKL.from_config(_unconfigured(sd.vae.config), dtype=sd.vae_dtype)
  text = FlaxCLIPTextModel(CLIPTextConfig(**clip_models.text_config_dict(sd.text_encoder.config)),
                           dtype=sd.dtype, _do_init=False)
  pipe = FlaxStableDiffusionImg2ImgPipeline(
      vae=vae, text_encoder=text, tokenizer=sd.tokenizer, unet=unet,
      scheduler=scheduler, safety_checker=None, feature_extractor=None)
  params = replicate(dict(sd.params, scheduler=scheduler.create_state()))
  size = jobs[0].image.shape[0]
  groups = _by_strength(jobs)

  def run_once():
    for strength, group in groups.items():
      ids, pixels = pipe.prepare_inputs([j.prompt for j in group],
                                        [Image.fromarray(j.image) for j in group])
      out = pipe(shard(np.asarray(ids)), shard(np.asarray(pixels)), params,
                 jax.random.split(jax.random.key(0), 1), strength=strength,
                 num_inference_steps=args.steps, height=size, width=size,
                 guidance_scale=10.0, jit=True).images
      np.asarray(out)

  first, steady = _timed_passes(run_once)
  evals = _useful_evals(jobs, args.steps)
  return dict(first_s=first, steady_s=steady, unet_evals=evals, useful_evals=evals)


def _torch_pipe(pt):
  import diffusers  # pylint: disable=g-import-not-at-top
  if pt["family"] == "sd":
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=pt["vae"], text_encoder=pt["text_encoder"], tokenizer=pt["tokenizer"],
        unet=pt["unet"], scheduler=diffusers.DDIMScheduler.from_config(models.SD_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  else:  # the reference's pipeline, Euler from the checkpoint's scheduler config
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=pt["vae"], text_encoder=pt.get("text_encoder"), text_encoder_2=pt["text_encoder_2"],
        tokenizer=pt.get("tokenizer"), tokenizer_2=pt["tokenizer_2"], unet=pt["unet"],
        scheduler=diffusers.EulerDiscreteScheduler.from_config(models.SDXL_SCHEDULER_CONFIG),
        requires_aesthetics_score=pt["family"] == "sdxl_refiner",
        force_zeros_for_empty_prompt=pt["family"] == "sdxl_base", add_watermarker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def bench_torch(pt, jobs, args, per_job):
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pipe = _torch_pipe(pt)
  calls = [[j] for j in jobs] if per_job else list(_by_strength(jobs).values())

  def run_once():
    with torch.no_grad():
      for group in calls:
        pipe(prompt=[j.prompt for j in group], image=[Image.fromarray(j.image) for j in group],
             strength=group[0].strength, num_inference_steps=args.steps, guidance_scale=10.0,
             generator=torch.Generator().manual_seed(0), output_type="np")

  first, steady = _timed_passes(run_once)
  evals = _useful_evals(jobs, args.steps)
  return dict(first_s=first, steady_s=steady, unet_evals=evals, useful_evals=evals)


def _targets(results):
  """Returns the packed sampler's checks (issues #14 and #23), as printable lines."""
  packed, lines = results.get("packed"), []
  if packed is None:
    return lines
  lines.append(f"useful UNet evaluations {packed['useful_fraction']:.1%} (target >= 95 %)")
  if "packed1" in results:
    ratio = packed["steady_img_s"] / results["packed1"]["steady_img_s"]
    lines.append(f"steady images/s, all devices vs one: {ratio:.2f}x")
  if "flax" in results:
    ratio = packed["steady_img_s"] / results["flax"]["steady_img_s"]
    lines.append(f"steady images/s vs diffusers Flax per strength {ratio:.2f}x (target >= 1.3)")
  if "torch" in results:
    steady = packed["steady_img_s"] / results["torch"]["steady_img_s"]
    first = packed["first_img_s"] / results["torch"]["first_img_s"]
    lines.append(f"vs PyTorch per strength: steady {steady:.2f}x (target >= 1.0), "
                 f"end to end {first:.2f}x")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
  parser.add_argument("--images", type=int, default=4, help="source images (x 10 strengths)")
  parser.add_argument("--seeds", type=int, default=1, help="generation seeds per (image, strength)")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--slots", type=int, default=0, help="0: the sampler's auto choice")
  parser.add_argument("--vae_batch", type=int, default=0, help="0: the slot count")
  parser.add_argument("--methods", default="packed,packed1,flax,torch,torch1")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="XLA host devices on a CPU host (0: one per usable core)")
  parser.add_argument("--out", default="experiments/results")
  args = parser.parse_args()
  print(f"devices: {host_devices.configure(args.cpu_devices)}")
  methods = [m for m in args.methods.split(",") if m]
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch_version = torch.__version__
  except ImportError:
    torch_version = None
  missing_torch = [m for m in methods if m.startswith("torch") and torch_version is None]
  if missing_torch:
    print(f"torch is not installed: skipping {missing_torch}")
    methods = [m for m in methods if m not in missing_torch]

  size, _, family = GEOMETRIES[args.geometry]
  if family != "sd" and "flax" in methods:
    print("diffusers has no Flax SDXL img2img pipeline: skipping flax")
    methods.remove("flax")
  if "flax" in methods and flax_pipeline_missing():
    print(f"{flax_pipeline_missing()}: skipping flax")
    methods.remove("flax")
  jobs = make_jobs(args.images, STRENGTHS, size, args.seeds)
  with tempfile.TemporaryDirectory() as tmp:
    path, pt = build_checkpoint(args.geometry, pathlib.Path(tmp) / "sd", torch_version is not None)
    sd = models.load_sd(str(path))
    results = {}
    for method in methods:
      if method == "packed":
        results[method] = bench_packed(sd, jobs, args)
      elif method == "packed1":
        results[method] = bench_packed(sd, jobs, args, jax.devices()[:1])
      elif method == "flax":
        results[method] = bench_flax(sd, jobs, args)
      elif method in ("torch", "torch1"):
        results[method] = bench_torch(pt, jobs, args, per_job=method == "torch1")
      else:
        raise ValueError(f"unknown method {method!r}")
      r = results[method]
      r.update(images=len(jobs), first_img_s=len(jobs) / r["first_s"],
               steady_img_s=len(jobs) / r["steady_s"],
               steady_unet_evals_s=r["unet_evals"] / r["steady_s"],
               useful_fraction=r["useful_evals"] / r["unet_evals"])
      print(f"{method}: {r}", flush=True)

  base = results.get("packed")
  print(f"\n{args.geometry}: {args.images} images x {len(STRENGTHS)} strengths x {args.seeds} seeds = "
        f"{len(jobs)} jobs, "
        f"{args.steps} steps, devices {jax.devices()[0].platform} x {jax.device_count()}")
  header = (f"{'method':8s} {'e2e s':>8s} {'e2e img/s':>10s} {'steady s':>9s} {'img/s':>7s} "
            f"{'UNet ev/s':>10s} {'useful':>7s} {'packed/x e2e':>13s} {'packed/x steady':>16s}")
  print(header)
  for method, r in results.items():
    ratios = ("", "") if base is None else (
        f"{base['first_img_s'] / r['first_img_s']:.2f}x", f"{base['steady_img_s'] / r['steady_img_s']:.2f}x")
    print(f"{method:8s} {r['first_s']:8.1f} {r['first_img_s']:10.2f} {r['steady_s']:9.1f} "
          f"{r['steady_img_s']:7.2f} {r['steady_unet_evals_s']:10.0f} {r['useful_fraction']:7.2f} "
          f"{ratios[0]:>13s} {ratios[1]:>16s}")
  targets = _targets(results)
  for line in targets:
    print(line)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  record = dict(geometry=args.geometry, images=args.images, strengths=STRENGTHS, steps=args.steps,
                slots=args.slots, jobs=len(jobs), platform=platform.platform(),
                devices=[str(d) for d in jax.devices()], torch=torch_version, results=results,
                targets=targets, load_average=os.getloadavg())
  target = out / f"bench_generate_{args.geometry}.json"
  target.write_text(json.dumps(record, indent=2))
  print(f"wrote {target}")


if __name__ == "__main__":
  main()
