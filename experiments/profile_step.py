"""Where one packed denoising step spends its time: XLA:CPU thread time per UNet part.

Profiles `--repeats` calls of the compiled packed step (bench_generate.py's
geometries, random weights) with XLA's per-op trace events, then sums each
op's self time (its duration less that of the ops nested in it, such as a
`while` loop's body) over every thread that ran ops (XLA:CPU's worker
threads, and the client thread that dispatches the step: on a busy machine
it runs much of the step itself), by the UNet part its HLO
metadata names: self-attention (attn1), cross-attention (attn2), feed-forward,
norms, convolutions, the transformer projections, the rest. Prints the table
and the untraced step time, and writes JSON. Thread time can exceed the
step's wall time on several cores; what the threads spend between ops
(the thunk runtime, waits) is not counted.

  python experiments/profile_step.py --geometry=tiny --slots=8
"""

import argparse
import collections
import json
import os
import pathlib
import re
import tempfile
import time

import jax

import bench_generate
from discl_jax.diffusion import models
from discl_jax.diffusion import sampler as sampler_lib

PARTS = (("attn1", "self-attention"), ("attn2", "cross-attention"), ("/ff/", "feed-forward"),
         ("norm", "norms"), ("proj_", "transformer projections"), ("conv", "convolutions"))
_OP_NAME = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]+)\"")


def part_of(op_name):
  """Returns the UNet part (a PARTS label, or "other") an HLO op_name belongs to."""
  for marker, label in PARTS:
    if marker in op_name:
      return label
  return "other"


def op_names(hlo_text):
  """Returns {HLO instruction name: its metadata op_name} of a compiled module's text."""
  return {m.group(1): m.group(2) for m in map(_OP_NAME.match, hlo_text.splitlines()) if m}


def self_times(events):
  """Returns [(name, self ns)] of one trace line's events: each less its nested events."""
  out, stack = [], []  # stack: [name, end_ns, self_ns] of the open events
  for ev in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
    while stack and stack[-1][1] <= ev.start_ns:
      out.append(tuple(stack.pop()[::2]))
    if stack:
      stack[-1][2] -= ev.duration_ns
    stack.append([ev.name, ev.start_ns + ev.duration_ns, ev.duration_ns])
  out.extend(tuple(s[::2]) for s in reversed(stack))
  return out


def thread_ms_by_part(profile, names, repeats):
  """Returns {part: thread ms per step} of the ops in `names` found in `profile`, on any thread."""
  totals = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for name, ns in self_times(list(line.events)):
        if name in names:
          totals[part_of(names[name])] += ns / 1e6 / repeats
  return dict(totals.most_common())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--geometry", choices=("tiny", "small"), default="tiny")
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--out", default="experiments/results")
  args = parser.parse_args()
  # Per-op trace events; JAX starts its CPU backend lazily, so this is in time.
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true"]).strip()
  size = bench_generate.GEOMETRIES[args.geometry][0]
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint, _ = bench_generate.build_checkpoint(args.geometry, pathlib.Path(tmp), False)
    sd = models.load_sd(str(checkpoint))
    sampler = sampler_lib.SpectrumSampler(sd, num_inference_steps=20, slots=args.slots,
                                          attention=args.attention)
    side = size // sd.vae_scale_factor
    latent_shape = (sd.vae.config.latent_channels, side, side)
    compiled = sampler.lower_step(latent_shape).compile()
    args_ = sampler.step_inputs(latent_shape)
    state = args_[-1]
    for _ in range(2):
      state = compiled(*args_[:-1], state)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(args.repeats):
      state = compiled(*args_[:-1], state)
    jax.block_until_ready(state)
    wall_ms = (time.perf_counter() - start) * 1e3 / args.repeats
    with jax.profiler.trace(tmp + "/trace"):
      for _ in range(args.repeats):
        state = compiled(*args_[:-1], state)
      jax.block_until_ready(state)
    trace = next(pathlib.Path(tmp, "trace").rglob("*.xplane.pb"))
    parts = thread_ms_by_part(jax.profiler.ProfileData.from_file(str(trace)),
                              op_names(compiled.as_text()), args.repeats)
  if not parts:
    raise RuntimeError("the trace holds no XLA:CPU op events; was the CPU backend started "
                       "before XLA_FLAGS was set?")
  total = sum(parts.values())
  print(f"{args.geometry}, {sampler.slots} slots ({2 * sampler.slots} UNet rows), "
        f"attention={args.attention}: {wall_ms:.1f} ms a step (untraced); the ops' self "
        f"time {total:.1f} ms, summed over the threads that ran them (traced)")
  for part, ms in parts.items():
    print(f"  {part:24s} {ms:8.1f} ms  {100 * ms / total:5.1f} %")
  load = os.getloadavg()[0]
  print(f"load average {load:.1f}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  target = out / f"profile_step_{args.geometry}.json"
  target.write_text(json.dumps(dict(
      geometry=args.geometry, slots=sampler.slots, attention=args.attention,
      repeats=args.repeats, step_ms=wall_ms, thread_ms_by_part=parts,
      load_average=load, backend=jax.default_backend(),
      cpu_count=os.cpu_count()), indent=2))
  print(f"wrote {target}")


if __name__ == "__main__":
  main()
