"""Attention implementations (discl_jax/diffusion/attention.py) timed and sized at UNet levels.

For each level (tokens, heads, head dim of one UNet attention) and each
implementation, self-attention (and with --cross, cross-attention to 77 text
tokens) on [batch, tokens, heads * d] projections: the best jitted seconds
of --repeats calls (the median too in the JSON), the compiled temporary memory
(`memory_analysis().temp_size_in_bytes`), with --rss the peak resident memory
one call adds (a fresh process each: XLA:CPU runs `xla`'s attention as one
YNNPACK fusion whose score matrix is not in temp_size), the max |difference|
from `xla`, and PyTorch's fused `scaled_dot_product_attention` for scale. Implementations: `xla`; `deferred`, one chunk normalised after the
product with v (`chunked` with no memory bound); `chunked@N`, `chunked` with
N MiB score blocks. A level whose `xla` temporaries exceed --max_run_gib is
sized, not run.

Levels: digits (the shipped digit generator's 8x8 and 4x4 latents), tiny (the tiny geometry's 16x16 latents), small (32x32 and 16x16),
sd15 (SD 1.5 at 512x512: 64x64, 32x32, 16x16 and 8x8 latents).

  python experiments/bench_attention.py --levels=tiny,small --batch=32 --repeats=5
  python experiments/bench_attention.py --levels=sd15 --batch=2 --cross
"""

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from discl_jax.diffusion import attention

# name: ((label, tokens, heads, head dim), ...)
LEVELS = {
    "digits": (("digits 8x8", 64, 4, 8), ("digits 4x4", 16, 4, 16)),
    "tiny": (("tiny 16x16", 256, 8, 4),),
    "small": (("small 32x32", 1024, 4, 16), ("small 16x16", 256, 4, 32)),
    "sd15": (("sd15 64x64", 4096, 8, 40), ("sd15 32x32", 1024, 8, 80),
             ("sd15 16x16", 256, 8, 160), ("sd15 8x8", 64, 8, 160)),
}
TEXT_TOKENS = 77


def implementations(budgets_mib):
  """Returns {name: fn(q, k, v, heads)} of the implementations to compare."""
  fns = {"xla": attention.xla,
         "deferred": functools.partial(attention.chunked, max_score_bytes=2**62)}
  for mib in budgets_mib:
    fns[f"chunked@{mib:g}"] = functools.partial(attention.chunked,
                                                max_score_bytes=int(mib * 2**20))
  return fns


def _time(fn, args, repeats):
  """Returns (median, best) seconds of `repeats` calls after a warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), float(np.min(times))


def _inputs(batch, lq, lk, heads, head_dim, dtype):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kq, (batch, lq, heads * head_dim), jnp.float32).astype(dtype),
          jax.random.normal(kk, (batch, lk, heads * head_dim), jnp.float32).astype(dtype),
          jax.random.normal(kv, (batch, lk, heads * head_dim), jnp.float32).astype(dtype))


def _peak_rss_growth(name, batch, lq, lk, heads, head_dim, args):
  """Returns the peak resident bytes one call of `name` adds, measured in a fresh process."""
  spec = json.dumps(dict(name=name, shape=[batch, lq, lk, heads, head_dim], dtype=args.dtype,
                         budgets_mib=args.budgets_mib))
  out = subprocess.run([sys.executable, __file__, f"--rss_child={spec}"], check=True,
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return int(out.stdout.strip().splitlines()[-1])


def _status_bytes(field):
  """Returns /proc/self/status's `field` (VmRSS, VmHWM) in bytes."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  raise KeyError(field)


def _rss_child(spec):
  """Prints the peak resident bytes one call adds after compiling (the --rss_child process).

  Linux: the peak (VmHWM) is reset to the current size before the call
  (/proc/self/clear_refs); getrusage's maximum would carry the parent's over exec.
  """
  spec = json.loads(spec)
  batch, lq, lk, heads, head_dim = spec["shape"]
  fn = implementations([float(b) for b in spec["budgets_mib"].split(",") if b])[spec["name"]]
  args = _inputs(batch, lq, lk, heads, head_dim, jnp.dtype(spec["dtype"]))
  jitted = jax.jit(functools.partial(fn, heads=heads)).lower(*args).compile()
  before = _status_bytes("VmRSS")
  pathlib.Path("/proc/self/clear_refs").write_text("5")
  jax.block_until_ready(jitted(*args))
  print(_status_bytes("VmHWM") - before)


def _torch_seconds(q, k, v, heads, repeats):
  """Returns ((median, best) seconds, output [B, Lq, H * d]) of PyTorch's fused attention, or None."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  split = lambda x: torch.from_numpy(np.array(x)).unflatten(-1, (heads, -1)).transpose(1, 2)
  tq, tk, tv = split(q), split(k), split(v)
  sdpa = torch.nn.functional.scaled_dot_product_attention
  with torch.no_grad():
    seconds = _time(sdpa, (tq, tk, tv), repeats)
    out = sdpa(tq, tk, tv)
  return seconds, out.transpose(1, 2).flatten(2).numpy()


def measure(label, batch, lq, lk, heads, head_dim, fns, args):
  """Returns the record of one attention shape: per implementation seconds, temp bytes, error."""
  dtype = jnp.dtype(args.dtype)
  q, k, v = _inputs(batch, lq, lk, heads, head_dim, dtype)
  results = {}
  want = None
  for name, fn in fns.items():
    jitted = jax.jit(functools.partial(fn, heads=heads))
    temp = jitted.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    record = dict(temp_bytes=int(temp))
    if name == "xla" and temp > args.max_run_gib * 2**30:
      results[name] = record
      break
    out = np.asarray(jitted(q, k, v), np.float32)
    want = out if want is None else want
    median, best = _time(jitted, (q, k, v), args.repeats)
    record.update(seconds=best, median_seconds=median, max_abs_diff=float(np.abs(out - want).max()))
    if args.rss:
      record["peak_rss_growth_bytes"] = _peak_rss_growth(name, batch, lq, lk, heads, head_dim, args)
    results[name] = record
  if want is not None and dtype == jnp.float32 and not args.no_torch:
    torch_result = _torch_seconds(q, k, v, heads, args.repeats)
    if torch_result:
      results["torch_sdpa"] = dict(seconds=torch_result[0][1], median_seconds=torch_result[0][0],
                                   max_abs_diff=float(np.abs(torch_result[1] - want).max()))
  return dict(label=label, batch=batch, lq=lq, lk=lk, heads=heads, head_dim=head_dim,
              scores_per_example=heads * lq * lk, auto=attention.choose(
                  jax.default_backend(), dtype, lq, lk, heads, head_dim), results=results)


def _print(record):
  base = record["results"]["xla"].get("seconds")
  print(f"\n{record['label']}: batch {record['batch']}, Lq {record['lq']}, Lk {record['lk']}, "
        f"{record['heads']} heads x {record['head_dim']}, heads*Lq*Lk "
        f"{record['scores_per_example']:,}, auto -> {record['auto']}")
  for name, r in record["results"].items():
    temp = f"{r['temp_bytes'] / 2**20:8.1f} MiB" if "temp_bytes" in r else " " * 12
    rss = (f"  peak rss +{r['peak_rss_growth_bytes'] / 2**20:7.1f} MiB"
           if "peak_rss_growth_bytes" in r else "")
    if "seconds" in r:
      speed = f"xla/x {base / r['seconds']:5.2f}" if base else ""
      print(f"  {name:14s} {r['seconds'] * 1e3:9.2f} ms {speed}  temp {temp}{rss}  "
            f"max|diff| {r['max_abs_diff']:.1e}")
    else:
      print(f"  {name:14s} {'not run':>12s}            temp {temp}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--levels", default="tiny,small", help=f"comma list of {sorted(LEVELS)}")
  parser.add_argument("--batch", type=int, default=32, help="rows: slots x 2 (CFG)")
  parser.add_argument("--budgets_mib", default="2,8,32", help="chunked score-block budgets")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--cross", action="store_true", help="also cross-attention to 77 tokens")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--max_run_gib", type=float, default=2.0)
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--rss", action="store_true",
                      help="also the peak resident memory of one call, each in a fresh process")
  parser.add_argument("--rss_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="experiments/results")
  args = parser.parse_args()
  if args.rss_child:
    _rss_child(args.rss_child)
    return
  fns = implementations([float(b) for b in args.budgets_mib.split(",") if b])
  records = []
  print(f"{jax.devices()[0].platform}, {args.dtype}, best of {args.repeats}, "
        f"load average {os.getloadavg()[0]:.2f}")
  for level in args.levels.split(","):
    for label, tokens, heads, head_dim in LEVELS[level]:
      shapes = [(label, tokens)] + ([(f"{label} cross", TEXT_TOKENS)] if args.cross else [])
      for name, lk in shapes:
        records.append(measure(name, args.batch, tokens, lk, heads, head_dim, fns, args))
        _print(records[-1])
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  target = out / "bench_attention.json"
  target.write_text(json.dumps(dict(platform=jax.devices()[0].platform, dtype=args.dtype,
                                    load_average=os.getloadavg(), records=records), indent=2))
  print(f"\nwrote {target}")


if __name__ == "__main__":
  main()
