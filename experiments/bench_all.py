"""Runs the generate, score, train and input benchmarks and writes one markdown table.

Sized for a single GPU or TPU host (`--profile=accelerator`, the default; the
sizes are chosen to fit, not yet measured on one): each benchmark runs in its
own process under its own time limit (together 10 minutes at most; one that
runs out is reported as timed out), then their JSON
results are summarised, ours against the reference implementation, in
experiments/results/bench_all.md (also printed). `--profile=smoke` runs the
smallest sizes, to check the wiring on a CPU.

  python experiments/bench_all.py
  python experiments/bench_all.py --profile=smoke --only=train,input
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"

SMOKE_LIMIT_S = 900  # per benchmark on a (possibly busy) CPU
# name: (time limit s on an accelerator host, arguments per profile, JSON result file)
BENCHMARKS = {
    "generate": (240, {
        "accelerator": ["--geometry=tiny", "--images=16", "--seeds=2", "--steps=20",
                        "--methods=packed,flax,torch"],
        "smoke": ["--geometry=tiny", "--images=1", "--steps=10", "--methods=packed"],
    }, "bench_generate_tiny.json"),
    "score": (120, {"accelerator": ["--size=full"], "smoke": ["--size=quick", "--repeats=1"]},
              "bench_score.json"),
    "train": (120, {"accelerator": ["--batch=256", "--steps=20", "--warmup=2"],
                    "smoke": ["--batch=16", "--steps=1"]}, "bench_train.json"),
    "input": (120, {"accelerator": ["--size=quick"], "smoke": ["--size=smoke", "--workers=0"]},
              "bench_input.json"),
}


def run(name, profile):
  """Runs benchmark `name`; returns (status, seconds)."""
  limit, args, _ = BENCHMARKS[name]
  limit = limit if profile == "accelerator" else SMOKE_LIMIT_S
  args = list(args[profile])
  if name == "generate":
    args.append(f"--out={RESULTS}")
  elif name in ("score", "input"):
    args.append(f"--out={RESULTS / BENCHMARKS[name][2]}")
  log = RESULTS / f"bench_all_{name}.log"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
  start = time.perf_counter()
  with open(log, "wb") as out:
    try:
      proc = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py"), *args], env=env,
                            stdout=out, stderr=subprocess.STDOUT, timeout=limit, check=False)
      status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}, see {log.name})"
    except subprocess.TimeoutExpired:
      status = f"timed out after {limit} s"
  return status, time.perf_counter() - start


def _ratio(ours, ref):
  return f"{ours / ref:.2f}x" if ours and ref else "n/a"


def _row(bench, case, ours, ref, unit):
  fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
  return f"| {bench} | {case} | {fmt(ours)} | {fmt(ref)} | {_ratio(ours, ref)} | {unit} |"


def summary_rows(name, r):
  """Returns the markdown rows of benchmark `name`'s JSON result `r` (ours vs reference)."""
  if name == "generate":
    m = r["results"]
    packed = m.get("packed", {})
    case = f"{r['geometry']}, {r['jobs']} jobs, {r['steps']} steps, useful {packed.get('useful_fraction', 0):.0%}"
    rows = []
    for ref, what in (("flax", "steady"), ("torch", "end to end")):
      key = "steady_img_s" if what == "steady" else "first_img_s"
      rows.append(_row("generate", f"{case}: {what} vs {ref}", packed.get(key),
                       m.get(ref, {}).get(key), "images/s"))
    return rows
  if name == "score":
    return [_row("score", f"{model} ({v['images']} images, batch {v['batch']}): {kind}",
                 v[f"flax_{kind}"], v[f"torch_{kind}"], "images/s")
            for model, v in r["models"].items() for kind in ("model", "end_to_end")]
  if name == "train":
    return [_row("train", f"ResNet-32 batch {r['batch']}, {r['timed_steps']} steps",
                 r["flax_images_per_s"], r["torch_images_per_s"], "images/s")]
  if name == "input":
    rows = {(x["loader"], x["workers"]): x["images_per_s"] for x in r["rows"]}
    return [_row("input", f"{r['image_size']} px, {r['images']} JPEGs, {w} workers",
                 rows[("grain", w)], rows.get(("torch", w)), "images/s")
            for loader, w in rows if loader == "grain"]
  raise ValueError(f"unknown benchmark {name!r}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--profile", choices=("accelerator", "smoke"), default="accelerator")
  parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
  args = parser.parse_args()
  names = [n for n in args.only.split(",") if n]
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
  RESULTS.mkdir(parents=True, exist_ok=True)
  lines = [f"Benchmarks (`experiments/bench_all.py --profile={args.profile}`), "
           f"{platform.platform()}, {os.cpu_count()} CPUs, "
           f"load average {os.getloadavg()[0]:.1f} at the start.", "",
           "| benchmark | case | ours | reference | ours / reference | unit |",
           "|---|---|---|---|---|---|"]
  status_lines = []
  for name in names:
    target = RESULTS / BENCHMARKS[name][2]
    target.unlink(missing_ok=True)
    status, seconds = run(name, args.profile)
    print(f"{name}: {status} in {seconds:.0f} s", flush=True)
    status_lines.append(f"- {name}: {status}, {seconds:.0f} s")
    if status == "ok":
      r = json.loads(target.read_text())
      lines.extend(summary_rows(name, r))
      devices = " ".join(str(r[k]) for k in ("backend", "devices") if r.get(k))
      if devices:
        status_lines[-1] += f" (devices: {devices})"
  lines += ["", "Reference: diffusers Flax / PyTorch (generate), transformers PyTorch CLIP "
            "(score), PyTorch (train), PyTorch DataLoader (input).", "", *status_lines]
  table = "\n".join(lines) + "\n"
  (RESULTS / "bench_all.md").write_text(table)
  print(table)
  print(f"wrote {RESULTS / 'bench_all.md'}")


if __name__ == "__main__":
  main()
