"""SDXL (refiner and base) in the packed sampler: parity with PyTorch's StableDiffusionXLImg2ImgPipeline.

Tiny SDXL-shaped checkpoints are written by PyTorch as safetensors and loaded
through our converter; both sides get the same posterior eps and img2img noise.
"""

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
from discl_jax.diffusion import schedules
from discl_jax.models import tiny

STEPS, GUIDANCE = 10, 10.0
HEIGHT, WIDTH = 40, 56  # multiples of 8, not of 64 (docs/design.md §5.11)
STRENGTHS = (0.1, 0.5, 1.0)
PROMPT = "a photo of the wild"

JOBS_CODE = """
import numpy as np
from discl_jax import seeding
from discl_jax.diffusion.sampler import Job
def make_jobs(height, width, strengths, prompt):
  rng = seeding.numpy_rng(0, "test-sdxl-images")
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  return [Job(f"src|s{s}|seed{i}", image, prompt, s, i) for i, s in enumerate(strengths)]
"""
_namespace = {}
exec(JOBS_CODE, _namespace)  # pylint: disable=exec-used
make_jobs = _namespace["make_jobs"]


def _write_torch_checkpoint(root, family):
  """Writes a tiny SDXL-shaped checkpoint with PyTorch modules (safetensors); returns the modules."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # pylint: disable=g-import-not-at-top
  tokenizers = {"tokenizer_2": tiny.write_tokenizer(root / "tokenizer_2", pad_token="!")}
  if family == "sdxl_base":
    tokenizers["tokenizer"] = tiny.write_tokenizer(root / "tokenizer")
  tok = tokenizers["tokenizer_2"]
  unet_cfg, vae_cfg, text_cfgs = tiny.sdxl_configs(
      family, len(tok.get_vocab()), tok.bos_token_id, tok.eos_token_id)
  torch.manual_seed(0)
  modules = {"unet": UNet2DConditionModel(**unet_cfg).eval(),
             "vae": AutoencoderKL(**vae_cfg).eval()}
  for name, cfg in text_cfgs.items():
    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    modules[name] = cls(CLIPTextConfig(**cfg)).eval()
  for name, module in modules.items():
    module.save_pretrained(root / name, safe_serialization=True)
  models.write_pipeline_files(root, models.SDXL_SCHEDULER_CONFIG, family)
  assert not list(root.rglob("*.msgpack"))
  return modules, tokenizers


_CHECKPOINTS = {}


def _checkpoint(family, tmp_path_factory):
  """Returns (family, dir, SDModels, PyTorch modules, tokenizers), written once per module."""
  pytest.importorskip("torch", reason="the tiny SDXL checkpoints are written by PyTorch")
  if family not in _CHECKPOINTS:
    root = tmp_path_factory.mktemp(family) / "sdxl"
    modules, tokenizers = _write_torch_checkpoint(root, family)
    _CHECKPOINTS[family] = family, root, models.load_sd(str(root)), modules, tokenizers
  return _CHECKPOINTS[family]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """Tiny models: more PyTorch threads only spin (4x the CPU time on 2 cores)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)
  _CHECKPOINTS.clear()


@pytest.fixture(scope="module", params=["sdxl_refiner", "sdxl_base"])
def torch_sdxl(request, tmp_path_factory):
  return _checkpoint(request.param, tmp_path_factory)


def _torch_image(family, modules, tokenizers, kind, job, monkeypatch):
  """Returns PyTorch StableDiffusionXLImg2ImgPipeline's float image of `job` with its eps and noise."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  factor = 2 ** (len(modules["vae"].config.block_out_channels) - 1)
  h, w = job.image.shape[0] // factor, job.image.shape[1] // factor
  vae_key, _ = sampler.job_keys(job)
  eps = np.asarray(jax.random.normal(vae_key, (h, w, 4))).transpose(2, 0, 1)
  noise = np.asarray(sampler.job_noise(job, (4, h, w)))[None]
  monkeypatch.setattr(img2img, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                      out.latent_dist.mean + out.latent_dist.std * torch.from_numpy(eps.copy())[None])
  monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise.copy()))
  scheduler_cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}[kind]
  pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
      vae=modules["vae"], text_encoder=modules.get("text_encoder"),
      text_encoder_2=modules["text_encoder_2"], tokenizer=tokenizers.get("tokenizer"),
      tokenizer_2=tokenizers["tokenizer_2"], unet=modules["unet"],
      scheduler=scheduler_cls.from_config(models.SDXL_SCHEDULER_CONFIG),
      requires_aesthetics_score=family == "sdxl_refiner",
      force_zeros_for_empty_prompt=family == "sdxl_base", add_watermarker=False)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    return pipe(prompt=job.prompt, image=Image.fromarray(job.image), strength=job.strength,
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np").images[0]


@pytest.mark.parametrize("kind", ["euler", "ddim"])
def test_matches_torch_sdxl_img2img_pipeline(torch_sdxl, kind, monkeypatch):
  """Strengths 0.1, 0.5 and 1.0 packed in one batch, each against PyTorch run alone.

  DDIM runs on the refiner only (the base adds nothing to it and costs a compilation).
  """
  family, _, sd, modules, tokenizers = torch_sdxl
  if kind == "ddim" and family == "sdxl_base":
    pytest.skip("DDIM is checked on the refiner")
  assert sd.family == family and sd.is_sdxl
  s = sampler.SpectrumSampler(sd, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                              scheduler=kind, slots=len(STRENGTHS))
  jobs = make_jobs(HEIGHT, WIDTH, STRENGTHS, PROMPT)
  ours = {job.job_id: image for job, image in s.generate(jobs)}
  diffs = {}
  for job in jobs:
    ref = _torch_image(family, modules, tokenizers, kind, job, monkeypatch)
    got = ours[job.job_id]
    assert got.shape == ref.shape == (HEIGHT, WIDTH, 3)
    diffs[job.strength] = float(np.abs(got - ref).max())
    level = np.abs(sampler.to_uint8(got).astype(int) - sampler.to_uint8(ref).astype(int))
    assert level.max() <= 1, (job.strength, level.max())
  print(f"{family} {kind} max abs float diff per strength: {diffs}")
  assert max(diffs.values()) <= 1e-4, diffs
  if kind == "euler":  # a job packed with others gets the image it gets alone
    (_, alone), = list(s.generate([jobs[1]]))
    np.testing.assert_array_equal(alone, ours[jobs[1].job_id])


def test_eight_devices_give_the_images_of_one(torch_sdxl, tmp_path):
  family, root, sd, _, _ = torch_sdxl
  if family != "sdxl_refiner":
    pytest.skip("one family suffices for device independence")
  jobs = make_jobs(HEIGHT, WIDTH, STRENGTHS, PROMPT)
  one = {j.job_id: im for j, im in sampler.SpectrumSampler(  # the parity test's compilation
      sd, num_inference_steps=STEPS, guidance_scale=GUIDANCE, scheduler="euler",
      slots=len(STRENGTHS)).generate(jobs)}
  out_file = tmp_path / "eight.npz"
  code = JOBS_CODE + f"""
import jax
from discl_jax.diffusion import models, sampler
assert jax.device_count() == 8
sd = models.load_sd({str(root)!r})
s = sampler.SpectrumSampler(sd, num_inference_steps={STEPS}, guidance_scale={GUIDANCE},
                            scheduler="euler", slots=8)
assert s.mesh.shape["data"] == 8
jobs = make_jobs({HEIGHT}, {WIDTH}, {STRENGTHS}, {PROMPT!r})
np.savez({str(out_file)!r}, **{{j.job_id: im for j, im in s.generate(jobs)}})
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        cwd=pathlib.Path(__file__).parents[1], timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = np.load(out_file)
  assert sorted(eight.files) == sorted(one)
  for job_id, image in one.items():
    # per-device batch 1 vs 8: XLA:CPU kernel blocking changes float32 rounding only
    np.testing.assert_allclose(eight[job_id], image, atol=2e-5, rtol=0)


def test_sdxl_loading_flags_and_precision(torch_sdxl):
  family, root, sd, _, _ = torch_sdxl
  index = json.loads((root / "model_index.json").read_text())
  assert sd.force_zeros_for_empty_prompt == index["force_zeros_for_empty_prompt"]
  assert sd.requires_aesthetics_score == (family == "sdxl_refiner")
  assert (sd.text_encoder is None) == (family == "sdxl_refiner")
  assert sd.vae.config.scaling_factor == 0.13025
  half = models.load_sd(str(root), dtype="bfloat16")
  leaves = lambda name: jax.tree.leaves(half.params[name])
  assert all(x.dtype == np.float32 for x in leaves("vae"))  # force_upcast
  assert all(x.dtype == jax.numpy.bfloat16 for x in leaves("unet") + leaves("text_encoder_2"))
  ids = sampler.time_ids(sd, 368, 496)
  want = ([[368, 496, 0, 0, 2.5], [368, 496, 0, 0, 6.0]] if family == "sdxl_refiner"
          else [[368, 496, 0, 0, 368, 496]] * 2)
  np.testing.assert_array_equal(ids, want)
  sd.requires_aesthetics_score = not sd.requires_aesthetics_score
  try:
    with pytest.raises(ValueError, match="requires_aesthetics_score"):
      sampler.time_ids(sd, 368, 496)
  finally:
    sd.requires_aesthetics_score = not sd.requires_aesthetics_score


def test_sdxl_first_sigma_per_strength():
  """docs/design.md §5.4: SDXL's Euler schedule, 50 steps, leading spacing, steps_offset 1."""
  schedule = schedules.make_schedule(models.SDXL_SCHEDULER_CONFIG, 50, "euler")
  assert schedule.timesteps[0] == 981 and schedule.timesteps[-1] == 1
  strengths = [round(0.1 * k, 1) for k in range(1, 11)]
  starts = [schedules.start_index(50, s) for s in strengths]
  assert [50 - i for i in starts] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
  np.testing.assert_allclose(
      schedule.sigma[starts],
      [0.3006, 0.5270, 0.7789, 1.0939, 1.5192, 2.1354, 3.0930, 4.6917, 7.5624, 13.1204],
      atol=1e-4)
  with pytest.raises(ValueError, match="use_karras_sigmas=True"):
    schedules.make_schedule(dict(models.SDXL_SCHEDULER_CONFIG, use_karras_sigmas=True), 50, "euler")


def test_family_of_refiner_and_base_indexes():
  # The refiner repo's file selection: tests/test_hub.py.
  index = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
           "tokenizer": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
           "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "x"],
           "vae": ["diffusers", "x"], "scheduler": ["diffusers", "x"]}
  assert models.family_of(index) == "sdxl_refiner"
  assert models.family_of(dict(index, text_encoder=["transformers", "CLIPTextModel"])) == "sdxl_base"
  assert models.family_of({"_class_name": "StableDiffusionPipeline"}) == "sd"


def test_imagenet_lt_runlocal_with_tiny_refiner(tmp_path, tmp_path_factory):
  """configs/imagenet_lt.py:runlocal, tiny refiner-shaped SDXL: hard -> prompts -> generate -> score.

  The generator is the parity tests' refiner checkpoint at their step count, slot
  count and latent size, so the stage reuses their compiled sampler.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from discl_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from discl_jax import config_checks  # pylint: disable=g-import-not-at-top
  from discl_jax import pipeline  # pylint: disable=g-import-not-at-top
  from discl_jax import workdir as wd  # pylint: disable=g-import-not-at-top
  from discl_jax.configs import common  # pylint: disable=g-import-not-at-top
  from discl_jax.data import spectrum_store  # pylint: disable=g-import-not-at-top
  root, lists = tmp_path / "images", {}
  rng = np.random.default_rng(0)
  sizes = {0: (43, 61), 1: (47, 58)}  # not multiples of 8: both rounded down to 40x56
  for split, per_class in (("train", (2, 1)), ("val", (1, 1)), ("test", (1, 1))):
    rows = []
    for label, n in enumerate(per_class):
      for k in range(n):
        rel = f"{split}/n{label}/img{k}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, sizes[label] + (3,), dtype=np.uint8)).save(root / rel)
        rows.append(f"{rel} {label}")
    lists[split] = tmp_path / f"ImageNet_LT_{split}.txt"
    lists[split].write_text("\n".join(rows) + "\n")
  (tmp_path / "classnames.txt").write_text("tench\ngoldfish\n")
  (tmp_path / "descriptions.json").write_text(json.dumps(
      {"tench": ["a photo of the wild"], "goldfish": ["a real photo in the wild"]}))
  c = config_lib.load_file("configs/imagenet_lt.py", "runlocal")
  assert c.diffusion.model == common.SDXL_REFINER and c.diffusion.resolution == 0
  c.data.root, c.data.num_workers = str(root), 0
  c.data.train_list, c.data.val_list, c.data.test_list = (str(lists[s]) for s in ("train", "val", "test"))
  c.data.class_names_file = str(tmp_path / "classnames.txt")
  c.prompts.descriptions_file = str(tmp_path / "descriptions.json")
  c.diffusion.model = str(_checkpoint("sdxl_refiner", tmp_path_factory)[1])
  c.diffusion.dtype, c.diffusion.strengths, c.diffusion.grid_sources = "float32", (0.5, 1.0), 1
  c.diffusion.num_inference_steps, c.diffusion.slots = STEPS, len(STRENGTHS)
  c.score.model, c.score.tiny, c.score.batch_size = "", True, 8
  c.score.regenerate = False  # a random tiny CLIP rejects all: regeneration has its own tests
  config_checks.validate(c)
  workdir = tmp_path / "wd"
  pipeline.run_stages(c, str(workdir), ("hard", "prompts", "generate", "score"))
  rows = spectrum_store.SpectrumStore(wd.path(str(workdir), wd.SPECTRUM)).rows()
  assert len(rows) == 3 * 2 and all("clip_text" in r for r in rows)
  shapes = {r["source_id"]: Image.open(workdir / wd.SPECTRUM / r["path"]).size for r in rows}
  multiple = 8  # rounded down to a multiple of 8 (docs/design.md §5.3)
  assert sorted(set(shapes.values())) == sorted(
      {(w // multiple * multiple, h // multiple * multiple) for h, w in sizes.values()})


def test_tiny_family_builds_a_tiny_sdxl(tmp_path):
  from discl_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from discl_jax.diffusion import spectrum_run  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.diffusion.tiny, c.diffusion.tiny_family = True, "sdxl_refiner"
  sd = models.load_sd(spectrum_run.checkpoint_dir(c, str(tmp_path)))
  assert sd.family == "sdxl_refiner" and sd.requires_aesthetics_score
  assert sd.text_encoder is None and sd.tokenizer_2.pad_token == "!"
  assert sd.unet.config.down_block_types[0] == "DownBlock2D" and sd.vae_scale_factor == 2
  sampler.time_ids(sd, 40, 56)  # the UNet's add-embedding fits 5 micro-conditions
  c.diffusion.tiny_family = "sdxl_large"
  with pytest.raises(ValueError, match="diffusion.tiny_family"):
    spectrum_run.checkpoint_dir(c, str(tmp_path))
