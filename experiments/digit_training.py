"""Training a small latent diffusion model (our Flax modules, discl_jax/models) from scratch.

Two stages, each a pure jitted step over a plain-dict train state
{"params", "opt_state", "step"} (+ "ema" for the UNet):
  1. the VAE (`models.vae.AutoencoderKL`): reconstruction MSE + a small KL to N(0, I);
  2. the UNet (`models.unet.UNet`): epsilon prediction on VAE latents
     noised by the scheduler's `alphas_cumprod`, conditioned on frozen text
     encoder hidden states looked up from a precomputed caption table (row 0 is
     the empty caption used for classifier-free-guidance dropout).
Captions are "{template}" strings over class names ("a photo of the digit
seven") so one class has several phrasings.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

CAPTION_TEMPLATES = (
    "a photo of the digit {c}",
    "a handwritten digit {c}",
    "a photo of a {c}",
    "the digit {c}",
    "a digit {c}",
    "a photo of the number {c}",
    "a handwritten {c}",
    "{c}",
    "a photo of the digit {n}",
    "the number {n}",
)


def caption_table(class_names, templates=CAPTION_TEMPLATES):
  """Returns (captions, labels): row 0 is "" (label -1), then every template x class.

  "{c}" is the class name, "{n}" the class index as a numeral.
  """
  captions, labels = [""], [-1]
  for template in templates:
    for label, name in enumerate(class_names):
      captions.append(template.format(c=name, n=label))
      labels.append(label)
  return captions, np.asarray(labels, np.int32)


def sample_captions(rng, labels, caption_labels, uncond_prob):
  """Returns int32 caption rows for `labels`: a random phrasing of each label, or row 0
  (the empty caption) with probability `uncond_prob`."""
  labels = np.asarray(labels)
  rows = np.empty(len(labels), np.int32)
  for i, label in enumerate(labels):
    choices = np.flatnonzero(caption_labels == label)
    rows[i] = choices[rng.integers(len(choices))]
  rows[rng.random(len(labels)) < uncond_prob] = 0
  return rows


def make_optimizer(learning_rate, total_steps, warmup_steps=100, weight_decay=0.0, clip_norm=1.0):
  """Returns AdamW with linear warmup + cosine decay (to 5 %) and global-norm clipping."""
  total_steps = max(int(total_steps), 2)
  warmup_steps = int(min(warmup_steps, total_steps // 2))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, total_steps, end_value=0.05 * learning_rate)
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(schedule, weight_decay=weight_decay))


def init_state(params, optimizer, ema=False):
  """Returns the train state dict of float32 `params` (with an EMA copy when `ema`)."""
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
  if ema:
    state["ema"] = jax.tree.map(jnp.copy, params)
  return state


def apply_gradients(optimizer, state, grads):
  """Returns `state` one optimizer step later (params, opt_state and step updated)."""
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  return dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
              step=state["step"] + 1)


def to_vae_pixels(images_uint8):
  """Returns uint8 [B, H, W, 3] images as float32 [B, 3, H, W] in [-1, 1] (the VAE's input)."""
  x = jnp.asarray(images_uint8, jnp.float32) * (2.0 / 255.0) - 1.0
  return x.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------- VAE

def vae_loss(vae, params, pixels, key, kl_weight):
  """Returns (loss, {"mse", "kl"}): reconstruction MSE of a posterior sample + kl_weight * KL.

  `pixels` is float32 [B, 3, H, W] in [-1, 1]; MSE and KL are per-element means.
  """
  posterior = vae.apply({"params": params}, pixels, method=vae.encode).latent_dist
  latents = posterior.sample(key)
  recon = vae.apply({"params": params}, latents, method=vae.decode).sample
  mse = jnp.mean(jnp.square(recon - pixels))
  kl = 0.5 * jnp.mean(jnp.square(posterior.mean) + posterior.var - 1.0 - posterior.logvar)
  return mse + kl_weight * kl, {"mse": mse, "kl": kl}


def make_vae_step(vae, optimizer, kl_weight):
  """Returns jitted step(state, images_uint8 [B,H,W,3], key) -> (state, metrics); donates state."""

  def step(state, images, key):
    loss_fn = functools.partial(vae_loss, vae, pixels=to_vae_pixels(images), key=key,
                                kl_weight=kl_weight)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    return apply_gradients(optimizer, state, grads), dict(aux, loss=loss)

  return jax.jit(step, donate_argnums=(0,))


def make_encoder(vae):
  """Returns jitted encode(params, images_uint8) -> (mean, std), float32 [B, C, h, w] each."""

  def encode(params, images):
    posterior = vae.apply({"params": params}, to_vae_pixels(images), method=vae.encode).latent_dist
    return posterior.mean.transpose(0, 3, 1, 2), posterior.std.transpose(0, 3, 1, 2)

  return jax.jit(encode)


def encode_all(encode, params, images_uint8, batch_size):
  """Returns numpy (mean, std) posterior of every image, encoded in fixed-size batches."""
  n = len(images_uint8)
  means, stds = [], []
  for start in range(0, n, batch_size):
    chunk = images_uint8[start:start + batch_size]
    count = len(chunk)
    if count < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - count, 0)])
    mean, std = encode(params, chunk)
    means.append(np.asarray(mean)[:count])
    stds.append(np.asarray(std)[:count])
  return np.concatenate(means), np.concatenate(stds)


def scaling_factor(means, stds):
  """Returns 1 / std of posterior samples: the VAE config's `scaling_factor` (SD's 0.18215)."""
  second_moment = np.mean(np.square(means)) + np.mean(np.square(stds))
  variance = second_moment - np.square(np.mean(means))
  return float(1.0 / np.sqrt(variance))


# ---------------------------------------------------------------- UNet

def denoise_loss(unet, params, batch, context_table, alphas_cumprod, key):
  """Returns the epsilon-prediction MSE of one batch.

  `batch`: "mean", "std" (scaled posterior, [B, C, h, w]) and "caption" (rows of
  `context_table` [N, L, D]). Latents are posterior samples noised to uniform
  timesteps with `alphas_cumprod`.
  """
  k_latent, k_time, k_noise = jax.random.split(key, 3)
  mean = batch["mean"]
  latents = mean + batch["std"] * jax.random.normal(k_latent, mean.shape, mean.dtype)
  t = jax.random.randint(k_time, (mean.shape[0],), 0, alphas_cumprod.shape[0])
  noise = jax.random.normal(k_noise, mean.shape, mean.dtype)
  alpha = alphas_cumprod[t].reshape(-1, 1, 1, 1)
  noisy = jnp.sqrt(alpha) * latents + jnp.sqrt(1.0 - alpha) * noise
  context = context_table[batch["caption"]]
  pred = unet.apply({"params": params}, noisy, t, context).sample
  return jnp.mean(jnp.square(pred - noise))


def ema_decay(step, max_decay):
  """Returns the EMA decay at `step`: min(max_decay, (1 + step) / (10 + step))."""
  step = step.astype(jnp.float32)
  return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def make_unet_step(unet, optimizer, max_ema_decay=0.999):
  """Returns jitted step(state, batch, context_table, alphas_cumprod, key) -> (state, metrics).

  Updates the params and their EMA; donates the state.
  """

  def step(state, batch, context_table, alphas_cumprod, key):
    loss_fn = functools.partial(denoise_loss, unet, batch=batch, context_table=context_table,
                                alphas_cumprod=alphas_cumprod, key=key)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    decay = ema_decay(state["step"], max_ema_decay)
    new = apply_gradients(optimizer, state, grads)
    new["ema"] = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], new["params"])
    return new, {"loss": loss}

  return jax.jit(step, donate_argnums=(0,))


def make_text_encoder(text_encoder):
  """Returns jitted encode(params, input_ids [N, L]) -> float32 last hidden states [N, L, D]."""
  return jax.jit(lambda params, ids: text_encoder.apply(
      {"params": params}, ids).last_hidden_state.astype(jnp.float32))
