"""CLIP loading, preprocessing and the sharded scorer (tiny random CLIP, CPU)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from discl_jax import parallel
from discl_jax.models import tiny
from discl_jax.models import weights
from discl_jax.scoring import acceptance
from discl_jax.scoring import clip
from discl_jax.scoring import preprocess

TEXTS = ["a photo of zero", "a photo of the digit seven", "x", "a 8k real photo: " + "long " * 40]
# Embeddings are L2-normalised; float32 sums in a different order (batch
# grouping, device count, PyTorch vs XLA kernels) move them by ~1e-7.
EMBED_ATOL = 1e-5


def projected(features):
  """Returns get_*_features' tensor: transformers 5 wraps it (pooler_output), 4.x returns it."""
  return getattr(features, "pooler_output", features)


def _images(seed=0):
  """Returns uint8 images of assorted sizes and aspect ratios (up- and down-scaled)."""
  rng = np.random.default_rng(seed)
  shapes = [(32, 32), (40, 50), (64, 31), (20, 20), (33, 90), (120, 80), (32, 32)]
  return [rng.integers(0, 256, shape + (3,), dtype=np.uint8) for shape in shapes]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  base = tmp_path_factory.mktemp("clip")
  return (tiny.build_clip(base / "msgpack", seed=0),
          tiny.build_clip(base / "safetensors", seed=0, weights_format="safetensors"))


@pytest.fixture(scope="module")
def models(tiny_dirs):
  return clip.load_clip(str(tiny_dirs[0]))


@pytest.fixture(scope="module")
def scorer(models):
  return clip.ClipScorer(models, parallel.make_mesh(), batch_size=4)


def test_tiny_clip_folder_layout(tiny_dirs):
  names = {p.name for p in tiny_dirs[0].iterdir()}
  assert {"config.json", clip.FLAX_WEIGHTS, "vocab.json", "merges.txt",
          preprocess.PREPROCESSOR_CONFIG} <= names
  assert clip.SAFETENSORS_WEIGHTS in {p.name for p in tiny_dirs[1].iterdir()}
  assert not list(tiny_dirs[0].parent.glob(".*"))  # no staging folder left behind


def test_safetensors_loads_to_the_same_params(models, tiny_dirs):
  other = clip.load_clip(str(tiny_dirs[1]))
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                      models.params, other.params)
  assert all(jax.tree.leaves(same))
  assert other.preprocess == models.preprocess


def test_bfloat16_params(tiny_dirs):
  models = clip.load_clip(str(tiny_dirs[0]), dtype="bfloat16")
  assert {leaf.dtype for leaf in jax.tree.leaves(models.params)} == {np.dtype("bfloat16")}
  assert models.model.dtype == np.dtype("bfloat16")


def test_load_errors_name_the_problem(tmp_path, tiny_dirs):
  with pytest.raises(FileNotFoundError, match="not found: /nonexistent/clip"):
    clip.load_clip("/nonexistent/clip")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    clip.load_clip(str(tmp_path / "empty"))
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "config.json").write_text((tiny_dirs[0] / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="neither flax_model.msgpack nor model.safetensors"):
    clip.load_clip(str(no_weights))
  with pytest.raises(ValueError, match="dtype"):
    clip.load_clip(str(tiny_dirs[0]), dtype="float16")
  with pytest.raises(ValueError, match="score.tiny"):
    clip.load_clip("")


def test_weights_that_do_not_fit_are_rejected(tmp_path, models, tiny_dirs):
  from safetensors.numpy import save_file
  state = weights.to_pytorch_state_dict(models.params)
  state["visual_projection.weight"] = state["visual_projection.weight"][:, :5]
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text((tiny_dirs[0] / "config.json").read_text())
  save_file(state, str(bad / clip.SAFETENSORS_WEIGHTS), metadata={"format": "pt"})
  with pytest.raises(ValueError, match="visual_projection.kernel"):
    clip.load_clip(str(bad))


@pytest.mark.parametrize("size,crop", [(32, (32, 32)), (224, (224, 224)), ((40, 36), (30, 30)),
                                       (24, (28, 28))])
def test_preprocessing_matches_clip_image_processor(size, crop):
  from transformers import CLIPImageProcessor
  spec = preprocess.ClipPreprocess(size=size, crop=crop)
  hf_size = ({"shortest_edge": size} if isinstance(size, int)
             else {"height": size[0], "width": size[1]})
  processor = CLIPImageProcessor(size=hf_size, crop_size={"height": crop[0], "width": crop[1]})
  images = _images()
  expected = processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = np.asarray(preprocess.normalize(preprocess.preprocess_batch(images, spec), spec))
  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_preprocess_spec_read_from_processor_config(tiny_dirs, models):
  from transformers import CLIPImageProcessor
  saved = CLIPImageProcessor.from_pretrained(str(tiny_dirs[0]))
  assert models.preprocess.size == saved.size["shortest_edge"]
  assert models.preprocess.crop == (saved.crop_size["height"], saved.crop_size["width"])
  assert models.preprocess.mean == tuple(saved.image_mean)


def test_embeddings_are_normalised_and_independent_of_batch_size(models, scorer):
  images = _images()
  reference = scorer.image_embeddings(images)
  assert reference.shape == (len(images), models.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-6)
  texts = scorer.text_embeddings(TEXTS)
  np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-6)
  other = clip.ClipScorer(models, parallel.make_mesh(), batch_size=3)
  np.testing.assert_allclose(other.image_embeddings(images), reference, atol=EMBED_ATOL, rtol=0)
  np.testing.assert_allclose(other.text_embeddings(TEXTS), texts, atol=EMBED_ATOL, rtol=0)
  single = np.concatenate([scorer.image_embeddings([im]) for im in images[:3]])
  np.testing.assert_allclose(single, reference[:3], atol=EMBED_ATOL, rtol=0)
  assert scorer.image_embeddings([]).shape == (0, models.embed_dim)


def test_wrong_crop_shape_is_an_error(scorer):
  with pytest.raises(ValueError, match="preprocessed images must be"):
    scorer.pixel_embeddings(np.zeros((2, 16, 16, 3), np.uint8))


def test_parity_with_pytorch_clip(models, scorer, tiny_dirs):
  """CLIPScore embeddings: transformers' PyTorch CLIPModel reading the same safetensors."""
  torch = pytest.importorskip("torch", reason="parity with PyTorch CLIPModel needs the torch extra")
  from transformers import CLIPImageProcessor, CLIPModel
  reference = CLIPModel.from_pretrained(str(tiny_dirs[1])).eval()
  images = _images()
  processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  tokens = models.tokenizer(TEXTS, padding="max_length", truncation=True, max_length=77,
                            return_tensors="pt")
  with torch.no_grad():
    image_ref = reference.get_image_features(
        pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    text_ref = reference.get_text_features(**tokens)
  image_ref = torch.nn.functional.normalize(projected(image_ref), dim=-1).numpy()
  text_ref = torch.nn.functional.normalize(projected(text_ref), dim=-1).numpy()
  image, text = scorer.image_embeddings(images), scorer.text_embeddings(TEXTS)
  print(f"CLIPScore embeddings max |ours - PyTorch|: images {np.abs(image - image_ref).max():.2e}, "
        f"texts {np.abs(text - text_ref).max():.2e}")
  np.testing.assert_allclose(image, image_ref, atol=EMBED_ATOL, rtol=0)
  np.testing.assert_allclose(text, text_ref, atol=EMBED_ATOL, rtol=0)


_EIGHT_DEVICES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.modules["torch"] = None  # safetensors weights must load without torch
    import jax, numpy as np
    from discl_jax import parallel
    from discl_jax.scoring import clip
    sys.path.insert(0, os.path.dirname(sys.argv[3]))
    from test_clip import _images, TEXTS
    assert jax.device_count() == 8
    scorer = clip.ClipScorer(clip.load_clip(sys.argv[1]), parallel.make_mesh(), batch_size=5)
    assert scorer.batch_size == 8
    np.savez(sys.argv[2], images=scorer.image_embeddings(_images()),
             texts=scorer.text_embeddings(TEXTS))
""")


def test_eight_devices_match_one_device(tmp_path, tiny_dirs, scorer):
  out = tmp_path / "eight.npz"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(tiny_dirs[1]), str(out), __file__],
                 check=True, env=env, timeout=300)
  eight = np.load(out)
  np.testing.assert_allclose(eight["images"], scorer.image_embeddings(_images()),
                             atol=EMBED_ATOL, rtol=0)
  np.testing.assert_allclose(eight["texts"], scorer.text_embeddings(TEXTS),
                             atol=EMBED_ATOL, rtol=0)


@pytest.mark.parametrize("bad", [1.5, -1.01, float("nan"), "high", None])
def test_threshold_outside_cosine_range_is_an_error(bad):
  with pytest.raises(ValueError, match="score.threshold"):
    acceptance.check_threshold(bad)


def test_threshold_edges_are_valid():
  assert acceptance.check_threshold(-1) == -1.0
  assert acceptance.check_threshold("0.25") == 0.25
