"""Weights of every network we run: Flax msgpack, or PyTorch checkpoints converted without torch.

A model folder in diffusers' layout (`unet/`, `vae/`) or transformers' layout
(`text_encoder/`, a CLIP) holds one weight format: Flax msgpack
(`diffusion_flax_model.msgpack` / `flax_model.msgpack`), PyTorch safetensors
(`diffusion_pytorch_model.safetensors` / `model.safetensors`, full precision
before the `.fp16` variant, one file or shards listed by their
`*.safetensors.index.json`), or a torch pickle (`*.bin`, read through torch
when it is installed). `load_params` finds whichever is there and returns
float32 numpy params in our modules' trees (the trees diffusers' and
transformers' Flax classes had, so their msgpack files load unchanged).

PyTorch names are mapped by the target tree itself: each tensor name becomes
the candidate Flax paths it could be (`down_blocks.0` is `down_blocks_0` in
diffusers' trees, `layers/0` in transformers'), renamed (`weight` -> `kernel`,
`scale` or `embedding`; the VAE's `to_q` -> `query`), laid out (conv OIHW ->
HWIO, linear transposed) and accepted only where the shape matches.
"""

import json
import pathlib
import re

import numpy as np
from flax import serialization
from flax import traverse_util

from discl_jax import workdir as wd

LAYOUTS = ("diffusers", "transformers")
FLAX_WEIGHTS = {"diffusers": "diffusion_flax_model.msgpack", "transformers": "flax_model.msgpack"}
SAFETENSORS_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
TORCH_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "pytorch_model"}
VARIANTS = ("", "fp16")
# PyTorch attention projections and the names diffusers' Flax VAE gave them.
_ATTENTION_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
# PyTorch buffers that are not parameters.
_IGNORED_SUFFIXES = ("position_ids",)
# Flax module names "name_N" that are "name.N" in PyTorch (diffusers' block lists).
_NUMBERED = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
             "transformer_blocks", "to_out", "net")


def _with_variant(name, variant):
  """Returns `name` with `variant` before its extension (diffusers' `_add_variant`)."""
  if not variant:
    return name
  stem, _, ext = name.rpartition(".")
  return f"{stem}.{variant}.{ext}"


def _sharded(folder, filename, variant):
  """Returns the shards an index file lists for `filename` (+ `variant`), or []."""
  names = [_with_variant(f"{filename}.index.json", variant)]  # diffusers: x.safetensors.index.fp16.json
  if variant:
    names.append(f"{_with_variant(filename, variant)}.index.json")  # transformers: x.fp16.safetensors.index.json
  for name in names:
    index = folder / name
    if index.is_file():
      try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{str(index)!r} is not a weight index (no weight_map): {e}") from e
      missing = [s for s in shards if not (folder / s).is_file()]
      if missing:
        raise FileNotFoundError(f"{str(index)!r} lists shard(s) not in the folder: {missing[:4]}")
      return [folder / s for s in shards]
  return []


def pytorch_files(folder, layout):
  """Returns ("safetensors" | "torch", [files]) of the PyTorch weights in `folder`, or (None, []).

  Safetensors before torch pickles, full precision before the fp16 variant, a
  single file before shards.
  """
  folder = pathlib.Path(folder)
  for kind, stem, ext in (("safetensors", SAFETENSORS_STEMS[layout], "safetensors"),
                          ("torch", TORCH_STEMS[layout], "bin")):
    for variant in VARIANTS:
      single = folder / _with_variant(f"{stem}.{ext}", variant)
      if single.is_file():
        return kind, [single]
      shards = _sharded(folder, f"{stem}.{ext}", variant)
      if shards:
        return kind, shards
  return None, []


def read_safetensors(files):
  """Returns {name: float32 np.ndarray} read from safetensors `files` (no torch; fp16 and bf16 too)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  tensors = {}
  for file in files:
    with wd.reading_weights(file), safe_open(str(file), framework="flax") as f:
      for name in f.keys():
        tensors[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
  return tensors


def read_torch(files):
  """Returns {name: float32 np.ndarray} of torch pickles `files`; needs torch installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{files[0]} is a PyTorch pickle: install torch (pip install "
                      "'discl-jax[torch]') or convert it to safetensors") from e
  tensors = {}
  for file in files:
    with wd.reading_weights(file):
      state = torch.load(str(file), map_location="cpu", weights_only=True)
    tensors.update({k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")})
  return tensors


def _candidate_paths(pt_name):
  """Returns the Flax key tuples a PyTorch parameter name may map to, before renaming."""
  parts = tuple(pt_name.split("."))
  merged = tuple(re.sub(r"(\w+)\.(\d+)", r"\1_\2", pt_name).split("."))
  return [merged, parts] if merged != parts else [merged]


def _renamings(path):
  """Yields (flax_path, layout) pairs for one candidate path; layout names the reshaping."""
  stem, leaf = path[:-1], path[-1]
  if leaf in ("weight", "gamma"):
    yield stem + ("kernel",), "kernel"
    yield stem + ("scale",), "same"
    yield stem + ("embedding",), "same"
    if stem and stem[-1] in _ATTENTION_RENAMES:
      yield stem[:-1] + (_ATTENTION_RENAMES[stem[-1]], "kernel"), "kernel"
  elif leaf in ("bias", "beta"):
    yield stem + ("bias",), "same"
    if stem and stem[-1] in _ATTENTION_RENAMES:
      yield stem[:-1] + (_ATTENTION_RENAMES[stem[-1]], "bias"), "same"
  else:
    yield path, "same"


def _layout(tensor, layout):
  if layout == "kernel" and tensor.ndim == 4:
    return np.transpose(tensor, (2, 3, 1, 0))  # OIHW -> HWIO
  if layout == "kernel" and tensor.ndim == 2:
    return tensor.T
  return tensor


def convert_state_dict(pt_tensors, shape_tree, source="checkpoint", prefixes=()):
  """Returns params (nested dict of np.ndarray) for `shape_tree` from PyTorch-named tensors.

  A name that fits nowhere is tried again under each of `prefixes` (transformers
  5 saves a CLIPTextModel without its `text_model.` prefix). Raises ValueError
  naming `source`, the unmatched tensors and the parameters left unfilled.
  """
  wanted = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shape_tree).items()}
  flat, unmatched = {}, []
  for name, tensor in pt_tensors.items():
    if name.endswith(_IGNORED_SUFFIXES):
      continue
    found = None
    candidates = _candidate_paths(name)
    for path in candidates + [(p,) + c for p in prefixes for c in candidates]:
      for flax_path, layout in _renamings(path):
        if flax_path in wanted and flax_path not in flat:
          value = _layout(tensor, layout)
          if value.shape == wanted[flax_path]:
            found = flax_path, value
            break
      if found:
        break
    if found is None:
      unmatched.append(f"{name} {tuple(tensor.shape)}")
    else:
      flat[found[0]] = np.array(found[1], order="C")
  missing = sorted("/".join(k) for k in wanted if k not in flat)
  if unmatched or missing:
    raise ValueError(
        f"cannot convert PyTorch weights in {source}: "
        f"{len(unmatched)} tensor(s) match no parameter {unmatched[:8]}; "
        f"{len(missing)} parameter(s) not found {missing[:8]}")
  return traverse_util.unflatten_dict(flat)


def check_params(params, shapes, source):
  """Returns `params`; ValueError naming `source` unless it has exactly the tree and shapes of `shapes`."""
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
  missing = sorted("/".join(k) for k in want.keys() - got.keys())
  unexpected = sorted("/".join(k) for k in got.keys() - want.keys())
  wrong = sorted(f"{'/'.join(k)} {got[k]} != {want[k]}" for k in want.keys() & got.keys()
                 if got[k] != want[k])
  if missing or unexpected or wrong:
    raise ValueError(f"weights {source} do not fit the model's config: {len(missing)} missing "
                     f"{missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}, "
                     f"{len(wrong)} of another shape {wrong[:8]}")
  return params


def load_params(folder, shapes, layout, prefixes=()):
  """Returns float32 numpy params for the tree `shapes` from the weights in `folder`.

  `layout` is "diffusers" or "transformers" (which file names to look for);
  `prefixes` as `convert_state_dict`'s.
  Raises FileNotFoundError naming the folder when it holds no weights, and
  ValueError when they do not fit `shapes`.
  """
  folder = pathlib.Path(folder)
  msgpack = folder / FLAX_WEIGHTS[layout]
  if msgpack.is_file():
    with wd.reading_weights(msgpack):
      params = serialization.msgpack_restore(msgpack.read_bytes())
    params = check_params(params, shapes, str(msgpack))
    return traverse_util.unflatten_dict(
        {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()})
  kind, files = pytorch_files(folder, layout)
  if not files:
    stem = SAFETENSORS_STEMS[layout]
    raise FileNotFoundError(f"no {FLAX_WEIGHTS[layout]}, {stem}*.safetensors or "
                            f"{TORCH_STEMS[layout]}*.bin in {str(folder)!r}")
  tensors = read_safetensors(files) if kind == "safetensors" else read_torch(files)
  return convert_state_dict(tensors, shapes, source=str(folder), prefixes=prefixes)


def _pytorch_name(path):
  parts = []
  for part in path:
    match = re.fullmatch(r"(\w+)_(\d+)", part)
    if match and match.group(1) in _NUMBERED:
      parts += [match.group(1), match.group(2)]
    else:
      parts.append(part)
  return parts


def to_pytorch_state_dict(params):
  """Returns params as {name: float32 np.ndarray} in PyTorch's names and layouts (CLIP, UNet).

  The VAE's attention (query/key/value/proj_attn) keeps its Flax names.
  """
  state = {}
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(value, np.float32)
    parts = _pytorch_name(path)
    if parts[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      parts[-1] = "weight"
    elif parts[-1] in ("scale", "embedding"):
      parts[-1] = "weight"
    state[".".join(parts)] = np.array(value, order="C")
  return state


def save_safetensors(params, target):
  """Writes `params` as one PyTorch-layout safetensors file (no torch needed); returns target."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(to_pytorch_state_dict(params), str(target), metadata={"format": "pt"})
  return target


def save_msgpack(params, target):
  """Writes `params` as a Flax msgpack file; returns target."""
  pathlib.Path(target).write_bytes(serialization.msgpack_serialize(
      traverse_util.unflatten_dict({k: np.asarray(v) for k, v in
                                    traverse_util.flatten_dict(params).items()})))
  return target
