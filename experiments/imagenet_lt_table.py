r"""The ImageNet-LT table (the paper's Table 1): the base as it is, CE / BS with DisCL and resampling.

  python experiments/imagenet_lt_table.py --base=/ckpt/ldmlr_resnet10.pth \
    --set=data.root=/data/imagenet --set=data.train_list=/data/ImageNet_LT_train.txt \
    --set=data.val_list=/data/ImageNet_LT_val.txt --set=data.test_list=/data/ImageNet_LT_test.txt \
    --set=data.class_names_file=/data/imagenet_classes.txt \
    --set=prompts.source=llm          # or prompts.descriptions_file=... (see configs/imagenet_lt.py)
  python experiments/imagenet_lt_table.py --base=train ...      # train the base first (:base)

Protocol (the reference's, docs/design.md §6), on `configs/imagenet_lt.py`:
  1. base: `--base` is the long-tail ResNet-10 every run starts from (LDMLR's
     PyTorch checkpoint, or a ckpt directory of this project); `--base=train`
     trains it first with the `:base` variant (the reference's base recipe)
     into WORKDIR/base_train;
  2. spectrum: hard (every Few-class image) -> prompts -> generate -> score,
     once, into WORKDIR/spectrum;
  3. rows: the base evaluated as it is (`train.epochs=0`: the paper's CE
     row), and for each training seed, from the base: CE + DisCL and BS +
     DisCL (`syn_to_real`, 14/15/15/17 + 4 epochs, on the shared spectrum),
     BS (real data), CE / BS + resampling (the reference's
     `augment_type='baseline'`: real images sampled as DisCL's epochs);
  4. Many / Medium / Few / All test top-1 of each run at the epoch chosen on
     val (our headline), at its best test epoch (the paper's way of
     reporting: the reference picked each run's best epoch on test) and at
     its last epoch; mean ± sample std over the seeds, the paper's rows
     printed beside ours.
Every run shares the config but for `seed`, loss and schedule; `--set
key=value` changes any key of every run. Runs resume: a finished run is read
back, a killed one continues from its checkpoint; `--methods` picks a subset.
Writes OUT/imagenet_lt_table.{json,md} and prints the markdown.
"""

import argparse
import pathlib
import sys
import time

from absl import logging

import table_runs
from discl_jax import config as config_lib
from discl_jax import config_checks
from discl_jax import pipeline
from discl_jax import workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "imagenet_lt.py"
GROUPS = ("many", "medium", "few", "all")
SPECTRUM_STAGES = ("hard", "prompts", "generate", "score")
# name: (row label, loss, schedule); "base" is the base evaluated as it is (train.epochs=0).
METHODS = {
    "base": ("CE (the base as it is)", "ce", "none"),
    "ce_discl": ("CE + DisCL", "ce", "syn_to_real"),
    "ce_resample": ("CE + resampling", "ce", "resample"),
    "bs": ("BS", "balanced_softmax", "none"),
    "bs_discl": ("BS + DisCL", "balanced_softmax", "syn_to_real"),
    "bs_resample": ("BS + resampling", "balanced_softmax", "resample"),
}
# The paper's ImageNet-LT rows, test top-1 (%) at each run's best test epoch (docs/design.md
# §1.7, §6); None where the paper gives no figure.
PAPER = {
    "base": {"many": 57.7, "medium": 26.6, "few": 4.4, "all": 35.8},
    "ce_discl": {"many": None, "medium": None, "few": 23.64, "all": 39.82},
    "bs": {"many": None, "medium": None, "few": None, "all": 39.80},
    "bs_discl": {"many": None, "medium": None, "few": None, "all": 41.33},
}
SELECTIONS = {"val": "the epoch chosen on val (our headline)",
              "test": table_runs.PAPERS_WAY, "last": "the last epoch"}


def parse_args(argv):
  """Returns the parsed command line."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="/tmp/imagenet_lt_table",
                 help="holds the spectrum and every run; rerun to resume")
  p.add_argument("--out", default=str(ROOT / "experiments" / "results"),
                 help="directory for imagenet_lt_table.json and .md")
  p.add_argument("--base", required=True,
                 help="the base every run starts from (a PyTorch ResNet-10 or a ckpt dir); "
                      "'train': train it with configs/imagenet_lt.py:base into WORKDIR/base_train")
  p.add_argument("--config_arg", default="", help='argument of configs/imagenet_lt.py, e.g. "runlocal"')
  p.add_argument("--seeds", default="0", help="training seeds, comma separated")
  p.add_argument("--methods", default=",".join(METHODS), help="rows, comma separated")
  p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                 help="a config key of every run, e.g. data.root=/data/imagenet")
  return p.parse_args(argv)


def protocol_of(args):
  """Returns the dict of settings every run of one table shares (recorded in the workdir)."""
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  if not seeds:
    raise ValueError(f"--seeds={args.seeds!r} names no seed")
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f"--methods={args.methods!r}: unknown {unknown}; valid: {', '.join(METHODS)}")
  base = args.base if args.base == "train" else str(pathlib.Path(args.base).absolute())
  protocol = {"config": f"configs/imagenet_lt.py:{args.config_arg}".rstrip(":"), "seeds": seeds,
              "methods": methods, "base": base,
              "overrides": table_runs.parse_overrides(args.overrides)}
  run_config(protocol, "ce_discl", seeds[0], "base")  # bad keys or values fail here
  return protocol


def _load(protocol, variant=""):
  arg = ",".join(filter(None, (protocol["config"].partition(":")[2], variant)))
  return table_runs.apply_overrides(config_lib.load_file(CONFIG, arg or None),
                                    protocol["overrides"])


def base_train_config(protocol):
  """Returns the config of the base run (`--base=train`): the `:base` variant, seed of the first."""
  c = _load(protocol, "base")
  c.seed = protocol["seeds"][0]
  return config_checks.validate(c)


def run_config(protocol, method, seed, base, spectrum_dir=None):
  """Returns the config of one run: `method` at `seed` from checkpoint `base`."""
  _, loss, schedule = METHODS[method]
  c = _load(protocol, f"schedule={schedule},loss={loss}")
  c.seed = seed
  c.train.init_checkpoint = str(base)
  if method == "base":
    c.train.epochs = 0
  if spectrum_dir is not None and schedule == "syn_to_real":
    c.data.spectrum_dir = str((pathlib.Path(spectrum_dir) / wd.SPECTRUM).resolve())
  return config_checks.validate(c)


def run_figures(run_dir):
  """Returns {selection: {group: test top-1, "epoch": e}} of one finished run."""
  chosen = table_runs.selected_rows(run_dir)
  return {name: {"epoch": row["epoch"], **{g: row[f"test/{g}"] for g in GROUPS}}
          for name, row in chosen.items()}


def summarize(runs, methods, selection="val"):
  """Returns table rows: per method, mean and sample std over seeds of each group (%), and
  the paper's figures."""
  rows = []
  for method in methods:
    mine = [r for r in runs if r["method"] == method]
    if not mine:
      continue
    row = {"method": METHODS[method][0], "key": method, "seeds": [r["seed"] for r in mine],
           "paper": PAPER.get(method, {})}
    for group in GROUPS:
      row[f"{group}_mean"], row[f"{group}_std"] = table_runs.mean_std(
          [100.0 * r[selection][group] for r in mine])
    rows.append(row)
  return rows


def to_markdown(rows):
  """Returns the markdown table of `rows`: ours (mean ± std) and the paper's, per group (%)."""
  head = [g.capitalize() for g in GROUPS]
  lines = ["| method | " + " | ".join(head) + " | paper " + " | paper ".join(head) + " |",
           "|---|" + "---:|" * (2 * len(GROUPS))]
  for row in rows:
    ours = [f"{row[f'{g}_mean']:.1f} ± {row[f'{g}_std']:.1f}" for g in GROUPS]
    paper = [f"{row['paper'][g]:.2f}" if row["paper"].get(g) is not None else "-" for g in GROUPS]
    lines.append(f"| {row['method']} | " + " | ".join(ours + paper) + " |")
  return "\n".join(lines) + "\n"


def base_checkpoint(protocol, workdir):
  """Returns the base every run starts from, training it first when `--base=train`."""
  if protocol["base"] != "train":
    return protocol["base"]
  run_dir = workdir / "base_train"
  tick = time.perf_counter()
  _, trained = table_runs.train_once(base_train_config(protocol), run_dir)
  print(f"base: {'trained' if trained else 'read back'} in {run_dir} "
        f"({time.perf_counter() - tick:.0f} s)", flush=True)
  return run_dir / wd.CKPT


def main(argv=None, *, compile_cache=True):
  """Returns the report dict written to OUT/imagenet_lt_table.json, after running what is missing."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  protocol = protocol_of(args)
  workdir = pathlib.Path(args.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  table_runs.check_protocol(workdir, protocol, addable=("seeds", "methods"))
  logging.set_verbosity(logging.WARNING)
  if compile_cache:
    table_runs.use_compile_cache(workdir)
  start = time.perf_counter()
  base = base_checkpoint(protocol, workdir)
  spectrum_dir = workdir / "spectrum"
  if any(METHODS[m][2] == "syn_to_real" for m in protocol["methods"]):
    print(f"spectrum: {', '.join(SPECTRUM_STAGES)} -> {spectrum_dir}", flush=True)
    pipeline.run_stages(run_config(protocol, "ce_discl", protocol["seeds"][0], base),
                        spectrum_dir, SPECTRUM_STAGES)
  spectrum_seconds = time.perf_counter() - start

  runs = []
  for method in protocol["methods"]:
    seeds = protocol["seeds"][:1] if method == "base" else protocol["seeds"]  # no training
    for seed in seeds:
      run_dir = workdir / "runs" / method / f"seed{seed}"
      tick = time.perf_counter()
      _, trained = table_runs.train_once(
          run_config(protocol, method, seed, base, spectrum_dir), run_dir)
      figures = run_figures(run_dir)
      seconds = time.perf_counter() - tick
      runs.append({"method": method, "seed": seed, "trained_now": trained, "seconds": seconds,
                   **figures})
      print(f"  {METHODS[method][0]} seed {seed}: "
            + " ".join(f"{g} {100 * figures['val'][g]:.1f}" for g in GROUPS)
            + f" ({seconds:.0f} s)", flush=True)

  tables = {name: summarize(runs, protocol["methods"], name) for name in SELECTIONS}
  total = time.perf_counter() - start
  report = {"protocol": protocol, "runs": runs, "table": tables["val"],
            "table_best_test_epoch": tables["test"], "table_last_epoch": tables["last"],
            "paper": PAPER, "spectrum_seconds": spectrum_seconds, "total_seconds": total,
            "machine": table_runs.machine()}
  markdown = "\n".join(f"Test top-1 (%) at {label}:\n\n{to_markdown(tables[name])}"
                       for name, label in SELECTIONS.items())
  table_runs.write_outputs(args.out, "imagenet_lt_table", report, markdown)
  print(f"\nImageNet-LT, mean ± std over seeds {protocol['seeds']} (this call: "
        f"{total / 60:.1f} min); the paper's figures are at its best test epoch:\n\n{markdown}")
  return report


if __name__ == "__main__":
  main()
