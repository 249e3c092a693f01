r"""The digits-LT table: CE and BS, alone and with DisCL's schedules, over training seeds.

  python experiments/digits_lt_table.py                       # the README's table (~45 min, 2 CPUs)
  python experiments/digits_lt_table.py --seeds=0 --schedules=none,syn_to_real --epochs=4
  python experiments/digits_lt_table.py --schedules=none,syn_to_real,resample   # a subset
  python experiments/digits_lt_table.py --imbalance_ratios=20,50,100,200 --seeds=0,1,2,3,4 \
      --schedules=none,resample,syn_to_real,fixed,adaptive     # the study across ratios (hours)

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

`--set KEY=VALUE` changes a demo config key for every run (recorded: a workdir
keeps its overrides), e.g. `--set=curriculum.tail_share=0.3`.

`fixed` runs one method per level of `--fixed_levels`; its row is the level
with the highest mean validation top-1 (each run at its val-chosen epoch), so
the "best other fixed schedule" is chosen without looking at test.

With `--imbalance_ratios` (the study): one spectrum and one set of bases per
ratio (the long-tailed train split and its Few classes change with the ratio;
the val and test splits do not: `digits.partition` depends on the split seed
alone), the demo's ratio in WORKDIR itself (so a workdir of the one-ratio table
is reused) and every other one in WORKDIR/ratioR; a workdir keeps that layout
when the demo's ratio changes later. Writes
OUT/digits_lt_ratios.{json,md,png}: a table per ratio, the paired difference
DisCL - resampling per seed (same seed, same base) with its mean, std and
standard error, flagged where the mean exceeds twice the standard error, and
Few / All against the ratio.
"""

import argparse
import os
import pathlib
import sys
import time

from absl import logging

import numpy as np

import table_runs
from discl_jax import config as config_lib
from discl_jax import host_devices
from discl_jax import pipeline
from discl_jax import workdir as wd
from discl_jax.data import datasets
from discl_jax.data import digits
from discl_jax.evaluation import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.py"
SCHEDULES = ("none", "resample", "syn_to_real", "adaptive", "all_levels", "text_only",
             "real_to_syn", "fixed")
REAL_ONLY = ("none", "resample")
LOSSES = ("ce", "balanced_softmax")
LOSS_NAMES = {"ce": "CE", "balanced_softmax": "BS"}
GROUPS = ("many", "medium", "few", "all")
PAIRED_GROUPS = ("few", "all")
SPECTRUM_STAGES = ("hard", "prompts", "generate", "score")
EPOCHS_REPORTED = {"test/": "val-chosen", "last/": "last"}
# Workdirs made before the root's ratio was recorded hold runs at the demo's ratio of then.
RECORDED_DEFAULTS = {"overrides": {}}
ROOT_RATIO_BEFORE_RECORDING = 20.0


def parse_args(argv):
  """Returns the parsed command line."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="/tmp/digits_lt_table",
                 help="holds the spectrum and every run; rerun to resume")
  p.add_argument("--out", default=str(ROOT / "experiments" / "results"),
                 help="directory for digits_lt_table.{json,md} (the study: digits_lt_ratios.{json,md,png})")
  p.add_argument("--config_arg", default="",
                 help='argument of configs/demo.py, e.g. "runlocal" for a smoke-sized spectrum')
  p.add_argument("--imbalance_ratios", default="",
                 help="the study: data.imbalance_ratio values, comma separated (e.g. "
                      "20,50,100,200); empty: the demo's ratio, the one-ratio table")
  p.add_argument("--seeds", default="0,1,2", help="training seeds, comma separated")
  p.add_argument("--losses", default=",".join(LOSSES))
  p.add_argument("--schedules", default=",".join(SCHEDULES[:-1]))
  p.add_argument("--fixed_levels", default="0.1,0.3,0.5",
                 help="levels of the `fixed` schedule, one run each; the best on val is its row")
  p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                 help="a demo config key for every run, e.g. curriculum.tail_share=0.3 (repeatable)")
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


def _floats(text, flag, low, high):
  """Returns the sorted distinct floats of `text`, each in [low, high); ValueError names the flag."""
  try:
    values = sorted({float(v) for v in text.split(",") if v.strip()})
  except ValueError as e:
    raise ValueError(f"--{flag}={text!r}: not a comma-separated list of numbers") from e
  if not values or not all(low <= v < high for v in values):
    raise ValueError(f"--{flag}={text!r}: give values in [{low}, {high})")
  return values


def protocol_of(args):
  """Returns the dict of settings every run of one table shares (recorded in the workdir)."""
  seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
  if not seeds:
    raise ValueError(f"--seeds={args.seeds!r} names no seed")
  if not 0 < args.curriculum_epochs <= args.epochs:
    raise ValueError(f"--curriculum_epochs={args.curriculum_epochs} must be in "
                     f"1..--epochs={args.epochs}")
  config = f"configs/demo.py:{args.config_arg}".rstrip(":")
  overrides = table_runs.parse_overrides(args.overrides)
  demo_ratio = float(table_runs.apply_overrides(
      config_lib.load_file(DEMO_CONFIG, args.config_arg or None), overrides).data.imbalance_ratio)
  ratios = (_floats(args.imbalance_ratios, "imbalance_ratios", 1.0, float("inf"))
            if args.imbalance_ratios.strip() else [demo_ratio])
  return {"config": config, "overrides": overrides, "seeds": list(seeds),
          "losses": list(_csv(args.losses, LOSSES, "losses")),
          "schedules": list(_csv(args.schedules, SCHEDULES, "schedules")),
          "fixed_levels": _floats(args.fixed_levels, "fixed_levels", 0.0, 1.0),
          "imbalance_ratios": ratios, "root_imbalance_ratio": demo_ratio,
          "base_epochs": args.base_epochs, "epochs": args.epochs,
          "curriculum_epochs": args.curriculum_epochs, "learning_rate": args.learning_rate}


def check_protocol(workdir, protocol):
  """Returns None after recording `protocol` in workdir, or ValueError naming a changed key.

  Runs already in `workdir` were made under the recorded settings; seeds,
  losses, schedules, fixed levels and ratios may be added, every other setting must match.
  The ratio whose runs live in WORKDIR itself (`root_imbalance_ratio`, the demo's when the
  workdir was made) stays the recorded one when the demo's ratio changes.
  """
  recorded = table_runs.recorded_protocol(workdir)
  if recorded is not None:
    protocol["root_imbalance_ratio"] = recorded.get(
        "root_imbalance_ratio", recorded.get("demo_imbalance_ratio", ROOT_RATIO_BEFORE_RECORDING))
  table_runs.check_protocol(
      workdir, protocol,
      addable=("seeds", "losses", "schedules", "fixed_levels", "imbalance_ratios",
               "root_imbalance_ratio"),
      recorded_defaults=RECORDED_DEFAULTS)


def demo_config(protocol, variant="", ratio=None):
  """Returns the demo config (with `variant` added to its argument) of this table's runs,
  the protocol's `--set` overrides applied, at imbalance ratio `ratio` (None: the demo's)."""
  arg = ",".join(filter(None, (protocol["config"].partition(":")[2], variant)))
  c = table_runs.apply_overrides(config_lib.load_file(DEMO_CONFIG, arg or None),
                                 protocol.get("overrides", {}))
  if ratio is not None:
    c.data.imbalance_ratio = float(ratio)
  return c


def base_config(loss, seed, protocol, ratio=None):
  """Returns the config of the real-only base run of (`loss`, `seed`): the demo's `base`."""
  c = demo_config(protocol, "base", ratio)
  c.seed = seed
  c.train.loss = loss
  c.train.epochs = protocol["base_epochs"]
  return c


def method_config(loss, schedule, seed, protocol, init_checkpoint, ratio=None, level=None):
  """Returns the config of one method run: `schedule` (`fixed`: at `level`) fine-tuning the
  base checkpoint."""
  c = demo_config(protocol, ratio=ratio)
  c.seed = seed
  c.train.loss = loss
  c.train.epochs = protocol["epochs"]
  c.train.learning_rate = protocol["learning_rate"]
  c.train.init_checkpoint = str(init_checkpoint)
  c.curriculum.schedule = schedule
  c.curriculum.curriculum_epochs = protocol["curriculum_epochs"]
  c.curriculum.val_sources = 6  # adaptive: 6 hard images with every level (2 per Few class before)
  if schedule == "fixed":
    c.curriculum.levels = (float(level),)
  return c


def shared_spectrum(config, spectrum_dir):
  """Returns `config` training on the shared spectrum (and hard list) of workdir `spectrum_dir`."""
  config.data.spectrum_dir = str((spectrum_dir / wd.SPECTRUM).resolve())
  return config


def ratio_dir(workdir, ratio, protocol):
  """Returns the folder of ratio `ratio`'s spectrum, bases and runs: WORKDIR for the root's
  ratio (the demo's when the workdir was made), else WORKDIR/ratioR."""
  if float(ratio) == protocol["root_imbalance_ratio"]:
    return pathlib.Path(workdir)
  return pathlib.Path(workdir) / f"ratio{float(ratio):g}"


def method_variants(protocol):
  """Returns [(schedule, level)] of the method runs: `fixed` once per fixed level."""
  return [(s, level) for s in protocol["schedules"]
          for level in (protocol["fixed_levels"] if s == "fixed" else [None])]


def variant_name(schedule, level):
  """Returns a method run's folder name: the schedule, "fixed0.3" for `fixed` at 0.3."""
  return schedule if level is None else f"{schedule}{level:g}"


def choose_fixed_level(runs, loss):
  """Returns the `fixed` level whose runs of `loss` have the highest mean val top-1 at their
  val-chosen epochs (the lowest level on a tie), or None without `fixed` runs."""
  by_level = {}
  for r in runs:
    if r["loss"] == loss and r["schedule"] == "fixed":
      by_level.setdefault(r["level"], []).append(r["val/all"])
  if not by_level:
    return None
  return max(sorted(by_level), key=lambda level: table_runs.mean_std(by_level[level])[0])


def row_runs(runs, loss, schedule):
  """Returns (level, runs) of a table row: for `fixed` the runs of its level chosen on val."""
  level = choose_fixed_level(runs, loss) if schedule == "fixed" else None
  return level, [r for r in runs if r["loss"] == loss and r["schedule"] == schedule
                 and r.get("level") == level]


def summarize(runs, protocol, prefix="test/"):
  """Returns table rows: per (loss, schedule), mean and sample std over seeds of each group.

  `runs` are of one ratio. `prefix` picks the figures: "test/" at the epoch chosen on
  val, "best_test/" at the best test epoch (the paper's way), "last/" at the last epoch.
  """
  rows = []
  for loss in protocol["losses"]:
    for schedule in protocol["schedules"]:
      level, mine = row_runs(runs, loss, schedule)
      if not mine:
        continue
      row = {"method": method_name(loss, schedule, level), "loss": loss, "schedule": schedule,
             "level": level, "seeds": [r["seed"] for r in mine]}
      for group in GROUPS:
        row[f"{group}_mean"], row[f"{group}_std"] = table_runs.mean_std(
            [100.0 * r[f"{prefix}{group}"] for r in mine])
      if prefix == "test/":
        row["per_class_mean"] = [float(a) for a in np.mean(
            [r["test_per_class"] for r in mine], axis=0) * 100.0]
      rows.append(row)
  return rows


def method_name(loss, schedule, level=None):
  """Returns the row label: "CE", "CE + resampling", "CE + DisCL syn_to_real" or
  "CE + DisCL fixed 0.3"."""
  name = LOSS_NAMES[loss]
  if schedule == "none":
    return name
  if schedule == "resample":
    return f"{name} + resampling"
  return f"{name} + DisCL {schedule}" + ("" if level is None else f" {level:g}")


def paired_differences(runs, protocol):
  """Returns one record per (ratio, loss, DisCL schedule, epoch reported): the per-seed
  difference DisCL - resampling in Few and All top-1 (points) and its mean, std and se."""
  out = []
  for ratio in protocol["imbalance_ratios"]:
    mine = [r for r in runs if r.get("imbalance_ratio", ratio) == ratio]
    for loss in protocol["losses"]:
      resampled = {r["seed"]: r for r in row_runs(mine, loss, "resample")[1]}
      for schedule in protocol["schedules"]:
        if schedule in REAL_ONLY:
          continue
        level, discl = row_runs(mine, loss, schedule)
        pairs = [(r, resampled[r["seed"]]) for r in discl if r["seed"] in resampled]
        if not pairs:
          continue
        for prefix, epoch in EPOCHS_REPORTED.items():
          record = {"imbalance_ratio": ratio, "loss": loss, "schedule": schedule,
                    "level": level, "method": method_name(loss, schedule, level),
                    "epoch": epoch, "seeds": [d["seed"] for d, _ in pairs]}
          for group in PAIRED_GROUPS:
            diffs = [100.0 * (d[f"{prefix}{group}"] - b[f"{prefix}{group}"]) for d, b in pairs]
            record[group] = {"differences": diffs, **table_runs.paired_difference(diffs)}
          out.append(record)
  return out


def to_markdown(rows):
  """Returns the markdown table of `rows`: test top-1 (%) mean ± std per class group."""
  lines = ["| method | Many | Medium | Few | All |", "|---|---:|---:|---:|---:|"]
  for row in rows:
    cells = [f"{row[f'{g}_mean']:.1f} ± {row[f'{g}_std']:.1f}" for g in GROUPS]
    lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def per_class_markdown(rows, class_names, class_counts):
  """Returns the markdown table of `rows`' per-class test top-1 (%, mean over seeds, val-chosen
  epoch), each column headed by the class and its train images at this ratio."""
  head = " | ".join(f"{name} ({count})" for name, count in zip(class_names, class_counts))
  lines = [f"| method | {head} |", "|---|" + "---:|" * len(class_names)]
  for row in rows:
    lines.append(f"| {row['method']} | "
                 + " | ".join(f"{a:.0f}" for a in row["per_class_mean"]) + " |")
  return "\n".join(lines) + "\n"


def _paired_cell(stats):
  se = "–" if stats["se"] is None else f"{stats['se']:.1f}"
  flag = " **\\***" if stats["beyond_2se"] else ""
  return f"{stats['mean']:+.1f} ± {stats['std']:.1f} (se {se}){flag}"


def paired_markdown(pairs):
  """Returns the markdown table of `pairs` (`paired_differences`): mean ± std (se) in points."""
  lines = ["| ratio | DisCL − resampling | epoch | seeds | Few Δ | All Δ |",
           "|---:|---|---|---:|---:|---:|"]
  for p in pairs:
    lines.append(f"| {p['imbalance_ratio']:g} | {p['method']} | {p['epoch']} | {len(p['seeds'])} | "
                 + " | ".join(_paired_cell(p[g]) for g in PAIRED_GROUPS) + " |")
  return ("\n".join(lines) + "\n\nPoints of test top-1, paired by seed (the same seed's base); "
          "mean ± sample std (standard error); **\\*** the mean exceeds twice its standard "
          "error.\n")


def study_markdown(ratio_tables, pairs, protocol):
  """Returns the study's markdown: a table per ratio (val-chosen and last epoch), then the
  paired-difference table."""
  parts = []
  for t in ratio_tables:
    parts.append(f"#### digits-LT, imbalance ratio {t['imbalance_ratio']:g}\n\n"
                 f"Test top-1 (%), mean ± std over seeds {protocol['seeds']}, at the epoch "
                 f"chosen on val:\n\n{to_markdown(t['table'])}\nAt the last epoch:\n\n"
                 f"{to_markdown(t['table_last_epoch'])}\nPer class (train images in "
                 "brackets), mean over the seeds, val-chosen epoch:\n\n"
                 f"{per_class_markdown(t['table'], t['class_names'], t['class_counts'])}")
  parts.append(f"#### DisCL − resampling, paired by seed\n\n{paired_markdown(pairs)}")
  return "\n".join(parts)


def plot_ratios(ratio_tables, protocol, path):
  """Writes `path`: Few and All test top-1 (val-chosen epoch) against the imbalance ratio,
  one line per method, ± std shaded; a row of panels per loss. Returns `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  losses = protocol["losses"]
  fig, axes = plt.subplots(len(losses), 2, figsize=(10, 3.6 * len(losses)), squeeze=False)
  ratios = [t["imbalance_ratio"] for t in ratio_tables]
  for i, loss in enumerate(losses):
    for j, group in enumerate(("few", "all")):
      ax = axes[i][j]
      for k, schedule in enumerate(protocol["schedules"]):
        points = [(t["imbalance_ratio"], row) for t in ratio_tables for row in t["table"]
                  if row["loss"] == loss and row["schedule"] == schedule]
        if not points:
          continue
        x = [r for r, _ in points]
        mean = [row[f"{group}_mean"] for _, row in points]
        std = [row[f"{group}_std"] for _, row in points]
        label = method_name(loss, schedule) + (" (best level on val)" if schedule == "fixed"
                                               else "")
        ax.plot(x, mean, marker="o", color=f"C{k}", label=label)
        for (r, row), m in zip(points, mean):
          if row["level"] is not None:  # the fixed level chosen at this ratio
            ax.annotate(f"{row['level']:g}", (r, m), fontsize=7, color=f"C{k}",
                        textcoords="offset points", xytext=(4, 4))
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=f"C{k}", alpha=0.15)
      ax.set_xscale("log")
      ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
      ax.minorticks_off()
      ax.set_xlabel("imbalance ratio (n_max / n_min)")
      ax.set_ylabel(f"{group.capitalize()} test top-1 (%)")
      ax.set_title(f"{LOSS_NAMES[loss]}: {group.capitalize()} (val-chosen epoch)")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  fig.suptitle(f"digits-LT, mean ± std over seeds {protocol['seeds']}")
  fig.tight_layout()
  path = pathlib.Path(path)
  partial = path.with_name(path.stem + ".partial.png")
  fig.savefig(partial, dpi=110)
  plt.close(fig)
  os.replace(partial, path)
  return path


def run_record(result, run_dir, **keys):
  """Returns one method run's record: `keys`, its val top-1, its Many / Medium / Few / All
  test top-1 at the val-chosen, best test and last epochs, and its per-class test top-1 at
  the val-chosen epoch."""
  chosen = table_runs.selected_rows(run_dir)
  with np.load(pathlib.Path(run_dir) / wd.PREDICTIONS) as saved:
    per_class = metrics.per_class_accuracy(saved["test_pred"], saved["test_label"],
                                           len(digits.CLASS_NAMES))
  return {**keys, "best_epoch": result["best_epoch"],
          "test_per_class": [float(a) for a in per_class],
          "best_test_epoch": chosen["test"]["epoch"], "val/all": chosen["val"]["val/all"],
          **{f"test/{g}": result[f"test/{g}"] for g in GROUPS},
          **{f"best_test/{g}": chosen["test"][f"test/{g}"] for g in GROUPS},
          **{f"last/{g}": chosen["last"][f"test/{g}"] for g in GROUPS}}


def run_ratio(workdir, ratio, protocol):
  """Returns (the run records of imbalance ratio `ratio`, its spectrum's seconds), training
  what is missing."""
  home = ratio_dir(workdir, ratio, protocol)
  spectrum_dir = home / "spectrum"
  print(f"ratio {ratio:g}: spectrum {', '.join(SPECTRUM_STAGES)} -> {spectrum_dir}", flush=True)
  tick = time.perf_counter()
  pipeline.run_stages(demo_config(protocol, ratio=ratio), spectrum_dir, SPECTRUM_STAGES)
  spectrum_seconds = time.perf_counter() - tick
  runs = []
  for loss in protocol["losses"]:
    for seed in protocol["seeds"]:
      base_dir = home / "base" / loss / f"seed{seed}"
      tick = time.perf_counter()
      table_runs.train_once(
          shared_spectrum(base_config(loss, seed, protocol, ratio), spectrum_dir), base_dir)
      print(f"base {LOSS_NAMES[loss]} seed {seed}: {time.perf_counter() - tick:.0f} s", flush=True)
      for schedule, level in method_variants(protocol):
        run_dir = home / "runs" / loss / variant_name(schedule, level) / f"seed{seed}"
        tick = time.perf_counter()
        config = method_config(loss, schedule, seed, protocol, base_dir / wd.CKPT, ratio, level)
        result, trained = table_runs.train_once(shared_spectrum(config, spectrum_dir), run_dir)
        seconds = time.perf_counter() - tick
        runs.append(run_record(result, run_dir, imbalance_ratio=ratio, loss=loss,
                               schedule=schedule, level=level, seed=seed, seconds=seconds,
                               trained_now=trained))
        print(f"  {method_name(loss, schedule, level)} seed {seed}: "
              + " ".join(f"{g} {100 * result[f'test/{g}']:.1f}" for g in GROUPS)
              + f" ({seconds:.0f} s)", flush=True)
  return runs, spectrum_seconds


def ratio_tables_of(runs, protocol):
  """Returns per ratio {"imbalance_ratio", "table", "table_last_epoch", "table_best_test_epoch"}."""
  tables = []
  for ratio in protocol["imbalance_ratios"]:
    mine = [r for r in runs if r["imbalance_ratio"] == ratio]
    train = datasets.load(demo_config(protocol, ratio=ratio).data)["train"]
    tables.append({"imbalance_ratio": ratio, "class_names": list(train.class_names),
                   "class_counts": [int(n) for n in train.class_counts()],
                   "table": summarize(mine, protocol),
                   "table_last_epoch": summarize(mine, protocol, prefix="last/"),
                   "table_best_test_epoch": summarize(mine, protocol, prefix="best_test/")})
  return tables


def main(argv=None, *, compile_cache=True):
  """Returns the report dict written to OUT/digits_lt_table.json (the study:
  OUT/digits_lt_ratios.json), after running what is missing.

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
  runs, spectrum_seconds = [], 0.0
  for ratio in protocol["imbalance_ratios"]:
    ratio_runs, seconds = run_ratio(workdir, ratio, protocol)
    runs += ratio_runs
    spectrum_seconds += seconds
  tables = ratio_tables_of(runs, protocol)
  pairs = paired_differences(runs, protocol)
  total = time.perf_counter() - start
  report = {"protocol": protocol, "runs": runs, "paired_differences": pairs,
            "spectrum_seconds": spectrum_seconds, "total_seconds": total,
            "machine": table_runs.machine()}
  if args.imbalance_ratios.strip():
    return _write_study(args.out, report, tables, protocol)
  report.update({k: v for k, v in tables[0].items() if k != "imbalance_ratio"})
  markdown = to_markdown(report["table"])
  table_runs.write_outputs(args.out, "digits_lt_table", report, markdown)
  print("\ndigits-LT test top-1 (%), mean ± std over seeds "
        f"{protocol['seeds']}, at the epoch chosen on val (this call: {total / 60:.1f} min):"
        f"\n\n{markdown}\nat the {table_runs.PAPERS_WAY}:\n\n"
        f"{to_markdown(report['table_best_test_epoch'])}"
        f"\nat the last epoch:\n\n{to_markdown(report['table_last_epoch'])}")
  return report


def _write_study(out, report, tables, protocol):
  """Returns `report` with the per-ratio tables, after writing OUT/digits_lt_ratios.{json,md,png}."""
  report["ratios"] = tables
  markdown = study_markdown(tables, report["paired_differences"], protocol)
  folder = table_runs.write_outputs(out, "digits_lt_ratios", report, markdown)
  plot_ratios(tables, protocol, folder / "digits_lt_ratios.png")
  print(f"\n{markdown}\n(this call: {report['total_seconds'] / 60:.1f} min; plot: "
        f"{folder / 'digits_lt_ratios.png'})")
  return report


if __name__ == "__main__":
  print(f"devices: {host_devices.configure()}")  # one XLA host device per core on CPU
  main()
