r"""The iWildCam table: FLYP and FLYP + DisCL (adaptive), ID / OOD macro-F1 over training seeds.

  python experiments/iwildcam_table.py --set=data.metadata_csv=/data/iwildcam_v2.0/metadata.csv
  python experiments/iwildcam_table.py --config_arg=runlocal --seeds=0 --set=...   # smoke size

Protocol (the reference's two steps, docs/design.md §6), on `configs/iwildcam.py`:
  1. baseline: for each training seed, FLYP on the real data
     (`curriculum.schedule=none`);
  2. spectrum: the hard images are the train-split errors of the first seed's
     baseline (`hard.model_checkpoint`, `empty` excluded), then prompts ->
     generate -> score, once, into WORKDIR/spectrum;
  3. DisCL: for each training seed, FLYP with the adaptive curriculum on that
     spectrum;
  4. the table: ID (id_test) and OOD (test) macro-F1 (WILDS' definition) of
     each run at the epoch chosen on the OOD validation split, mean ± sample
     std over the seeds; the JSON also holds the same at the epoch chosen on
     id_val, at the best test epoch (the paper's way of reporting: the
     reference picked each run's best epoch on test) and at the last epoch.
Every run shares the config but for `seed` and the schedule; `--set key=value`
changes any config key of every run (the data path, tiny models for a smoke
run). Runs resume: a finished run is read back, a killed one continues from its
checkpoint. Writes OUT/iwildcam_table.{json,md} and prints the markdown.
"""

import argparse
import json
import pathlib
import shutil
import sys
import time

from absl import logging

import table_runs
from discl_jax import config as config_lib
from discl_jax import config_checks
from discl_jax import host_devices
from discl_jax import pipeline
from discl_jax import workdir as wd
from discl_jax.evaluation import report as report_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "iwildcam.py"
METHODS = {"none": "FLYP", "adaptive": "FLYP + DisCL (adaptive)"}
SPLITS = {"id": "id_test", "ood": "test"}
SPECTRUM_STAGES = ("hard", "prompts", "generate", "score")
SHARED_FILES = (wd.HARD, wd.PROMPTS)
SELECTIONS = ("val", "id_val", "test", "last")  # chosen on OOD val, id_val, OOD test; the last


def parse_args(argv):
  """Returns the parsed command line."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="/tmp/iwildcam_table",
                 help="holds the spectrum and every run; rerun to resume")
  p.add_argument("--out", default=str(ROOT / "experiments" / "results"),
                 help="directory for iwildcam_table.json and .md")
  p.add_argument("--config_arg", default="", help='argument of configs/iwildcam.py, e.g. "runlocal"')
  p.add_argument("--seeds", default="0,1,2", help="training seeds, comma separated")
  p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                 help="a config key of every run, e.g. data.metadata_csv=/data/metadata.csv")
  return p.parse_args(argv)


def protocol_of(args):
  """Returns the dict of settings every run of one table shares (recorded in the workdir)."""
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  if not seeds:
    raise ValueError(f"--seeds={args.seeds!r} names no seed")
  overrides = table_runs.parse_overrides(args.overrides)
  protocol = {"config": f"configs/iwildcam.py:{args.config_arg}".rstrip(":"), "seeds": seeds,
              "overrides": overrides}
  run_config(protocol, "none", seeds[0])  # bad keys or values fail here, before any run
  return protocol


def run_config(protocol, schedule, seed, model_checkpoint=""):
  """Returns the config of one run: `schedule` at `seed`, the protocol's overrides applied."""
  arg = protocol["config"].partition(":")[2]
  c = table_runs.apply_overrides(config_lib.load_file(CONFIG, arg or None), protocol["overrides"])
  c.seed = seed
  c.curriculum.schedule = schedule
  c.hard.model_checkpoint = str(model_checkpoint)
  return config_checks.validate(c)


def link_spectrum(spectrum_dir, run_dir):
  """Returns `run_dir`, given the shared hard list, prompts and spectrum (read only)."""
  run_dir.mkdir(parents=True, exist_ok=True)
  for name in SHARED_FILES:
    if not (run_dir / name).exists():
      shutil.copyfile(spectrum_dir / name, run_dir / name)
  link = run_dir / wd.SPECTRUM
  if not link.exists():
    link.symlink_to((spectrum_dir / wd.SPECTRUM).resolve(), target_is_directory=True)
  return run_dir


def run_figures(run_dir):
  """Returns {selection: {"id": F1, "ood": F1, "epoch": e}} of one finished run."""
  chosen = table_runs.selected_rows(run_dir, "macro_f1")
  rows = [r for r in wd.read_jsonl(pathlib.Path(run_dir) / wd.METRICS) if "epoch" in r]
  chosen["id_val"] = report_lib.best_row(rows, None, "id_val", "macro_f1")
  return {name: {"epoch": row["epoch"],
                 **{k: row[f"{split}/macro_f1"] for k, split in SPLITS.items()}}
          for name, row in chosen.items()}


def summarize(runs, selection="val"):
  """Returns table rows: per method, mean and sample std over seeds of ID / OOD macro-F1 (%)."""
  rows = []
  for schedule, name in METHODS.items():
    mine = [r for r in runs if r["schedule"] == schedule]
    if not mine:
      continue
    row = {"method": name, "schedule": schedule, "seeds": [r["seed"] for r in mine]}
    for key in SPLITS:
      row[f"{key}_mean"], row[f"{key}_std"] = table_runs.mean_std(
          [100.0 * r[selection][key] for r in mine])
    rows.append(row)
  return rows


def to_markdown(rows):
  """Returns the markdown table of `rows`: OOD and ID macro-F1 (%) mean ± std."""
  lines = ["| method | OOD macro-F1 | ID macro-F1 |", "|---|---:|---:|"]
  for row in rows:
    lines.append(f"| {row['method']} | {row['ood_mean']:.1f} ± {row['ood_std']:.1f} | "
                 f"{row['id_mean']:.1f} ± {row['id_std']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None, *, compile_cache=True):
  """Returns the report dict written to OUT/iwildcam_table.json, after running what is missing."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  protocol = protocol_of(args)
  workdir = pathlib.Path(args.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  table_runs.check_protocol(workdir, protocol)
  logging.set_verbosity(logging.WARNING)
  if compile_cache:
    table_runs.use_compile_cache(workdir)
  start = time.perf_counter()
  runs = []

  def record(schedule, seed, run_dir, trained, seconds):
    figures = run_figures(run_dir)
    runs.append({"schedule": schedule, "seed": seed, "trained_now": trained,
                 "seconds": seconds, **figures})
    print(f"  {METHODS[schedule]} seed {seed}: OOD {100 * figures['val']['ood']:.1f} "
          f"ID {100 * figures['val']['id']:.1f} ({seconds:.0f} s)", flush=True)

  baselines = {}
  for seed in protocol["seeds"]:
    run_dir = workdir / "baseline" / f"seed{seed}"
    tick = time.perf_counter()
    _, trained = table_runs.train_once(run_config(protocol, "none", seed), run_dir)
    baselines[seed] = run_dir
    record("none", seed, run_dir, trained, time.perf_counter() - tick)

  hard_model = baselines[protocol["seeds"][0]] / wd.CKPT
  spectrum_dir = workdir / "spectrum"
  print(f"spectrum: hard set of {hard_model}; {', '.join(SPECTRUM_STAGES)} -> {spectrum_dir}",
        flush=True)
  tick = time.perf_counter()
  pipeline.run_stages(run_config(protocol, "adaptive", protocol["seeds"][0], hard_model),
                      spectrum_dir, SPECTRUM_STAGES)
  spectrum_seconds = time.perf_counter() - tick

  for seed in protocol["seeds"]:
    run_dir = link_spectrum(spectrum_dir, workdir / "discl" / f"seed{seed}")
    tick = time.perf_counter()
    _, trained = table_runs.train_once(run_config(protocol, "adaptive", seed, hard_model), run_dir)
    record("adaptive", seed, run_dir, trained, time.perf_counter() - tick)

  tables = {selection: summarize(runs, selection) for selection in SELECTIONS}
  markdown = to_markdown(tables["val"])
  hard = json.loads((spectrum_dir / wd.HARD_SUMMARY).read_text())
  total = time.perf_counter() - start
  report = {"protocol": protocol, "runs": runs, "table": tables["val"],
            "table_id_val_epoch": tables["id_val"], "table_best_test_epoch": tables["test"],
            "table_last_epoch": tables["last"],
            "hard": {k: hard.get(k) for k in ("num_hard", "num_images", "hard_share", "model")},
            "spectrum_seconds": spectrum_seconds, "total_seconds": total,
            "machine": table_runs.machine()}
  table_runs.write_outputs(args.out, "iwildcam_table", report, markdown)
  print(f"\niWildCam macro-F1 (%), mean ± std over seeds {protocol['seeds']}, at the epoch "
        f"chosen on OOD val (this call: {total / 60:.1f} min):\n\n{markdown}\n"
        f"at the epoch chosen on id_val:\n\n{to_markdown(tables['id_val'])}\n"
        f"at the {table_runs.PAPERS_WAY} (OOD test macro-F1):\n\n"
        f"{to_markdown(tables['test'])}\n"
        f"at the last epoch:\n\n{to_markdown(tables['last'])}")
  return report


if __name__ == "__main__":
  print(f"devices: {host_devices.configure()}")  # one XLA host device per core on CPU
  main()
