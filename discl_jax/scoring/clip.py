"""CLIP models (transformers' FlaxCLIPModel) and a batched, mesh-sharded scorer.

`load_clip` reads a local folder or a hub id holding Flax msgpack weights or
PyTorch-layout `model.safetensors` (converted here, without torch), checking
every weight's name and shape against the config. `build_tiny_clip` writes a
tiny random CLIP in the same layout, so tests and the demo load it through
exactly the code a real checkpoint goes through.
"""

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from discl_jax import hub
from discl_jax import parallel
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.scoring import preprocess

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
FLAX_WEIGHTS = "flax_model.msgpack"
SAFETENSORS_WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ClipModels:
  """A loaded CLIP: the Flax model (module + config), its params, tokenizer and
  preprocessing settings."""
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
  from transformers import CLIPConfig, CLIPTokenizer, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
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
  if not (model / "config.json").is_file():
    raise FileNotFoundError(f"CLIP model folder {model} has no config.json")
  config = CLIPConfig.from_pretrained(str(model))
  flax_model = FlaxCLIPModel(config, dtype=DTYPES[dtype], _do_init=False)
  shapes = jax.eval_shape(lambda: flax_model.init_weights(jax.random.key(0), flax_model.input_shape))
  flax_file = _resolve(model, FLAX_WEIGHTS)
  if flax_file is not None:
    with wd.reading_weights(flax_file):
      params = flax_model.load_flax_weights(str(flax_file))
  else:
    torch_file = _resolve(model, SAFETENSORS_WEIGHTS)
    if torch_file is None:
      raise FileNotFoundError(
          f"CLIP model {model} has neither {FLAX_WEIGHTS} nor {SAFETENSORS_WEIGHTS} "
          f"(a {TORCH_WEIGHTS} must be converted to {SAFETENSORS_WEIGHTS} first)")
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    with wd.reading_weights(torch_file):
      params = from_pytorch_state_dict(load_file(str(torch_file)), shapes)
    flax_file = torch_file
  params = _checked(params, shapes, flax_file)
  params = jax.tree.map(lambda p: jnp.asarray(p, DTYPES[dtype]), params)
  tokenizer = CLIPTokenizer.from_pretrained(str(model))
  spec = preprocess.ClipPreprocess.from_file(
      _resolve(model, preprocess.PREPROCESSOR_CONFIG), config.vision_config.image_size)
  return ClipModels(model=flax_model, params=params, tokenizer=tokenizer,
                    preprocess=spec, name=name)


def _checked(params, shapes, source):
  """Returns `params` after checking its keys and shapes against `shapes`."""
  got = traverse_util.flatten_dict(params, sep=".")
  want = traverse_util.flatten_dict(shapes, sep=".")
  missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
  if missing or unexpected:
    raise ValueError(f"{source}: weights do not fit the CLIP config: missing "
                     f"{missing[:5]}, unexpected {unexpected[:5]}")
  wrong = [f"{k} {np.shape(got[k])} != {want[k].shape}" for k in sorted(want)
           if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if wrong:
    raise ValueError(f"{source}: weight shapes do not fit the CLIP config: {wrong[:5]}")
  return params


def tiny_config(vocab_size, bos_id, eos_id):
  """Returns the CLIPConfig of the tiny test CLIP (32x32 images, width 32)."""
  from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top
  text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, bos_token_id=bos_id,
              eos_token_id=eos_id, pad_token_id=eos_id)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, image_size=32, patch_size=8)
  return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def _write_tokenizer(directory):
  """Writes a byte-level CLIP BPE vocabulary (no merges); returns (size, bos, eos)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  from transformers.models.clip.tokenization_clip import bytes_to_unicode  # pylint: disable=g-import-not-at-top
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
  vocab = {token: i for i, token in enumerate(tokens)}
  (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
  tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                            model_max_length=77)
  tokenizer.save_pretrained(str(directory))
  return len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"]


def build_tiny_clip(path, seed=0, weights_format="msgpack"):
  """Writes a tiny random CLIP (config, weights, tokenizer, preprocessor) to `path`.

  `weights_format` is "msgpack" (Flax) or "safetensors" (PyTorch layout).
  The folder appears atomically (built aside, then renamed); returns the Path.
  """
  from transformers import CLIPImageProcessor, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  if weights_format not in ("msgpack", "safetensors"):
    raise ValueError(f"weights_format must be msgpack or safetensors, got {weights_format!r}")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
  try:
    vocab_size, bos_id, eos_id = _write_tokenizer(staging)
    config = tiny_config(vocab_size, bos_id, eos_id)
    model = FlaxCLIPModel(config, _do_init=False)
    params = random_params(model, seed)
    if weights_format == "msgpack":
      model.save_pretrained(str(staging), params=params)
    else:
      config.save_pretrained(str(staging))
      save_safetensors(params, staging / SAFETENSORS_WEIGHTS)
    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size},
                       crop_size={"height": size, "width": size}).save_pretrained(str(staging))
    if path.exists():
      shutil.rmtree(path)
    os.replace(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return path


def to_pytorch_state_dict(params):
  """Returns Flax CLIP `params` as a {name: np.ndarray} in PyTorch CLIPModel's layout."""
  state = {}
  for key, value in traverse_util.flatten_dict(params, sep=".").items():
    value = np.asarray(value, np.float32)
    stem, _, leaf = key.rpartition(".")
    if leaf == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      key = f"{stem}.weight"
    elif leaf in ("scale", "embedding"):
      key = f"{stem}.weight"
    state[key] = np.array(value, order="C")
  return state


def from_pytorch_state_dict(state, shapes):
  """Returns Flax params (nested dict) from a PyTorch CLIPModel `state` dict.

  `shapes` (the Flax param tree, e.g. from jax.eval_shape) tells a layer norm
  scale or an embedding table from a linear weight.
  """
  want = traverse_util.flatten_dict(shapes, sep=".")
  flat = {}
  for key, value in state.items():
    value = np.asarray(value, np.float32)
    stem, _, leaf = key.rpartition(".")
    if leaf == "weight":
      for flax_leaf in ("scale", "embedding", "kernel"):
        if f"{stem}.{flax_leaf}" in want:
          break
      if flax_leaf == "kernel":
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
      key = f"{stem}.{flax_leaf}"
    if not key.endswith("position_ids"):
      flat[key] = value
  return traverse_util.unflatten_dict(flat, sep=".")


def random_params(model, seed):
  """Returns random Flax params for `model` (a FlaxCLIPModel), drawn with numpy.

  Kernels ~ N(0, 1 / fan_in) (so features depend on the input image even in a
  tiny model), embeddings ~ N(0, 0.02), layer norms 1, biases 0; no init
  function is compiled.
  """
  shapes = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), model.input_shape))
  rng = seeding.numpy_rng(seed, "tiny_clip")
  flat = {}
  for key, leaf in sorted(traverse_util.flatten_dict(shapes, sep=".").items()):
    name = key.rpartition(".")[2]
    if name == "scale":
      value = np.ones(leaf.shape, np.float32)
    elif name == "bias":
      value = np.zeros(leaf.shape, np.float32)
    elif name == "logit_scale":
      value = np.full(leaf.shape, np.log(1 / 0.07), np.float32)
    elif name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(0.0, fan_in ** -0.5, leaf.shape).astype(np.float32)
    else:
      value = rng.normal(0.0, 0.02, leaf.shape).astype(np.float32)
    flat[key] = value
  return traverse_util.unflatten_dict(flat, sep=".")


def save_safetensors(params, target):
  """Writes `params` as a PyTorch-layout safetensors file (no torch needed); returns target."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(to_pytorch_state_dict(params), str(target), metadata={"format": "pt"})
  return target


def _image_features(module, pixels):
  outputs = module.vision_model(pixel_values=pixels, deterministic=True)
  return module.visual_projection(outputs[1])


def _text_features(module, input_ids, attention_mask):
  position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
  outputs = module.text_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, deterministic=True)
  return module.text_projection(outputs[1])


def _l2_normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def embed_images(module, spec, params, pixels_uint8):
  """Returns L2-normalised image embeddings of uint8 [B, H, W, 3] crops."""
  pixels = preprocess.normalize(pixels_uint8, spec).astype(module.dtype)
  features = module.apply({"params": params}, pixels, method=_image_features)
  return _l2_normalize(features)


def embed_texts(module, params, input_ids, attention_mask):
  """Returns L2-normalised text embeddings of token ids [B, T]."""
  features = module.apply({"params": params}, input_ids, attention_mask,
                          method=_text_features)
  return _l2_normalize(features)


_JITTED = {}


def _jitted(models, mesh):
  """Returns the jitted (image, text) embedding functions of `models` on `mesh`.

  Kept per (model config, dtype, preprocessing, mesh), so scorers made again
  for the same model reuse the compiled functions.
  """
  module = models.model.module
  key = (models.model.config.to_json_string(), str(module.dtype), models.preprocess, mesh)
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
  target = wd.path(workdir, wd.MODELS, TINY_CLIP)
  if wd.is_main_process() and not (target / "config.json").is_file():
    build_tiny_clip(target, seed=config.seed)
  parallel.barrier("scoring.clip.tiny_clip")
  return str(target)
