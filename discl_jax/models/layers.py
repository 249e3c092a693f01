"""Pieces the Flax networks share: convolutions, norms, torch's nearest resize, a frozen config.

`numerics` names the functions a network computes where diffusers' / transformers'
Flax classes and PyTorch differ (docs/design.md §5.9): "pytorch" (every real
checkpoint, trained in PyTorch) or "flax" (a checkpoint trained with those Flax
classes, the shipped digit models). A checkpoint records it in its config.json
under NUMERICS_KEY (absent: "pytorch").
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

NUMERICS_KEY = "discl_numerics"
NUMERICS_NAMES = ("pytorch", "flax")


class FrozenConfig(dict):
  """A read-only config mapping whose entries are also attributes (`config.block_out_channels`)."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e

  def _readonly(self, *args, **kwargs):
    raise TypeError("the config is frozen")

  __setitem__ = __delitem__ = update = pop = setdefault = _readonly

  def to_dict(self):
    """Returns the entries as a plain dict."""
    return dict(self)


def check_numerics(name, source):
  """Returns `name` when it is one of NUMERICS_NAMES; ValueError naming `source` otherwise."""
  if name not in NUMERICS_NAMES:
    raise ValueError(f"{source}: {NUMERICS_KEY}={name!r}; valid: {list(NUMERICS_NAMES)}")
  return name


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


def group_norm(groups, eps, two_pass_variance, name):
  """Returns a GroupNorm whose variance is E[(x - mean)^2] (PyTorch) or E[x^2] - mean^2 (Flax)."""
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=not two_pass_variance,
                      name=name)


def layer_norm(eps, two_pass_variance, dtype, name):
  """Returns a LayerNorm with PyTorch's (two-pass) or Flax's (one-pass) variance."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=not two_pass_variance,
                      name=name)


def conv(features, dtype, name, kernel=3, stride=1, padding=None):
  """Returns a kernel x kernel convolution, padded kernel // 2 each side unless `padding` is given."""
  pad = kernel // 2
  if padding is None:
    padding = ((pad, pad), (pad, pad)) if pad else "VALID"
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name)
