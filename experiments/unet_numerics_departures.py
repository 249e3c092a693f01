"""How far each departure of diffusers' Flax UNet functions from PyTorch's moves the output.

Runs our UNet (discl_jax/diffusion/unet.py) with one departure switched on at a
time (tanh GELU, Transformer2D GroupNorm eps 1e-5, E[x^2] - mean^2 variance,
Flax's sinusoid operation order), all of them ("flax": diffusers' Flax modules)
and none ("pytorch"), against diffusers' PyTorch modules with the same weights
(written as safetensors by torch, read by our converter), float32:

  unet    one UNet evaluation, SD1-shaped tiny (5x7 latents) and refiner-shaped tiny
          (20x28 latents, text_time): max |ours - torch| of the prediction
  sd1     the SD 1.x tiny img2img parity run of tests/test_sampler.py (4 steps, DDIM and
          Euler, 32x32): max |ours - torch| of the float images in [0, 1]

  python experiments/unet_numerics_departures.py [--parts=unet,sd1]

Prints a table and writes experiments/results/unet_numerics_departures.json.
"""

import argparse
import dataclasses
import json
import pathlib
import tempfile

import jax
import numpy as np
import torch

from discl_jax import seeding
from discl_jax.diffusion import models
from discl_jax.diffusion import sampler as sampler_lib
from discl_jax.models import tiny
from discl_jax.models import unet as unet_lib

_TORCH = unet_lib.NUMERICS["pytorch"]
VARIANTS = {
    "flax (all departures)": unet_lib.NUMERICS["flax"],
    "tanh GELU only": dataclasses.replace(_TORCH, exact_gelu=False),
    "GroupNorm eps 1e-5 only": dataclasses.replace(_TORCH, transformer_norm_eps=1e-5),
    "GELU + GroupNorm eps": dataclasses.replace(_TORCH, exact_gelu=False,
                                                transformer_norm_eps=1e-5),
    "fast variance only": dataclasses.replace(_TORCH, two_pass_variance=False),
    "Flax sinusoid order only": dataclasses.replace(_TORCH, torch_timestep_embedding=False),
    "pytorch (none)": _TORCH,
}
REFINER_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64, 64), layers_per_block=1, attention_head_dim=(2, 4, 4, 4),
    transformer_layers_per_block=2, use_linear_projection=True, cross_attention_dim=32,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=72)
STEPS, GUIDANCE, SIZE = 4, 7.5, 32


def register_variants():
  """Adds VARIANTS to unet.NUMERICS (under their own names) so UNet(numerics=name) runs them."""
  unet_lib.NUMERICS.update({name: spec for name, spec in VARIANTS.items()
                            if name not in unet_lib.NUMERICS})


def unet_part(root):
  """Returns {geometry: {variant: max abs difference}} of one UNet evaluation."""
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  out = {}
  for geometry, config, hw in (("sd1 5x7", tiny.sd_configs(100, 0, 1)[0], (5, 7)),
                               ("refiner 20x28", REFINER_UNET, (20, 28))):
    folder = root / geometry.split()[0]
    torch.manual_seed(0)
    module = UNet2DConditionModel(**config).eval()
    module.save_pretrained(folder, safe_serialization=True)
    unet, params = unet_lib.load(folder)
    rng = np.random.default_rng(1)
    inputs = dict(sample=rng.normal(0, 1, (2, 4, *hw)).astype(np.float32),
                  timesteps=np.array([981.0, 401.0], np.float32),
                  encoder_hidden_states=rng.normal(0, 1, (2, 9, config["cross_attention_dim"])
                                                   ).astype(np.float32))
    added = None
    if config.get("addition_embed_type") == "text_time":
      added = dict(text_embeds=rng.normal(0, 1, (2, 32)).astype(np.float32),
                   time_ids=np.array([[40, 56, 0, 0, 2.5], [40, 56, 0, 0, 6.0]], np.float32))
      inputs["added_cond_kwargs"] = added
    with torch.no_grad():
      want = module(*(torch.from_numpy(inputs[k]) for k in ("sample", "timesteps")),
                    encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
                    added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}
                    if added else None).sample.numpy()
    out[geometry] = {}
    for name in VARIANTS:
      variant = unet.clone(numerics=name)
      got = jax.jit(lambda p, i, u=variant: u.apply({"params": p}, **i).sample)(params, inputs)
      out[geometry][name] = float(np.abs(np.asarray(got) - want).max())
  return out


def _job(index):
  """Returns job `index` of tests/test_sampler.py's make_jobs (same images, prompts, seeds)."""
  rng = seeding.numpy_rng(0, "test-sampler-images")
  strengths = (0.25, 0.5, 0.75, 1.0)
  prompts = ("a photo of the digit seven", "a digit in the wild", "a real photo of a class")
  images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(index + 1)]
  return sampler_lib.Job(f"src{index}|s{strengths[index % 4]}|seed{index % 3}", images[index],
                         prompts[index % 3], strengths[index % 4], index % 3)


def sd1_part(root):
  """Returns {scheduler: {variant: max abs difference}} of the SD 1.x tiny img2img parity run."""
  import diffusers  # pylint: disable=g-import-not-at-top
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top
  root = root / "sd"
  tokenizer = tiny.write_tokenizer(root / "tokenizer")
  unet_cfg, vae_cfg, text_cfg = tiny.sd_configs(
      len(tokenizer.get_vocab()), tokenizer.bos_token_id, tokenizer.eos_token_id)
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**unet_cfg).eval()
  vae = diffusers.AutoencoderKL(**vae_cfg).eval()
  text = CLIPTextModel(CLIPTextConfig(**text_cfg)).eval()
  for sub, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
    module.save_pretrained(root / sub, safe_serialization=True)
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(models.SD_SCHEDULER_CONFIG))
  sd = models.load_sd(str(root))
  out = {}
  for kind, index in (("ddim", 2), ("euler", 1)):
    job = _job(index)
    vae_key, _ = sampler_lib.job_keys(job)
    latent = SIZE // 2
    eps = np.asarray(jax.random.normal(vae_key, (latent, latent, 4))).transpose(2, 0, 1)
    noise = np.asarray(sampler_lib.job_noise(job, (4, latent, latent)))[None]
    img2img.retrieve_latents = (lambda o, generator=None, sample_mode="sample", e=eps:
                                o.latent_dist.mean + o.latent_dist.std * torch.from_numpy(e.copy())[None])
    img2img.randn_tensor = lambda shape, n=noise, **kw: torch.from_numpy(n.copy())
    scheduler_cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}[kind]
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler_cls.from_config(models.SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
      ref = pipe(prompt=job.prompt, image=Image.fromarray(job.image), strength=job.strength,
                 num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np").images[0]
    out[kind] = {}
    for name in VARIANTS:
      variant = dataclasses.replace(sd, unet=sd.unet.clone(numerics=name))
      s = sampler_lib.SpectrumSampler(variant, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                      slots=16, scheduler=kind)
      (_, ours), = list(s.generate([job]))
      out[kind][name] = float(np.abs(ours - ref).max())
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", default="unet,sd1", help="comma-separated: unet, sd1")
  args = parser.parse_args()
  register_variants()
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    parts = {"unet": unet_part, "sd1": sd1_part}
    for part in args.parts.split(","):
      results[part] = parts[part](pathlib.Path(tmp) / part)
  for part, rows in results.items():
    for case, values in rows.items():
      print(f"\n{part} {case}: max |ours - torch|")
      for name, value in values.items():
        print(f"  {name:28s} {value:.3g}")
  target = pathlib.Path(__file__).parent / "results" / "unet_numerics_departures.json"
  target.parent.mkdir(exist_ok=True)
  target.write_text(json.dumps(results, indent=2))
  print(f"\nwrote {target}")


if __name__ == "__main__":
  main()
