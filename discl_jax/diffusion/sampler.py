"""The packed multi-strength SDEdit (img2img) spectrum sampler.

A fixed batch of `slots` is stepped by one jitted function; each slot holds one
(image, prompt, strength, seed) job at its own schedule index, so jobs of every
strength share the batch and one compilation. Classifier-free guidance is a
doubled batch. When a slot's job finishes its `int(steps * strength)` steps the
host loop refills it from the queue. VAE encoding (with img2img's noising) and
decoding run in fixed-size jitted batches. Each job's randomness comes from
`seeding.job_key(job.seed, job.job_id)` alone, so its output does not depend on
which other jobs share the batch or on the device count.

The sampler runs on the devices of `mesh` that belong to this process (slots
sharded over the `data` axis, params replicated); on several hosts each process
runs the jobs its caller gave it, independently.
"""

import collections
import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from discl_jax import parallel
from discl_jax import seeding
from discl_jax.diffusion import models as models_lib
from discl_jax.diffusion import schedules

TEXT_BATCH = 8  # prompts encoded per text-encoder call (fixed: one compilation)


@dataclasses.dataclass(frozen=True, eq=False)
class Job:
  """One image to generate: a source image at one strength and seed, with its prompt."""
  job_id: str
  image: np.ndarray  # uint8 [H, W, 3]
  prompt: str
  strength: float
  seed: int


def job_keys(job):
  """Returns (vae_key, noise_key): the VAE posterior sample's key and the img2img noise's key."""
  vae_key, noise_key = jax.random.split(seeding.job_key(job.seed, job.job_id))
  return vae_key, noise_key


def job_noise(job, latent_shape):
  """Returns the img2img noise of `job`, float32 `latent_shape` (C, h, w), as the sampler draws it."""
  return jax.random.normal(job_keys(job)[1], latent_shape, jnp.float32)


def to_pixels(image):
  """Returns uint8 HxWx3 `image` as float32 [3, H, W] in [-1, 1] (diffusers' preprocessing)."""
  return 2.0 * (np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0) - 1.0


def to_uint8(image):
  """Returns float [0, 1] images as uint8, rounding like diffusers' numpy_to_pil."""
  return (np.asarray(image) * 255).round().astype(np.uint8)


def _local_mesh(mesh):
  if mesh is None:
    return parallel.make_mesh((-1,), jax.local_devices())
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return parallel.make_mesh((-1,), local)


@functools.lru_cache(maxsize=8)
def _compiled(signature):
  """Returns the jitted functions for one (models config, schedule kind, mesh) signature.

  Cached so that samplers over models of the same geometry share compilations.
  """
  return _build_functions(*_SIGNATURES[signature])


_SIGNATURES = {}


def _build_functions(modules, schedule, mesh):
  batch = NamedSharding(mesh, P(parallel.DATA_AXIS))
  unet, vae, text_encoder, dtype = modules
  scaling = float(vae.config.scaling_factor)
  state_sharding = {"latents": batch, "index": batch, "context": batch}

  def encode_text(params, ids):
    return text_encoder(ids, params=params)[0].astype(jnp.float32)

  def prepare(params, tables, pixels, key_data, index):
    keys = jax.random.wrap_key_data(key_data)  # [E, 2] keys: (vae, noise) per job
    posterior = vae.apply({"params": params}, pixels.astype(dtype), method=vae.encode).latent_dist
    mean = posterior.mean.astype(jnp.float32)
    std = posterior.std.astype(jnp.float32)
    eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys[:, 0])
    latents = (mean + std * eps).transpose(0, 3, 1, 2) * scaling
    noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(keys[:, 1])
    return schedules.add_noise(schedule, tables, latents, noise, index)

  def refill(state, latents, index, context, mask):
    def put(new, old):
      return jnp.where(mask.reshape(mask.shape + (1,) * (old.ndim - 1)), new, old)
    return {"latents": put(latents, state["latents"]), "index": put(index, state["index"]),
            "context": put(context, state["context"])}

  def step(params, tables, uncond, guidance, state):
    latents, index, context = state["latents"], state["index"], state["context"]
    i = jnp.minimum(index, schedule.num_steps - 1)
    model_in = schedules.scale_model_input(schedule, tables, latents, i)
    t = tables["timesteps"][i]
    uncond = jnp.broadcast_to(uncond, context.shape)
    out = unet.apply({"params": params},
                     jnp.concatenate([model_in, model_in]).astype(dtype),
                     jnp.concatenate([t, t]),
                     encoder_hidden_states=jnp.concatenate([uncond, context]).astype(dtype)).sample
    out_uncond, out_text = jnp.split(out.astype(jnp.float32), 2)
    guided = out_uncond + guidance * (out_text - out_uncond)
    new = schedules.step(schedule, tables, guided, latents, i)
    return {"latents": new, "index": index + 1, "context": context}

  def decode(params, latents):
    image = vae.apply({"params": params}, (latents / scaling).astype(dtype), method=vae.decode).sample
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

  def quiet(fn):  # the pinned modules log a deprecation line per submodule at trace time
    @functools.wraps(fn)
    def traced(*args):
      with models_lib.quiet():
        return fn(*args)
    return traced

  return {
      "encode_text": jax.jit(quiet(encode_text)),
      "prepare": jax.jit(quiet(prepare), out_shardings=batch),
      "refill": jax.jit(refill, donate_argnums=(0,), out_shardings=state_sharding),
      "step": jax.jit(quiet(step), donate_argnums=(4,), out_shardings=state_sharding),
      "decode": jax.jit(quiet(decode), out_shardings=batch),
  }


_UNUSED_CONFIG_KEYS = ("architectures", "torch_dtype", "dtype", "transformers_version")


def _config(config):
  return {k: v for k, v in dict(config).items()
          if not k.startswith("_") and k not in _UNUSED_CONFIG_KEYS}


def _signature(sd, schedule, mesh):
  key = json.dumps([_config(sd.unet.config), _config(sd.vae.config),
                    _config(sd.text_encoder.config.to_dict()),
                    str(jnp.dtype(sd.dtype)), schedule.kind, schedule.num_steps,
                    schedule.prediction_type, schedule.clip_sample,
                    [d.id for d in mesh.devices.flat]], sort_keys=True, default=str)
  _SIGNATURES.setdefault(key, ((sd.unet, sd.vae, sd.text_encoder, sd.dtype), schedule, mesh))
  return key


class SpectrumSampler:
  """Runs img2img jobs of mixed strengths through one packed, jitted denoising step."""

  def __init__(self, models, *, num_inference_steps=50, guidance_scale=10.0, negative_prompt="",
               scheduler="ddim", slots=16, mesh=None, dtype=None):
    if dtype is not None and jnp.dtype(models_lib._dtype(dtype)) != jnp.dtype(models.dtype):  # pylint: disable=protected-access
      raise ValueError(f"sampler dtype {dtype!r} differs from the loaded models' "
                       f"{jnp.dtype(models.dtype).name}; load them with load_sd(model, dtype)")
    if slots < 1:
      raise ValueError(f"diffusion.slots must be >= 1, got {slots}")
    self.models = models
    self.schedule = schedules.make_schedule(models.scheduler_config, num_inference_steps, scheduler)
    self.mesh = _local_mesh(mesh)
    self.slots = parallel.pad_to_multiple(slots, parallel.data_size(self.mesh))
    self.guidance_scale = float(guidance_scale)
    self._fns = _compiled(_signature(models, self.schedule, self.mesh))
    self._batch = NamedSharding(self.mesh, P(parallel.DATA_AXIS))
    put = functools.partial(parallel.put_replicated, mesh=self.mesh)
    self._params = {k: put(v) for k, v in models.params.items()}
    self._tables = put(self.schedule.tables())
    self._guidance = put(jnp.float32(self.guidance_scale))
    self._text_cache = {}
    self._uncond = put(jnp.asarray(self.text_embeddings([negative_prompt])[0]))
    self.stats = collections.Counter()

  # ------------------------------------------------------------------ text
  def text_embeddings(self, prompts):
    """Returns float32 [len(prompts), L, D] CLIP text embeddings, cached per distinct prompt."""
    todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
    tok = self.models.tokenizer
    for start in range(0, len(todo), TEXT_BATCH):
      chunk = todo[start:start + TEXT_BATCH]
      ids = tok(chunk + [""] * (TEXT_BATCH - len(chunk)), padding="max_length",
                max_length=tok.model_max_length, truncation=True, return_tensors="np").input_ids
      out = np.asarray(self._fns["encode_text"](self._params["text_encoder"], ids))
      self._text_cache.update(zip(chunk, out))
    return np.stack([self._text_cache[p] for p in prompts])

  # ------------------------------------------------------------------ jobs
  def _check(self, job, size):
    image = np.asarray(job.image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
      raise ValueError(f"job {job.job_id!r}: image must be uint8 HxWx3, got "
                       f"{image.dtype} {image.shape}")
    if size is not None and image.shape[:2] != size:
      raise ValueError(f"job {job.job_id!r}: image size {image.shape[:2]} differs from the "
                       f"{size} of earlier jobs; one run() call takes one resolution")
    m = self.models.size_multiple
    if image.shape[0] % m or image.shape[1] % m:
      raise ValueError(f"job {job.job_id!r}: image size {image.shape[:2]} is not a multiple of "
                       f"{m} (the VAE downsampling of this checkpoint)")
    try:
      return schedules.start_index(self.schedule.num_steps, job.strength)
    except ValueError as e:
      raise ValueError(f"job {job.job_id!r}: {e}") from None

  def _put(self, x):
    return jax.device_put(x, self._batch)

  def _prepare(self, jobs, starts):
    """Returns host float32 starting latents [len(jobs), C, h, w] (VAE sample + img2img noise)."""
    n = len(jobs)
    pixels = np.stack([to_pixels(j.image) for j in jobs])
    key_data = np.stack([np.asarray(jax.random.key_data(jnp.stack(job_keys(j)))) for j in jobs])
    index = np.asarray(starts, np.int32)
    pad = self.slots - n
    pixels = np.concatenate([pixels, np.repeat(pixels[:1], pad, 0)])
    key_data = np.concatenate([key_data, np.repeat(key_data[:1], pad, 0)])
    index = np.concatenate([index, np.repeat(index[:1], pad, 0)])
    out = self._fns["prepare"](self._params["vae"], self._tables, self._put(pixels),
                               self._put(key_data), self._put(index))
    return np.asarray(out)[:n]

  def _decode(self, latents):
    n = len(latents)
    batch = np.concatenate([latents, np.zeros((self.slots - n,) + latents.shape[1:], np.float32)])
    return np.asarray(self._fns["decode"](self._params["vae"], self._put(batch)))[:n]

  # ------------------------------------------------------------------ loop
  def generate(self, jobs):
    """Yields (job, float32 [H, W, 3] image in [0, 1]) as jobs finish (not in input order)."""
    jobs = iter(jobs)
    s, n_steps = self.slots, self.schedule.num_steps
    ready = collections.deque()  # (job, start latent, start index)
    slot_job, slot_index = [None] * s, np.zeros(s, np.int64)
    done, size, exhausted, state = [], None, False, None
    while True:
      free = [j for j in range(s) if slot_job[j] is None]
      while len(ready) < len(free) and not exhausted:
        chunk = list(itertools.islice(jobs, s))
        if not chunk:
          exhausted = True
          break
        starts = []
        for job in chunk:
          starts.append(self._check(job, size))
          size = job.image.shape[:2]
        ready.extend(zip(chunk, self._prepare(chunk, starts), starts))
      if state is None and ready:
        state = self._empty_state(ready[0][1].shape)
      if free and ready:
        state = self._refill(state, free, ready, slot_job, slot_index)
      active = [j for j in range(s) if slot_job[j] is not None]
      if not active:
        break
      state = self._fns["step"](self._params["unet"], self._tables, self._uncond,
                                self._guidance, state)
      self.stats["steps"] += 1
      self.stats["slot_evals"] += s
      self.stats["useful_evals"] += len(active)
      slot_index[active] += 1
      finished = [j for j in active if slot_index[j] == n_steps]
      if finished:
        latents = np.asarray(state["latents"])
        for j in finished:
          done.append((slot_job[j], latents[j]))
          slot_job[j] = None
      while len(done) >= s:
        yield from self._finish(done[:s])
        done = done[s:]
    if done:
      yield from self._finish(done)

  def _finish(self, batch):
    images = self._decode(np.stack([lat for _, lat in batch]))
    self.stats["images"] += len(batch)
    return [(job, image) for (job, _), image in zip(batch, images)]

  def run(self, jobs):
    """Yields (job, uint8 [H, W, 3] image) for every job, in completion order."""
    for job, image in self.generate(jobs):
      yield job, to_uint8(image)

  def _empty_state(self, latent_shape):
    s = self.slots
    context_shape = (s,) + self._uncond.shape
    return {"latents": self._put(np.zeros((s,) + latent_shape, np.float32)),
            "index": self._put(np.zeros(s, np.int32)),
            "context": self._put(np.zeros(context_shape, np.float32))}

  def _refill(self, state, free, ready, slot_job, slot_index):
    s = self.slots
    latents = np.zeros((s,) + ready[0][1].shape, np.float32)
    index = np.zeros(s, np.int32)
    mask = np.zeros(s, bool)
    placed = []
    for j in free:
      if not ready:
        break
      job, lat, start = ready.popleft()
      latents[j], index[j], mask[j] = lat, start, True
      slot_job[j], slot_index[j] = job, start
      placed.append((j, job.prompt))
    context = np.zeros((s,) + self._uncond.shape, np.float32)
    embeddings = self.text_embeddings([p for _, p in placed])
    for (j, _), emb in zip(placed, embeddings):
      context[j] = emb
    return self._fns["refill"](state, self._put(latents), self._put(index), self._put(context),
                               self._put(mask))

