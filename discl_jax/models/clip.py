"""CLIP in Flax linen: the text transformer (SD / SDXL text encoders), the vision transformer,
and the dual model with its logit scale (CLIPScore, FLYP).

Parameter trees of transformers 4.x's `FlaxCLIPTextModel`,
`FlaxCLIPTextModelWithProjection` and `FlaxCLIPModel` (their msgpack files
load unchanged), functions of the PyTorch classes: two-pass LayerNorm
variance, attention through `diffusion.attention`, and the pooled text output
at the first EOS token (`eos_token_id` from the config; a config with the
legacy id 2 pools at argmax(input_ids), as PyTorch does). A checkpoint
trained with the Flax classes (the shipped digit CLIP) records
`"discl_numerics": "flax"` in its config.json and keeps their one-pass
LayerNorm and attention formula. Images are NHWC.
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

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}
LEGACY_EOS_ID = 2  # configs from before transformers read eos_token_id: pool at argmax(ids)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """transformers' CLIPTextConfig entries that change what is computed."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  numerics: str = "pytorch"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """transformers' CLIPVisionConfig entries that change what is computed."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  numerics: str = "pytorch"


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """transformers' CLIPConfig: the two towers, the joint embedding size and the logit scale's init."""
  text_config: TextConfig = TextConfig()
  vision_config: VisionConfig = VisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592


def _fields(cls, entries, numerics, source):
  names = {f.name for f in dataclasses.fields(cls)} - {"numerics"}
  values = {k: v for k, v in entries.items() if k in names and v is not None}
  act = values.get("hidden_act", "quick_gelu")
  if act not in ACTIVATIONS:
    raise ValueError(f"{source}: hidden_act={act!r} is not supported ({sorted(ACTIVATIONS)})")
  return cls(**values, numerics=layers.check_numerics(numerics, source))


def text_config(entries, source="CLIP text config"):
  """Returns the TextConfig of a transformers CLIPTextConfig dict (a config.json)."""
  return _fields(TextConfig, entries, entries.get(layers.NUMERICS_KEY, "pytorch"), source)


def clip_config(entries, source="CLIP config"):
  """Returns the ClipConfig of a transformers CLIPConfig dict (a config.json)."""
  numerics = entries.get(layers.NUMERICS_KEY, "pytorch")
  return ClipConfig(
      text_config=_fields(TextConfig, entries.get("text_config") or {}, numerics, source),
      vision_config=_fields(VisionConfig, entries.get("vision_config") or {}, numerics, source),
      projection_dim=int(entries.get("projection_dim", 512)),
      logit_scale_init_value=float(entries.get("logit_scale_init_value", 2.6592)))


def _tower_dict(config, model_type):
  out = {k: v for k, v in dataclasses.asdict(config).items() if k != "numerics"}
  return dict(out, model_type=model_type)


def text_config_dict(config, projection=False):
  """Returns a config.json dict (transformers' layout) of a text encoder of `config`."""
  out = dict(_tower_dict(config, "clip_text_model"),
             architectures=["CLIPTextModelWithProjection" if projection else "CLIPTextModel"])
  if config.numerics != "pytorch":
    out[layers.NUMERICS_KEY] = config.numerics
  return out


def clip_config_dict(config):
  """Returns a config.json dict (transformers' layout) of a CLIP of `config`."""
  out = {"architectures": ["CLIPModel"], "model_type": "clip",
         "projection_dim": config.projection_dim,
         "logit_scale_init_value": config.logit_scale_init_value,
         "text_config": _tower_dict(config.text_config, "clip_text_model"),
         "vision_config": _tower_dict(config.vision_config, "clip_vision_model")}
  if config.text_config.numerics != "pytorch":
    out[layers.NUMERICS_KEY] = config.text_config.numerics
  return out


# ---------------------------------------------------------------- layers


class Attention(nn.Module):
  """q/k/v/out projections with biases; `mask` [B or 1, L, L] (True: attend)."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, mask=None):
    cfg = self.config
    heads, dim = cfg.num_attention_heads, cfg.hidden_size
    dense = lambda name: nn.Dense(dim, dtype=self.dtype, name=name)
    q, k, v = dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x)
    if cfg.numerics == "pytorch":
      out = attention_lib.attention(q, k, v, heads, self.attention, mask=mask)
    else:
      out = _flax_attention(q, k, v, heads, mask, self.dtype)
    return dense("out_proj")(out)


def _flax_attention(q, k, v, heads, mask, dtype):
  """Returns transformers' Flax CLIP attention: q / sqrt(d), masked by a finfo.min bias, softmax in `dtype`."""
  split = lambda x: x.reshape(x.shape[:2] + (heads, x.shape[2] // heads))
  q, k, v = split(q), split(k), split(v)
  q = q / jnp.sqrt(q.shape[-1]).astype(dtype)
  scores = jnp.einsum("...qhd,...khd->...hqk", q, k)
  if mask is not None:
    scores = scores + jnp.where(mask[:, None], 0.0, jnp.finfo(dtype).min).astype(dtype)
  probs = jax.nn.softmax(scores).astype(dtype)
  out = jnp.einsum("...hqk,...khd->...qhd", probs, v)
  return out.reshape(out.shape[:2] + (-1,))


class EncoderLayer(nn.Module):
  """Pre-LayerNorm self-attention and MLP (fc1, activation, fc2), each residual."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, mask=None):
    cfg = self.config
    two_pass = cfg.numerics == "pytorch"
    norm = lambda name: layers.layer_norm(cfg.layer_norm_eps, two_pass, self.dtype, name)
    x = x + Attention(cfg, self.dtype, self.attention, name="self_attn")(norm("layer_norm1")(x), mask)
    return x + MLP(cfg, self.dtype, name="mlp")(norm("layer_norm2")(x))


class MLP(nn.Module):
  """fc1, the config's activation, fc2."""
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(ACTIVATIONS[cfg.hidden_act](x))


class Encoder(nn.Module):
  """The transformer layers; returns every hidden state (the input first, the last unnormalised)."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, mask=None):
    states = (x,)
    for i in range(self.config.num_hidden_layers):
      x = EncoderLayer(self.config, self.dtype, self.attention, name=str(i))(x, mask)
      states += (x,)
    return states


class _Layers(nn.Module):
  """`layers/<i>`: the parameter path transformers' Flax CLIP gives the encoder layers."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, mask=None):
    return Encoder(self.config, self.dtype, self.attention, name="layers")(x, mask)


@flax.struct.dataclass
class TextOutput:
  """Text transformer outputs: final-normed states [B, L, D], pooled [B, D], all hidden states.

  `hidden_states[-2]` is the input of the last layer (SDXL's prompt embeddings);
  `text_embeds` is the projection of `pooler_output` (None without a projection).
  """
  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: tuple
  text_embeds: Any = None


def eos_positions(input_ids, eos_token_id):
  """Returns [B] the pooling index of each row: its first `eos_token_id` (argmax(ids) for the legacy id 2)."""
  if eos_token_id == LEGACY_EOS_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextTransformer(nn.Module):
  """Token + position embeddings, causal layers, final LayerNorm, pooling at EOS."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    cfg = self.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    length = input_ids.shape[-1]
    x = _TextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
    mask = jnp.tril(jnp.ones((1, length, length), bool))
    if attention_mask is not None:
      mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, :]
    states = _Layers(cfg, self.dtype, self.attention, name="encoder")(x, mask)
    two_pass = cfg.numerics == "pytorch"
    last = layers.layer_norm(cfg.layer_norm_eps, two_pass, self.dtype, "final_layer_norm")(states[-1])
    pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
    return TextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states)


class _TextEmbeddings(nn.Module):
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.config
    tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                         name="position_embedding")
    return tokens(input_ids) + positions(jnp.arange(input_ids.shape[-1])[None])


class VisionTransformer(nn.Module):
  """Patch embedding (no bias), class token, positions, pre-LayerNorm, layers, pooled class token."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, pixels):
    cfg = self.config
    two_pass = cfg.numerics == "pytorch"
    x = _VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
    x = layers.layer_norm(cfg.layer_norm_eps, two_pass, self.dtype, "pre_layrnorm")(x)
    last = _Layers(cfg, self.dtype, self.attention, name="encoder")(x)[-1]
    pooled = layers.layer_norm(cfg.layer_norm_eps, two_pass, self.dtype, "post_layernorm")(last[:, 0])
    return last, pooled


class _VisionEmbeddings(nn.Module):
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    cfg = self.config
    p = cfg.patch_size
    patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, name="patch_embedding")(pixels)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, cfg.hidden_size)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
    cls = jnp.tile(jnp.asarray(cls, self.dtype)[None, None], (b, 1, 1))
    x = jnp.concatenate([cls, patches], axis=1)
    positions = nn.Embed(x.shape[1], cfg.hidden_size, dtype=self.dtype, name="position_embedding")
    return x + positions(jnp.arange(x.shape[1])[None])


class CLIPTextModel(nn.Module):
  """A CLIP text encoder (SD's `text_encoder`); with `projection`, SDXL's CLIPTextModelWithProjection."""
  config: TextConfig
  projection: bool = False
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    out = TextTransformer(self.config, self.dtype, self.attention, name="text_model")(
        input_ids, attention_mask)
    if self.projection:
      embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                        name="text_projection")(out.pooler_output)
      out = out.replace(text_embeds=embeds)
    return out

  def init_weights(self, rng):
    """Returns freshly initialised params (use under jax.eval_shape for the parameter shapes)."""
    return self.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


class CLIPModel(nn.Module):
  """Both towers, their projections (no bias) and the learnable `logit_scale`."""
  config: ClipConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  def setup(self):
    cfg = self.config
    self.text_model = TextTransformer(cfg.text_config, self.dtype, self.attention)
    self.vision_model = VisionTransformer(cfg.vision_config, self.dtype, self.attention)
    self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
    self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), ())

  def get_text_features(self, input_ids, attention_mask=None):
    """Returns the projected (unnormalised) text embeddings [B, P]."""
    return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

  def get_image_features(self, pixels):
    """Returns the projected (unnormalised) image embeddings [B, P] of NHWC `pixels`."""
    return self.visual_projection(self.vision_model(pixels)[1])

  def __call__(self, input_ids, pixels, attention_mask=None):
    """Returns (image embeddings, text embeddings, logit_scale), unnormalised."""
    return (self.get_image_features(pixels), self.get_text_features(input_ids, attention_mask),
            self.logit_scale)

  def init_weights(self, rng):
    """Returns freshly initialised params (use under jax.eval_shape for the parameter shapes)."""
    size = self.config.vision_config.image_size
    pixels = jnp.zeros((1, size, size, self.config.vision_config.num_channels), jnp.float32)
    return self.init(rng, jnp.zeros((1, 1), jnp.int32), pixels)["params"]


# ---------------------------------------------------------------- loading and saving


def _read_config(folder):
  config_file = pathlib.Path(folder) / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"missing CLIP config {str(config_file)!r}")
  try:
    return json.loads(config_file.read_text()), str(config_file)
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(config_file)!r} is not valid JSON: {e}") from e


def load_text_encoder(folder, dtype=jnp.float32, projection=False):
  """Returns (CLIPTextModel, float32 numpy params) of a transformers text-encoder folder."""
  entries, source = _read_config(folder)
  module = CLIPTextModel(text_config(entries, source), projection, dtype)
  shapes = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
  return module, weights.load_params(folder, shapes, "transformers", prefixes=("text_model",))


def load_clip_model(folder, dtype=jnp.float32):
  """Returns (CLIPModel, float32 numpy params) of a transformers CLIP folder."""
  entries, source = _read_config(folder)
  module = CLIPModel(clip_config(entries, source), dtype)
  shapes = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
  return module, weights.load_params(folder, shapes, "transformers")


def save_text_encoder(folder, module, params, weights_format="msgpack"):
  """Writes `module`'s config.json and params ("msgpack" or "safetensors") into `folder`; returns it."""
  return _save(folder, text_config_dict(module.config, module.projection), params, weights_format)


def save_clip_model(folder, module, params, weights_format="msgpack"):
  """Writes a CLIP's config.json and params ("msgpack" or "safetensors") into `folder`; returns it."""
  return _save(folder, clip_config_dict(module.config), params, weights_format)


def _save(folder, config, params, weights_format):
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  if weights_format == "msgpack":
    weights.save_msgpack(params, folder / weights.FLAX_WEIGHTS["transformers"])
  elif weights_format == "safetensors":
    weights.save_safetensors(params, folder / f"{weights.SAFETENSORS_STEMS['transformers']}.safetensors")
  else:
    raise ValueError(f"weights_format must be msgpack or safetensors, got {weights_format!r}")
  return folder
