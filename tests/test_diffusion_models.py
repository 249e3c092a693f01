"""Tiny SD checkpoints: layout, loading (msgpack and safetensors), dtype cast, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from discl_jax.diffusion import models
from discl_jax.models import tiny
from discl_jax.models import weights


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return tiny.build_sd(tmp_path_factory.mktemp("tiny_sd") / "sd", seed=0)


@pytest.fixture(scope="module")
def tiny_sd(tiny_dir):
  return models.load_sd(str(tiny_dir))


def test_build_tiny_writes_diffusers_layout(tiny_dir):
  for sub, name in [("unet", "diffusion_flax_model.msgpack"), ("vae", "diffusion_flax_model.msgpack"),
                    ("text_encoder", "flax_model.msgpack"), ("tokenizer", "vocab.json"),
                    ("tokenizer", "merges.txt"), ("scheduler", "scheduler_config.json")]:
    assert (tiny_dir / sub / name).is_file(), (sub, name)
  index = json.loads((tiny_dir / "model_index.json").read_text())
  assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_random_params_depend_only_on_seed_and_path():
  shapes = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32),
                     "bias": jax.ShapeDtypeStruct((8,), jnp.float32)},
            "norm": {"scale": jax.ShapeDtypeStruct((8,), jnp.float32)}}
  a = tiny.random_params(shapes, 0, "unet")
  b = tiny.random_params(shapes, 0, "unet")
  c = tiny.random_params(shapes, 1, "unet")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a["conv"]["kernel"], c["conv"]["kernel"])
  assert abs(float(a["conv"]["kernel"].std()) - 1 / 6) < 0.03  # LeCun: 1/sqrt(3*3*4)
  assert abs(float(a["norm"]["scale"].mean()) - 1) < 0.05


def test_load_sd_float32_and_bfloat16(tiny_dir, tiny_sd):
  sd = tiny_sd
  assert set(sd.params) == {"unet", "vae", "text_encoder"}
  leaves = jax.tree.leaves(sd.params)
  assert all(x.dtype == jnp.float32 for x in leaves)
  assert sd.vae_scale_factor == sd.size_multiple == 2  # the UNet takes any latent size
  assert sd.scheduler_config["beta_schedule"] == "scaled_linear"
  half = models.load_sd(str(tiny_dir), dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half.params))
  np.testing.assert_allclose(
      np.asarray(jax.tree.leaves(half.params)[0], np.float32), np.asarray(leaves[0]),
      rtol=1e-2, atol=1e-2)


def test_tiny_tokenizer_encodes_words(tiny_sd):
  tok = tiny_sd.tokenizer
  ids = tok("a photo of the digit seven").input_ids
  assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
  assert len(ids) == 8  # bos + one token per word + eos: the merges cover the words
  assert tok.model_max_length == 77


def test_missing_checkpoint_dir_names_it(tmp_path):
  missing = tmp_path / "no_such_checkpoint"
  with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
    models.load_sd(str(missing))
  with pytest.raises(ValueError, match="diffusion.model is empty"):
    models.load_sd("")


def test_checkpoint_without_unet_names_subfolder(tiny_dir, tmp_path):
  broken = tmp_path / "broken"
  broken.mkdir()
  for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
    (broken / sub).mkdir()
  with pytest.raises(FileNotFoundError, match="unet"):
    models.load_sd(str(broken))


def test_bad_dtype_is_rejected(tiny_dir):
  with pytest.raises(ValueError, match="float16"):
    models.load_sd(str(tiny_dir), dtype="float16")


def test_converter_maps_names_and_layouts():
  shapes = {"down_blocks_0": {"attentions_0": {"to_q": {"kernel": jax.ShapeDtypeStruct((3, 5), jnp.float32)}},
                              "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32),
                                       "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
                              "norm": {"scale": jax.ShapeDtypeStruct((4,), jnp.float32)}},
            "mid": {"attn": {"query": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}}},
            "layers": {"0": {"fc": {"kernel": jax.ShapeDtypeStruct((2, 6), jnp.float32)}}}}
  rng = np.random.default_rng(0)
  pt = {"down_blocks.0.attentions.0.to_q.weight": rng.normal(size=(5, 3)),
        "down_blocks.0.conv.weight": rng.normal(size=(4, 2, 3, 3)),
        "down_blocks.0.conv.bias": rng.normal(size=(4,)),
        "down_blocks.0.norm.weight": rng.normal(size=(4,)),
        "mid.attn.to_q.weight": rng.normal(size=(4, 4)),
        "layers.0.fc.weight": rng.normal(size=(6, 2)),
        "embeddings.position_ids": np.arange(3)}
  out = weights.convert_state_dict(pt, shapes)
  np.testing.assert_array_equal(out["down_blocks_0"]["attentions_0"]["to_q"]["kernel"],
                                pt["down_blocks.0.attentions.0.to_q.weight"].T)
  np.testing.assert_array_equal(out["down_blocks_0"]["conv"]["kernel"],
                                pt["down_blocks.0.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(out["down_blocks_0"]["norm"]["scale"], pt["down_blocks.0.norm.weight"])
  np.testing.assert_array_equal(out["mid"]["attn"]["query"]["kernel"], pt["mid.attn.to_q.weight"].T)
  np.testing.assert_array_equal(out["layers"]["0"]["fc"]["kernel"], pt["layers.0.fc.weight"].T)
  del pt["down_blocks.0.conv.bias"]
  pt["stray.weight"] = np.zeros((2, 2))
  with pytest.raises(ValueError, match=r"stray.weight.*down_blocks_0/conv/bias"):
    weights.convert_state_dict(pt, shapes, source="unet")


def test_build_once_builds_once_and_a_failed_build_leaves_nothing(tmp_path):
  calls = []

  def build(path):
    calls.append(path)
    path.mkdir()
    (path / "model_index.json").write_text("{}")

  for _ in range(2):
    assert tiny.build_once(tmp_path / "sd", build, "model_index.json", "t") == tmp_path / "sd"
  assert len(calls) == 1 and (tmp_path / "sd" / "model_index.json").is_file()

  def killed(path):
    path.mkdir()
    (path / "half").write_text("")
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    tiny.build_once(tmp_path / "other", killed, "model_index.json", "t")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]
