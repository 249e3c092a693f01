"""PyTorch ResNet checkpoints -> this project's flax variables (`train.init_checkpoint`); the
ResNets' own name mapping, beside `weights.py` (the diffusion and CLIP models' loader).

The reference fine-tunes an ImageNet-LT ResNet-10 saved by LDMLR's code
(docs/design.md §6): `torch.load(path)["state_dict"]["model"]`, keys with a
`module.` prefix when saved from DataParallel. Accepted here: `.safetensors`
(read without torch) or a torch pickle (`.pth`, `.pt`, LDMLR's `.checkpoint`,
read with `torch.load(weights_only=True)`), holding a plain state dict or that
dict under "state_dict", "state_dict"/"model" or "model".

Names follow torchvision's ResNet (`conv1`, `bn1`, `layer{s}.{b}.conv{n}`,
`downsample.0/1`, `fc`) and the CIFAR ResNet-32 (`shortcut.0/1` for option-B
shortcuts; option A has none). Conv weights go OIHW -> HWIO, BatchNorm
weight/bias -> scale/bias and running mean/var -> `batch_stats`, the linear
layer -> `head`. Every key must be used and every shape must match.

Convert once where torch is installed, then load the result without torch:
  python -m discl_jax.models.resnet_weights IN.pth OUT.safetensors
"""

import pathlib
import re
import sys

import jax
import numpy as np

SAFETENSORS = ".safetensors"
_WRAPPERS = ("state_dict", "model")
_BLOCK = re.compile(r"^(BasicBlock|BottleneckBlock)_(\d+)$")


def read_state_dict(path):
  """Returns {torch key without `module.`: np.ndarray} of the checkpoint file `path`.

  Raises ImportError saying how to get torch (or convert) when a pickle needs
  it, and ValueError naming the file when it holds no state dict.
  """
  path = pathlib.Path(path)
  if path.suffix == SAFETENSORS:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    state = load_file(str(path))
  else:
    state = _torch_state_dict(path)
  prefix = "module."
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _torch_state_dict(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"train.init_checkpoint {str(path)!r} is a PyTorch pickle, and reading one needs "
        "torch: install the `torch` extra (pip install 'discl-jax[torch]'), or convert it "
        "once where torch is installed and point train.init_checkpoint at the result: "
        f"python -m discl_jax.models.resnet_weights {path} "
        f"{path.with_suffix(SAFETENSORS)}") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many kinds)
    raise ValueError(f"train.init_checkpoint {str(path)!r}: torch.load failed: "
                     f"{type(e).__name__}: {e}") from e
  for key in _WRAPPERS:
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not obj:
    raise ValueError(f"train.init_checkpoint {str(path)!r} holds no state dict "
                     "(a dict of tensors, or one under 'state_dict' or 'state_dict'/'model')")
  bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
  if bad:
    raise ValueError(f"train.init_checkpoint {str(path)!r}: entries {bad[:10]} are not "
                     "tensors; expected a state dict")
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}


def torch_names(params):
  """Returns {flax module path (tuple): torch module name} for ResNet `params`.

  Stages are told apart by the width of each block's first convolution.
  Names are torchvision's; `_lookup` also accepts the CIFAR ResNet's
  `shortcut` (option B) for `downsample` and `linear` for `fc`.
  """
  names = {("stem_conv",): "conv1", ("stem_norm",): "bn1", ("head",): "fc"}
  blocks = sorted((int(m.group(2)), key) for key in params if (m := _BLOCK.match(key)))
  stage, index, width = 0, 0, None
  for _, key in blocks:
    block_width = params[key]["Conv_0"]["kernel"].shape[-1]
    if width is not None and block_width != width:
      stage, index = stage + 1, 0
    width = block_width
    prefix = f"layer{stage + 1}.{index}"
    for sub in params[key]:
      if sub.startswith(("Conv_", "BatchNorm_")):
        kind, n = sub.split("_")
        names[(key, sub)] = f"{prefix}.{'conv' if kind == 'Conv' else 'bn'}{int(n) + 1}"
      elif sub == "shortcut_conv":
        names[(key, sub)] = f"{prefix}.downsample.0"
      elif sub == "shortcut_norm":
        names[(key, sub)] = f"{prefix}.downsample.1"
    index += 1
  return names


_ALIASES = {"downsample.": "shortcut.", "fc.": "linear."}


def _lookup(state, key):
  """Returns the key of `state` that holds `key` or its CIFAR-style alias, or `key`."""
  if key in state:
    return key
  for name, alias in _ALIASES.items():
    if name in key and key.replace(name, alias) in state:
      return key.replace(name, alias)
  return key


def to_variables(state, target, where):
  """Returns {"params", "batch_stats"} shaped like `target`'s, filled from torch `state`.

  `target` is a TrainState (arrays or ShapeDtypeStructs). Raises ValueError
  naming `where` and the missing, unused and mis-shaped keys.
  """
  params, stats = target.params, target.batch_stats
  names = torch_names(params)
  out = {"params": {}, "batch_stats": {}}
  missing, shapes, used = [], [], set()

  def take(key, shape, transform):
    key = _lookup(state, key)
    if key not in state:
      missing.append(key)
      return np.zeros(shape, np.float32)
    used.add(key)
    value = transform(np.asarray(state[key], np.float32))
    if value.shape != tuple(shape):
      shapes.append(f"{key} {tuple(state[key].shape)} -> {tuple(shape)}")
    return value

  for path, torch_name in names.items():
    module = params[path[0]] if len(path) == 1 else params[path[0]][path[1]]
    dest_params = _nested(out["params"], path)
    if "kernel" in module and len(module["kernel"].shape) == 4:
      dest_params["kernel"] = take(f"{torch_name}.weight", module["kernel"].shape,
                                   lambda w: w.transpose(2, 3, 1, 0))
    elif "kernel" in module:
      dest_params["kernel"] = take(f"{torch_name}.weight", module["kernel"].shape,
                                   lambda w: w.T)
      dest_params["bias"] = take(f"{torch_name}.bias", module["bias"].shape, lambda b: b)
    else:
      dest_params["scale"] = take(f"{torch_name}.weight", module["scale"].shape, lambda w: w)
      dest_params["bias"] = take(f"{torch_name}.bias", module["bias"].shape, lambda b: b)
      dest_stats = _nested(out["batch_stats"], path)
      module_stats = stats[path[0]] if len(path) == 1 else stats[path[0]][path[1]]
      dest_stats["mean"] = take(f"{torch_name}.running_mean", module_stats["mean"].shape,
                                lambda m: m)
      dest_stats["var"] = take(f"{torch_name}.running_var", module_stats["var"].shape,
                               lambda v: v)
  unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
  if missing or shapes or unused:
    hints = []
    if any(".shortcut." in k for k in unused):
      hints.append("the checkpoint has option-B (1x1 conv) shortcuts where this model "
                   "zero-pads (option A)")
    if any(k.startswith(("fc.", "linear.")) for k in missing) and "fc.weight" in state:
      hints.append("a linear layer without bias (LDMLR's fc_norm NormedLinear) is not supported")
    raise ValueError(
        f"train.init_checkpoint {where!r} does not fit the model (config train.model; the "
        f"head's rows are the dataset's classes): missing {missing[:10]}, unused "
        f"{unused[:10]}, shape mismatches {shapes[:10]}" + "".join(f"; {h}" for h in hints))
  cast = lambda v, t: np.asarray(v, t.dtype)
  return {"params": jax.tree.map(cast, out["params"], params),
          "batch_stats": jax.tree.map(cast, out["batch_stats"], stats)}


def _nested(tree, path):
  for key in path:
    tree = tree.setdefault(key, {})
  return tree


def load_variables(path, target):
  """Returns {"params", "batch_stats"} for `target` from the PyTorch checkpoint file `path`."""
  return to_variables(read_state_dict(path), target, str(path))


def convert(source, target):
  """Writes the state dict of torch checkpoint `source` to `target` (safetensors); returns target."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = read_state_dict(source)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(target),
            metadata={"format": "pt"})
  return target


def main(argv):
  """`python -m discl_jax.models.resnet_weights IN.pth OUT.safetensors`; returns the exit code."""
  if len(argv) != 3 or not argv[2].endswith(SAFETENSORS):
    print(f"usage: python -m discl_jax.models.resnet_weights IN.pth OUT{SAFETENSORS}",
          file=sys.stderr)
    return 2
  convert(argv[1], argv[2])
  print(f"wrote {argv[2]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
