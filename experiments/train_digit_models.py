r"""Trains the digit generator (a small latent diffusion model) and the digit CLIP.

  python experiments/train_digit_models.py --out=/tmp/digit_models            # full run
  python experiments/train_digit_models.py --out=/tmp/digit_smoke --quick     # a few hundred steps

Data: scikit-learn's digits as 32x32 RGB (`discl_jax.data.digits`), only the
"pool" of `digits.partition(data_seed, test_per_class)`: the digits-LT test
split is never trained on. Every class is present (balanced-ish pool).

Order and why:
  1. CLIP (text + vision towers, models/clip.py) trained contrastively on
     (image, caption) pairs (captions from `digit_training.CAPTION_TEMPLATES`);
  2. its text tower becomes the generator's frozen text encoder (like SD, whose
     text encoder is a frozen CLIP text tower), so captions are encoded once;
  3. a VAE (models/vae.py, 32x32 -> 8x8x4: the digits are upscaled 8x8
     images, so an 8x8 latent loses nothing essential) trained for
     reconstruction + a small KL, then frozen; the pool is encoded once;
  4. the UNet (models/unet.py) trained on those latents with
     classifier-free-guidance dropout (empty caption) and an EMA of its weights.
Outputs under --out: sd/ (diffusers layout), clip/ (transformers layout),
curves.png, samples.png, spectrum.png, metrics.json, README.md (how they were
made + SHA-256s). Quality figures printed at the end: the CLIP's zero-shot
accuracy on the digits-LT test split and the generator's class fidelity (a
logistic regression trained on real pool digits applied to text-to-image
samples made by `SpectrumSampler` at strength 1.0).
"""

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import digit_clip_training
import digit_training
from discl_jax import parallel
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.data import digits
from discl_jax.diffusion import models as sd_models
from discl_jax.diffusion import sampler as sampler_lib
from discl_jax.diffusion import schedules
from discl_jax.models import clip as clip_models
from discl_jax.models import tiny
from discl_jax.models import unet as unet_lib
from discl_jax.models import vae as vae_lib
from discl_jax.scoring import clip as clip_lib
from discl_jax.scoring import preprocess

FULL_STEPS = {"clip": 400, "vae": 600, "unet": 1600}
QUICK_STEPS = {"clip": 100, "vae": 100, "unet": 150}
ZERO_SHOT_TEMPLATE = "a photo of the digit {c}"
SPECTRUM_STRENGTHS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
UNCOND_PROB = 0.1
EMA_DECAY = 0.995  # UNet weight EMA; ~200-step window, short next to the 1600-step run
IMAGE_SIZE = digits.IMAGE_SIZE

# Geometries. "digits": what ships; "tiny": the unit tests' (compiles fast).
SIZES = {
    "digits": dict(
        max_length=32,
        clip_text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4),
        clip_vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, patch_size=8),
        projection_dim=64,
        vae=dict(block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=8),
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4),
        batch=dict(clip=128, vae=32, unet=64),
        lr=dict(clip=1e-3, vae=1e-3, unet=5e-4),
    ),
    "tiny": dict(
        max_length=16,
        clip_text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2),
        clip_vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, patch_size=8),
        projection_dim=16,
        vae=dict(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4),
        unet=dict(block_out_channels=(32,), layers_per_block=1, attention_head_dim=2),
        batch=dict(clip=32, vae=16, unet=32),
        lr=dict(clip=2e-3, vae=2e-3, unet=2e-3),
    ),
}


def parse_args(argv):
  """Returns the parsed command line."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="/tmp/digit_models", help="output folder (replaced)")
  p.add_argument("--seed", type=int, default=0, help="training seed (init, batches, noise)")
  p.add_argument("--data_seed", type=int, default=0,
                 help="digits.partition seed: the digits-LT data.split_seed whose test split is held out")
  p.add_argument("--test_per_class", type=int, default=50, help="digits-LT data.test_per_class")
  p.add_argument("--size", choices=sorted(SIZES), default="digits", help="model geometry")
  p.add_argument("--quick", action="store_true",
                 help=f"short run ({QUICK_STEPS}) to check that everything works")
  for name in FULL_STEPS:
    p.add_argument(f"--{name}_steps", type=int, default=None,
                   help=f"{name} training steps (default {FULL_STEPS[name]}, --quick {QUICK_STEPS[name]})")
  p.add_argument("--kl_weight", type=float, default=1e-4, help="VAE KL weight (per-element means)")
  p.add_argument("--samples_per_class", type=int, default=20, help="fidelity samples per digit")
  p.add_argument("--sample_steps", type=int, default=25, help="DDIM steps of the evaluation samples")
  p.add_argument("--guidance", type=float, default=7.5, help="CFG scale of the evaluation samples")
  args = p.parse_args(argv)
  if args.sample_steps < 10:
    p.error(f"--sample_steps must be >= 10 (strength 0.1 must run a step), got {args.sample_steps}")
  defaults = QUICK_STEPS if args.quick else FULL_STEPS
  for name, default in defaults.items():
    if getattr(args, f"{name}_steps") is None:
      setattr(args, f"{name}_steps", default)
    if getattr(args, f"{name}_steps") < 1:
      p.error(f"--{name}_steps must be >= 1, got {getattr(args, f'{name}_steps')}")
  return args


# ---------------------------------------------------------------- data

def load_data(data_seed, test_per_class):
  """Returns (pool, test) LabeledImages: the training pool and the digits-LT test split."""
  images = digits.all_images()
  parts = digits.partition(data_seed, test_per_class)
  return images.subset(parts["pool"]), images.subset(parts["test"])


def index_batches(n, batch_size, rng):
  """Yields index arrays of `batch_size` from successive random permutations of range(n)."""
  buffer = np.zeros(0, np.int64)
  while True:
    while len(buffer) < batch_size:
      buffer = np.concatenate([buffer, rng.permutation(n)])
    yield buffer[:batch_size]
    buffer = buffer[batch_size:]


def shift_augment(images, rng, max_shift=2):
  """Returns uint8 images each shifted by up to `max_shift` px (white fill, digits' background)."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                  constant_values=255)
  dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
  return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def tokenize(tokenizer, texts, max_length):
  """Returns int32 (input_ids, attention_mask) [N, max_length] of `texts`."""
  tokens = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="np")
  return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)


# ---------------------------------------------------------------- training loop

def train_loop(name, steps, step_fn, state, make_batch, key):
  """Runs `steps` steps with a progress bar; returns (state, {metric: [per-step values]}, timing).

  timing: {"compile_s": wall time of the first step (compilation included),
  "steps_per_s": wall-clock rate of the later steps, "cpu_s_per_step": their
  process CPU time per step (all threads)}.
  """
  history, start, cpu_start = {}, None, None
  first = time.perf_counter()
  bar = tqdm(range(steps), desc=f"train {name}", dynamic_ncols=True, mininterval=2.0)
  for i in bar:
    if i == 1:
      jax.block_until_ready(state)
      start, cpu_start = time.perf_counter(), time.process_time()
      compile_s = start - first
    state, metrics = step_fn(state, *make_batch(i), jax.random.fold_in(key, i))
    for k, v in jax.device_get(metrics).items():
      history.setdefault(k, []).append(float(v))
    if i % 10 == 0 or i == steps - 1:
      bar.set_postfix({k: f"{v[-1]:.4g}" for k, v in history.items()})
  jax.block_until_ready(state)
  if steps < 2:
    return state, history, {"compile_s": time.perf_counter() - first}
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  return state, history, {"compile_s": compile_s, "steps_per_s": (steps - 1) / wall,
                          "cpu_s_per_step": cpu / (steps - 1)}


def final_value(values, window=50):
  """Returns the mean of the last `window` values (the reported final loss)."""
  return float(np.mean(values[-window:]))


def train_clip(args, size, pool, tokenizer, captions, caption_labels, key):
  """Returns (models.clip.CLIPModel, params, history, steps/s): the digit CLIP trained on the pool."""
  common = dict(vocab_size=len(tokenizer.get_vocab()), max_position_embeddings=size["max_length"],
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id)
  model = clip_models.CLIPModel(clip_models.clip_config({
      "text_config": dict(size["clip_text"], **common),
      "vision_config": dict(size["clip_vision"], image_size=IMAGE_SIZE),
      "projection_dim": size["projection_dim"]}))
  spec = preprocess.ClipPreprocess(size=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE))
  optimizer = digit_training.make_optimizer(size["lr"]["clip"], args.clip_steps,
                                            weight_decay=0.05)
  shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
  state = digit_training.init_state(tiny.random_params(shapes, args.seed, "clip"), optimizer)
  step = digit_clip_training.make_clip_step(model, spec, optimizer)
  ids, mask = tokenize(tokenizer, captions, size["max_length"])
  rng = seeding.numpy_rng(args.seed, "digit-clip", "batches")
  batches = index_batches(len(pool.labels), size["batch"]["clip"], rng)

  def make_batch(_):
    idx = next(batches)
    labels = pool.labels[idx].astype(np.int32)
    rows = digit_training.sample_captions(rng, labels, caption_labels, uncond_prob=0.0)
    return shift_augment(pool.pixels[idx], rng), ids[rows], mask[rows], labels

  def step_fn(state, images, input_ids, attention_mask, labels, _):
    return step(state, images, input_ids, attention_mask, labels)

  state, history, rate = train_loop("clip", args.clip_steps, step_fn, state, make_batch, key)
  return model, jax.device_get(state["params"]), history, rate


def vae_kwargs(size, scaling_factor=0.18215):
  """Returns the AutoencoderKL config of geometry `size` (32x32 RGB, 4 latent channels)."""
  depth = len(size["vae"]["block_out_channels"])
  return dict(in_channels=3, out_channels=3, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * depth,
              up_block_types=("UpDecoderBlock2D",) * depth,
              sample_size=IMAGE_SIZE, scaling_factor=scaling_factor, **size["vae"])


def train_vae(args, size, pool, key):
  """Returns (models.vae.AutoencoderKL, params, history, steps/s)."""
  vae = vae_lib.from_config(vae_kwargs(size))
  shapes = jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))
  optimizer = digit_training.make_optimizer(size["lr"]["vae"], args.vae_steps)
  state = digit_training.init_state(tiny.random_params(shapes, args.seed, "vae"), optimizer)
  step = digit_training.make_vae_step(vae, optimizer, args.kl_weight)
  rng = seeding.numpy_rng(args.seed, "digit-vae", "batches")
  batches = index_batches(len(pool.labels), size["batch"]["vae"], rng)
  state, history, rate = train_loop(
      "vae", args.vae_steps, step, state,
      lambda _: (shift_augment(pool.pixels[next(batches)], rng),), key)
  return vae, jax.device_get(state["params"]), history, rate


def train_unet(args, size, pool, latents, context_table, caption_labels, scheduler_config,
               cross_attention_dim, key):
  """Returns (models.unet.UNet, EMA params, history, steps/s).

  `latents`: scaled posterior (mean, std) of every pool image, [N, 4, h, w] each.
  """
  means, stds = latents
  depth = len(size["unet"]["block_out_channels"])
  unet = unet_lib.from_config(dict(
      sample_size=means.shape[-1], in_channels=means.shape[1], out_channels=means.shape[1],
      down_block_types=("CrossAttnDownBlock2D",) * depth,
      up_block_types=("CrossAttnUpBlock2D",) * depth,
      cross_attention_dim=cross_attention_dim, **size["unet"]))
  shapes = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
  optimizer = digit_training.make_optimizer(size["lr"]["unet"], args.unet_steps, warmup_steps=200)
  params = tiny.random_params(shapes, args.seed, "unet")
  state = digit_training.init_state(params, optimizer, ema=True)
  step = digit_training.make_unet_step(unet, optimizer, max_ema_decay=EMA_DECAY)
  acp = jnp.asarray(schedules.alphas_cumprod(scheduler_config))
  table = jnp.asarray(context_table)
  rng = seeding.numpy_rng(args.seed, "digit-unet", "batches")
  batches = index_batches(len(means), size["batch"]["unet"], rng)

  def make_batch(_):
    idx = next(batches)
    rows = digit_training.sample_captions(rng, pool.labels[idx], caption_labels, UNCOND_PROB)
    return ({"mean": means[idx], "std": stds[idx], "caption": rows},)

  def step_fn(state, batch, key):
    return step(state, batch, table, acp, key)

  state, history, rate = train_loop("unet", args.unet_steps, step_fn, state, make_batch, key)
  return unet, jax.device_get(state["ema"]), history, rate


# ---------------------------------------------------------------- saving

def save_clip(target, model, params, tokenizer):
  """Writes the CLIP in the transformers layout (+ tokenizer, preprocessor config); returns the path."""

  def write(folder):
    clip_models.save_clip_model(folder, model, params)
    tokenizer.save_pretrained(str(folder))
    tiny.write_preprocessor(folder, IMAGE_SIZE)

  return wd.atomic_folder(target, write)


def save_sd(target, *, tokenizer, text_encoder, text_params, vae, vae_params, unet, unet_params,
            scheduler_config):
  """Writes the generator in the diffusers layout `load_sd` reads; returns the path."""

  def write(root):
    unet_lib.save(root / "unet", unet, unet_params)
    vae_lib.save(root / "vae", vae, vae_params)
    clip_models.save_text_encoder(root / "text_encoder", text_encoder, text_params)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    sd_models.write_pipeline_files(root, scheduler_config)

  return wd.atomic_folder(target, write)


def sha256_files(root):
  """Returns {relative path: sha256 hex} of every file under `root` (sorted)."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def write_readme(out, summary):
  """Writes out/README.md (how the models were made, figures) and out/SHA256SUMS; returns the path."""
  out = pathlib.Path(out)
  sums = {}
  for part in ("sd", "clip"):
    sums.update({f"{part}/{k}": v for k, v in sha256_files(out / part).items()})
  (out / "SHA256SUMS").write_text("".join(f"{v}  {k}\n" for k, v in sums.items()))
  steps, finals, quality = summary["steps"], summary["final_losses"], summary["quality"]
  lines = [
      "# Digit generator and digit CLIP (trained by discl-jax)",
      "",
      "Made by `experiments/train_digit_models.py`:",
      "",
      f"    {summary['command']}",
      "",
      f"- seed {summary['seed']}; data: scikit-learn digits as 32x32 RGB, the pool of "
      f"`digits.partition(seed={summary['data_seed']}, test_per_class={summary['test_per_class']})` "
      f"({summary['pool_size']} images); the digits-LT test split ({summary['test_size']} images) "
      "is never trained on.",
      f"- steps: CLIP {steps['clip']}, VAE {steps['vae']}, UNet {steps['unet']} "
      f"(wall time {summary['wall_seconds'] / 60:.1f} min on {summary['device']}).",
      f"- final losses (mean of the last 50 steps): CLIP {finals['clip']:.4f}, "
      f"VAE MSE {finals['vae_mse']:.5f} (KL {finals['vae_kl']:.3f}), UNet {finals['unet']:.4f}.",
      "- `sd/`: diffusers layout (UNet, AutoencoderKL, the digit CLIP's text tower as the text "
      "encoder, CLIPTokenizer, DDIM scheduler config; Flax msgpack weights of discl_jax.models' "
      "modules); load with `discl_jax.diffusion.models.load_sd`.",
      "- `clip/`: transformers layout (CLIPModel, Flax msgpack); load with "
      "`discl_jax.scoring.clip.load_clip`.",
      "",
      "## Quality",
      "",
      f"- digit CLIP zero-shot top-1 on the digits-LT test split (\"{ZERO_SHOT_TEMPLATE}\"): "
      f"{quality['clip_zero_shot']:.3f}",
      f"- generator class fidelity: {quality['fidelity']:.3f} (logistic regression trained on the "
      f"pool, test accuracy {quality['classifier_test_accuracy']:.3f}, applied to "
      f"{quality['samples_per_class']} text-to-image samples per digit, strength 1.0, "
      f"{quality['sample_steps']} DDIM steps, guidance {quality['guidance']})",
      "- per-class fidelity: " + ", ".join(
          f"{k} {v:.2f}" for k, v in quality["fidelity_per_class"].items()),
      "",
      "## SHA-256",
      "",
      "```",
      *(f"{v}  {k}" for k, v in sums.items()),
      "```",
      "",
  ]
  target = out / "README.md"
  target.write_text("\n".join(lines))
  return target


# ---------------------------------------------------------------- evaluation

def zero_shot_accuracy(clip_dir, test):
  """Returns the top-1 zero-shot accuracy of the CLIP at `clip_dir` on LabeledImages `test`."""
  models = clip_lib.load_clip(str(clip_dir))
  scorer = clip_lib.ClipScorer(models, parallel.make_mesh(), batch_size=128)
  texts = scorer.text_embeddings([ZERO_SHOT_TEMPLATE.format(c=c) for c in test.class_names])
  images = scorer.image_embeddings(list(test.pixels))
  return float(np.mean(np.argmax(images @ texts.T, axis=1) == test.labels))


def _gray_features(images_uint8):
  return np.asarray(images_uint8, np.float32).mean(axis=-1).reshape(len(images_uint8), -1) / 255.0


def fit_digit_classifier(pool, seed):
  """Returns a logistic regression on the grayscale pixels of the real pool digits."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  classifier = LogisticRegression(max_iter=2000, C=0.1, random_state=seed)
  return classifier.fit(_gray_features(pool.pixels), pool.labels)


def generate(sd, jobs, steps, guidance):
  """Returns {job_id: uint8 image} of `jobs` run through the SpectrumSampler."""
  sampler = sampler_lib.SpectrumSampler(sd, num_inference_steps=steps, guidance_scale=guidance,
                                        slots=min(64, max(8, len(jobs))))
  return {job.job_id: image for job, image in sampler.run(jobs)}


def grid(rows):
  """Returns one uint8 image of equally sized images laid out as `rows` (lists), 2 px gaps."""
  h, w = rows[0][0].shape[:2]
  cols = max(len(r) for r in rows)
  canvas = np.full((len(rows) * (h + 2), cols * (w + 2), 3), 128, np.uint8)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      canvas[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = image
  return canvas


def evaluate_generator(sd_dir, pool, test, args, out):
  """Returns the fidelity figures and writes samples.png and spectrum.png into `out`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  sd = sd_models.load_sd(str(sd_dir))
  classifier = fit_digit_classifier(pool, args.seed)
  blank = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)
  jobs = [sampler_lib.Job(f"fidelity/{c}/{i}", blank, ZERO_SHOT_TEMPLATE.format(c=c), 1.0, args.seed)
          for c in pool.class_names for i in range(args.samples_per_class)]
  sources = [pool.pixels[np.flatnonzero(pool.labels == k)[0]] for k in range(len(pool.class_names))]
  jobs += [sampler_lib.Job(f"spectrum/{c}/{s:.1f}", sources[k], ZERO_SHOT_TEMPLATE.format(c=c), s,
                           args.seed)
           for k, c in enumerate(pool.class_names) for s in SPECTRUM_STRENGTHS]
  images = generate(sd, jobs, args.sample_steps, args.guidance)
  per_class, sample_rows, spectrum_rows = {}, [], []
  for k, c in enumerate(pool.class_names):
    samples = np.stack([images[f"fidelity/{c}/{i}"] for i in range(args.samples_per_class)])
    per_class[c] = float(np.mean(classifier.predict(_gray_features(samples)) == k))
    sample_rows.append(list(samples[:10]))
    spectrum_rows.append([sources[k]] + [images[f"spectrum/{c}/{s:.1f}"] for s in SPECTRUM_STRENGTHS])
  Image.fromarray(_upscale(grid(sample_rows), 2)).save(out / "samples.png")
  Image.fromarray(_upscale(grid(spectrum_rows), 2)).save(out / "spectrum.png")
  return {
      "fidelity": float(np.mean(list(per_class.values()))),
      "fidelity_per_class": per_class,
      "classifier_test_accuracy": float(classifier.score(_gray_features(test.pixels), test.labels)),
      "samples_per_class": args.samples_per_class,
      "sample_steps": args.sample_steps,
      "guidance": args.guidance,
  }


def _upscale(image, factor):
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def plot_curves(histories, target):
  """Saves the loss curves (raw, and a moving average) of every model as one PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [("CLIP contrastive loss", histories["clip"]["loss"]),
            ("VAE reconstruction MSE", histories["vae"]["mse"]),
            ("UNet epsilon MSE", histories["unet"]["loss"])]
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
  for ax, (title, values) in zip(axes, panels):
    values = np.asarray(values)
    window = max(1, len(values) // 50)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(values, alpha=0.3, lw=0.8)
    ax.plot(np.arange(window - 1, len(values)), smooth, lw=1.5)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(target, dpi=100)
  plt.close(fig)
  return target


# ---------------------------------------------------------------- main

def main(argv=None):
  """Trains both models, saves them under --out, evaluates them; returns the summary dict."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  return run(args, argv)


def run(args, argv):
  """Does main's work for parsed `args` (`argv` is recorded as the command)."""
  wall = time.perf_counter()
  size = SIZES[args.size]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  pool, test = load_data(args.data_seed, args.test_per_class)
  key = jax.random.key(args.seed)
  keys = {name: jax.random.fold_in(key, seeding.stable_hash("digit-models", name))
          for name in ("clip", "vae", "unet")}
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="digit-tokenizer-"))
  tokenizer = tiny.write_tokenizer(scratch, model_max_length=size["max_length"])
  shutil.rmtree(scratch)
  captions, caption_labels = digit_training.caption_table(pool.class_names)
  print(f"pool {len(pool.labels)} images, test {len(test.labels)}, {len(captions) - 1} captions")

  histories, rates = {}, {}
  clip_model, clip_params, histories["clip"], rates["clip"] = train_clip(
      args, size, pool, tokenizer, captions, caption_labels, keys["clip"])
  clip_dir = save_clip(out / "clip", clip_model, clip_params, tokenizer)

  text_params = {"text_model": clip_params["text_model"]}
  text_encoder = clip_models.CLIPTextModel(clip_model.config.text_config)
  ids, _ = tokenize(tokenizer, captions, size["max_length"])
  context_table = np.asarray(digit_training.make_text_encoder(text_encoder)(text_params, ids))

  vae, vae_params, histories["vae"], rates["vae"] = train_vae(args, size, pool, keys["vae"])
  means, stds = digit_training.encode_all(digit_training.make_encoder(vae), vae_params,
                                          pool.pixels, size["batch"]["vae"])
  scale = digit_training.scaling_factor(means, stds)
  vae = vae_lib.from_config(vae_kwargs(size, scale))
  scheduler_config = dict(sd_models.SD_SCHEDULER_CONFIG)
  unet, unet_params, histories["unet"], rates["unet"] = train_unet(
      args, size, pool, (means * scale, stds * scale), context_table, caption_labels,
      scheduler_config, text_encoder.config.hidden_size, keys["unet"])
  sd_dir = save_sd(out / "sd", tokenizer=tokenizer, text_encoder=text_encoder,
                   text_params=text_params, vae=vae, vae_params=vae_params, unet=unet,
                   unet_params=unet_params, scheduler_config=scheduler_config)

  quality = {"clip_zero_shot": zero_shot_accuracy(clip_dir, test)}
  quality.update(evaluate_generator(sd_dir, pool, test, args, out))
  plot_curves(histories, out / "curves.png")
  summary = {
      "command": "python experiments/train_digit_models.py " + " ".join(argv),
      "seed": args.seed, "data_seed": args.data_seed, "test_per_class": args.test_per_class,
      "size": args.size, "pool_size": int(len(pool.labels)), "test_size": int(len(test.labels)),
      "steps": {"clip": args.clip_steps, "vae": args.vae_steps, "unet": args.unet_steps},
      "timing": rates,
      "final_losses": {"clip": final_value(histories["clip"]["loss"]),
                       "clip_batch_accuracy": final_value(histories["clip"]["accuracy"]),
                       "vae_mse": final_value(histories["vae"]["mse"]),
                       "vae_kl": final_value(histories["vae"]["kl"]),
                       "unet": final_value(histories["unet"]["loss"])},
      "initial_losses": {"clip": histories["clip"]["loss"][0], "vae_mse": histories["vae"]["mse"][0],
                         "unet": histories["unet"]["loss"][0]},
      "vae_scaling_factor": scale,
      "quality": quality,
      "device": f"{jax.devices()[0].platform} x{jax.device_count()} ({os.cpu_count()} cpus)",
  }
  summary["wall_seconds"] = time.perf_counter() - wall
  (out / "metrics.json").write_text(json.dumps(summary, indent=2))
  (out / "losses.json").write_text(json.dumps(histories))
  write_readme(out, summary)
  print(json.dumps({k: summary[k] for k in ("timing", "initial_losses", "final_losses",
                                            "quality", "wall_seconds")}, indent=2))
  return dict(summary, histories=histories)


if __name__ == "__main__":
  main()
