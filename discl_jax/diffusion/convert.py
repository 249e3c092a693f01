"""PyTorch-layout weights (safetensors) -> Flax params, without torch.

The mapping is driven by the Flax model's own parameter tree (its shapes from
`jax.eval_shape`): every PyTorch tensor name is turned into the candidate Flax
paths it could be (`down_blocks.0` is `down_blocks_0` in diffusers' Flax modules
but `layers/0` in transformers' CLIP), renamed (`weight` -> `kernel`, `scale` or
`embedding`; the VAE's `to_q` -> `query`, ...), laid out (conv OIHW -> HWIO,
linear transposed) and accepted only where the shape matches the Flax tree.
"""

import json
import pathlib
import re

import numpy as np
from flax import traverse_util

from discl_jax import workdir as wd

# PyTorch attention projections and the names diffusers' Flax VAE gives them.
_ATTENTION_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
# PyTorch buffers that are not parameters in Flax.
_IGNORED_SUFFIXES = ("position_ids",)


def read_safetensors(files):
  """Returns {name: np.ndarray float32} read from the safetensors `files` (no torch)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  tensors = {}
  for file in files:
    with wd.reading_weights(file), safe_open(str(file), framework="flax") as f:
      for name in f.keys():
        tensors[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
  return tensors


def safetensors_files(folder, stem):
  """Returns the safetensors files holding `stem` weights in `folder` (sharded or not), or []."""
  folder = pathlib.Path(folder)
  for variant in ("", ".fp16"):
    index = folder / f"{stem}{variant}.safetensors.index.json"
    if index.is_file():
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      return [folder / s for s in shards]
    single = folder / f"{stem}{variant}.safetensors"
    if single.is_file():
      return [single]
  return []


def _candidate_paths(pt_name):
  """Returns the Flax key tuples a PyTorch parameter name may map to, before renaming."""
  parts = pt_name.split(".")
  merged = tuple(re.sub(r"(\w+)\.(\d+)", r"\1_\2", pt_name).split("."))
  return [merged, tuple(parts)] if merged != tuple(parts) else [merged]


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


def convert_state_dict(pt_tensors, shape_tree, source="checkpoint"):
  """Returns Flax params (nested dict of np.ndarray) for `shape_tree` from PyTorch tensors.

  Raises ValueError naming the unmatched tensors or the Flax parameters left
  unfilled, with `source` (a file or folder name) in the message.
  """
  wanted = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shape_tree).items()}
  flat, unmatched = {}, []
  for name, tensor in pt_tensors.items():
    if name.endswith(_IGNORED_SUFFIXES):
      continue
    found = None
    for path in _candidate_paths(name):
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
      flat[found[0]] = np.ascontiguousarray(found[1])
  missing = sorted("/".join(k) for k in wanted if k not in flat)
  if unmatched or missing:
    raise ValueError(
        f"cannot convert PyTorch weights in {source}: "
        f"{len(unmatched)} tensor(s) match no Flax parameter {unmatched[:8]}; "
        f"{len(missing)} Flax parameter(s) not found {missing[:8]}")
  return traverse_util.unflatten_dict(flat)
