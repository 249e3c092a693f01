"""Training throughput: ResNet-32 (CIFAR-style) at 32x32, Flax/XLA vs PyTorch, same CPU.

Both sides run the same model (3 stages x 5 basic blocks, 16/32/64 channels,
zero-padding shortcuts, batch norm), the same loss (cross-entropy over 100
classes) and the same update (Adam with L2 weight decay), one step per batch
of random images, in one process one after the other. The Flax side is the
project's jitted `train_step` (`discl_jax.train.steps`), on a mesh over every
device (on CPU one XLA host device per usable core, `--cpu_devices`) and on a
one-device mesh. Prints a table and writes JSON to experiments/results/bench_train.json.

  python experiments/bench_train.py            # quick: 3 timed steps each
  python experiments/bench_train.py --steps 20
"""

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import ml_collections
import numpy as np

from discl_jax import host_devices
from discl_jax import parallel
from discl_jax.models import resnet
from discl_jax.train import losses, optim, state as state_lib, steps as steps_lib

RESULTS = pathlib.Path(__file__).parent / "results"


def bench_flax(batch, num_classes, steps, warmup, devices=None):
  """Returns (images/s, compile+first-step seconds) of the jitted Flax train step on `devices`."""
  train = ml_collections.ConfigDict(dict(optimizer="adam", learning_rate=1e-3,
                                         weight_decay=1e-5, momentum=0.9))
  model = resnet.get_model("resnet32", num_classes)
  tx = optim.make_optimizer(train)
  mesh = parallel.make_mesh((-1,), devices)
  state = parallel.put_replicated(
      state_lib.create(model, tx, jax.random.key(0, impl="rbg"), 32), mesh)
  step = steps_lib.make_train_step(model, tx, losses.cross_entropy, mesh)
  rng = np.random.default_rng(0)
  data = parallel.put_batch({
      "image": rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
      "label": rng.integers(0, num_classes, batch).astype(np.int32)}, mesh)
  start = time.perf_counter()
  for _ in range(warmup):
    state, metrics = step(state, data, 1e-3)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, data, 1e-3)
  jax.block_until_ready(metrics)
  return batch * steps / (time.perf_counter() - start), first


def bench_torch(batch, num_classes, steps, warmup):
  """Returns images/s of the same model and update in PyTorch (eager, channels-first)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.stride != 1 or self.extra:
        x = F.pad(x[:, :, ::self.stride, ::self.stride],
                  (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return F.relu(x + y)

  class ResNet32(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn = nn.BatchNorm2d(16)
      blocks, cin = [], 16
      for i, cout in enumerate((16, 32, 64)):
        for j in range(5):
          blocks.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
          cin = cout
      self.blocks = nn.Sequential(*blocks)
      self.head = nn.Linear(64, num_classes)

    def forward(self, x):
      x = self.blocks(F.relu(self.bn(self.conv(x))))
      return self.head(x.mean((2, 3)))

  torch.manual_seed(0)
  model = ResNet32()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, num_classes, (batch,))

  def one_step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss

  for _ in range(warmup):
    one_step()
  start = time.perf_counter()
  for _ in range(steps):
    one_step()
  return batch * steps / (time.perf_counter() - start), torch.get_num_threads()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="XLA host devices on a CPU host (0: one per usable core)")
  args = parser.parse_args()
  why = host_devices.configure(args.cpu_devices, args.batch)

  sides = {}
  sides["flax"] = bench_flax(args.batch, args.classes, args.steps, args.warmup)
  if jax.device_count() > 1:
    sides["flax1"] = bench_flax(args.batch, args.classes, args.steps, args.warmup,
                                jax.devices()[:1])
  torch_ips, torch_threads = bench_torch(args.batch, args.classes, args.steps, args.warmup)
  result = {
      "benchmark": "resnet32 train step, 32x32, adam+wd, cross-entropy",
      "batch": args.batch, "classes": args.classes, "timed_steps": args.steps,
      "flax_images_per_s": sides["flax"][0], "torch_images_per_s": torch_ips,
      "flax_over_torch": sides["flax"][0] / torch_ips,
      "flax_compile_and_warmup_s": sides["flax"][1],
      "devices": jax.device_count(), "devices_why": why,
      "jax": jax.__version__, "device": str(jax.devices()[0]),
      "cpu_count": os.cpu_count(), "torch_threads": torch_threads,
      "load_average_1m": os.getloadavg()[0], "machine": platform.machine(),
  }
  if "flax1" in sides:
    result.update(flax1_images_per_s=sides["flax1"][0],
                  flax1_over_torch=sides["flax1"][0] / torch_ips)
  print(f"{'side':<16} {'images/s':>10} {'ratio':>7}")
  for name, (ips, _) in sides.items():
    label = f"{name} ({jax.device_count() if name == 'flax' else 1} dev)"
    print(f"{label:<16} {ips:>10.1f} {ips / torch_ips:>7.2f}")
  print(f"{'torch':<16} {torch_ips:>10.1f} {1.0:>7.2f}")
  print(f"(flax compile + {args.warmup} warmup step(s): {sides['flax'][1]:.1f} s; devices: {why}; "
        f"1-min load average {result['load_average_1m']:.1f} on {os.cpu_count()} cores; "
        f"target flax >= 0.5x torch)")
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "bench_train.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
