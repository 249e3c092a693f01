"""CLIP classifier: features, zero-shot head, probabilities and WiSE-FT against numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from discl_jax.models import clip_classifier as cc
from discl_jax.models import tiny
from discl_jax.scoring import clip as clip_lib

TEMPLATES = ("a photo of {c}.", "{c} in the wild.", "a real photo of the {c}.")
CLASSES = ("peccary", "agouti", "spotted paca", "ocelot")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  path = tiny.build_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=0)
  return clip_lib.load_clip(str(path))


def _normalised(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pixels(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


@functools.cache
def _hf_features(model):
  """Returns jitted (image, text) projections through the CLIP module's own methods (unnormalised)."""
  image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))
  text = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask,
                                                  method="get_text_features"))
  return image, text


def test_features_are_the_models_projections_normalised(clip):
  model, params = clip.model, clip.params
  hf_image, hf_text = _hf_features(model)
  pixels = _pixels(3)
  ours = jax.jit(functools.partial(cc.image_features, model))(params, pixels)
  np.testing.assert_allclose(ours, _normalised(hf_image(params, pixels)), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)

  ids, mask = cc.caption_table(clip.tokenizer, CLASSES, TEMPLATES)      # [T, C, L]
  ours = jax.jit(functools.partial(cc.text_features, model))(params, ids, mask)
  assert ours.shape == (len(TEMPLATES), len(CLASSES), 16)
  flat = hf_text(params, ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1]))
  np.testing.assert_allclose(ours.reshape(-1, 16), _normalised(flat), atol=1e-5)


def test_caption_table_fills_templates_per_class(clip):
  tokenizer = clip.tokenizer
  ids, mask = cc.caption_table(tokenizer, CLASSES, TEMPLATES)
  assert ids.shape == mask.shape == (len(TEMPLATES), len(CLASSES), tokenizer.model_max_length)
  expect_ids, expect_mask = cc.tokenize(tokenizer, ["spotted paca in the wild."])
  np.testing.assert_array_equal(ids[1, 2], expect_ids[0])
  np.testing.assert_array_equal(mask[1, 2], expect_mask[0])
  decoded = tokenizer.decode(ids[0, 3], skip_special_tokens=True)
  assert decoded.replace(" ", "") == "aphotoofocelot."
  with pytest.raises(ValueError, match="no {c} field"):
    cc.caption_table(tokenizer, CLASSES, ("a photo of a cat",))


def test_zero_shot_head_and_probabilities_match_numpy(clip):
  model, params = clip.model, clip.params
  hf_image, hf_text = _hf_features(model)
  ids, mask = cc.caption_table(clip.tokenizer, CLASSES, TEMPLATES)
  head = np.asarray(jax.jit(functools.partial(cc.zero_shot_head, model))(params, ids, mask))
  assert head.shape == (16, len(CLASSES))

  # numpy: per class, the normalised mean over templates of normalised text embeddings
  raw = hf_text(params, ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1]))
  raw = np.asarray(raw).reshape(len(TEMPLATES), len(CLASSES), -1)
  expect_head = _normalised(_normalised(raw).mean(axis=0)).T           # [D, C]
  np.testing.assert_allclose(head, expect_head, atol=1e-5)

  pixels = _pixels(5, seed=1)
  image = _normalised(hf_image(params, pixels))
  logits = np.exp(float(params["logit_scale"])) * image @ expect_head
  expect = np.exp(logits - logits.max(-1, keepdims=True))
  expect /= expect.sum(-1, keepdims=True)
  probs = jax.jit(functools.partial(cc.class_probabilities, model))(params, pixels, head)
  np.testing.assert_allclose(probs, expect, atol=1e-5)
  labels = np.array([0, 3, 1, 1, 2])
  np.testing.assert_allclose(cc.true_class_probabilities(probs, labels),
                             expect[np.arange(5), labels], atol=1e-5)


def _perturbed(params, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.1, np.shape(x)).astype(np.float32),
                      params)


def test_wise_ft_endpoints_and_midpoint(clip):
  model, params = clip.model, clip.params
  finetuned = _perturbed(params)
  for alpha, expect in ((0.0, params), (1.0, finetuned)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
                 cc.wise_ft(params, finetuned, alpha), expect)
  mid = cc.wise_ft(params, finetuned, 0.5)
  jax.tree.map(lambda m, a, b: np.testing.assert_allclose(m, (np.asarray(a) + b) / 2, atol=1e-6),
               mid, params, finetuned)

  # The head of the interpolated model is built from the interpolated text encoder.
  ids, mask = cc.caption_table(clip.tokenizer, CLASSES, TEMPLATES)
  head_fn = jax.jit(functools.partial(cc.zero_shot_head, model))
  head_zs, head_mid, head_ft = (head_fn(p, ids, mask) for p in (params, mid, finetuned))
  assert not np.allclose(head_zs, head_ft, atol=1e-3)
  assert not np.allclose(head_mid, head_zs, atol=1e-3)
  np.testing.assert_allclose(head_fn(cc.wise_ft(params, finetuned, 1.0), ids, mask), head_ft,
                             atol=1e-6)


def test_wise_ft_keeps_dtype_and_rejects_bad_input(clip):
  params = clip.params
  zs = {"a": jnp.ones((2,), jnp.bfloat16), "b": jnp.zeros((3,), jnp.float32)}
  ft = {"a": jnp.full((2,), 3.0, jnp.bfloat16), "b": jnp.ones((3,), jnp.float32)}
  out = cc.wise_ft(zs, ft, 0.25)
  assert out["a"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["a"].astype(jnp.float32), 1.5)
  np.testing.assert_allclose(out["b"], 0.25)
  with pytest.raises(ValueError, match="alpha must be in"):
    cc.wise_ft(params, params, 1.5)
  with pytest.raises(ValueError, match="different structures.*'c'"):
    cc.wise_ft(zs, {"a": ft["a"], "c": ft["b"]}, 0.5)
  with pytest.raises(ValueError, match=r"\['b'\] has shape"):
    cc.wise_ft(zs, {"a": ft["a"], "b": jnp.ones((4,))}, 0.5)
