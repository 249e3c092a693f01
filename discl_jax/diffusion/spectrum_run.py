"""Running spectrum jobs through the sampler: the one path `generate` and regeneration share.

Sources are resized as the reference fed them (docs/design.md §5.3): first to
`diffusion.source_size` if set, then to the generation size (`jobs.target_size`:
LANCZOS at `resolution=0`, else bicubic); jobs run in one sampler pass per
generation size, each image stored as it comes.
"""

import collections
import math

from absl import logging

from discl_jax import parallel
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.diffusion import jobs
from discl_jax.diffusion import models
from discl_jax.diffusion import sampler as sampler_lib
from discl_jax.models import tiny


def checkpoint_dir(config, workdir):
  """Returns the checkpoint to load: the configured one, or the tiny one of `tiny_family` (built once).

  Every process must call it (it waits for process 0 to build the tiny model).
  """
  if not config.diffusion.tiny:
    if not config.diffusion.model:
      raise ValueError("diffusion.model is empty: set a checkpoint directory or hub id, "
                       "or diffusion.tiny=True for a tiny random model")
    return config.diffusion.model
  family = config.diffusion.tiny_family
  if family not in models.FAMILIES:
    raise ValueError(f"diffusion.tiny_family must be one of {models.FAMILIES}, got {family!r}")
  seed = seeding.generation_seed(config)

  def build(path):
    if family == "sd":
      tiny.build_sd(path, seed=seed)
    else:
      tiny.build_sdxl(path, seed=seed, family=family)
    logging.info("generate: built a tiny %s checkpoint for %s", family, workdir)

  return str(tiny.build_once(wd.path(workdir, wd.MODELS, family), build, "model_index.json",
                             "diffusion.spectrum_run.tiny_model"))


def make_sampler(config, checkpoint):
  """Returns the SpectrumSampler of `config.diffusion` over the checkpoint at `checkpoint`."""
  diffusion = config.diffusion
  sd = models.load_sd(checkpoint, dtype=diffusion.dtype)
  return sampler_lib.SpectrumSampler(
      sd, num_inference_steps=diffusion.num_inference_steps,
      guidance_scale=diffusion.guidance_scale, negative_prompt=diffusion.negative_prompt,
      scheduler=diffusion.scheduler, slots=diffusion.slots, vae_batch=diffusion.vae_batch,
      mesh=parallel.make_mesh(config.mesh.shape), dtype=diffusion.dtype,
      aesthetic_score=diffusion.aesthetic_score,
      negative_aesthetic_score=diffusion.negative_aesthetic_score, attention=diffusion.attention)


def generation_size(height, width, diffusion, size_multiple):
  """Returns the (height, width) a source of `height` x `width` is generated at."""
  h, w = jobs.source_size(height, width, diffusion.source_size)
  return jobs.target_size(h, w, diffusion.resolution, math.lcm(8, size_multiple))


def sampler_jobs(rows, source_image, size, diffusion, seed):
  """Yields sampler Jobs for `rows` (grouped by source), their sources resized to `size`."""
  cached_id, cached = None, None
  resample = "lanczos" if diffusion.resolution == 0 else "bicubic"
  for row in rows:
    if row["source_id"] != cached_id:
      cached_id = row["source_id"]
      image = source_image(cached_id)
      image = jobs.resize(image, jobs.source_size(*image.shape[:2], diffusion.source_size))
      cached = jobs.resize(image, size, resample)
    yield sampler_lib.Job(job_id=row["job_id"], image=cached, prompt=row["prompt"],
                          strength=row["strength"], seed=seed)


def run_rows(sampler, store, rows, source_image, source_hw, config, order, progress=None):
  """Generates manifest `rows` into `store`, one sampler pass per generation size; returns how many.

  `source_image(id)` / `source_hw(id)` give a source as generation sees it (and
  its height, width); `order(row)` sorts the rows of one pass; `progress` (a
  tqdm bar or None) advances per image. Each size compiles its own sampler step.
  """
  groups = collections.defaultdict(list)
  for row in rows:
    size = generation_size(*source_hw(row["source_id"]), config.diffusion,
                           sampler.models.size_multiple)
    groups[size].append(row)
  by_id = {row["job_id"]: row for row in rows}
  made = 0
  for size in sorted(groups):
    group = sorted(groups[size], key=order)
    for job, image in sampler.run(sampler_jobs(group, source_image, size, config.diffusion,
                                               seeding.generation_seed(config))):
      store.add(by_id[job.job_id], image)
      made += 1
      if progress is not None:
        progress.update(1)
  return made
