"""CPU self-attention cost at the small geometry's 32x32 level, before/after deferred normalisation.

docs/design.md ("Where CPU time goes"): one attention (batch 16, 4 heads, 1024 tokens,
head dim 16) costs ~0.47 s jitted in XLA:CPU against 0.056 s in PyTorch's fused
`scaled_dot_product_attention`, most of it passes over the [B, H, T, T] score
matrix. The idea measured here: normalise after the PV product (divide the
[T, d] output by the row sums instead of the [T, T] probabilities, as flash
attention does), which removes one full read+write pass over the score matrix.

  python experiments/bench_attention.py --batch=16 --tokens=1024 --repeats=5
"""

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np


def reference(q, k, v):
  """diffusers' formulation: scores, softmax over keys, then PV. [B, T, H, D] in and out."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def deferred(q, k, v):
  """Same result, normalised after PV: exp(s - max) @ V / sum(exp(s - max))."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
  weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  return out / jnp.einsum("bhqk->bqh", weights)[..., None]


def library(q, k, v):
  """jax.nn.dot_product_attention (XLA implementation on CPU)."""
  return jax.nn.dot_product_attention(q, k, v)


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--tokens", type=int, default=1024)
  parser.add_argument("--head_dim", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="experiments/results")
  args = parser.parse_args()
  shape = (args.batch, args.tokens, args.heads, args.head_dim)
  q, k, v = (jax.random.normal(key, shape, jnp.float32)
             for key in jax.random.split(jax.random.key(0), 3))
  want = jax.jit(reference)(q, k, v)
  results = {}
  for name, fn in (("reference", reference), ("deferred", deferred), ("library", library)):
    jitted = jax.jit(fn)
    err = float(jnp.abs(jitted(q, k, v) - want).max())
    results[name] = dict(seconds=_time(jitted, (q, k, v), args.repeats), max_abs_diff=err)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    tq, tk, tv = (torch.from_numpy(np.array(x)).transpose(1, 2).contiguous() for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
      sdpa(tq, tk, tv)
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        sdpa(tq, tk, tv)
        times.append(time.perf_counter() - t0)
      err = float(np.abs(sdpa(tq, tk, tv).transpose(1, 2).numpy() - np.asarray(want)).max())
    results["torch_sdpa"] = dict(seconds=float(np.median(times)), max_abs_diff=err)
  except ImportError:
    pass
  base = results["reference"]["seconds"]
  print(f"attention {shape} [B, T, H, D], median of {args.repeats}, {jax.devices()[0].platform}")
  for name, r in results.items():
    print(f"{name:12s} {r['seconds'] * 1e3:9.1f} ms  reference/x {base / r['seconds']:5.2f}  "
          f"max|diff| {r['max_abs_diff']:.1e}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "bench_attention.json").write_text(json.dumps(dict(shape=shape, results=results), indent=2))


if __name__ == "__main__":
  main()
