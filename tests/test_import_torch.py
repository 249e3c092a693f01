"""PyTorch ResNet checkpoints through train.init_checkpoint give PyTorch's logits.

The PyTorch models are written here as plain torch.nn modules with the
reference's architectures (docs/design.md §6): the torchvision-style ResNet-10 that
LDMLR trains on ImageNet-LT (7x7/2 stem, 3x3/2 max pool padded 1, one basic
block per stage, 1x1 projection shortcuts) and the CIFAR ResNet-32 (3x3 stem,
5 blocks per stage, option-A zero-padding shortcuts). They are saved in the
reference's layout `{"state_dict": {"model": {"module." + k: v}}}`.
"""

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import jax  # pylint: disable=g-import-not-at-top

from discl_jax import config as config_lib
from discl_jax.models import resnet
from discl_jax.train import checkpoint as checkpoint_lib
from discl_jax.models import resnet_weights as import_torch
from discl_jax.train import optim
from discl_jax.train import state as state_lib


class TorchBlock(nn.Module):
  """Basic block; shortcut "projection" (torchvision downsample) or "A" (CIFAR zero pad)."""

  def __init__(self, inplanes, planes, stride, shortcut):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.pad = 0
    if (stride != 1 or inplanes != planes) and shortcut == "projection":
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))
    elif stride != 1 or inplanes != planes:
      self.pad = planes // 4
    self.stride = stride

  def forward(self, x):
    out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    if hasattr(self, "downsample"):
      x = self.downsample(x)
    elif self.pad:
      x = nn.functional.pad(x[:, :, ::self.stride, ::self.stride],
                            (0, 0, 0, 0, self.pad, self.pad))
    return torch.relu(out + x)


class TorchResNet(nn.Module):
  """ResNet-10 (imagenet stem, widths 64-512) or ResNet-32 (cifar stem, 16-64)."""

  def __init__(self, imagenet, blocks, widths, num_classes):
    super().__init__()
    first = widths[0]
    if imagenet:
      self.conv1 = nn.Conv2d(3, first, 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    else:
      self.conv1 = nn.Conv2d(3, first, 3, 1, 1, bias=False)
      self.maxpool = nn.Identity()
    self.bn1 = nn.BatchNorm2d(first)
    inplanes = first
    for s, width in enumerate(widths):
      layer = []
      for b in range(blocks):
        layer.append(TorchBlock(inplanes, width, 2 if s > 0 and b == 0 else 1,
                                "projection" if imagenet else "A"))
        inplanes = width
      setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
    self.num_stages = len(widths)
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for s in range(self.num_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return self.fc(x.mean(dim=(2, 3)))


ARCHS = {  # train.model: (torch model, image size)
    "resnet10": (lambda: TorchResNet(True, 1, (64, 128, 256, 512), 7), 64),
    "resnet32": (lambda: TorchResNet(False, 5, (16, 32, 64), 7), 32),
}


def _randomized(model, seed):
  """Returns `model` in eval mode with random weights and non-trivial BN statistics."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(0.5 + torch.rand(n, generator=gen))
        module.bias.copy_(0.2 * torch.randn(n, generator=gen))
        module.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
        module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
        module.num_batches_tracked.fill_(1000)
      elif isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in ** 0.5)
        if module.bias is not None:
          module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
  return model.eval()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def saved(request, tmp_path_factory):
  """Returns (train.model, the .pth path in the reference's layout, images NHWC, torch logits)."""
  name = request.param
  build, size = ARCHS[name]
  model = _randomized(build(), seed=len(name))
  images = np.random.default_rng(0).normal(size=(4, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  path = tmp_path_factory.mktemp(name) / f"{name}.pth"
  torch.save({"state_dict": {"model": {f"module.{k}": v for k, v in model.state_dict().items()},
                             "optimizer": {}}, "train_info": {"epoch": 100}}, path)
  return name, path, images, logits


class Ours:
  """Our `name` ResNet: an abstract TrainState target and a jitted eval-mode forward."""

  def __init__(self, name, size, padding=None):
    kwargs = {} if padding is None else {"padding": padding}
    self.model = resnet.get_model(name, 7, **kwargs)
    tx = optim.make_optimizer(config_lib.base_config().train)
    self.target = jax.eval_shape(lambda: state_lib.create(
        self.model, tx, jax.random.key(0, impl="rbg"), size))
    self.forward = jax.jit(lambda v, x: self.model.apply(v, x, train=False))

  def logits(self, init_checkpoint, images):
    """Returns our logits with the weights `train.init_checkpoint` loads from the file."""
    variables = checkpoint_lib.load_variables(init_checkpoint, self.target)
    return np.asarray(self.forward(variables, images))


@pytest.fixture(scope="module")
def ours(saved):
  name, _, images, _ = saved
  return Ours(name, images.shape[1])


def test_reference_layout_gives_pytorch_logits(saved, ours):
  _, path, images, want = saved
  np.testing.assert_allclose(ours.logits(path, images), want, atol=1e-4, rtol=0)
  assert np.abs(want).max() > 0.5  # the logits are not trivially small


def test_same_padding_would_not_match(saved):
  name, path, images, want = saved
  got = Ours(name, images.shape[1], padding="same").logits(path, images)
  assert np.abs(got - want).max() > 1e-2


def test_converted_safetensors_loads_without_torch(saved, ours, tmp_path, monkeypatch):
  name, path, images, want = saved
  target = tmp_path / f"{name}.safetensors"
  assert import_torch.main(["import_torch", str(path), str(target)]) == 0
  monkeypatch.setitem(sys.modules, "torch", None)
  np.testing.assert_allclose(ours.logits(target, images), want, atol=1e-4, rtol=0)


def test_pickle_without_torch_says_how_to_get_it(saved, ours, monkeypatch):
  name, path, images, _ = saved
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"`torch` extra.*python -m discl_jax.models.resnet_weights "
                     rf"{path} .*{name}\.safetensors"):
    ours.logits(path, images)


def test_wrong_model_names_the_mismatch(saved):
  name, path, images, _ = saved
  other = Ours("resnet32" if name == "resnet10" else "resnet10", images.shape[1])
  with pytest.raises(ValueError, match=f"init_checkpoint '{path}' does not fit the model"):
    checkpoint_lib.load_variables(path, other.target)
