"""CLIP checkpoints (our Flax CLIPModel, discl_jax.models.clip) and a batched, mesh-sharded scorer.

`load_clip` reads a local folder or a hub id holding Flax msgpack weights or
PyTorch-layout `model.safetensors` (converted without torch, models/weights.py),
checking every weight's name and shape against the config. `models.tiny.build_clip`
writes a tiny random CLIP in the same layout, so tests and the demo load it
through exactly the code a real checkpoint goes through.
"""

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from discl_jax import hub
from discl_jax import parallel
from discl_jax import workdir as wd
from discl_jax.models import clip as clip_models
from discl_jax.models import tiny
from discl_jax.scoring import preprocess

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
FLAX_WEIGHTS = "flax_model.msgpack"
SAFETENSORS_WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"
WEIGHT_FILES = (FLAX_WEIGHTS, SAFETENSORS_WEIGHTS, TORCH_WEIGHTS)  # the first one present loads
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ClipModels:
  """A loaded CLIP: the Flax CLIPModel (its `config` a models.clip.ClipConfig), its params,
  tokenizer and preprocessing settings."""
  model: Any
  params: Any
  tokenizer: Any
  preprocess: preprocess.ClipPreprocess
  name: str

  @property
  def embed_dim(self):
    """Returns the size of the joint image-text embedding."""
    return int(self.model.config.projection_dim)


def _resolve(folder, filename):
  """Returns the path of `filename` in local CLIP folder `folder`, or None."""
  path = pathlib.Path(folder) / filename
  return path if path.is_file() else None


def load_clip(model=DEFAULT_MODEL, dtype="float32"):
  """Returns ClipModels read from local folder or hub id `model`.

  Raises FileNotFoundError naming a missing folder or weights file and
  ValueError for an unknown dtype or weights that do not fit the config.
  """
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:
    raise ValueError(f"CLIP dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  if not model:
    raise ValueError("no CLIP model given: set score.model to a folder or hub id, "
                     "or score.tiny=True")
  name = str(model)
  local = pathlib.Path(name)
  if not local.is_dir() and not hub.is_hub_id(name):
    raise FileNotFoundError(f"CLIP model folder not found: {name}")
  model = local if local.is_dir() else hub.download(name, hub.CLIP)
  if _resolve(model, "config.json") is None:
    raise FileNotFoundError(f"CLIP model folder {model} has no config.json")
  weights_file = next((f for f in map(functools.partial(_resolve, model), WEIGHT_FILES)
                       if f is not None), None)
  if weights_file is None:
    raise FileNotFoundError(
        f"CLIP model {model} has neither {FLAX_WEIGHTS} nor {SAFETENSORS_WEIGHTS} "
        f"({TORCH_WEIGHTS} loads where torch is installed)")
  module, params = clip_models.load_clip_model(weights_file.parent, DTYPES[dtype])
  params = jax.tree.map(lambda p: jnp.asarray(p, DTYPES[dtype]), params)
  tokenizer = CLIPTokenizer.from_pretrained(str(model))
  spec = preprocess.ClipPreprocess.from_file(
      _resolve(model, preprocess.PREPROCESSOR_CONFIG), module.config.vision_config.image_size)
  return ClipModels(model=module, params=params, tokenizer=tokenizer, preprocess=spec, name=name)


def _l2_normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def embed_images(module, spec, params, pixels_uint8):
  """Returns L2-normalised image embeddings of uint8 [B, H, W, 3] crops."""
  pixels = preprocess.normalize(pixels_uint8, spec).astype(module.dtype)
  return _l2_normalize(module.apply({"params": params}, pixels, method="get_image_features"))


def embed_texts(module, params, input_ids, attention_mask):
  """Returns L2-normalised text embeddings of token ids [B, T]."""
  return _l2_normalize(module.apply({"params": params}, input_ids, attention_mask,
                                   method="get_text_features"))


_JITTED = {}


def _jitted(models, mesh):
  """Returns the jitted (image, text) embedding functions of `models` on `mesh`.

  Kept per (model config, dtype, preprocessing, mesh), so scorers made again
  for the same model reuse the compiled functions.
  """
  module = models.model
  key = (module.config, str(jnp.dtype(module.dtype)), module.attention, models.preprocess, mesh)
  if key not in _JITTED:
    if len(_JITTED) >= 8:
      _JITTED.clear()
    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    _JITTED[key] = (
        jax.jit(functools.partial(embed_images, module, models.preprocess),
                in_shardings=(replicated, batch), out_shardings=batch),
        jax.jit(functools.partial(embed_texts, module),
                in_shardings=(replicated, batch, batch), out_shardings=batch))
  return _JITTED[key]


class ClipScorer:
  """Embeds images and texts in fixed-size jitted batches sharded over `data`.

  `batch_size` is the global batch, rounded up to a multiple of the mesh's
  data size; the last batch is padded and the padding dropped, so results do
  not depend on how rows are grouped.
  """

  def __init__(self, models, mesh, batch_size):
    self.models = models
    self.mesh = mesh
    self.batch_size = parallel.pad_to_multiple(max(int(batch_size), 1),
                                               parallel.data_size(mesh))
    self.params = parallel.put_replicated(models.params, mesh)
    self._image_fn, self._text_fn = _jitted(models, mesh)

  @property
  def crop_shape(self):
    """Returns (h, w, 3): the shape of one preprocessed image."""
    return tuple(self.models.preprocess.crop) + (3,)

  def _batched(self, fn, arrays):
    n = len(arrays[0])
    outputs = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start:start + self.batch_size] for a in arrays]
      count = len(chunk[0])
      if count < self.batch_size:
        chunk = [_pad_rows(a, self.batch_size) for a in chunk]
      result = fn(self.params, *parallel.put_batch(tuple(chunk), self.mesh))
      outputs.append(np.asarray(jax.device_get(result))[:count])
    if not outputs:
      return np.zeros((0, self.models.embed_dim), np.float32)
    return np.concatenate(outputs)

  def pixel_embeddings(self, crops_uint8):
    """Returns L2-normalised embeddings [N, D] of preprocessed uint8 crops [N, h, w, 3]."""
    crops = np.asarray(crops_uint8, np.uint8)
    if crops.shape[1:] != self.crop_shape:
      raise ValueError(f"preprocessed images must be {self.crop_shape}, got {crops.shape[1:]}")
    return self._batched(self._image_fn, (crops,))

  def image_embeddings(self, images_uint8):
    """Returns L2-normalised embeddings [N, D] of uint8 H x W x 3 images (any sizes)."""
    return self.pixel_embeddings(preprocess.preprocess_batch(images_uint8, self.models.preprocess))

  def text_embeddings(self, texts):
    """Returns L2-normalised embeddings [N, D] of `texts`."""
    texts = list(texts)
    if not texts:
      return np.zeros((0, self.models.embed_dim), np.float32)
    length = self.models.model.config.text_config.max_position_embeddings
    tokens = self.models.tokenizer(texts, padding="max_length", truncation=True,
                                   max_length=length, return_tensors="np")
    return self._batched(self._text_fn, (tokens["input_ids"].astype(np.int32),
                                         tokens["attention_mask"].astype(np.int32)))


def _pad_rows(array, size):
  """Returns `array` with its first row repeated to `size` rows."""
  pad = np.repeat(array[:1], size - len(array), axis=0)
  return np.concatenate([array, pad])


TINY_CLIP = "clip"  # workdir/models/clip: the tiny CLIP of score.tiny runs


def configured_model(config, workdir):
  """Returns the CLIP checkpoint `score.model`, or (score.tiny) the workdir's tiny CLIP.

  Every process must call it: process 0 builds the tiny CLIP once, the others wait.
  """
  if not config.score.tiny:
    return config.score.model
  return str(tiny.build_once(wd.path(workdir, wd.MODELS, TINY_CLIP),
                             lambda path: tiny.build_clip(path, seed=config.seed),
                             "config.json", "scoring.clip.tiny_clip"))
