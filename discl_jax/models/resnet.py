"""ResNet classifiers (Flax linen) with batch norm `batch_stats`.

- `resnet10`: ImageNet-style stem and 4 stages of one basic block each
  (64-512 channels), the long-tail ResNet-10 LDMLR fine-tunes.
- `resnet32`: CIFAR-style, 3x3 stem and 3 stages of 5 basic blocks (16/32/64),
  identity shortcuts that subsample and zero-pad channels (option A).
- `resnet50`: ImageNet-style bottleneck ResNet, stages (3, 4, 6, 3).
- `resnet8`: the CIFAR layout with one block per stage (16/32/64), for the demo.
- `tiny`: the CIFAR layout with 2 stages of one block (8/16) for tests.

`padding="torch"` pads as PyTorch does, so imported PyTorch weights
(`models/resnet_weights.py`) give PyTorch's logits: k // 2 on each side of every
convolution and 1 on each side of the stem max pool. XLA's "SAME" instead puts
the extra row and column of a stride-2 layer at the bottom and right;
`resnet8` and `tiny` keep "same", the padding the shipped digits ResNet-8 was
trained with. Batch norm: eps 1e-5, flax momentum 0.9 (PyTorch's momentum 0.1).

Constructors are `functools.partial`s of `ResNet`; `get_model(name, num_classes)`
is the registry.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  shortcut: str = "projection"

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm()(y)
    residual = _shortcut(residual, y.shape[-1], self.strides, self.shortcut,
                         self.conv, self.norm)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  shortcut: str = "projection"

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm()(y)
    residual = _shortcut(residual, y.shape[-1], self.strides, self.shortcut,
                         self.conv, self.norm)
    return nn.relu(residual + y)


def _shortcut(x, filters, strides, kind, conv, norm):
  """Returns `x` matched to `filters` channels and `strides` by `kind`."""
  if x.shape[-1] == filters and strides == 1:
    return x
  if kind == "pad":
    x = x[:, ::strides, ::strides, :]
    extra = filters - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  x = conv(filters, (1, 1), (strides, strides), name="shortcut_conv")(x)
  return norm(name="shortcut_norm")(x)


PADDINGS = ("torch", "same")


def _conv(features, kernel_size, strides=(1, 1), *, mode, dtype, name=None):
  """Returns a bias-free nn.Conv padded k // 2 on each side ("torch") or "SAME"."""
  padding = [(k // 2, k // 2) for k in kernel_size] if mode == "torch" else "SAME"
  return nn.Conv(features, kernel_size, strides, padding=padding, use_bias=False,
                 dtype=dtype, kernel_init=nn.initializers.kaiming_normal(), name=name)


class ResNet(nn.Module):
  """A ResNet classifier; `__call__(x, train)` returns logits [B, num_classes]."""
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  stem: str = "imagenet"       # imagenet: 7x7/2 conv + 3x3/2 max pool; cifar: 3x3 conv
  shortcut: str = "projection"  # projection: 1x1 conv + BN; pad: subsample + zero pad
  dtype: Any = jnp.float32
  act: Callable = nn.relu

  padding: str = "torch"        # torch: PyTorch's symmetric padding; same: XLA SAME

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.padding not in PADDINGS:
      raise ValueError(f"ResNet padding {self.padding!r}; valid: {', '.join(PADDINGS)}")
    conv = functools.partial(_conv, mode=self.padding, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(self.num_filters, (7, 7), (2, 2), mode="torch", name="stem_conv")(x)
      x = self.act(norm(name="stem_norm")(x))
      pool_padding = ((1, 1), (1, 1)) if self.padding == "torch" else "SAME"
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=pool_padding)
    else:
      x = conv(self.num_filters, (3, 3), name="stem_conv")(x)
      x = self.act(norm(name="stem_norm")(x))
    for i, block_count in enumerate(self.stage_sizes):
      for j in range(block_count):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.num_filters * 2 ** i, conv=conv, norm=norm,
                           strides=strides, shortcut=self.shortcut)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)


ResNet10 = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock)
ResNet8 = functools.partial(ResNet, stage_sizes=(1, 1, 1), block_cls=BasicBlock,
                            num_filters=16, stem="cifar", shortcut="pad", padding="same")
ResNet32 = functools.partial(ResNet, stage_sizes=(5, 5, 5), block_cls=BasicBlock,
                             num_filters=16, stem="cifar", shortcut="pad")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock,
                               num_filters=8, stem="cifar", shortcut="pad", padding="same")

MODELS = {
    "resnet8": ResNet8,
    "resnet10": ResNet10,
    "resnet32": ResNet32,
    "resnet50": ResNet50,
    "tiny": ResNetTiny,
}


def get_model(name, num_classes, **kwargs):
  """Returns the flax module `name` with `num_classes` outputs.

  Raises ValueError listing the valid names when `name` is unknown.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r} (config train.model); "
                     f"valid: {', '.join(sorted(MODELS))}")
  return MODELS[name](num_classes=num_classes, **kwargs)
