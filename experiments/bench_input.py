"""Images/s of our grain train loader vs PyTorch's DataLoader, same transforms and workers.

Both read a generated folder of JPEGs (ImageNet-like 500x375, smooth content)
and produce normalised 224 px training batches: JPEG decode, random-resized
crop (scale 0.35-1, aspect 3/4-4/3, bilinear), horizontal flip, colour jitter
(brightness, contrast, saturation) and ImageNet normalisation, in one run:
  grain:   `pipeline.train_loader` (discl_jax/data/transforms.train_transform),
  PyTorch: `torch.utils.data.DataLoader` over a Dataset doing the same work
           with PIL + numpy as torchvision would (crop and resize in one PIL
           call on the image, PIL flip, ImageEnhance jitter), then a CHW tensor.
Each loader runs one epoch per worker count (0, 1, 2); images/s counts the
batches after the first (start-up and worker spawn reported separately).

  python experiments/bench_input.py                 # quick size
  python experiments/bench_input.py --size=full
  python experiments/bench_input.py --size=smoke    # seconds; checks it runs
Prints a table and writes experiments/results/bench_input.json.
"""

import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
from absl import app
from absl import flags
from PIL import Image, ImageEnhance

from discl_jax.data import pipeline
from discl_jax.data import transforms
from discl_jax.data.records import LabeledImages

SIZES = {  # name: (images, batch)
    "smoke": (24, 8),
    "quick": (512, 32),
    "full": (4096, 64),
}
_SIZE = flags.DEFINE_enum("size", "quick", list(SIZES), "benchmark size")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "worker counts to run")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "training crop size")
_OUT = flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results" / "bench_input.json"),
                           "where the JSON results go")


def write_jpegs(folder, n, seed=0):
  """Writes `n` 500x375 JPEGs (quality 90) to `folder`; returns their paths."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
  paths = []
  for i in range(n):
    fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
    base = np.sin(xx * fx + phase)[..., None] + np.cos(yy * fy)[..., None]
    image = (127 + 60 * base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 8, (375, 500, 3)))
    path = os.path.join(folder, f"img{i:05d}.jpg")
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
    paths.append(path)
  return paths


class TorchTrainDataset:
  """A map-style PyTorch Dataset: JPEG decode, random-resized crop, flip, jitter, normalise."""

  def __init__(self, paths, labels, size, seed=0):
    self.paths, self.labels, self.size, self.seed = paths, labels, size, seed

  def __len__(self):
    return len(self.paths)

  def _crop_box(self, w, h, rng):
    log_ratio = np.log(transforms.CROP_RATIO)
    for _ in range(10):
      target = w * h * rng.uniform(*transforms.CROP_SCALE)
      aspect = np.exp(rng.uniform(*log_ratio))
      cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
      if 0 < cw <= w and 0 < ch <= h:
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return left, top, left + cw, top + ch
    return 0, 0, w, h

  def __getitem__(self, index):
    import torch  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng([self.seed, index, torch.initial_seed() % 2**32])
    with Image.open(self.paths[index]) as im:
      im = im.convert("RGB")
    im = im.resize((self.size, self.size), Image.Resampling.BILINEAR,
                   box=self._crop_box(*im.size, rng))
    if rng.uniform() < 0.5:
      im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    b, c, s = rng.uniform(1 - transforms.JITTER, 1 + transforms.JITTER, size=3)
    im = ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(b))
                            .enhance(c)).enhance(s)
    x = transforms.normalize(np.asarray(im))
    return torch.from_numpy(x.transpose(2, 0, 1).copy()), int(self.labels[index])


def _time_batches(batches, count_of):
  """Returns (seconds to the first batch, images/s over the rest, images) of iterable `batches`."""
  start = time.perf_counter()
  first = None
  images = 0
  for batch in batches:
    if first is None:
      first = time.perf_counter()
    else:
      images += count_of(batch)
  end = time.perf_counter()
  return first - start, images / max(end - first, 1e-9), images


def run_grain(split, size, batch, workers):
  """Returns timing of one epoch of our grain train loader."""
  picks = np.stack([np.zeros(len(split), np.int64), np.arange(len(split))], 1)
  loader = pipeline.train_loader([split], picks, image_size=size, batch_size=batch, seed=0,
                                 epoch=0, shard=(0, 1), num_workers=workers)
  return _time_batches(loader, lambda b: len(b["label"]))


def run_torch(split, size, batch, workers):
  """Returns timing of one epoch of PyTorch's DataLoader over TorchTrainDataset."""
  import torch  # pylint: disable=g-import-not-at-top
  dataset = TorchTrainDataset(list(split.paths), split.labels, size)
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=workers,
                                       generator=torch.Generator().manual_seed(0))
  return _time_batches(loader, lambda b: len(b[1]))


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  n, batch = SIZES[_SIZE.value]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    paths = write_jpegs(tmp, n)
    split = LabeledImages(ids=np.array([os.path.basename(p) for p in paths]),
                          labels=np.arange(n) % 10, class_names=tuple(map(str, range(10))),
                          paths=np.array(paths))
    for workers in map(int, _WORKERS.value):
      for name, run in (("grain", run_grain), ("torch", run_torch)):
        first_s, per_s, images = run(split, _IMAGE_SIZE.value, batch, workers)
        rows.append({"loader": name, "workers": workers, "first_batch_s": round(first_s, 3),
                     "images_per_s": round(per_s, 1), "timed_images": images})
  for workers in map(int, _WORKERS.value):
    ours, theirs = (next(r for r in rows if r["loader"] == l and r["workers"] == workers)
                    for l in ("grain", "torch"))
    ours["vs_torch"] = round(ours["images_per_s"] / theirs["images_per_s"], 2)
  print(f"{'loader':8s} {'workers':>7s} {'first batch s':>13s} {'images/s':>9s} {'vs torch':>8s}")
  for r in rows:
    print(f"{r['loader']:8s} {r['workers']:7d} {r['first_batch_s']:13.3f} "
          f"{r['images_per_s']:9.1f} {r.get('vs_torch', ''):>8}")
  result = {"size": _SIZE.value, "images": n, "batch": batch, "image_size": _IMAGE_SIZE.value,
            "rows": rows, "machine": platform.platform(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "torch": torch.__version__}
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
