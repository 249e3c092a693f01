"""Our UNet (models/unet.py) against diffusers' PyTorch modules (and, where diffusers < 0.40 is
installed, its Flax ones for the "flax" numerics): numerics, any latent size, SDXL."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from discl_jax import digit_models
from discl_jax.models import layers
from discl_jax.models import tiny
from discl_jax.models import unet as unet_lib
from discl_jax.models import weights

torch = pytest.importorskip("torch", reason="PyTorch parity needs the torch extra")

# Refiner-shaped (docs/design.md §5.1) at tiny scale: Down/CrossAttn/CrossAttn/Down, transformer
# depth 2, linear projections, text_time with 5 micro-conditions (72 = 32 + 5 x 8).
REFINER_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64, 64), layers_per_block=1, attention_head_dim=(2, 4, 4, 4),
    transformer_layers_per_block=2, use_linear_projection=True, cross_attention_dim=32,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=72)


def _torch_params(module, flax_module, *inputs):
  """Returns Flax params for `flax_module` converted from torch `module`'s state dict."""
  tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}
  shapes = jax.eval_shape(flax_module.init, jax.random.PRNGKey(0), *inputs)["params"]
  return weights.convert_state_dict(tensors, shapes)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------- modules


@pytest.fixture(scope="module")
def feed_forward():
  """(torch FeedForward, params, input) where tanh and erf GELU differ in the output by > 1e-3."""
  from diffusers.models.attention import FeedForward  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  module = FeedForward(32, activation_fn="geglu").eval()
  x = np.random.default_rng(0).normal(0, 8, (2, 7, 32)).astype(np.float32)
  return module, _torch_params(module, unet_lib.FeedForward(32), x), x


def _diffusers_flax(module, name):
  """Returns diffusers' Flax class `name`; skips where diffusers >= 0.40 has none (the reference
  of the "flax" numerics, which only checkpoints trained with those classes use)."""
  found = getattr(pytest.importorskip(module), name, None)
  if found is None:
    pytest.skip(f"diffusers has no {name} (>= 0.40): the flax numerics' reference needs < 0.40")
  return found


def test_feed_forward_computes_pytorch_functions(feed_forward):
  module, params, x = feed_forward
  with torch.no_grad():
    want = module(torch.from_numpy(x)).numpy()
  ours = unet_lib.FeedForward(32, numerics="pytorch").apply({"params": params}, x)
  ours_flax = unet_lib.FeedForward(32, numerics="flax").apply({"params": params}, x)
  assert np.abs(ours_flax - want).max() > 1e-3  # the departure is visible on these inputs
  np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)


def test_feed_forward_flax_numerics_are_diffusers_flax(feed_forward):
  flax_cls = _diffusers_flax("diffusers.models.attention_flax", "FlaxFeedForward")
  _, params, x = feed_forward
  ours_flax = unet_lib.FeedForward(32, numerics="flax").apply({"params": params}, x)
  np.testing.assert_array_equal(ours_flax, flax_cls(32).apply({"params": params}, x))


@pytest.fixture(scope="module")
def transformer():
  """(torch Transformer2DModel, params, x NHWC, context); x is small so GroupNorm eps matters."""
  from diffusers import Transformer2DModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  module = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                              cross_attention_dim=24, norm_num_groups=32).eval()
  rng = np.random.default_rng(1)
  x = (rng.normal(0, 3e-3, (2, 6, 5, 32)) + rng.normal(0, 1e-2, (32,))).astype(np.float32)
  context = rng.normal(0, 1, (2, 7, 24)).astype(np.float32)
  flax_module = unet_lib.Transformer2D(32, 2, 16)
  return module, _torch_params(module, flax_module, x, context), x, context


def test_transformer2d_computes_pytorch_functions(transformer):
  module, params, x, context = transformer
  with torch.no_grad():
    want = module(_nchw(x), encoder_hidden_states=torch.from_numpy(context)).sample
  want = want.numpy().transpose(0, 2, 3, 1)
  ours = unet_lib.Transformer2D(32, 2, 16, numerics="pytorch").apply({"params": params}, x, context)
  ours_flax = unet_lib.Transformer2D(32, 2, 16, numerics="flax").apply(
      {"params": params}, x, context)
  assert np.abs(ours_flax - want).max() > 1e-3
  np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)


def test_transformer2d_flax_numerics_are_diffusers_flax(transformer):
  flax_cls = _diffusers_flax("diffusers.models.attention_flax", "FlaxTransformer2DModel")
  _, params, x, context = transformer
  ours_flax = unet_lib.Transformer2D(32, 2, 16, numerics="flax").apply(
      {"params": params}, x, context)
  np.testing.assert_array_equal(ours_flax, flax_cls(32, 2, 16).apply({"params": params}, x, context))


@pytest.mark.parametrize("size,out", [((3, 4), (5, 7)), ((4, 4), (8, 8)), ((5, 7), (9, 13)),
                                      ((2, 3), (3, 3))])
def test_nearest_resize_picks_torch_pixels(size, out):
  x = np.arange(np.prod(size), dtype=np.float32).reshape(1, *size, 1)
  want = torch.nn.functional.interpolate(_nchw(x), size=out, mode="nearest").numpy()
  np.testing.assert_array_equal(layers.nearest_resize(jnp.asarray(x), out),
                                want.transpose(0, 2, 3, 1))


# ---------------------------------------------------------------- whole UNet


def _torch_unet(folder, config, seed):
  """Writes a PyTorch UNet2DConditionModel with `config` as safetensors in `folder`; returns it."""
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  module = UNet2DConditionModel(**config).eval()
  module.save_pretrained(folder, safe_serialization=True)
  return module


def _unet_inputs(config, latent_hw, seed):
  rng = np.random.default_rng(seed)
  inputs = {
      "sample": rng.normal(0, 1, (2, config["in_channels"], *latent_hw)).astype(np.float32),
      "timesteps": np.array([981.0, 401.0], np.float32),
      "encoder_hidden_states": rng.normal(0, 1, (2, 9, config["cross_attention_dim"])
                                          ).astype(np.float32),
  }
  if config.get("addition_embed_type") == "text_time":
    text_dim = config["projection_class_embeddings_input_dim"] - 5 * config["addition_time_embed_dim"]
    inputs["added_cond_kwargs"] = {
        "text_embeds": rng.normal(0, 1, (2, text_dim)).astype(np.float32),
        "time_ids": np.array([[40, 56, 0, 0, 2.5], [40, 56, 0, 0, 6.0]], np.float32)}
  return inputs


def _torch_apply(module, inputs):
  to_torch = lambda x: torch.from_numpy(np.asarray(x))  # pylint: disable=unnecessary-lambda-assignment
  added = inputs.get("added_cond_kwargs")
  with torch.no_grad():
    return module(to_torch(inputs["sample"]), to_torch(inputs["timesteps"]),
                  encoder_hidden_states=to_torch(inputs["encoder_hidden_states"]),
                  added_cond_kwargs={k: to_torch(v) for k, v in added.items()} if added else None
                  ).sample.numpy()


def _ours_apply(unet, params, inputs):
  return np.asarray(jax.jit(lambda p, i: unet.apply({"params": p}, **i).sample)(params, inputs))


@pytest.mark.parametrize("shape,latent_hw", [("sd1", (5, 7)), ("refiner", (20, 28))])
def test_unet_matches_pytorch_at_any_latent_size(shape, latent_hw, tmp_path):
  """Latents not divisible by 2^upsamplers: upsampling to the skip's size as PyTorch does."""
  config = tiny.sd_configs(100, 0, 1)[0] if shape == "sd1" else dict(REFINER_UNET)
  module = _torch_unet(tmp_path / "unet", config, seed=0)
  unet, params = unet_lib.load(tmp_path / "unet")  # safetensors through our converter
  assert unet.numerics == "pytorch"  # no marker: a PyTorch-trained checkpoint
  inputs = _unet_inputs(config, latent_hw, seed=1)
  want = _torch_apply(module, inputs)
  got = _ours_apply(unet, params, inputs)
  assert got.shape == want.shape == inputs["sample"].shape
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_text_time_needs_added_cond_kwargs():
  unet = unet_lib.UNet(**REFINER_UNET)
  params = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
  inputs = _unet_inputs(REFINER_UNET, (8, 8), seed=0)
  del inputs["added_cond_kwargs"]
  with pytest.raises(ValueError, match=r"text_time.*\['text_embeds', 'time_ids'\]"):
    jax.eval_shape(lambda p: unet.apply({"params": p}, **inputs), params)


def test_digit_generator_keeps_the_flax_functions_bit_for_bit():
  """The shipped generator was trained with diffusers' Flax modules: same outputs, every bit."""
  flax_cls = _diffusers_flax("diffusers", "FlaxUNet2DConditionModel")
  folder = digit_models.ROOT / "sd" / "unet"
  unet, params = unet_lib.load(folder)
  config = json.loads((folder / "config.json").read_text())
  assert config[unet_lib.NUMERICS_KEY] == unet.numerics == "flax"
  flax_unet = flax_cls.from_config(
      {k: v for k, v in config.items() if k != unet_lib.NUMERICS_KEY})
  inputs = _unet_inputs(config, (8, 8), seed=2)
  rng = np.random.default_rng(3)  # ControlNet-style residuals (NHWC) of every skip and the mid block
  inputs["down_block_additional_residuals"] = tuple(
      rng.normal(0, 1, shape).astype(np.float32)
      for shape in ((2, 8, 8, 32), (2, 8, 8, 32), (2, 4, 4, 32), (2, 4, 4, 64)))
  inputs["mid_block_additional_residual"] = rng.normal(0, 1, (2, 4, 4, 64)).astype(np.float32)
  want = _ours_apply(flax_unet, params, inputs)
  np.testing.assert_array_equal(_ours_apply(unet, params, inputs), want)


# ---------------------------------------------------------------- config and weights errors


@pytest.mark.parametrize("key,value,match", [
    ("class_embed_type", "timestep", "class_embed_type='timestep' is not supported"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
    ("some_new_option", 1, "unknown UNet config key 'some_new_option'"),
    (unet_lib.NUMERICS_KEY, "fp8", "discl_numerics='fp8'"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "down_block_types"),
])
def test_unsupported_config_is_named(key, value, match):
  config = dict(tiny.sd_configs(100, 0, 1)[0], **{key: value})
  with pytest.raises(ValueError, match=f"my/unet/config.json: {match}"):
    unet_lib.from_config(config, source="my/unet/config.json")


def test_mismatched_msgpack_weights_are_named(tmp_path):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  config = tiny.sd_configs(100, 0, 1)[0]
  (tmp_path / "config.json").write_text(json.dumps(config))
  unet = unet_lib.from_config(config)
  params = tiny.random_params(jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)), 0, "u")
  params["conv_in"]["kernel"] = params["conv_in"]["kernel"][..., :8]
  del params["conv_out"]
  (tmp_path / "diffusion_flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
  with pytest.raises(ValueError, match=r"diffusion_flax_model.msgpack.*missing \['conv_out/bias', "
                     r"'conv_out/kernel'\].*conv_in/kernel \(3, 3, 4, 8\) != \(3, 3, 4, 32\)"):
    unet_lib.load(tmp_path)


def test_mark_numerics_round_trips(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(tiny.sd_configs(100, 0, 1)[0]))
  unet_lib.mark_numerics(tmp_path, "flax")
  config = json.loads((tmp_path / "config.json").read_text())
  assert unet_lib.from_config(config).numerics == "flax"
  with pytest.raises(ValueError, match="numerics must be one of"):
    unet_lib.mark_numerics(tmp_path, "tf32")
