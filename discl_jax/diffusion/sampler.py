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

SDXL checkpoints (base and refiner) follow diffusers' PyTorch
`StableDiffusionXLImg2ImgPipeline` (docs/design.md §5): each slot also carries the
pooled text embedding, the run carries the micro-conditioning `time_ids` of its
image size, and the VAE runs in its own dtype (float32 with `force_upcast`).
"""

import collections
import dataclasses
import functools
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from discl_jax import parallel
from discl_jax import seeding
from discl_jax.diffusion import attention as attention_lib
from discl_jax.diffusion import models as models_lib
from discl_jax.diffusion import schedules
from discl_jax.diffusion import slot_memory

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
  unet, vae, encoders, dtype, vae_dtype, xl = modules
  scaling = float(vae.config.scaling_factor)
  cond_keys = ("context", "pooled") if xl else ("context",)
  state_sharding = dict.fromkeys(("latents", "index") + cond_keys, batch)

  def encode_text(params, ids):
    """Returns {context, pooled}: SD the last hidden state, SDXL hidden_states[-2] (§5.2)."""
    if not xl:
      (name, encoder), = encoders
      out = encoder.apply({"params": params[name]}, ids[name])
      return {"context": out.last_hidden_state.astype(jnp.float32)}
    hidden = []
    for name, encoder in encoders:
      out = encoder.apply({"params": params[name]}, ids[name])
      hidden.append(out.hidden_states[-2])
    return {"context": jnp.concatenate(hidden, axis=-1).astype(jnp.float32),
            "pooled": out.text_embeds.astype(jnp.float32)}

  def in_model_dtype(latents):
    # SDXL keeps its latents in the model dtype between steps, as the reference in fp16 (§5.7).
    if xl and jnp.dtype(dtype) != jnp.float32:
      return latents.astype(dtype).astype(jnp.float32)
    return latents

  def prepare(params, tables, pixels, key_data, index):
    keys = jax.random.wrap_key_data(key_data)  # [E, 2] keys: (vae, noise) per job
    posterior = vae.apply({"params": params}, pixels.astype(vae_dtype),
                          method=vae.encode).latent_dist
    mean = posterior.mean.astype(jnp.float32)
    std = posterior.std.astype(jnp.float32)
    # Both draws of every job in one flat vmapped normal, reshaped: the same numbers as a
    # normal of each shape, and XLA:CPU compiles it in 1 s instead of 7 (tiny geometry).
    size = math.prod(mean.shape[1:])
    draws = jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (size,), jnp.float32)))(keys)
    eps = draws[:, 0].reshape(mean.shape)
    latents = (mean + std * eps).transpose(0, 3, 1, 2) * scaling
    noise = draws[:, 1].reshape(latents.shape)
    return in_model_dtype(schedules.add_noise(schedule, tables, latents, noise, index))

  def refill(state, latents, index, cond, mask):
    def put(new, old):
      return jnp.where(mask.reshape(mask.shape + (1,) * (old.ndim - 1)), new, old)
    new = {"latents": put(latents, state["latents"]), "index": put(index, state["index"])}
    new.update({k: put(cond[k], state[k]) for k in cond_keys})
    return new

  def step(params, tables, uncond, guidance, time_ids, state):
    latents, index, context = state["latents"], state["index"], state["context"]
    i = jnp.minimum(index, schedule.num_steps - 1)
    model_in = schedules.scale_model_input(schedule, tables, latents, i)
    t = tables["timesteps"][i]
    negative = jnp.broadcast_to(uncond["context"], context.shape)
    added = None
    if xl:  # CFG batch order [negative, prompt] (§5.6)
      pooled = state["pooled"]
      tile = lambda x: jnp.broadcast_to(x, (len(pooled),) + x.shape)
      added = {"text_embeds": jnp.concatenate([tile(uncond["pooled"]), pooled]).astype(dtype),
               "time_ids": jnp.concatenate([tile(time_ids[0]), tile(time_ids[1])])}
    out = unet.apply({"params": params},
                     jnp.concatenate([model_in, model_in]).astype(dtype),
                     jnp.concatenate([t, t]),
                     encoder_hidden_states=jnp.concatenate([negative, context]).astype(dtype),
                     added_cond_kwargs=added).sample
    out_uncond, out_text = jnp.split(out.astype(jnp.float32), 2)
    guided = out_uncond + guidance * (out_text - out_uncond)
    new = in_model_dtype(schedules.step(schedule, tables, guided, latents, i))
    return dict(state, latents=new, index=index + 1)

  def steps(params, tables, uncond, guidance, time_ids, state, count):
    """`count` denoising steps in one dispatch (a loop on the device, no host round trip)."""
    return jax.lax.fori_loop(
        0, count, lambda _, s: step(params, tables, uncond, guidance, time_ids, s), state)

  def decode(params, latents):
    image = vae.apply({"params": params}, (latents / scaling).astype(vae_dtype),
                      method=vae.decode).sample
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

  return {
      "encode_text": jax.jit(encode_text),
      "prepare": jax.jit(prepare, out_shardings=batch),
      "refill": jax.jit(refill, donate_argnums=(0,), out_shardings=state_sharding),
      "step": jax.jit(step, donate_argnums=(5,), out_shardings=state_sharding),
      "steps": jax.jit(steps, donate_argnums=(5,), out_shardings=state_sharding),
      "decode": jax.jit(decode, out_shardings=batch),
  }


_UNUSED_CONFIG_KEYS = ("architectures", "torch_dtype", "dtype", "transformers_version")


def _config(config):
  return {k: v for k, v in dict(config).items()
          if not k.startswith("_") and k not in _UNUSED_CONFIG_KEYS}


def _encoders(sd):
  """Returns ((params name, text encoder), ...) in the order their embeddings are concatenated."""
  return tuple((name, getattr(sd, name)) for name in ("text_encoder", "text_encoder_2")
               if getattr(sd, name) is not None)


def _signature(sd, schedule, mesh):
  encoders = _encoders(sd)
  key = json.dumps([_config(sd.unet.config), sd.unet.attention, _config(sd.vae.config),
                    [dataclasses.asdict(e.config) for _, e in encoders], sd.family,
                    str(jnp.dtype(sd.dtype)), str(jnp.dtype(sd.vae_dtype)),
                    schedule.kind, schedule.num_steps,
                    schedule.prediction_type, schedule.clip_sample,
                    [d.id for d in mesh.devices.flat]], sort_keys=True, default=str)
  modules = (sd.unet, sd.vae, encoders, sd.dtype, sd.vae_dtype, sd.is_sdxl)
  _SIGNATURES.setdefault(key, (modules, schedule, mesh))
  return key


def time_ids(sd, height, width, aesthetic_score=6.0, negative_aesthetic_score=2.5):
  """Returns SDXL's float32 micro-conditioning [2, n] (negative, prompt) for an H x W image.

  Refiner (`requires_aesthetics_score`): (H, W, 0, 0, aesthetic); base:
  (H, W, 0, 0, H, W), docs/design.md §5.6. ValueError when the UNet's add-embedding
  expects another length.
  """
  if sd.requires_aesthetics_score:
    ids = [[height, width, 0, 0, negative_aesthetic_score], [height, width, 0, 0, aesthetic_score]]
  else:
    ids = [[height, width, 0, 0, height, width]] * 2
  cfg = sd.unet.config
  passed = cfg.addition_time_embed_dim * len(ids[0]) + sd.text_encoder_2.config.projection_dim
  expected = cfg.projection_class_embeddings_input_dim
  if passed != expected:
    raise ValueError(
        f"the UNet's add-embedding takes {expected} inputs but {len(ids[0])} time ids make "
        f"{passed}: model_index.json's requires_aesthetics_score="
        f"{sd.requires_aesthetics_score} does not fit this UNet")
  return np.asarray(ids, np.float32)


# diffusion.slots=0 (auto): slots per device. CPU: with blocked attention the tiny
# geometry's cost per slot is flat from 8 to 32 slots, and fewer slots drain sooner
# (bench_generate.py, docs/benchmarks.md). Accelerators: the largest count up to
# MAX_AUTO_SLOTS_PER_DEVICE per device whose step fits the device's memory.
AUTO_SLOTS_PER_DEVICE = {"cpu": 8}
MAX_AUTO_SLOTS_PER_DEVICE = 64
DEVICE_MEMORY_FRACTION = 0.8  # of bytes_limit, leaving room for the VAE and text encoder


def _device_memory(mesh):
  """Returns the smallest bytes_limit among `mesh`'s devices, or 0 where unknown (CPU)."""
  limits = []
  for device in mesh.devices.flat:
    stats = device.memory_stats() if device.platform != "cpu" else None
    limits.append((stats or {}).get("bytes_limit", 0))
  return min(limits) if limits and all(limits) else 0


class SpectrumSampler:
  """Runs img2img jobs of mixed strengths through one packed, jitted denoising step."""

  def __init__(self, models, *, num_inference_steps=50, guidance_scale=10.0, negative_prompt="",
               scheduler="ddim", slots=16, mesh=None, dtype=None, aesthetic_score=6.0,
               negative_aesthetic_score=2.5, vae_batch=0, attention="auto"):
    if dtype is not None and jnp.dtype(models_lib._dtype(dtype)) != jnp.dtype(models.dtype):  # pylint: disable=protected-access
      raise ValueError(f"sampler dtype {dtype!r} differs from the loaded models' "
                       f"{jnp.dtype(models.dtype).name}; load them with load_sd(model, dtype)")
    if slots < 0:
      raise ValueError(f"diffusion.slots must be >= 0 (0: auto), got {slots}")
    if vae_batch < 0:
      raise ValueError(f"diffusion.vae_batch must be >= 0 (0: the slot count), got {vae_batch}")
    if attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"diffusion.attention must be one of {attention_lib.IMPLEMENTATIONS}, "
                       f"got {attention!r}")
    models = dataclasses.replace(models, **{  # every network's attention: diffusion.attention
        name: getattr(models, name).clone(attention=attention)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if getattr(models, name) is not None})
    self.models = models
    self.schedule = schedules.make_schedule(models.scheduler_config, num_inference_steps, scheduler)
    self.mesh = _local_mesh(mesh)
    self.auto_slots = slots == 0
    per_device = AUTO_SLOTS_PER_DEVICE.get(jax.default_backend(), MAX_AUTO_SLOTS_PER_DEVICE)
    self.slots = self._round_slots(slots or per_device * parallel.data_size(self.mesh))
    self.vae_batch = self._round_slots(vae_batch or self.slots)
    self.guidance_scale = float(guidance_scale)
    self._fns = _compiled(_signature(models, self.schedule, self.mesh))
    self._batch = NamedSharding(self.mesh, P(parallel.DATA_AXIS))
    put = functools.partial(parallel.put_replicated, mesh=self.mesh)
    self._params = {k: put(v) for k, v in models.params.items()}
    self._tables = put(self.schedule.tables())
    self._guidance = put(jnp.float32(self.guidance_scale))
    self.aesthetic_scores = (float(aesthetic_score), float(negative_aesthetic_score))
    self._text_cache = {}
    self._uncond = put(self._negative(negative_prompt))
    self._time_ids = {}
    self.stats = collections.Counter()

  # ------------------------------------------------------------------ text
  def _negative(self, negative_prompt):
    """Returns the negative branch's {context, pooled} (docs/design.md §5.2).

    An empty `negative_prompt` is diffusers' `negative_prompt=None`: SDXL uses
    zeros when model_index.json sets `force_zeros_for_empty_prompt` (the
    base), else the encoded "" (the refiner, and SD 1.x/2.x).
    """
    cond = self.text_conditioning([negative_prompt])
    if self.models.is_sdxl and not negative_prompt and self.models.force_zeros_for_empty_prompt:
      cond = {k: np.zeros_like(v) for k, v in cond.items()}
    return {k: jnp.asarray(v[0]) for k, v in cond.items()}

  def text_conditioning(self, prompts):
    """Returns {context: float32 [N, L, D], pooled (SDXL): [N, P]} for `prompts`, cached per prompt."""
    todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
    tokenizers = {"text_encoder": self.models.tokenizer, "text_encoder_2": self.models.tokenizer_2}
    for start in range(0, len(todo), TEXT_BATCH):
      chunk = todo[start:start + TEXT_BATCH]
      padded = chunk + [""] * (TEXT_BATCH - len(chunk))
      ids = {}
      for name, _ in _encoders(self.models):
        tok = tokenizers[name]
        ids[name] = tok(padded, padding="max_length", max_length=tok.model_max_length,
                        truncation=True, return_tensors="np").input_ids
      params = {name: self._params[name] for name in ids}
      out = jax.tree.map(np.asarray, self._fns["encode_text"](params, ids))
      for i, prompt in enumerate(chunk):
        self._text_cache[prompt] = {k: v[i] for k, v in out.items()}
    return {k: np.stack([self._text_cache[p][k] for p in prompts])
            for k in self._text_cache[prompts[0]]}

  def text_embeddings(self, prompts):
    """Returns float32 [len(prompts), L, D] prompt embeddings (what cross-attention sees)."""
    return self.text_conditioning(prompts)["context"]

  def _time_ids_for(self, size):
    """Returns the replicated SDXL time ids of image `size` (a dummy for SD 1.x/2.x)."""
    if size not in self._time_ids:
      ids = (time_ids(self.models, *size, *self.aesthetic_scores) if self.models.is_sdxl
             else np.zeros((2, 1), np.float32))
      self._time_ids[size] = parallel.put_replicated(ids, mesh=self.mesh)
    return self._time_ids[size]

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

  def _round_slots(self, n):
    return parallel.pad_to_multiple(n, parallel.data_size(self.mesh))

  def _first_state(self, latent_shape, image_size):
    """Returns the empty slot state; with slots=0 on an accelerator, first fits the slot count.

    Auto on GPU/TPU: the largest power of two up to MAX_AUTO_SLOTS_PER_DEVICE per device
    whose compiled step loop fits DEVICE_MEMORY_FRACTION of the device's memory
    (XLA memory analysis; the persistent compilation cache then serves the
    loop's real compile at the chosen count); on CPU the measured AUTO_SLOTS_PER_DEVICE.
    """
    limit = _device_memory(self.mesh)
    if self.auto_slots and limit:
      devices = parallel.data_size(self.mesh)
      while self.slots > devices:
        compiled = self.lower_step(latent_shape, image_size, loop=True).compile()
        needed = slot_memory.footprint(compiled.memory_analysis())
        if needed <= DEVICE_MEMORY_FRACTION * limit:
          break
        self.slots = self._round_slots(self.slots // 2)
      self.vae_batch = min(self.vae_batch, self.slots)
    return self._empty_state(latent_shape)

  def _put(self, x):
    return jax.device_put(x, self._batch)

  def _prepare(self, jobs, starts):
    """Returns host float32 starting latents [len(jobs), C, h, w] (VAE sample + img2img noise)."""
    n = len(jobs)
    pixels = np.stack([to_pixels(j.image) for j in jobs])
    key_data = np.stack([np.asarray(jax.random.key_data(jnp.stack(job_keys(j)))) for j in jobs])
    index = np.asarray(starts, np.int32)
    pad = self.vae_batch - n
    pixels = np.concatenate([pixels, np.repeat(pixels[:1], pad, 0)])
    key_data = np.concatenate([key_data, np.repeat(key_data[:1], pad, 0)])
    index = np.concatenate([index, np.repeat(index[:1], pad, 0)])
    out = self._fns["prepare"](self._params["vae"], self._tables, self._put(pixels),
                               self._put(key_data), self._put(index))
    return np.asarray(out)[:n]

  def _decode(self, latents):
    n = len(latents)
    batch = np.concatenate([latents, np.zeros((self.vae_batch - n,) + latents.shape[1:], np.float32)])
    return np.asarray(self._fns["decode"](self._params["vae"], self._put(batch)))[:n]

  # ------------------------------------------------------------------ loop
  def generate(self, jobs):
    """Yields (job, float32 [H, W, 3] image in [0, 1]) as jobs finish (not in input order).

    Between refills the step runs on the device for as many steps as the
    nearest finish needs (one dispatch, no host round trip); the queue is
    encoded and the finished jobs decoded `vae_batch` at a time.
    """
    jobs = iter(jobs)
    ready = collections.deque()  # (job, start latent, start index)
    size = self._enqueue(jobs, ready, None)
    if size is None:
      return
    state = self._first_state(ready[0][1].shape, size)
    slot_job, slot_index = [None] * self.slots, np.zeros(self.slots, np.int64)
    done, exhausted = [], False
    while True:
      free = [j for j, job in enumerate(slot_job) if job is None]
      while len(ready) < len(free) and not exhausted:
        next_size = self._enqueue(jobs, ready, size)
        exhausted = next_size is None
        size = size if exhausted else next_size
      if free and ready:
        state = self._refill(state, free, ready, slot_job, slot_index)
      active = [j for j, job in enumerate(slot_job) if job is not None]
      if not active:
        break
      state = self._advance(state, size, slot_index, active)
      latents = np.asarray(state["latents"])
      for j in active:
        if slot_index[j] == self.schedule.num_steps:
          done.append((slot_job[j], latents[j]))
          slot_job[j] = None
      while len(done) >= self.vae_batch:
        yield from self._finish(done[:self.vae_batch])
        done = done[self.vae_batch:]
    if done:
      yield from self._finish(done)

  def _enqueue(self, jobs, ready, size):
    """Prepares the next `vae_batch` jobs onto `ready`; returns their size (None: no job left)."""
    chunk = list(itertools.islice(jobs, self.vae_batch))
    if not chunk:
      return None
    starts = []
    for job in chunk:
      starts.append(self._check(job, size))
      size = job.image.shape[:2]
    ready.extend(zip(chunk, self._prepare(chunk, starts), starts))
    return size

  def _advance(self, state, size, slot_index, active):
    """Returns the slot state run up to the nearest finish among `active` (one dispatch);
    advances `slot_index`."""
    count = int(self.schedule.num_steps - slot_index[active].max())
    state = self._fns["steps"](self._params["unet"], self._tables, self._uncond, self._guidance,
                               self._time_ids_for(size), state, np.int32(count))
    self.stats["steps"] += count
    self.stats["dispatches"] += 1
    self.stats["slot_evals"] += self.slots * count
    self.stats["useful_evals"] += len(active) * count
    slot_index[active] += count
    return state

  def _finish(self, batch):
    images = self._decode(np.stack([lat for _, lat in batch]))
    self.stats["images"] += len(batch)
    return [(job, image) for (job, _), image in zip(batch, images)]

  def run(self, jobs):
    """Yields (job, uint8 [H, W, 3] image) for every job, in completion order."""
    for job, image in self.generate(jobs):
      yield job, to_uint8(image)

  def step_inputs(self, latent_shape, image_size=None):
    """Returns the arguments of one denoising step at `latent_shape` (C, h, w), its slots empty.

    `image_size` (H, W) sets SDXL's time ids (default: latents x 8). The last
    argument, the slot state, is donated: pass a step's output back in.
    """
    size = image_size or (latent_shape[1] * 8, latent_shape[2] * 8)
    return (self._params["unet"], self._tables, self._uncond, self._guidance,
            self._time_ids_for(tuple(size)), self._empty_state(latent_shape))

  def lower_step(self, latent_shape, image_size=None, loop=False):
    """Returns the `jax.stages.Lowered` denoising step of this sampler's slots at `latent_shape`.

    For cost and memory analysis (`.compile().cost_analysis()` / `.memory_analysis()`)
    and timing (call the compiled step on `step_inputs`); `loop` lowers the
    multi-step loop `generate` runs instead of one step.
    """
    args = self.step_inputs(latent_shape, image_size)
    if loop:
      return self._fns["steps"].lower(*args, np.int32(1))
    return self._fns["step"].lower(*args)

  def _empty_state(self, latent_shape):
    s = self.slots
    state = {"latents": self._put(np.zeros((s,) + latent_shape, np.float32)),
             "index": self._put(np.zeros(s, np.int32))}
    state.update({k: self._put(np.zeros((s,) + v.shape, np.float32))
                  for k, v in self._uncond.items()})
    return state

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
    cond = {k: np.zeros((s,) + v.shape, np.float32) for k, v in self._uncond.items()}
    embeddings = self.text_conditioning([p for _, p in placed])
    for i, (j, _) in enumerate(placed):
      for k in cond:
        cond[k][j] = embeddings[k][i]
    return self._fns["refill"](state, self._put(latents), self._put(index),
                               {k: self._put(v) for k, v in cond.items()}, self._put(mask))

