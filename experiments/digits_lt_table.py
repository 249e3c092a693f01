r"""The digits-LT table: CE and BS, alone and with DisCL's schedules, over training seeds.

  python experiments/digits_lt_table.py                       # the README's table (~45 min, 2 CPUs)
  python experiments/digits_lt_table.py --seeds=0 --schedules=none,syn_to_real --epochs=4
  python experiments/digits_lt_table.py --schedules=none,syn_to_real,resample   # a subset

Protocol (the reference's: DisCL fine-tunes a model already trained on the
long-tailed data, docs/design.md 1.6), on the demo config (`configs/demo.py`):
  1. spectrum: the demo's hard -> prompts -> generate -> score, once, into
     WORKDIR/spectrum (shipped digit generator and digit CLIP, seed 0);
  2. base: for each loss and training seed, `--base_epochs` epochs on real
     data only from scratch (`configs/demo.py:base`, which with CE and seed 0
     made the demo's shipped base classifier);
  3. methods: from each base checkpoint, `--epochs` more epochs at
     `--learning_rate`, once per schedule: `none` is the plain CE / BS row,
     `resample` the reference's resampling baseline (real images only, sampled
     as DisCL's epochs: how much of DisCL's Few gain is tail oversampling), the
     others are DisCL's schedules on the shared spectrum, all with the same
     epochs, levels and curriculum epochs;
  4. Many / Medium / Few / All test top-1 of each run's epoch chosen on val,
     as mean ± sample std over the seeds (the JSON also holds the same at
     each run's last epoch, free of the 50-image val split's selection noise,
     and at its best test epoch: the paper's way of reporting, the reference
     picked each run's best epoch on test).
The dataset split (`data.split_seed`) and the spectrum are the same for every
run; the training seed moves the initialisation, the per-epoch sampling and
the batch order. Runs resume: a finished run is read back, a killed one
continues from its checkpoint; `--schedules` / `--losses` / `--seeds` pick a
subset, and runs of a larger earlier call in the same workdir are reused. Writes OUT/digits_lt_table.{json,md} and prints
the markdown.
"""

import argparse
import pathlib
import sys
import time

from absl import logging

import table_runs
from discl_jax import config as config_lib
from discl_jax import host_devices
from discl_jax import pipeline
from discl_jax import workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.py"
SCHEDULES = ("none", "resample", "syn_to_real", "adaptive", "all_levels", "text_only",
             "real_to_syn")
LOSSES = ("ce", "balanced_softmax")
LOSS_NAMES = {"ce": "CE", "balanced_softmax": "BS"}
GROUPS = ("many", "medium", "few", "all")
SPECTRUM_STAGES = ("hard", "prompts", "generate", "score")


def parse_args(argv):
  """Returns the parsed command line."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="/tmp/digits_lt_table",
                 help="holds the spectrum and every run; rerun to resume")
  p.add_argument("--out", default=str(ROOT / "experiments" / "results"),
                 help="directory for digits_lt_table.json and .md")
  p.add_argument("--config_arg", default="",
                 help='argument of configs/demo.py, e.g. "runlocal" for a smoke-sized spectrum')
  p.add_argument("--seeds", default="0,1,2", help="training seeds, comma separated")
  p.add_argument("--losses", default=",".join(LOSSES))
  p.add_argument("--schedules", default=",".join(SCHEDULES))
  p.add_argument("--base_epochs", type=int, default=20)
  p.add_argument("--epochs", type=int, default=20, help="epochs of every method run")
  p.add_argument("--curriculum_epochs", type=int, default=15,
                 help="of --epochs, those that follow the schedule")
  p.add_argument("--learning_rate", type=float, default=3e-3,
                 help="peak learning rate of the method runs (cosine over --epochs)")
  return p.parse_args(argv)


def _csv(text, valid, flag):
  items = tuple(s.strip() for s in text.split(",") if s.strip())
  unknown = [s for s in items if s not in valid]
  if unknown or not items:
    raise ValueError(f"--{flag}={text!r}: unknown {unknown}; valid: {', '.join(valid)}")
  return items


def protocol_of(args):
  """Returns the dict of settings every run of one table shares (recorded in the workdir)."""
  seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
  if not seeds:
    raise ValueError(f"--seeds={args.seeds!r} names no seed")
  if not 0 < args.curriculum_epochs <= args.epochs:
    raise ValueError(f"--curriculum_epochs={args.curriculum_epochs} must be in "
                     f"1..--epochs={args.epochs}")
  return {"config": f"configs/demo.py:{args.config_arg}".rstrip(":"), "seeds": list(seeds),
          "losses": list(_csv(args.losses, LOSSES, "losses")),
          "schedules": list(_csv(args.schedules, SCHEDULES, "schedules")),
          "base_epochs": args.base_epochs, "epochs": args.epochs,
          "curriculum_epochs": args.curriculum_epochs, "learning_rate": args.learning_rate}


def check_protocol(workdir, protocol):
  """Returns None after recording `protocol` in workdir, or ValueError naming a changed key.

  Runs already in `workdir` were made under the recorded settings; seeds,
  losses and schedules may be added, every other setting must match.
  """
  table_runs.check_protocol(workdir, protocol, addable=("seeds", "losses", "schedules"))


def demo_config(protocol, variant=""):
  """Returns the demo config (with `variant` added to its argument) of this table's runs."""
  arg = ",".join(filter(None, (protocol["config"].partition(":")[2], variant)))
  return config_lib.load_file(DEMO_CONFIG, arg or None)


def base_config(loss, seed, protocol):
  """Returns the config of the real-only base run of (`loss`, `seed`): the demo's `base`."""
  c = demo_config(protocol, "base")
  c.seed = seed
  c.train.loss = loss
  c.train.epochs = protocol["base_epochs"]
  return c


def method_config(loss, schedule, seed, protocol, init_checkpoint):
  """Returns the config of one method run: `schedule` fine-tuning the base checkpoint."""
  c = demo_config(protocol)
  c.seed = seed
  c.train.loss = loss
  c.train.epochs = protocol["epochs"]
  c.train.learning_rate = protocol["learning_rate"]
  c.train.init_checkpoint = str(init_checkpoint)
  c.curriculum.schedule = schedule
  c.curriculum.curriculum_epochs = protocol["curriculum_epochs"]
  c.curriculum.val_sources = 6  # adaptive: 6 hard images with every level (2 per Few class before)
  return c


def shared_spectrum(config, spectrum_dir):
  """Returns `config` training on the shared spectrum (and hard list) of workdir `spectrum_dir`."""
  config.data.spectrum_dir = str((spectrum_dir / wd.SPECTRUM).resolve())
  return config


def summarize(runs, protocol, prefix="test/"):
  """Returns table rows: per (loss, schedule), mean and sample std over seeds of each group.

  `prefix` picks the figures: "test/" at the epoch chosen on val, "best_test/" at the best
  test epoch (the paper's way), "last/" at the last epoch.
  """
  rows = []
  for loss in protocol["losses"]:
    for schedule in protocol["schedules"]:
      mine = [r for r in runs if r["loss"] == loss and r["schedule"] == schedule]
      if not mine:
        continue
      row = {"method": method_name(loss, schedule), "loss": loss, "schedule": schedule,
             "seeds": [r["seed"] for r in mine]}
      for group in GROUPS:
        row[f"{group}_mean"], row[f"{group}_std"] = table_runs.mean_std(
            [100.0 * r[f"{prefix}{group}"] for r in mine])
      rows.append(row)
  return rows


def method_name(loss, schedule):
  """Returns the row label: "CE", "CE + resampling" or "CE + DisCL syn_to_real"."""
  name = LOSS_NAMES[loss]
  if schedule == "none":
    return name
  return f"{name} + resampling" if schedule == "resample" else f"{name} + DisCL {schedule}"


def to_markdown(rows):
  """Returns the markdown table of `rows`: test top-1 (%) mean ± std per class group."""
  lines = ["| method | Many | Medium | Few | All |", "|---|---:|---:|---:|---:|"]
  for row in rows:
    cells = [f"{row[f'{g}_mean']:.1f} ± {row[f'{g}_std']:.1f}" for g in GROUPS]
    lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None, *, compile_cache=True):
  """Returns the report dict written to OUT/digits_lt_table.json, after running what is missing.

  `compile_cache` keeps XLA executables in WORKDIR/jax_cache, shared by the runs.
  """
  args = parse_args(sys.argv[1:] if argv is None else argv)
  protocol = protocol_of(args)
  workdir = pathlib.Path(args.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  check_protocol(workdir, protocol)
  logging.set_verbosity(logging.WARNING)
  if compile_cache:
    table_runs.use_compile_cache(workdir)
  start = time.perf_counter()

  spectrum_dir = workdir / "spectrum"
  print(f"spectrum: {', '.join(SPECTRUM_STAGES)} -> {spectrum_dir}", flush=True)
  pipeline.run_stages(demo_config(protocol), spectrum_dir, SPECTRUM_STAGES)
  spectrum_seconds = time.perf_counter() - start

  runs = []
  todo = [(loss, seed) for loss in protocol["losses"] for seed in protocol["seeds"]]
  for loss, seed in todo:
    base_dir = workdir / "base" / loss / f"seed{seed}"
    tick = time.perf_counter()
    table_runs.train_once(shared_spectrum(base_config(loss, seed, protocol), spectrum_dir),
                          base_dir)
    print(f"base {LOSS_NAMES[loss]} seed {seed}: {time.perf_counter() - tick:.0f} s", flush=True)
    for schedule in protocol["schedules"]:
      run_dir = workdir / "runs" / loss / schedule / f"seed{seed}"
      tick = time.perf_counter()
      result, trained = table_runs.train_once(shared_spectrum(
          method_config(loss, schedule, seed, protocol, base_dir / wd.CKPT), spectrum_dir), run_dir)
      seconds = time.perf_counter() - tick
      chosen = table_runs.selected_rows(run_dir)
      runs.append({"loss": loss, "schedule": schedule, "seed": seed, "seconds": seconds,
                   "trained_now": trained, "best_epoch": result["best_epoch"],
                   "best_test_epoch": chosen["test"]["epoch"],
                   **{f"test/{g}": result[f"test/{g}"] for g in GROUPS},
                   **{f"best_test/{g}": chosen["test"][f"test/{g}"] for g in GROUPS},
                   **{f"last/{g}": chosen["last"][f"test/{g}"] for g in GROUPS}})
      print(f"  {method_name(loss, schedule)} seed {seed}: "
            + " ".join(f"{g} {100 * result[f'test/{g}']:.1f}" for g in GROUPS)
            + f" ({seconds:.0f} s)", flush=True)

  rows = summarize(runs, protocol)
  markdown = to_markdown(rows)
  last_rows = summarize(runs, protocol, prefix="last/")
  best_test_rows = summarize(runs, protocol, prefix="best_test/")
  total = time.perf_counter() - start
  report = {"protocol": protocol, "runs": runs, "table": rows, "table_last_epoch": last_rows,
            "table_best_test_epoch": best_test_rows,
            "spectrum_seconds": spectrum_seconds, "total_seconds": total,
            "machine": table_runs.machine()}
  table_runs.write_outputs(args.out, "digits_lt_table", report, markdown)
  print("\ndigits-LT test top-1 (%), mean ± std over seeds "
        f"{protocol['seeds']}, at the epoch chosen on val (this call: {total / 60:.1f} min):"
        f"\n\n{markdown}\nat the {table_runs.PAPERS_WAY}:\n\n{to_markdown(best_test_rows)}"
        f"\nat the last epoch:\n\n{to_markdown(last_rows)}")
  return report


if __name__ == "__main__":
  print(f"devices: {host_devices.configure()}")  # one XLA host device per core on CPU
  main()
