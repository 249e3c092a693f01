"""The Stable Diffusion UNet (SD 1.x/2.x and SDXL) with PyTorch's functions, at any latent size.

`UNet` has the parameter tree and call signature of diffusers 0.39's
`FlaxUNet2DConditionModel`, including SDXL's `addition_embed_type="text_time"`,
so Flax msgpack checkpoints and `convert.py`'s safetensors load into it
unchanged. It differs from that class where PyTorch's `UNet2DConditionModel`
does (docs/design.md §5.9):

- numerics: every real SD checkpoint was trained in PyTorch and gets PyTorch's
  functions (`NUMERICS["pytorch"]`); a checkpoint trained with diffusers' Flax
  modules (the shipped digit generator) keeps theirs (`NUMERICS["flax"]`). The
  choice is recorded in the UNet's config.json under `NUMERICS_KEY` (absent:
  "pytorch").
- sizes: any latent size, as PyTorch's `forward_upsample_size`: each upsampler
  resizes to its skip connection's size with torch's nearest indexing.

The `attention` field names the attention implementation (attention.py,
`diffusion.attention`); it is a run-time choice, not part of the config.json.

Inference only: dropout is not applied.
"""

import dataclasses
import json
import math
import pathlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax import traverse_util

from discl_jax import workdir as wd
from discl_jax.diffusion import attention as attention_lib
from discl_jax.diffusion import convert

NUMERICS_KEY = "discl_numerics"


@dataclasses.dataclass(frozen=True)
class Numerics:
  """The functions where diffusers' Flax and PyTorch UNet modules differ."""
  exact_gelu: bool  # GEGLU gate: erf GELU (PyTorch) or the tanh approximation (Flax)
  transformer_norm_eps: float  # Transformer2D GroupNorm epsilon: 1e-6 (PyTorch), 1e-5 (Flax)
  two_pass_variance: bool  # norms' variance E[(x - mean)^2] (PyTorch) or E[x^2] - mean^2 (Flax)
  torch_timestep_embedding: bool  # sinusoid frequencies in get_timestep_embedding's operation order


NUMERICS = {
    "pytorch": Numerics(exact_gelu=True, transformer_norm_eps=1e-6, two_pass_variance=True,
                        torch_timestep_embedding=True),
    "flax": Numerics(exact_gelu=False, transformer_norm_eps=1e-5, two_pass_variance=False,
                     torch_timestep_embedding=False),
}


def _numerics(name):
  if name not in NUMERICS:
    raise ValueError(f"UNet numerics must be one of {sorted(NUMERICS)}, got {name!r}")
  return NUMERICS[name]


# ---------------------------------------------------------------- functions


def timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift, torch_order=True):
  """Returns float32 [N, dim] sinusoidal embeddings of the 1-D `timesteps`.

  `torch_order` computes the frequencies as diffusers' PyTorch
  `get_timestep_embedding` does, else as its Flax `get_sinusoidal_embeddings`.
  """
  half = dim // 2
  if torch_order:
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  else:
    step = math.log(10000.0) / (half - freq_shift)
    args = timesteps[:, None] * jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)[None]
  sin, cos = jnp.sin(args), jnp.cos(args)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=1)


def nearest_resize(x, size):
  """Returns NHWC `x` resized to `size` = (h, w) as torch's nearest: src = floor(i * in / out).

  The scale is float32 `in / out` as in torch's kernel; `jax.image.resize`
  picks other pixels for sizes that are not 2x.
  """
  for axis, out in zip((1, 2), size):
    n = x.shape[axis]
    if out == 2 * n:
      x = jnp.repeat(x, 2, axis=axis)
    elif out != n:
      scale = np.float32(n) / np.float32(out)
      src = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale), n - 1).astype(np.int32)
      x = jnp.take(x, src, axis=axis)
  return x


def _group_norm(groups, eps, numerics, name):
  return nn.GroupNorm(num_groups=groups, epsilon=eps,
                      use_fast_variance=not numerics.two_pass_variance, name=name)


def _conv(features, dtype, name, kernel=3, stride=1):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)) if pad else "VALID", dtype=dtype, name=name)


# ---------------------------------------------------------------- layers


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice with the time embedding added between; 1x1 shortcut if needed."""
  out_channels: int
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  numerics: str = "pytorch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb):
    spec = _numerics(self.numerics)
    residual = x
    x = nn.swish(_group_norm(self.norm_num_groups, self.norm_eps, spec, "norm1")(x))
    x = _conv(self.out_channels, self.dtype, "conv1")(x)
    temb = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.swish(temb))
    x = x + temb[:, None, None, :]
    x = nn.swish(_group_norm(self.norm_num_groups, self.norm_eps, spec, "norm2")(x))
    x = _conv(self.out_channels, self.dtype, "conv2")(x)
    if residual.shape[-1] != self.out_channels:
      residual = _conv(self.out_channels, self.dtype, "conv_shortcut", kernel=1)(residual)
    return x + residual


class Downsample2D(nn.Module):
  """A 3x3 stride-2 convolution (padding 1): spatial size ceil(n / 2)."""
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(self.out_channels, self.dtype, "conv", stride=2)(x)


class Upsample2D(nn.Module):
  """Nearest resize to `size` (default 2x) as torch does it, then a 3x3 convolution."""
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, size=None):
    x = nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]))
    return _conv(self.out_channels, self.dtype, "conv")(x)


class Attention(nn.Module):
  """Multi-head attention: to_q/to_k/to_v projections, attention.py's `attention`, to_out_0."""
  query_dim: int
  heads: int
  dim_head: int
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    inner = self.heads * self.dim_head
    query = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
    key = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
    value = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
    out = attention_lib.attention(query, key, value, self.heads, self.attention)
    return nn.Dense(self.query_dim, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
  """Linear to 2 x 4 dim, then value * GELU(gate) (erf or tanh GELU per `numerics`)."""
  dim: int
  numerics: str = "pytorch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.dim * 8, dtype=self.dtype, name="proj")(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=not _numerics(self.numerics).exact_gelu)


class FeedForward(nn.Module):
  """GEGLU then a linear back to `dim` (diffusers' FeedForward with activation "geglu")."""
  dim: int
  numerics: str = "pytorch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = GEGLU(self.dim, self.numerics, self.dtype, name="net_0")(x)
    return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention and feed-forward, each pre-LayerNorm and residual."""
  dim: int
  n_heads: int
  d_head: int
  only_cross_attention: bool = False
  numerics: str = "pytorch"
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, context):
    spec = _numerics(self.numerics)

    def norm(name):
      return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                          use_fast_variance=not spec.two_pass_variance, name=name)

    attn1 = Attention(self.dim, self.n_heads, self.d_head, self.dtype, self.attention,
                      name="attn1")
    x = attn1(norm("norm1")(x), context if self.only_cross_attention else None) + x
    x = Attention(self.dim, self.n_heads, self.d_head, self.dtype, self.attention, name="attn2")(
        norm("norm2")(x), context) + x
    return FeedForward(self.dim, self.numerics, self.dtype, name="ff")(norm("norm3")(x)) + x


class Transformer2D(nn.Module):
  """GroupNorm, projection in, `depth` transformer blocks over the pixels, projection out, residual."""
  in_channels: int
  n_heads: int
  d_head: int
  depth: int = 1
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  norm_num_groups: int = 32
  numerics: str = "pytorch"
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, context):
    spec = _numerics(self.numerics)
    b, h, w, c = x.shape
    inner = self.n_heads * self.d_head
    residual = x
    x = _group_norm(self.norm_num_groups, spec.transformer_norm_eps, spec, "norm")(x)
    if self.use_linear_projection:
      x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
    else:
      x = _conv(inner, self.dtype, "proj_in", kernel=1)(x).reshape(b, h * w, inner)
    for i in range(self.depth):
      x = BasicTransformerBlock(inner, self.n_heads, self.d_head, self.only_cross_attention,
                                self.numerics, self.dtype, self.attention,
                                name=f"transformer_blocks_{i}")(x, context)
    if self.use_linear_projection:
      x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
    else:
      x = _conv(c, self.dtype, "proj_out", kernel=1)(x.reshape(b, h, w, inner))
    return x + residual


# ---------------------------------------------------------------- blocks


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
  """What the blocks of one UNet share."""
  norm_num_groups: int
  norm_eps: float
  use_linear_projection: bool
  numerics: str
  dtype: Any
  attention: str

  def resnet(self, out_channels, name):
    return ResnetBlock2D(out_channels, self.norm_num_groups, self.norm_eps, self.numerics,
                         self.dtype, name=name)

  def transformer(self, channels, heads, depth, only_cross_attention, name):
    return Transformer2D(channels, heads, channels // heads, depth, self.use_linear_projection,
                         only_cross_attention, self.norm_num_groups, self.numerics, self.dtype,
                         self.attention, name=name)


class DownBlock(nn.Module):
  """Resnets (each followed by a Transformer2D when `heads`), then a downsampler unless last.

  `heads=0` is diffusers' DownBlock2D, otherwise its CrossAttnDownBlock2D.
  """
  out_channels: int
  num_layers: int
  heads: int
  depth: int
  only_cross_attention: bool
  add_downsample: bool
  spec: _BlockSpec

  @nn.compact
  def __call__(self, x, temb, context):
    outputs = ()
    for i in range(self.num_layers):
      x = self.spec.resnet(self.out_channels, f"resnets_{i}")(x, temb)
      if self.heads:
        x = self.spec.transformer(self.out_channels, self.heads, self.depth,
                                  self.only_cross_attention, f"attentions_{i}")(x, context)
      outputs += (x,)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.spec.dtype, name="downsamplers_0")(x)
      outputs += (x,)
    return x, outputs


class UpBlock(nn.Module):
  """Resnets on x ++ skip (each + Transformer2D when `heads`), then an upsampler unless last.

  `heads=0` is diffusers' UpBlock2D, otherwise its CrossAttnUpBlock2D.
  """
  out_channels: int
  num_layers: int
  heads: int
  depth: int
  only_cross_attention: bool
  add_upsample: bool
  spec: _BlockSpec

  @nn.compact
  def __call__(self, x, skips, temb, context, upsample_size=None):
    for i in range(self.num_layers):
      x = jnp.concatenate((x, skips[-1 - i]), axis=-1)
      x = self.spec.resnet(self.out_channels, f"resnets_{i}")(x, temb)
      if self.heads:
        x = self.spec.transformer(self.out_channels, self.heads, self.depth,
                                  self.only_cross_attention, f"attentions_{i}")(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.spec.dtype, name="upsamplers_0")(x, upsample_size)
    return x


class MidBlock(nn.Module):
  """diffusers' UNetMidBlock2DCrossAttn: resnet, then (Transformer2D, resnet)."""
  channels: int
  heads: int
  depth: int
  spec: _BlockSpec

  @nn.compact
  def __call__(self, x, temb, context):
    x = self.spec.resnet(self.channels, "resnets_0")(x, temb)
    x = self.spec.transformer(self.channels, self.heads, self.depth, False, "attentions_0")(x, context)
    return self.spec.resnet(self.channels, "resnets_1")(x, temb)


# ---------------------------------------------------------------- UNet


@flax.struct.dataclass
class UNetOutput:
  """The UNet's prediction, [B, C, H, W] (diffusers' FlaxUNet2DConditionOutput)."""
  sample: jax.Array


def _per_block(value, n):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class UNet(nn.Module):
  """diffusers' UNet2DConditionModel (its Flax class's params and call) with `numerics`' functions.

  Fields are the config.json entries of diffusers' Flax UNet plus PyTorch's
  `norm_num_groups`, `norm_eps` and the `numerics` name (a key of NUMERICS);
  `attention` is one of attention.IMPLEMENTATIONS.
  """
  sample_size: int = 32
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  only_cross_attention: bool | tuple = False
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_head_dim: int | tuple = 8
  cross_attention_dim: int = 1280
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  transformer_layers_per_block: int | tuple = 1
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  numerics: str = "pytorch"
  dtype: Any = jnp.float32
  attention: str = "xla"  # attention.py's implementation (not a config.json entry)

  @property
  def config(self):
    """Returns the configuration (attribute and mapping access, like diffusers' config)."""
    from diffusers.configuration_utils import FrozenDict  # pylint: disable=g-import-not-at-top
    return FrozenDict({name: getattr(self, name) for name in CONFIG_FIELDS})

  def init_weights(self, rng):
    """Returns freshly initialised params (use under jax.eval_shape for the parameter shapes)."""
    size = 2 ** (len(self.block_out_channels) - 1)
    sample = jnp.zeros((1, self.in_channels, size, size), jnp.float32)
    context = jnp.zeros((1, 1, self.cross_attention_dim), jnp.float32)
    added = None
    if self.addition_embed_type == "text_time":  # the add-embedding sees text_embeds ++ time embeds
      width = self.projection_class_embeddings_input_dim - self.addition_time_embed_dim
      added = {"text_embeds": jnp.zeros((1, width), jnp.float32),
               "time_ids": jnp.zeros((1, 1), jnp.float32)}
    return self.init(rng, sample, jnp.ones((1,), jnp.int32), context, added)["params"]

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None,
               down_block_additional_residuals=None, mid_block_additional_residual=None,
               return_dict=True, train=False):
    """Returns UNetOutput(sample) (or a 1-tuple) for NCHW `sample`; `train` is ignored."""
    del train  # inference only
    spec = _numerics(self.numerics)
    n_blocks = len(self.block_out_channels)
    heads = _per_block(self.attention_head_dim, n_blocks)
    depths = _per_block(self.transformer_layers_per_block, n_blocks)
    only_cross = _per_block(self.only_cross_attention, n_blocks)
    blocks = _BlockSpec(self.norm_num_groups, self.norm_eps, self.use_linear_projection,
                        self.numerics, self.dtype, self.attention)
    time_dim = self.block_out_channels[0] * 4

    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    temb = timestep_embedding(timesteps, self.block_out_channels[0], self.flip_sin_to_cos,
                              self.freq_shift, spec.torch_timestep_embedding)
    temb = _TimestepEmbedding(time_dim, self.dtype, name="time_embedding")(temb)
    if self.addition_embed_type == "text_time":
      add_embeds = self._text_time(added_cond_kwargs, spec)
      temb = temb + _TimestepEmbedding(time_dim, self.dtype, name="add_embedding")(add_embeds)

    x = jnp.transpose(sample, (0, 2, 3, 1))
    x = _conv(self.block_out_channels[0], self.dtype, "conv_in")(x)
    skips = (x,)
    for i, kind in enumerate(self.down_block_types):
      block = DownBlock(self.block_out_channels[i], self.layers_per_block,
                        heads[i] if kind == "CrossAttnDownBlock2D" else 0, depths[i],
                        only_cross[i], i < n_blocks - 1, blocks, name=f"down_blocks_{i}")
      x, outputs = block(x, temb, encoder_hidden_states)
      skips += outputs
    if down_block_additional_residuals is not None:
      skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

    if self.mid_block_type == "UNetMidBlock2DCrossAttn":
      x = MidBlock(self.block_out_channels[-1], heads[-1], depths[-1], blocks,
                   name="mid_block")(x, temb, encoder_hidden_states)
    if mid_block_additional_residual is not None:
      x = x + mid_block_additional_residual

    n_skip = self.layers_per_block + 1
    for i, kind in enumerate(self.up_block_types):
      level = n_blocks - 1 - i
      block_skips, skips = skips[-n_skip:], skips[:-n_skip]
      last = i == n_blocks - 1
      block = UpBlock(self.block_out_channels[level], n_skip,
                      heads[level] if kind == "CrossAttnUpBlock2D" else 0, depths[level],
                      only_cross[level], not last, blocks, name=f"up_blocks_{i}")
      x = block(x, block_skips, temb, encoder_hidden_states,
                None if last else skips[-1].shape[1:3])

    x = nn.swish(_group_norm(self.norm_num_groups, self.norm_eps, spec, "conv_norm_out")(x))
    x = _conv(self.out_channels, self.dtype, "conv_out")(x)
    x = jnp.transpose(x, (0, 3, 1, 2))
    return UNetOutput(sample=x) if return_dict else (x,)

  def _text_time(self, added_cond_kwargs, spec):
    """Returns SDXL's add-embedding input: text_embeds ++ sinusoids of each of time_ids."""
    added = added_cond_kwargs or {}
    missing = [k for k in ("text_embeds", "time_ids") if added.get(k) is None]
    if missing:
      raise ValueError(f"addition_embed_type='text_time' needs added_cond_kwargs {missing}")
    text_embeds, time_ids = added["text_embeds"], added["time_ids"]
    time_embeds = timestep_embedding(jnp.ravel(time_ids), self.addition_time_embed_dim,
                                     self.flip_sin_to_cos, self.freq_shift,
                                     spec.torch_timestep_embedding)
    time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
    return jnp.concatenate([text_embeds, time_embeds], axis=-1)


class _TimestepEmbedding(nn.Module):
  """linear_1, SiLU, linear_2 (diffusers' TimestepEmbedding)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


# ---------------------------------------------------------------- config and loading

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(UNet)
                      if f.name not in ("dtype", "attention", "parent", "name"))
# Keys that do not change what the UNet computes here (sizes of init inputs, attention
# implementation choices, dropout at inference, PyTorch's fp16-only upcast).
_INERT_KEYS = ("dropout", "use_memory_efficient_attention", "split_head_dim", "upcast_attention",
               "addition_embed_type_num_heads")
# PyTorch UNet2DConditionModel options this UNet implements only at their default.
_PYTORCH_DEFAULTS = {
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "act_fn": "silu", "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_attention_heads": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _hashable(value):
  return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def from_config(config, dtype=jnp.float32, source="UNet config"):
  """Returns the UNet of a diffusers UNet config dict (Flax or PyTorch keys, numerics marker).

  Raises ValueError naming `source` and the key for options this UNet does not implement.
  """
  fields = {}
  for key, value in config.items():
    if key.startswith("_") or key in _INERT_KEYS:
      continue
    if key == NUMERICS_KEY:
      if value not in NUMERICS:
        raise ValueError(f"{source}: {key}={value!r}; valid: {sorted(NUMERICS)}")
      fields["numerics"] = value
    elif key in _PYTORCH_DEFAULTS:
      if value != _PYTORCH_DEFAULTS[key] and not (key == "mid_block_only_cross_attention"
                                                  and value is False):
        raise ValueError(f"{source}: {key}={value!r} is not supported "
                         f"(only {_PYTORCH_DEFAULTS[key]!r})")
    elif key in CONFIG_FIELDS and key != "numerics":
      fields[key] = _hashable(value)
    else:
      raise ValueError(f"{source}: unknown UNet config key {key!r}")
  unet = UNet(**fields, dtype=dtype)
  _check(unet, source)
  return unet


def _check(unet, source):
  n = len(unet.block_out_channels)
  for key, kinds in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
    value = getattr(unet, key)
    if len(value) != n or any(v not in kinds for v in value):
      raise ValueError(f"{source}: {key}={list(value)} must be {n} of {list(kinds)}")
  if unet.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
    raise ValueError(f"{source}: mid_block_type={unet.mid_block_type!r} is not supported "
                     "(UNetMidBlock2DCrossAttn or null)")
  if any(isinstance(v, tuple) for v in _per_block(unet.transformer_layers_per_block, n)):
    raise ValueError(f"{source}: nested transformer_layers_per_block is not supported")
  if not isinstance(unet.cross_attention_dim, int):
    raise ValueError(f"{source}: cross_attention_dim must be one integer, "
                     f"got {unet.cross_attention_dim!r}")
  if unet.addition_embed_type not in (None, "text_time"):
    raise ValueError(f"{source}: addition_embed_type={unet.addition_embed_type!r} is not "
                     "supported (null or 'text_time')")
  if unet.addition_embed_type == "text_time" and not (
      unet.addition_time_embed_dim and unet.projection_class_embeddings_input_dim):
    raise ValueError(f"{source}: addition_embed_type='text_time' needs addition_time_embed_dim "
                     "and projection_class_embeddings_input_dim")


def _check_params(params, shapes, source):
  """Raises ValueError naming `source` unless `params` has exactly the tree and shapes of `shapes`."""
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
  missing = sorted("/".join(k) for k in want.keys() - got.keys())
  unexpected = sorted("/".join(k) for k in got.keys() - want.keys())
  wrong = sorted(f"{'/'.join(k)} {got[k]} != {want[k]}" for k in want.keys() & got.keys()
                 if got[k] != want[k])
  if missing or unexpected or wrong:
    raise ValueError(f"UNet weights {source} do not fit its config: {len(missing)} missing "
                     f"{missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}, "
                     f"{len(wrong)} of another shape {wrong[:8]}")


def load(folder, dtype=jnp.float32):
  """Returns (UNet, float32 numpy params) of a diffusers `unet` folder (msgpack or safetensors)."""
  folder = pathlib.Path(folder)
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"missing UNet config {str(config_file)!r}")
  unet = from_config(json.loads(config_file.read_text()), dtype, source=str(config_file))
  shapes = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
  msgpack = folder / "diffusion_flax_model.msgpack"
  if msgpack.is_file():
    with wd.reading_weights(msgpack):
      params = serialization.msgpack_restore(msgpack.read_bytes())
    _check_params(params, shapes, str(msgpack))
    return unet, jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  files = convert.safetensors_files(folder, "diffusion_pytorch_model")
  if not files:
    raise FileNotFoundError(f"no diffusion_flax_model.msgpack or "
                            f"diffusion_pytorch_model*.safetensors in {str(folder)!r}")
  return unet, convert.convert_state_dict(convert.read_safetensors(files), shapes,
                                          source=str(folder))


def mark_numerics(folder, numerics):
  """Records `numerics` (the functions the UNet was trained with) in folder/config.json; returns it."""
  _numerics(numerics)
  config_file = pathlib.Path(folder) / "config.json"
  config = json.loads(config_file.read_text())
  config[NUMERICS_KEY] = numerics
  config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return config_file
