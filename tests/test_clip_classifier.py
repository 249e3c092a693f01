"""CLIP classifier: features, zero-shot head, probabilities and WiSE-FT against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iwildcam_fixture
from discl_jax.models import clip_classifier as cc

TEMPLATES = ("a photo of {c}.", "{c} in the wild.", "a real photo of the {c}.")
CLASSES = ("one", "two", "three", "nine")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  from transformers import CLIPTokenizer, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  path = iwildcam_fixture.build_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)
  model = FlaxCLIPModel.from_pretrained(str(path))
  return model, model.params, CLIPTokenizer.from_pretrained(str(path))


def _normalised(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pixels(n, seed=0):
  rng = np.random.default_rng(seed)
  return cc.normalize(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_features_are_the_models_projections_normalised(clip):
  model, params, tokenizer = clip
  pixels = _pixels(3)
  ours = cc.image_features(model, params, pixels)
  theirs = model.get_image_features(np.transpose(pixels, (0, 3, 1, 2)), params=params)
  np.testing.assert_allclose(ours, _normalised(theirs), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)

  ids, mask = cc.tokenize(tokenizer, ["a photo of one.", "nine in the wild."])
  ours = cc.text_features(model, params, ids, mask)
  theirs = model.get_text_features(ids, mask, params=params)
  np.testing.assert_allclose(ours, _normalised(theirs), atol=1e-5)


def test_caption_table_fills_templates_per_class(clip):
  _, _, tokenizer = clip
  ids, mask = cc.caption_table(tokenizer, CLASSES, TEMPLATES)
  assert ids.shape == mask.shape == (len(TEMPLATES), len(CLASSES), tokenizer.model_max_length)
  expect_ids, _ = cc.tokenize(tokenizer, ["{c} in the wild.".format(c="three")])
  np.testing.assert_array_equal(ids[1, 2], expect_ids[0])
  with pytest.raises(ValueError, match="no {c} field"):
    cc.caption_table(tokenizer, CLASSES, ("a photo of a cat",))


def test_zero_shot_head_and_probabilities_match_numpy(clip):
  model, params, tokenizer = clip
  ids, mask = cc.caption_table(tokenizer, CLASSES, TEMPLATES)
  head = np.asarray(cc.zero_shot_head(model, params, ids, mask))
  assert head.shape == (16, len(CLASSES))

  # numpy: per class, the normalised mean of the normalised template embeddings
  raw = np.stack([np.asarray(model.get_text_features(ids[t], mask[t], params=params))
                  for t in range(len(TEMPLATES))])                      # [T, C, D]
  expect_head = _normalised(_normalised(raw).mean(axis=0)).T           # [D, C]
  np.testing.assert_allclose(head, expect_head, atol=1e-5)

  pixels = _pixels(5, seed=1)
  image = _normalised(model.get_image_features(np.transpose(pixels, (0, 3, 1, 2)),
                                               params=params))
  logits = np.exp(float(params["logit_scale"])) * image @ expect_head
  expect = np.exp(logits - logits.max(-1, keepdims=True))
  expect /= expect.sum(-1, keepdims=True)
  probs = cc.class_probabilities(model, params, pixels, head)
  np.testing.assert_allclose(probs, expect, atol=1e-5)
  labels = np.array([0, 3, 1, 1, 2])
  np.testing.assert_allclose(cc.true_class_probabilities(probs, labels),
                             expect[np.arange(5), labels], atol=1e-5)


def _perturbed(params, seed=0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.1 * jax.random.normal(k, jnp.shape(x), jnp.float32) for x, k in zip(leaves, keys)])


def test_wise_ft_endpoints_and_midpoint(clip):
  model, params, tokenizer = clip
  finetuned = _perturbed(params)
  for alpha, expect in ((0.0, params), (1.0, finetuned)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
                 cc.wise_ft(params, finetuned, alpha), expect)
  mid = cc.wise_ft(params, finetuned, 0.5)
  jax.tree.map(lambda m, a, b: np.testing.assert_allclose(m, (np.asarray(a) + b) / 2, atol=1e-6),
               mid, params, finetuned)

  # The head of the interpolated model comes from the interpolated text encoder.
  ids, mask = cc.caption_table(tokenizer, CLASSES, TEMPLATES)
  head_ft = cc.zero_shot_head(model, cc.wise_ft(params, finetuned, 1.0), ids, mask)
  np.testing.assert_allclose(head_ft, cc.zero_shot_head(model, finetuned, ids, mask), atol=1e-6)


def test_wise_ft_keeps_dtype_and_rejects_bad_input(clip):
  _, params, _ = clip
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
