"""Timestep spacing and the per-slot DDIM / Euler-discrete updates, vectorised over slots.

Host side (numpy): the schedule's timesteps and per-step tables, computed as
diffusers' `DDIMScheduler` / `EulerDiscreteScheduler` do (same spacing rules,
same `alphas_cumprod`), and img2img's strength rule. Device side (jnp): the
updates with every coefficient gathered per slot from the slot's own step index,
so slots at different timesteps share one jitted step (diffusers'
`FlaxDDIMScheduler.step` takes one scalar timestep for the whole batch).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

KINDS = ("ddim", "euler")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# EulerDiscreteScheduler options whose other values change the sigmas or the update.
_EULER_DEFAULTS = {"interpolation_type": "linear", "use_karras_sigmas": False,
                   "use_exponential_sigmas": False, "use_beta_sigmas": False,
                   "final_sigmas_type": "zero", "timestep_type": "discrete",
                   "rescale_betas_zero_snr": False}


def alphas_cumprod(config):
  """Returns the float32 cumulative alpha products of scheduler config dict `config`."""
  n = int(config.get("num_train_timesteps", 1000))
  start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
  schedule = config.get("beta_schedule", "linear")
  if config.get("trained_betas") is not None:
    betas = np.asarray(config["trained_betas"], np.float32)
  elif schedule == "linear":
    betas = np.linspace(start, end, n, dtype=np.float32)
  elif schedule == "scaled_linear":
    betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float32) ** 2
  else:
    raise ValueError(f"scheduler beta_schedule {schedule!r} is not supported "
                     "(linear | scaled_linear | trained_betas)")
  return np.cumprod(1.0 - betas, dtype=np.float32)


def timesteps(config, num_steps, kind):
  """Returns the descending timesteps of a `num_steps` schedule as float64 (diffusers' spacing)."""
  n = int(config.get("num_train_timesteps", 1000))
  spacing = config.get("timestep_spacing", "leading")
  offset = int(config.get("steps_offset", 0))
  if not 1 <= num_steps <= n:
    raise ValueError(f"num_inference_steps must be in [1, {n}], got {num_steps}")
  if spacing == "leading":
    ts = (np.arange(num_steps) * (n // num_steps)).round()[::-1] + offset
  elif spacing == "trailing":
    ts = np.round(np.arange(n, 0, -n / num_steps)) - 1
  elif spacing == "linspace":
    ts = np.linspace(0, n - 1, num_steps)[::-1]
    if kind == "ddim":
      ts = ts.round()
  else:
    raise ValueError(f"scheduler timestep_spacing {spacing!r} is not supported "
                     "(leading | trailing | linspace)")
  return np.asarray(ts, np.float64).copy()


def start_index(num_steps, strength):
  """Returns the first schedule index img2img runs for `strength` (int(steps * strength) steps).

  Raises ValueError naming the strength when it is outside (0, 1] or runs no step.
  """
  if not (isinstance(strength, (int, float, np.floating)) and 0.0 < float(strength) <= 1.0):
    raise ValueError(f"strength must be in (0, 1], got {strength!r}")
  init = min(int(num_steps * float(strength)), num_steps)
  if init < 1:
    raise ValueError(f"strength {strength!r} with num_inference_steps={num_steps} runs "
                     f"int({num_steps} * {strength}) = 0 denoising steps; raise either")
  return num_steps - init


@dataclasses.dataclass(frozen=True)
class Schedule:
  """One sampler schedule: timesteps and per-step coefficient tables (host numpy)."""
  kind: str
  num_steps: int
  prediction_type: str
  timesteps: np.ndarray    # [n] float32, what the UNet sees
  alpha_t: np.ndarray      # [n] ddim: alphas_cumprod at t
  alpha_prev: np.ndarray   # [n] ddim: alphas_cumprod at the previous timestep (or the final one)
  sigma: np.ndarray        # [n + 1] euler: sigma at each step, then 0
  clip_sample: float       # ddim: clip x0 to +-this (0: off)

  def tables(self):
    """Returns the per-step tables as a dict of jnp arrays (the step function's arguments)."""
    return {"timesteps": jnp.asarray(self.timesteps), "alpha_t": jnp.asarray(self.alpha_t),
            "alpha_prev": jnp.asarray(self.alpha_prev), "sigma": jnp.asarray(self.sigma)}


def make_schedule(config, num_steps, kind):
  """Returns the Schedule of scheduler config dict `config` for `num_steps` steps of `kind`."""
  if kind not in KINDS:
    raise ValueError(f"diffusion.scheduler must be one of {KINDS}, got {kind!r}")
  prediction = config.get("prediction_type", "epsilon")
  if prediction not in PREDICTION_TYPES:
    raise ValueError(f"scheduler prediction_type {prediction!r} is not one of {PREDICTION_TYPES}")
  if config.get("thresholding"):
    raise ValueError("scheduler thresholding=True is not supported")
  for key, default in _EULER_DEFAULTS.items():
    if kind == "euler" and config.get(key, default) not in (default, None):
      raise ValueError(f"scheduler {key}={config[key]!r} is not supported by the Euler "
                       f"update (only {default!r})")
  acp = alphas_cumprod(config)
  n_train = len(acp)
  ts = timesteps(config, num_steps, kind)
  zeros = np.zeros(num_steps, np.float32)
  if kind == "ddim":
    idx = ts.astype(np.int64)
    prev = idx - n_train // num_steps
    final = np.float32(1.0) if config.get("set_alpha_to_one", True) else acp[0]
    alpha_t = acp[idx]
    alpha_prev = np.where(prev >= 0, acp[np.clip(prev, 0, None)], final).astype(np.float32)
    sigma = np.zeros(num_steps + 1, np.float32)
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample") else 0.0
  else:
    all_sigmas = ((1 - acp) / acp) ** 0.5
    sigma = np.concatenate([np.interp(ts, np.arange(n_train), all_sigmas), [0.0]])
    sigma = sigma.astype(np.float32)
    alpha_t = alpha_prev = zeros
    clip = 0.0
  return Schedule(kind=kind, num_steps=num_steps, prediction_type=prediction,
                  timesteps=ts.astype(np.float32), alpha_t=alpha_t.astype(np.float32),
                  alpha_prev=alpha_prev, sigma=sigma, clip_sample=clip)


def _per_slot(values, like):
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def add_noise(schedule, tables, latents, noise, index):
  """Returns img2img's starting latents: `latents` noised to each slot's start `index` [S]."""
  if schedule.kind == "ddim":
    alpha = _per_slot(tables["alpha_t"][index], latents)
    return alpha ** 0.5 * latents + (1 - alpha) ** 0.5 * noise
  return latents + noise * _per_slot(tables["sigma"][index], latents)


def scale_model_input(schedule, tables, sample, index):
  """Returns the UNet input for `sample` at step `index` [S] (Euler divides by sqrt(sigma^2+1))."""
  if schedule.kind == "ddim":
    return sample
  sigma = _per_slot(tables["sigma"][index], sample)
  return sample / ((sigma ** 2 + 1) ** 0.5)


def step(schedule, tables, model_output, sample, index):
  """Returns the latents one step later for each slot at its own step `index` [S] (eta = 0)."""
  if schedule.kind == "ddim":
    return _ddim(schedule, tables, model_output, sample, index)
  return _euler(schedule, tables, model_output, sample, index)


def _ddim(schedule, tables, model_output, sample, index):
  alpha_t = _per_slot(tables["alpha_t"][index], sample)
  alpha_prev = _per_slot(tables["alpha_prev"][index], sample)
  beta_t = 1 - alpha_t
  if schedule.prediction_type == "epsilon":
    x0 = (sample - beta_t ** 0.5 * model_output) / alpha_t ** 0.5
    eps = model_output
  elif schedule.prediction_type == "sample":
    x0 = model_output
    eps = (sample - alpha_t ** 0.5 * x0) / beta_t ** 0.5
  else:
    x0 = alpha_t ** 0.5 * sample - beta_t ** 0.5 * model_output
    eps = alpha_t ** 0.5 * model_output + beta_t ** 0.5 * sample
  if schedule.clip_sample:
    x0 = jnp.clip(x0, -schedule.clip_sample, schedule.clip_sample)
  return alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


def _euler(schedule, tables, model_output, sample, index):
  sigma = _per_slot(tables["sigma"][index], sample)
  sigma_next = _per_slot(tables["sigma"][index + 1], sample)
  if schedule.prediction_type == "epsilon":
    x0 = sample - sigma * model_output
  elif schedule.prediction_type == "v_prediction":
    x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
  else:
    x0 = model_output
  derivative = (sample - x0) / sigma
  return sample + derivative * (sigma_next - sigma)
