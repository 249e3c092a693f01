"""Digit generator + digit CLIP training (experiments/train_digit_models.py) at tiny size, CPU."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from discl_jax import seeding
from discl_jax.diffusion import models as sd_models
from discl_jax.models import clip as clip_models
from discl_jax.models import tiny
from discl_jax.scoring import clip as clip_lib
from discl_jax.scoring import preprocess

import experiment_scripts

digit_training = experiment_scripts.load("digit_training")
digit_clip_training = experiment_scripts.load("digit_clip_training")

# The tiny CLIP first collapses to constant embeddings (loss log(batch)) and needs
# ~100 steps to break out of it; its steps are cheap.
STEPS = {"clip": 150, "vae": 30, "unet": 30}


@pytest.fixture(scope="module")
def script():
  return experiment_scripts.load("train_digit_models")


@pytest.fixture(scope="module")
def run(script, tmp_path_factory):
  out = tmp_path_factory.mktemp("digit_models") / "out"
  summary = script.main(["--out", str(out), "--size", "tiny", "--seed", "3",
                         "--clip_steps", str(STEPS["clip"]), "--vae_steps", str(STEPS["vae"]),
                         "--unet_steps", str(STEPS["unet"]), "--samples_per_class", "2",
                         "--sample_steps", "10"])
  return out, summary


@pytest.mark.parametrize("model,metric", [("clip", "loss"), ("vae", "mse"), ("unet", "loss")])
def test_losses_decrease(run, model, metric):
  values = np.asarray(run[1]["histories"][model][metric])
  assert len(values) == STEPS[model] and np.all(np.isfinite(values))
  assert values[-5:].mean() < 0.9 * values[:5].mean(), values


def test_checkpoints_load_through_from_pretrained(run):
  out, summary = run
  sd = sd_models.load_sd(str(out / "sd"))
  clip = clip_lib.load_clip(str(out / "clip"))
  # The generator's text encoder is the CLIP's text tower, bit for bit.
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                      sd.params["text_encoder"]["text_model"], clip.params["text_model"])
  assert all(jax.tree.leaves(same))
  assert sd.vae.config.scaling_factor == pytest.approx(summary["vae_scaling_factor"])
  assert sd.unet.config.cross_attention_dim == clip.model.config.text_config.hidden_size
  assert sd.size_multiple == 4  # 3-block VAE (x4) and a 1-block UNet
  assert sd.tokenizer.get_vocab() == clip.tokenizer.get_vocab()
  assert clip.preprocess.crop == (32, 32)
  assert (out / "sd" / "model_index.json").is_file()
  assert json.loads((out / "sd" / "scheduler" / "scheduler_config.json").read_text()) == (
      sd_models.SD_SCHEDULER_CONFIG)


def test_outputs_readme_and_checksums(run):
  out, summary = run
  for name in ("curves.png", "samples.png", "spectrum.png", "metrics.json", "losses.json",
               "README.md", "SHA256SUMS"):
    assert (out / name).is_file(), name
  lines = (out / "SHA256SUMS").read_text().splitlines()
  assert any(line.endswith("sd/unet/diffusion_flax_model.msgpack") for line in lines)
  assert any(line.endswith("clip/flax_model.msgpack") for line in lines)
  for line in lines:
    digest, name = line.split("  ")
    assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
  readme = (out / "README.md").read_text()
  assert "--size tiny" in readme and "SHA-256" in readme
  quality = summary["quality"]
  assert 0.0 <= quality["clip_zero_shot"] <= 1.0
  assert 0.0 <= quality["fidelity"] <= 1.0 and len(quality["fidelity_per_class"]) == 10
  assert quality["classifier_test_accuracy"] > 0.85  # logistic regression on real digits
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["steps"] == STEPS
  assert metrics["pool_size"] + metrics["test_size"] == 1797


def test_pool_excludes_the_digits_lt_test_split(script):
  pool, test = script.load_data(0, 50)
  assert not set(pool.ids) & set(test.ids)
  assert len(test.ids) == 500 and np.all(np.bincount(test.labels) == 50)


def test_clip_step_is_deterministic_from_the_seed(script):
  model = clip_models.CLIPModel(clip_models.clip_config(tiny.clip_config(600, 598, 599)))
  spec = preprocess.ClipPreprocess(size=32, crop=(32, 32))
  optimizer = digit_training.make_optimizer(1e-3, 4)
  step = digit_clip_training.make_clip_step(model, spec, optimizer)
  pool, _ = script.load_data(0, 50)

  def train(seed):
    shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
    state = digit_training.init_state(tiny.random_params(shapes, seed, "clip"), optimizer)
    rng = seeding.numpy_rng(seed, "test-clip")
    batches = script.index_batches(len(pool.labels), 8, rng)
    for _ in range(3):
      idx = next(batches)
      ids = rng.integers(0, 598, (8, 77)).astype(np.int32)
      state, _ = step(state, script.shift_augment(pool.pixels[idx], rng), ids,
                      np.ones_like(ids), pool.labels[idx].astype(np.int32))
    return jax.device_get(state["params"])

  a, b, c = train(0), train(0), train(1)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, a, c)))


def test_multi_positive_loss_is_clip_loss_for_distinct_labels():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(6, 4)).astype(np.float32)
  text = rng.normal(size=(6, 4)).astype(np.float32)
  image /= np.linalg.norm(image, axis=1, keepdims=True)
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  logit_scale = jnp.log(10.0)
  loss, _ = digit_clip_training.multi_positive_loss(image, text, logit_scale, jnp.arange(6))
  logits = 10.0 * image @ text.T
  ref = 0.5 * (np.mean(-np.diag(jax.nn.log_softmax(logits, 1)))
               + np.mean(-np.diag(jax.nn.log_softmax(logits.T, 1))))
  assert float(loss) == pytest.approx(float(ref), rel=1e-5)
  # Same-label pairs are positives: matching a class's image to any of its captions is rewarded.
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  aligned = np.repeat(np.eye(3, 4, dtype=np.float32), 2, axis=0)
  good, acc = digit_clip_training.multi_positive_loss(aligned, aligned[[1, 0, 3, 2, 5, 4]],
                                                      logit_scale, labels)
  bad, _ = digit_clip_training.multi_positive_loss(aligned, aligned[[2, 4, 0, 5, 1, 3]],
                                                   logit_scale, labels)
  assert float(acc) == 1.0 and float(good) < float(bad)


def test_captions_and_cfg_dropout():
  names = ("zero", "one", "two")
  captions, labels = digit_training.caption_table(names)
  assert captions[0] == "" and labels[0] == -1
  assert "a photo of the digit two" in captions and "the number 1" in captions
  assert len(captions) == 1 + len(digit_training.CAPTION_TEMPLATES) * 3
  rng = np.random.default_rng(0)
  want = np.array([0, 1, 2] * 100)
  rows = digit_training.sample_captions(rng, want, labels, uncond_prob=0.0)
  assert np.array_equal(labels[rows], want) and len(set(rows.tolist())) > 10
  rows = digit_training.sample_captions(rng, want, labels, uncond_prob=0.5)
  dropped = rows == 0
  assert 0.35 < dropped.mean() < 0.65
  assert np.array_equal(labels[rows[~dropped]], want[~dropped])


def test_scaling_factor_makes_latents_unit_variance():
  rng = np.random.default_rng(0)
  means = rng.normal(0.5, 3.0, (4000, 4, 2, 2))
  stds = np.full_like(means, 4.0)
  samples = means + stds * rng.normal(size=means.shape)
  scale = digit_training.scaling_factor(means, stds)
  assert np.std(samples * scale) == pytest.approx(1.0, rel=0.02)


def test_bad_flags_are_rejected(script):
  with pytest.raises(SystemExit):
    script.parse_args(["--unet_steps", "0"])
  with pytest.raises(SystemExit):
    script.parse_args(["--sample_steps", "5"])
  args = script.parse_args(["--quick"])
  assert args.unet_steps == script.QUICK_STEPS["unet"]
