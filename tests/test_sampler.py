"""The packed spectrum sampler: parity with diffusers' PyTorch pipelines, batch/device independence, errors."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from discl_jax.diffusion import models
from discl_jax.diffusion import sampler
from discl_jax.diffusion import slot_memory
from discl_jax.models import tiny as tiny_models

STEPS, GUIDANCE, SIZE = 4, 7.5, 32
PROMPT = "a photo of the digit seven"

# Runs in-process and in the 8-device subprocess: the same 16 jobs of mixed strengths.
JOBS_CODE = """
import numpy as np
from discl_jax import seeding
from discl_jax.diffusion.sampler import Job
def make_jobs(n):
  rng = seeding.numpy_rng(0, "test-sampler-images")
  strengths = (0.25, 0.5, 0.75, 1.0)
  prompts = ("a photo of the digit seven", "a digit in the wild", "a real photo of a class")
  return [Job(f"src{i}|s{strengths[i % 4]}|seed{i % 3}",
              rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              prompts[i % 3], strengths[i % 4], i % 3) for i in range(n)]
"""
_namespace = {}
exec(JOBS_CODE, _namespace)  # pylint: disable=exec-used
make_jobs = _namespace["make_jobs"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tiny_models.build_sd(tmp_path_factory.mktemp("sampler") / "sd", seed=0)
  return path, models.load_sd(str(path))


@pytest.fixture(scope="module")
def packed(tiny):
  """16 slots, 16 mixed jobs, one run: {job_id: float image}."""
  sd = tiny[1]
  s = sampler.SpectrumSampler(sd, num_inference_steps=STEPS, guidance_scale=GUIDANCE, slots=16)
  out = {job.job_id: image for job, image in s.generate(make_jobs(16))}
  return s, out


def test_every_job_once_and_uint8(tiny, packed):
  s, out = packed
  assert sorted(out) == sorted(j.job_id for j in make_jobs(16))
  # 16 jobs need 1..4 steps each (int(4 * strength)); every slot starts busy.
  assert s.stats["useful_evals"] == sum(int(STEPS * j.strength) for j in make_jobs(16))
  img = next(iter(out.values()))
  assert img.shape == (SIZE, SIZE, 3) and img.min() >= 0 and img.max() <= 1
  job = make_jobs(1)[0]
  (got_job, got), = list(s.run([job]))
  assert got_job is job and got.dtype == np.uint8 and got.shape == (SIZE, SIZE, 3)


def test_job_independent_of_batch_composition(packed):
  """Same slot count, other jobs (here none) in the other slots: bitwise the same image."""
  s, out = packed
  job = make_jobs(16)[5]
  (_, alone), = list(s.generate([job]))
  np.testing.assert_array_equal(alone, out[job.job_id])


def test_steps_between_finishes_run_in_one_dispatch(tiny, packed):
  """Strengths 0.25 and 1.0 finish after steps 1 and 4: two dispatches (1 step, then 3)."""
  s = sampler.SpectrumSampler(tiny[1], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                              slots=16)
  jobs = [j for j in make_jobs(16) if j.strength in (0.25, 1.0)]
  out = {job.job_id: image for job, image in s.generate(jobs)}
  assert (s.stats["dispatches"], s.stats["steps"]) == (2, STEPS)
  assert s.stats["useful_evals"] == sum(int(STEPS * j.strength) for j in jobs)
  for job in jobs:  # the same executable whatever the trip count: bitwise the same image
    np.testing.assert_array_equal(out[job.job_id], packed[1][job.job_id])


def test_vae_batch_is_independent_of_slots(tiny, packed):
  s = sampler.SpectrumSampler(tiny[1], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                              slots=16, vae_batch=4)
  assert (s.slots, s.vae_batch) == (16, 4)
  jobs = make_jobs(6)
  out = dict(s.generate(jobs))
  assert len(out) == 6
  for job in jobs:
    _assert_same_up_to_kernel_rounding(out[job], packed[1][job.job_id])


def test_auto_slots(tiny, monkeypatch):
  """slots=0: the measured CPU count per device; on an accelerator the most slots that fit."""
  sd = tiny[1]
  assert sampler.SpectrumSampler(sd, num_inference_steps=STEPS, slots=0).slots == (
      sampler.AUTO_SLOTS_PER_DEVICE["cpu"] * jax.device_count())
  fits_8 = slot_memory.footprint(
      sampler.SpectrumSampler(sd, num_inference_steps=STEPS, slots=8).lower_step(
          (4, 16, 16), loop=True).compile().memory_analysis())
  monkeypatch.setattr(sampler, "AUTO_SLOTS_PER_DEVICE", {})  # CPU standing in for a GPU of this memory:
  monkeypatch.setattr(sampler, "MAX_AUTO_SLOTS_PER_DEVICE", 16)
  monkeypatch.setattr(sampler, "_device_memory", lambda mesh: fits_8 / sampler.DEVICE_MEMORY_FRACTION)
  s = sampler.SpectrumSampler(sd, num_inference_steps=STEPS, guidance_scale=GUIDANCE, slots=0)
  assert s.slots == 16
  assert len(list(s.generate(make_jobs(2)))) == 2
  assert s.slots == 8 and s.vae_batch == 8
  with pytest.raises(ValueError, match="diffusion.slots must be >= 0"):
    sampler.SpectrumSampler(sd, num_inference_steps=STEPS, slots=-1)
  with pytest.raises(ValueError, match="diffusion.vae_batch must be >= 0"):
    sampler.SpectrumSampler(sd, num_inference_steps=STEPS, vae_batch=-2)


def _assert_same_up_to_kernel_rounding(got, want):
  # XLA:CPU picks GEMM/conv blockings by batch shape, so a different slot count
  # or per-device batch changes float32 rounding (seen: <= 5e-6 on [0, 1]); the
  # randomness is the job's own, so anything beyond rounding would show here.
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  diff = np.abs(sampler.to_uint8(got).astype(int) - sampler.to_uint8(want).astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_job_independent_of_device_count_and_batch_size(tiny, packed, tmp_path):
  """8 fake devices with one slot each (per-device batch 1) against 16 slots on one device."""
  out_file = tmp_path / "eight.npz"
  code = JOBS_CODE + f"""
import jax
from discl_jax.diffusion import models, sampler
assert jax.device_count() == 8
sd = models.load_sd({str(tiny[0])!r})
s = sampler.SpectrumSampler(sd, num_inference_steps={STEPS}, guidance_scale={GUIDANCE}, slots=8)
assert s.slots == 8 and s.mesh.shape["data"] == 8
out = {{job.job_id: image for job, image in s.generate(make_jobs(16))}}
np.savez({str(out_file)!r}, **out)
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        cwd=pathlib.Path(__file__).parents[1], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = np.load(out_file)
  assert sorted(eight.files) == sorted(packed[1])
  for job_id, image in packed[1].items():
    _assert_same_up_to_kernel_rounding(eight[job_id], image)


@pytest.mark.parametrize("strength", [0.0, -0.2, 1.5, float("nan"), "0.5"])
def test_strength_outside_unit_interval_names_it(packed, strength):
  job = sampler.Job("bad", make_jobs(1)[0].image, PROMPT, strength, 0)
  with pytest.raises(ValueError, match=r"job 'bad'.*strength must be in \(0, 1\]"):
    list(packed[0].run([job]))


def test_strength_running_no_step_names_it(packed):
  job = sampler.Job("tiny-strength", make_jobs(1)[0].image, PROMPT, 0.1, 0)
  with pytest.raises(ValueError, match=r"tiny-strength.*strength 0.1.*0 denoising steps"):
    list(packed[0].run([job]))


def test_bad_images_name_the_job(packed):
  good = make_jobs(1)[0]
  odd = sampler.Job("odd-size", np.zeros((31, 32, 3), np.uint8), PROMPT, 0.5, 0)
  with pytest.raises(ValueError, match="odd-size.*multiple of 2"):
    list(packed[0].run([odd]))
  other = sampler.Job("other-size", np.zeros((64, 64, 3), np.uint8), PROMPT, 0.5, 0)
  with pytest.raises(ValueError, match="other-size.*differs"):
    list(packed[0].run([good, other]))
  gray = sampler.Job("gray", np.zeros((32, 32), np.uint8), PROMPT, 0.5, 0)
  with pytest.raises(ValueError, match="gray.*uint8 HxWx3"):
    list(packed[0].run([gray]))


def test_unknown_scheduler_is_rejected(tiny):
  with pytest.raises(ValueError, match="diffusion.scheduler"):
    sampler.SpectrumSampler(tiny[1], num_inference_steps=STEPS, scheduler="pndm", slots=2)


# ---------------------------------------------------------------- PyTorch parity


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory):
  """A diffusers-layout checkpoint written by PyTorch models as safetensors, and those models."""
  torch = pytest.importorskip("torch", reason="PyTorch parity needs the torch extra")
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("torch_sd") / "sd"
  tokenizer = tiny_models.write_tokenizer(root / "tokenizer")
  unet_cfg, vae_cfg, text_cfg = tiny_models.sd_configs(
      len(tokenizer.get_vocab()), tokenizer.bos_token_id, tokenizer.eos_token_id)
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**unet_cfg).eval()
  vae = AutoencoderKL(**vae_cfg).eval()
  text = CLIPTextModel(CLIPTextConfig(**text_cfg)).eval()
  unet.save_pretrained(root / "unet", safe_serialization=True)
  vae.save_pretrained(root / "vae", safe_serialization=True)
  text.save_pretrained(root / "text_encoder", safe_serialization=True)
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(models.SD_SCHEDULER_CONFIG))
  assert not list(root.rglob("*.msgpack"))
  return root, (unet, vae, text, tokenizer)


@pytest.mark.parametrize("kind", ["ddim", "euler"])
def test_matches_torch_img2img_pipeline_from_safetensors(torch_checkpoint, kind, monkeypatch):
  torch = pytest.importorskip("torch", reason="PyTorch parity needs the torch extra")
  import diffusers  # pylint: disable=g-import-not-at-top
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root, (unet, vae, text, tokenizer) = torch_checkpoint
  sd = models.load_sd(str(root))  # safetensors -> Flax through our converter, no torch
  job = make_jobs(16)[2 if kind == "ddim" else 1]
  s = sampler.SpectrumSampler(sd, num_inference_steps=STEPS, guidance_scale=GUIDANCE, slots=16,
                              scheduler=kind)
  (_, ours), = list(s.generate([job]))

  # Line PyTorch's randomness up with the job's: the VAE posterior sample and the img2img noise.
  vae_key, _ = sampler.job_keys(job)
  latent = SIZE // 2
  eps = np.asarray(sampler.jax.random.normal(vae_key, (latent, latent, 4))).transpose(2, 0, 1)
  noise = np.asarray(sampler.job_noise(job, (4, latent, latent)))[None]
  monkeypatch.setattr(img2img, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                      out.latent_dist.mean + out.latent_dist.std * torch.from_numpy(eps.copy())[None])
  monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise.copy()))
  scheduler_cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}[kind]
  pipe = diffusers.StableDiffusionImg2ImgPipeline(
      vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
      scheduler=scheduler_cls.from_config(models.SD_SCHEDULER_CONFIG), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    ref = pipe(prompt=job.prompt, image=Image.fromarray(job.image), strength=job.strength,
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np").images[0]
  # float32 on both sides, PyTorch's functions on both (unet.py), different kernels (oneDNN vs
  # XLA): 1e-4 on [0, 1] and 1 uint8 level (docs/design.md §5.9).
  print(f"SD 1.x {kind} max abs float diff: {np.abs(ours - ref).max():.2e}")
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert np.abs(sampler.to_uint8(ours).astype(int) - sampler.to_uint8(ref).astype(int)).max() <= 1
