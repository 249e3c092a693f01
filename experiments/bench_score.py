"""Images/s of our jitted Flax CLIP scorer vs transformers' PyTorch CLIPModel.

Both sides get the same random weights (ViT-B/32 geometry, and the tiny test
CLIP) and the same images, on this machine's CPU, in one run:
  model: L2-normalised image embeddings from already preprocessed pixels;
  end-to-end: from uint8 256x256 images (resize, crop, normalise, embed) --
    ours with `ClipScorer.image_embeddings`, PyTorch with CLIPImageProcessor.

  python experiments/bench_score.py              # quick size
  python experiments/bench_score.py --size=full
Prints a table and writes experiments/results/bench_score.json.
"""

import json
import pathlib
import platform
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags

from discl_jax import host_devices
from discl_jax import parallel
from discl_jax.models import clip as clip_models
from discl_jax.models import tiny
from discl_jax.models import weights
from discl_jax.scoring import clip
from discl_jax.scoring import preprocess

SIZES = {
    # name: {model: (images, batch)}
    "quick": {"vit_b32": (16, 8), "tiny": (256, 64)},
    "full": {"vit_b32": (256, 64), "tiny": (2048, 256)},
}
_SIZE = flags.DEFINE_enum("size", "quick", list(SIZES), "benchmark size")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed repeats (best is kept)")
_OUT = flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results" / "bench_score.json"),
                           "where the JSON results go")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0,
                                    "XLA host devices on a CPU host (0: one per usable core)")


def vit_b32_models(seed=0):
  """Returns ClipModels of ViT-B/32 geometry (transformers' CLIPConfig defaults), random weights."""
  model = clip_models.CLIPModel(clip_models.ClipConfig())
  params = tiny.random_params(jax.eval_shape(model.init_weights, jax.random.key(0)), seed, "clip")
  return clip.ClipModels(model=model, params=params, tokenizer=None,
                         preprocess=preprocess.ClipPreprocess(), name="vit_b32_random")


def tiny_models(directory):
  """Returns the tiny test CLIP, built into `directory` and loaded like a real one."""
  return clip.load_clip(str(tiny.build_clip(pathlib.Path(directory) / "tiny", seed=0)))


def best_time(fn, repeats):
  """Returns the best wall time of `repeats` calls of `fn` (after one warm-up call)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def bench(models, images, batch, repeats):
  """Returns a dict of images/s for ours and PyTorch, model-only and end-to-end."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # pylint: disable=g-import-not-at-top
  spec = models.preprocess
  scorer = clip.ClipScorer(models, parallel.make_mesh(), batch)
  scorer_one = clip.ClipScorer(models, parallel.make_mesh((-1,), jax.devices()[:1]), batch)
  crops = preprocess.preprocess_batch(images, spec)
  reference = CLIPModel(CLIPConfig.from_dict(
      clip_models.clip_config_dict(models.model.config))).eval()
  state = {k: torch.from_numpy(v) for k, v in weights.to_pytorch_state_dict(models.params).items()}
  reference.load_state_dict(state, strict=False)
  processor = CLIPImageProcessor(
      size={"shortest_edge": spec.size}, crop_size={"height": spec.crop[0], "width": spec.crop[1]})
  pixels = torch.from_numpy(np.asarray(preprocess.normalize(crops, spec)).transpose(0, 3, 1, 2).copy())

  def torch_embed(pixel_values):
    outputs = []
    with torch.no_grad():
      for start in range(0, len(pixel_values), batch):
        features = reference.get_image_features(pixel_values=pixel_values[start:start + batch])
        features = getattr(features, "pooler_output", features)  # transformers 5 wraps it
        outputs.append(torch.nn.functional.normalize(features, dim=-1))
    return torch.cat(outputs).numpy()

  def torch_end_to_end():
    return torch_embed(processor(images=images, return_tensors="pt")["pixel_values"])

  ours = scorer.pixel_embeddings(crops)
  theirs = torch_embed(pixels)
  n = len(images)
  result = dict(
      images=n, batch=scorer.batch_size,
      max_abs_diff=float(np.abs(ours - theirs).max()),
      flax_model=n / best_time(lambda: scorer.pixel_embeddings(crops), repeats),
      torch_model=n / best_time(lambda: torch_embed(pixels), repeats),
      flax_model_one_device=n / best_time(lambda: scorer_one.pixel_embeddings(crops), repeats),
      flax_end_to_end=n / best_time(lambda: scorer.image_embeddings(images), repeats),
      torch_end_to_end=n / best_time(torch_end_to_end, repeats))
  result["ratio_model"] = result["flax_model"] / result["torch_model"]
  result["ratio_end_to_end"] = result["flax_end_to_end"] / result["torch_end_to_end"]
  return result


def main(argv):
  del argv
  why = host_devices.configure(_CPU_DEVICES.value)
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  results = dict(size=_SIZE.value, repeats=_REPEATS.value, backend=jax.default_backend(),
                 devices=jax.device_count(), devices_why=why, torch_threads=torch.get_num_threads(),
                 machine=platform.processor() or platform.machine(), models={})
  with tempfile.TemporaryDirectory() as tmp:
    for name, (count, batch) in SIZES[_SIZE.value].items():
      models = vit_b32_models() if name == "vit_b32" else tiny_models(tmp)
      images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(count)]
      results["models"][name] = bench(models, images, batch, _REPEATS.value)

  header = (f"{'model':8} {'images':>6} {'batch':>5} {'flax img/s':>10} {'1 dev':>7} "
            f"{'torch img/s':>11} "
            f"{'ratio':>6} {'flax e2e':>9} {'torch e2e':>9} {'ratio':>6} {'max|diff|':>9}")
  print(f"{jax.device_count()} device(s): {why}")
  print(header)
  for name, r in results["models"].items():
    print(f"{name:8} {r['images']:6d} {r['batch']:5d} {r['flax_model']:10.1f} "
          f"{r['flax_model_one_device']:7.1f} "
          f"{r['torch_model']:11.1f} {r['ratio_model']:6.2f} {r['flax_end_to_end']:9.1f} "
          f"{r['torch_end_to_end']:9.1f} {r['ratio_end_to_end']:6.2f} {r['max_abs_diff']:9.1e}")
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
