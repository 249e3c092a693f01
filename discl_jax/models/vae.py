"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in Flax linen.

Parameter tree and call of diffusers 0.39's `FlaxAutoencoderKL` (so its msgpack
files load unchanged), functions of PyTorch's `AutoencoderKL`: GroupNorm
variance in two passes and mid-block attention through `diffusion.attention`.
A checkpoint trained with the Flax class (the shipped digit VAE) records
`"discl_numerics": "flax"` in its config.json and keeps that class's
functions (one-pass variance, q and k each scaled by d^-1/4). `encode` takes
NCHW pixels and returns the posterior (NHWC); `decode` takes NCHW or NHWC
latents and returns NCHW pixels. SDXL runs it in float32 (`force_upcast`).
"""

import dataclasses
import json
import pathlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from discl_jax.diffusion import attention as attention_lib
from discl_jax.models import layers
from discl_jax.models import weights

NORM_EPS = 1e-6


@flax.struct.dataclass
class DiagonalGaussian:
  """The VAE posterior: mean and log-variance [B, h, w, C] (log-variance clipped to [-30, 20])."""
  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self):
    """Returns exp(logvar / 2)."""
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self):
    """Returns exp(logvar)."""
    return jnp.exp(self.logvar)

  def sample(self, key):
    """Returns mean + std * eps, eps ~ N(0, I) drawn with `key`."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape)

  def mode(self):
    """Returns the mean."""
    return self.mean


@flax.struct.dataclass
class EncoderOutput:
  """`encode`'s result (diffusers' AutoencoderKLOutput)."""
  latent_dist: DiagonalGaussian


@flax.struct.dataclass
class DecoderOutput:
  """`decode`'s result: NCHW pixels (diffusers' DecoderOutput)."""
  sample: jax.Array


@dataclasses.dataclass(frozen=True)
class _Spec:
  groups: int
  two_pass: bool
  dtype: Any
  attention: str


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, 1x1 shortcut when the width changes (no time embedding)."""
  out_channels: int
  spec: _Spec

  @nn.compact
  def __call__(self, x):
    s = self.spec
    h = nn.swish(layers.group_norm(s.groups, NORM_EPS, s.two_pass, "norm1")(x))
    h = layers.conv(self.out_channels, s.dtype, "conv1")(h)
    h = nn.swish(layers.group_norm(s.groups, NORM_EPS, s.two_pass, "norm2")(h))
    h = layers.conv(self.out_channels, s.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, s.dtype, "conv_shortcut", kernel=1)(x)
    return h + x


class AttentionBlock(nn.Module):
  """Single-head self-attention over the pixels with a GroupNorm in front and a residual."""
  channels: int
  spec: _Spec

  @nn.compact
  def __call__(self, x):
    s = self.spec
    b, h, w, c = x.shape
    hidden = layers.group_norm(s.groups, NORM_EPS, s.two_pass, "group_norm")(x).reshape(b, h * w, c)
    dense = lambda name: nn.Dense(self.channels, dtype=s.dtype, name=name)
    q, k, v = dense("query")(hidden), dense("key")(hidden), dense("value")(hidden)
    if s.two_pass:
      out = attention_lib.attention(q, k, v, 1, s.attention)
    else:  # diffusers' Flax AttentionBlock: q and k scaled by d^-1/4 each, softmax in the dtype
      scale = 1 / jnp.sqrt(jnp.sqrt(float(self.channels)))
      probs = nn.softmax(jnp.einsum("...qc,...kc->...qk", q * scale, k * scale), axis=-1)
      out = jnp.einsum("...kc,...qk->...qc", v, probs)
    return dense("proj_attn")(out).reshape(b, h, w, c) + x


class MidBlock(nn.Module):
  """Resnet, attention (unless `add_attention` is off), resnet."""
  channels: int
  add_attention: bool
  spec: _Spec

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock(self.channels, self.spec, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(self.channels, self.spec, name="attentions_0")(x)
    return ResnetBlock(self.channels, self.spec, name="resnets_1")(x)


class DownBlock(nn.Module):
  """`num_layers` resnets, then a stride-2 convolution (padded right and bottom) unless last."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  spec: _Spec

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.spec, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      x = _Conv(self.out_channels, self.spec.dtype, stride=2, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  """`num_layers` resnets, then a 2x nearest upsampling and a convolution unless last."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  spec: _Spec

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.spec, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = layers.nearest_resize(x, (2 * x.shape[1], 2 * x.shape[2]))
      x = _Conv(self.out_channels, self.spec.dtype, name="upsamplers_0")(x)
    return x


class _Conv(nn.Module):
  """A module holding one 3x3 convolution named "conv" (diffusers' Down/Upsample2D)."""
  features: int
  dtype: Any
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    padding = "VALID" if self.stride == 2 else None
    return layers.conv(self.features, self.dtype, "conv", stride=self.stride, padding=padding)(x)


class Encoder(nn.Module):
  """conv_in, down blocks, mid block, GroupNorm-SiLU, conv_out to 2 x latent channels."""
  block_out_channels: tuple
  layers_per_block: int
  out_channels: int
  add_attention: bool
  spec: _Spec

  @nn.compact
  def __call__(self, x):
    s, channels = self.spec, self.block_out_channels
    x = layers.conv(channels[0], s.dtype, "conv_in")(x)
    for i, width in enumerate(channels):
      x = DownBlock(width, self.layers_per_block, i < len(channels) - 1, s,
                    name=f"down_blocks_{i}")(x)
    x = MidBlock(channels[-1], self.add_attention, s, name="mid_block")(x)
    x = nn.swish(layers.group_norm(s.groups, NORM_EPS, s.two_pass, "conv_norm_out")(x))
    return layers.conv(2 * self.out_channels, s.dtype, "conv_out")(x)


class Decoder(nn.Module):
  """conv_in, mid block, up blocks (widths reversed), GroupNorm-SiLU, conv_out."""
  block_out_channels: tuple
  layers_per_block: int
  out_channels: int
  add_attention: bool
  spec: _Spec

  @nn.compact
  def __call__(self, x):
    s, channels = self.spec, tuple(reversed(self.block_out_channels))
    x = layers.conv(channels[0], s.dtype, "conv_in")(x)
    x = MidBlock(channels[0], self.add_attention, s, name="mid_block")(x)
    for i, width in enumerate(channels):
      x = UpBlock(width, self.layers_per_block + 1, i < len(channels) - 1, s,
                  name=f"up_blocks_{i}")(x)
    x = nn.swish(layers.group_norm(s.groups, NORM_EPS, s.two_pass, "conv_norm_out")(x))
    return layers.conv(self.out_channels, s.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL; fields are its config.json entries plus `numerics`."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple = ("DownEncoderBlock2D",)
  up_block_types: tuple = ("UpDecoderBlock2D",)
  block_out_channels: tuple = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  numerics: str = "pytorch"
  dtype: Any = jnp.float32
  attention: str = "xla"  # diffusion.attention's implementation (not a config.json entry)

  @property
  def config(self):
    """Returns the configuration (attribute and mapping access)."""
    return layers.FrozenConfig({name: getattr(self, name) for name in CONFIG_FIELDS})

  def _spec(self):
    return _Spec(self.norm_num_groups, self.numerics == "pytorch", self.dtype, self.attention)

  def setup(self):
    spec = self._spec()
    self.encoder = Encoder(self.block_out_channels, self.layers_per_block, self.latent_channels,
                           self.mid_block_add_attention, spec)
    self.decoder = Decoder(self.block_out_channels, self.layers_per_block, self.out_channels,
                           self.mid_block_add_attention, spec)
    if self.use_quant_conv:
      self.quant_conv = layers.conv(2 * self.latent_channels, self.dtype, None, kernel=1)
    if self.use_post_quant_conv:
      self.post_quant_conv = layers.conv(self.latent_channels, self.dtype, None, kernel=1)

  def encode(self, sample):
    """Returns EncoderOutput(latent_dist) of NCHW pixels in [-1, 1]."""
    moments = self.encoder(jnp.transpose(sample, (0, 2, 3, 1)))
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return EncoderOutput(DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0)))

  def decode(self, latents):
    """Returns DecoderOutput(NCHW pixels) of NCHW (or NHWC) latents."""
    if latents.shape[-1] != self.latent_channels:
      latents = jnp.transpose(latents, (0, 2, 3, 1))
    if self.use_post_quant_conv:
      latents = self.post_quant_conv(latents)
    return DecoderOutput(jnp.transpose(self.decoder(latents), (0, 3, 1, 2)))

  def __call__(self, sample, key=None):
    """Returns the reconstruction (NCHW) of `sample`: the posterior's mode, or a sample with `key`."""
    posterior = self.encode(sample).latent_dist
    latents = posterior.mode() if key is None else posterior.sample(key)
    return self.decode(latents).sample

  def init_weights(self, rng):
    """Returns freshly initialised params (use under jax.eval_shape for the parameter shapes)."""
    size = 2 ** (len(self.block_out_channels) - 1)
    return self.init(rng, jnp.zeros((1, self.in_channels, size, size), jnp.float32))["params"]


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(AutoencoderKL)
                      if f.name not in ("dtype", "attention", "parent", "name"))
# Entries that change nothing computed here (PyTorch's tiling, statistics for other pipelines).
_INERT_KEYS = ("act_fn", "latents_mean", "latents_std", "use_slicing", "use_tiling")


def from_config(config, dtype=jnp.float32, source="VAE config"):
  """Returns the AutoencoderKL of a diffusers VAE config dict; ValueError names unsupported keys."""
  fields = {}
  for key, value in config.items():
    if key.startswith("_") or key in _INERT_KEYS:
      if key == "act_fn" and value != "silu":
        raise ValueError(f"{source}: act_fn={value!r} is not supported (only 'silu')")
      continue
    if key == layers.NUMERICS_KEY:
      fields["numerics"] = layers.check_numerics(value, source)
    elif key in CONFIG_FIELDS and key != "numerics":
      fields[key] = tuple(value) if isinstance(value, list) else value
    else:
      raise ValueError(f"{source}: unknown VAE config key {key!r}")
  for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                    ("up_block_types", "UpDecoderBlock2D")):
    if any(v != kind for v in fields.get(key, ())):
      raise ValueError(f"{source}: {key}={list(fields[key])} must all be {kind!r}")
  return AutoencoderKL(**fields, dtype=dtype)


def load(folder, dtype=jnp.float32):
  """Returns (AutoencoderKL, float32 numpy params) of a diffusers `vae` folder (any format weights.py reads)."""
  folder = pathlib.Path(folder)
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"missing VAE config {str(config_file)!r}")
  try:
    config = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(config_file)!r} is not valid JSON: {e}") from e
  vae = from_config(config, dtype, source=str(config_file))
  shapes = jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))
  return vae, weights.load_params(folder, shapes, "diffusers")


def save(folder, vae, params):
  """Writes `vae`'s config.json and params (Flax msgpack) into `folder`; returns the folder."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  config = {k: v for k, v in vae.config.items() if k != "numerics"}
  config.update({"_class_name": "AutoencoderKL", layers.NUMERICS_KEY: vae.numerics})
  (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  weights.save_msgpack(params, folder / weights.FLAX_WEIGHTS["diffusers"])
  return folder
