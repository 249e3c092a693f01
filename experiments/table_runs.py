"""What the table launchers (digits_lt_table, iwildcam_table, imagenet_lt_table) share.

The protocol record that makes a table's workdir resumable, `--set KEY=VALUE`
overrides, one training run read back when finished, each run's epoch
picked three ways (on validation: the headline; on test: the paper's way of
reporting, the reference picked each run's best test epoch; the last), and
mean ± sample std over seeds.
"""

import json
import pathlib

import jax
import ml_collections
import numpy as np

from discl_jax import pipeline
from discl_jax import workdir as wd
from discl_jax.evaluation import report as report_lib

PROTOCOL = "protocol.json"
PAPERS_WAY = ("best test epoch: the paper's way of reporting (the reference picked each run's "
              "best epoch on the test split; optimistic)")


def parse_overrides(items):
  """Returns {dotted key: text} of "KEY=VALUE" items (`--set`); ValueError names a bad one."""
  overrides = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set={item!r}: expected KEY=VALUE")
    overrides[key] = value
  return overrides


def set_key(config, dotted, text):
  """Sets `config`'s key `dotted` from `text`, converted to the type of its current value."""
  node, parts = config, dotted.split(".")
  for part in parts[:-1]:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise KeyError(f"--set {dotted}: unknown config key")
    node = node[part]
  if parts[-1] not in node:
    raise KeyError(f"--set {dotted}: unknown config key")
  default = node[parts[-1]]
  if isinstance(default, bool):
    value = text.lower() in ("1", "true", "yes")
  elif isinstance(default, (tuple, list)):
    value = tuple(type(default[0])(v) if default else v for v in filter(None, text.split(",")))
  else:
    value = type(default)(text)
  node[parts[-1]] = value


def apply_overrides(config, overrides):
  """Returns `config` with every {dotted key: text} of `overrides` set."""
  for key, value in overrides.items():
    set_key(config, key, value)
  return config


def recorded_protocol(workdir):
  """Returns the protocol dict recorded in workdir/protocol.json, or None before the first run."""
  path = pathlib.Path(workdir) / PROTOCOL
  return json.loads(path.read_text()) if path.exists() else None


def check_protocol(workdir, protocol, addable=("seeds",), recorded_defaults=None):
  """Returns None after recording `protocol` in workdir/protocol.json, or ValueError naming
  a key that differs from the recorded one (keys in `addable` may change: runs are added).

  `recorded_defaults` gives {key: value} for keys a record made before the key existed
  lacks: the value its runs were made with.
  """
  path = pathlib.Path(workdir) / PROTOCOL
  if path.exists():
    recorded = {**(recorded_defaults or {}), **recorded_protocol(workdir)}
    for key, value in protocol.items():
      if key not in addable and recorded.get(key) != value:
        raise ValueError(f"{path}: its runs used {key}={recorded.get(key)!r}, not {value!r}; "
                         "use another --workdir or the recorded value")
  wd.atomic_write_text(path, json.dumps(protocol, indent=2, sort_keys=True) + "\n")


def use_compile_cache(workdir):
  """Keeps XLA executables in WORKDIR/jax_cache, shared by a table's runs."""
  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(workdir) / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def train_once(config, run_dir):
  """Returns (train_result.json dict, whether this call trained), training unless it is there."""
  result_path = pathlib.Path(run_dir) / wd.TRAIN_RESULT
  trained = not result_path.exists()
  if trained:
    pipeline.run_stages(config, run_dir, ("train",))
  return json.loads(result_path.read_text()), trained


def selected_rows(run_dir, metric="all", test_split="test"):
  """Returns {"val": the row of the epoch chosen on validation, "test": the row with the
  highest `{test_split}/{metric}` (the paper's way), "last": the last epoch's row}."""
  rows = [r for r in wd.read_jsonl(pathlib.Path(run_dir) / wd.METRICS) if "epoch" in r]
  result = json.loads((pathlib.Path(run_dir) / wd.TRAIN_RESULT).read_text())
  return {"val": report_lib.best_row(rows, result["best_epoch"]),
          "test": report_lib.best_row(rows, None, test_split, metric),
          "last": max(rows, key=lambda r: r["epoch"])}


def mean_std(values):
  """Returns (mean, sample std; 0 for one value) of `values`."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def paired_difference(differences):
  """Returns {"mean", "std", "se", "beyond_2se"} of per-seed paired `differences`: sample std,
  standard error std / sqrt(n) (None for one value), and whether the mean exceeds twice it."""
  mean, std = mean_std(differences)
  if len(differences) < 2:
    return {"mean": mean, "std": std, "se": None, "beyond_2se": False}
  se = std / float(np.sqrt(len(differences)))
  return {"mean": mean, "std": std, "se": se, "beyond_2se": bool(mean > 2.0 * se)}


def machine():
  """Returns the platform and device count, e.g. "cpu x1"."""
  return f"{jax.devices()[0].platform} x{jax.device_count()}"


def write_outputs(out, name, report, markdown):
  """Writes OUT/NAME.json (`report`) and OUT/NAME.md (`markdown`); returns the folder."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  wd.atomic_write_text(out / f"{name}.json", json.dumps(report, indent=2) + "\n")
  wd.atomic_write_text(out / f"{name}.md", markdown)
  return out
