"""The run report: `report.md` (tables) and `curves.png` (accuracy and curriculum per epoch).

Inputs are the rows of metrics.jsonl, one per epoch, as the train loop writes
them: "epoch", accuracy keys "{split}/{many|medium|few|all|macro_f1}" (fractions),
and the curriculum keys of `EpochPlan.summary()` ("curriculum_phase",
"curriculum_level", "curriculum_levels", "num_real", "num_synthetic"); rows
where the adaptive curriculum picked a level also carry "curriculum_gains"
(mean progress per candidate: the levels, then real) and "curriculum_choice".
The low-quality task's hard-image figures (workdir/hard_summary.json, written
by the `hard` stage's misclassified rule) get their own section when present.
Keys a row lacks are shown as "-", so older or partial logs still render.
"""

import io
import json
import math
import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from discl_jax import workdir as wd
from discl_jax.evaluation import metrics as metrics_lib

CURVES = "curves.png"
COLUMNS = ("many", "medium", "few", "all", "macro_f1")
_HEADERS = {"many": "Many", "medium": "Medium", "few": "Few", "all": "All", "macro_f1": "macro-F1"}
_COLORS = {"all": "black", "many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
_STYLES = ("-", "--", ":", "-.")
REAL_LEVEL = 1.0  # where real images sit on the level axis (lambda = 1: the image itself)


def splits_in(rows):
  """Returns the split names that have accuracy keys in `rows`: test splits last, else by name."""
  seen = set()
  for row in rows:
    for key in row:
      split, sep, metric = key.rpartition("/")
      if sep and metric in COLUMNS:
        seen.add(split)
  return sorted(seen, key=lambda name: ("test" in name, name))


def best_row(rows, best_epoch=None, split="val", metric="all"):
  """Returns the row of `best_epoch`, else the row with the highest `{split}/{metric}`."""
  if best_epoch is not None:
    for row in rows:
      if row.get("epoch") == best_epoch:
        return row
  scored = [r for r in rows if _finite(r.get(f"{split}/{metric}"))]
  return max(scored, key=lambda r: r[f"{split}/{metric}"]) if scored else None


def id_val_row(rows, selected_on):
  """Returns the row chosen on `id_val` with the metric of `selected_on` ("split/metric"), or
  None when the rows have no id_val or the run already selects on it."""
  split, _, metric = selected_on.partition("/")
  if split == "id_val" or not any(f"id_val/{metric}" in r for r in rows):
    return None
  return best_row(rows, None, "id_val", metric)


def best_test_section(rows, selected_on):
  """Returns markdown lines: the run at its best epoch on `test/{metric}` (the metric of
  `selected_on`), the paper's way of reporting; [] with fewer than two epochs or no test."""
  metric = selected_on.partition("/")[2] or "all"
  row = best_row(rows, None, "test", metric) if len(rows) > 1 else None
  if row is None:
    return []
  return [f"## Best test epoch ({row.get('epoch')}): the paper's way of reporting", "",
          f"The same run at the epoch with the highest `test/{metric}`, as the reference "
          "reported each run (it picked the best epoch on the test split). Test figures "
          "selected on test are optimistic; the headline above is selected on validation.",
          "", results_table(row, splits_in(rows)), ""]


def results_table(values, splits):
  """Returns markdown: one line per split, Many/Medium/Few/All/macro-F1 in percent."""
  lines = ["| split | " + " | ".join(_HEADERS[c] for c in COLUMNS) + " |",
           "|---|" + "---:|" * len(COLUMNS)]
  for split in splits:
    lines.append(f"| {split} | " + " | ".join(_pct(values.get(f"{split}/{c}")) for c in COLUMNS) + " |")
  return "\n".join(lines)


def epoch_table(rows, splits):
  """Returns markdown: per epoch the curriculum (phase, level, counts), loss and All top-1."""
  head = ["epoch", "phase", "level", "real", "synthetic", "loss"] + [f"{s} All" for s in splits] + [
      f"{s} Few" for s in splits]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [str(row.get("epoch", "-")), str(row.get("curriculum_phase", "-")), level_label(row),
             _int(row.get("num_real")), _int(row.get("num_synthetic")), _num(row.get("loss"))]
    cells += [_pct(row.get(f"{s}/all")) for s in splits]
    cells += [_pct(row.get(f"{s}/few")) for s in splits]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def per_class_table(preds, labels, class_names, groups, train_counts):
  """Returns markdown: per class its group, train images, evaluated images and top-1."""
  num_classes = len(class_names)
  acc = metrics_lib.per_class_accuracy(preds, labels, num_classes)
  evaluated = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
  lines = ["| class | group | train images | eval images | top-1 |", "|---|---|---:|---:|---:|"]
  for c in range(num_classes):
    lines.append(f"| {class_names[c]} | {groups[c]} | {int(train_counts[c])} | "
                 f"{int(evaluated[c])} | {_pct(acc[c])} |")
  return "\n".join(lines)


def level_label(row):
  """Returns the curriculum level(s) of a metrics row as text ("real", "0.30", "0.10+0.30")."""
  levels = row.get("curriculum_levels")
  if levels is None:
    level = row.get("curriculum_level")
    if level is None:
      return "real" if "curriculum_level" in row else "-"
    levels = [level]
  return "+".join(f"{v:.2f}" for v in levels) if levels else "real"


def adaptive_table(rows, levels=None):
  """Returns markdown: per adaptive pick, the epoch, the chosen candidate and every
  candidate's mean progress; "" when no row has a pick.

  `levels` (curriculum.levels) names the candidates; the last candidate is real.
  """
  picked = [r for r in rows if r.get("curriculum_gains") is not None]
  if not picked:
    return ""
  num = len(picked[0]["curriculum_gains"])
  names = ([f"{v:.2f}" for v in levels] if levels is not None and len(levels) == num - 1
           else [f"level {g}" for g in range(num - 1)]) + ["real"]
  lines = ["| epoch | chosen | " + " | ".join(f"gain {n}" for n in names) + " |",
           "|---|---|" + "---:|" * num]
  for row in picked:
    choice = row.get("curriculum_choice")
    chosen = names[choice] if isinstance(choice, int) and 0 <= choice < num else "-"
    gains = [f"{g:+.4f}" if _finite(g) else "-" for g in row["curriculum_gains"]]
    lines.append(f"| {row.get('epoch', '-')} | {chosen} | " + " | ".join(gains) + " |")
  return "\n".join(lines)


def hard_section(figures):
  """Returns markdown lines for the hard-image rule and its per-class figures."""
  rule = figures.get("rule", {})
  out = [f"Rule: misclassified={rule.get('misclassified')}, true-class probability quantile "
         f"{rule.get('prob_quantile')} (threshold {figures.get('prob_threshold')}), classes "
         f"never hard {rule.get('excluded_classes', [])}; model `{figures.get('model', '-')}`, "
         f"train accuracy {_pct(figures.get('train_accuracy'))} %. "
         f"{figures.get('num_hard')} of {figures.get('num_images')} training images are hard "
         f"({_pct(figures.get('hard_share'))} %).",
         "", "| class | hard | total |", "|---|---:|---:|"]
  for name, counts in figures.get("per_class", {}).items():
    out.append(f"| {name} | {counts.get('hard')} | {counts.get('total')} |")
  return out


def synthetic_section(synthetic):
  """Returns markdown lines: generator and CLIP, threshold, acceptance per level, links."""
  overall = synthetic["overall"]
  out = [f"Generator `{synthetic['generator']}`, CLIP `{synthetic['clip']}`, CLIPScore "
         f"threshold {synthetic['threshold']}: {overall.get('accepted')} of "
         f"{overall.get('generated')} generated images accepted; "
         f"{synthetic['trained_on']} synthetic samples trained on (summed over epochs).", "",
         "| image guidance λ | generated | accepted |", "|---:|---:|---:|"]
  for level in synthetic["per_level"]:
    out.append(f"| {level['image_guidance']:.2f} | {level.get('generated')} | "
               f"{level.get('accepted')} |")
  links = ([f"[acceptance per level and class]({synthetic['acceptance_png']})"]
           if synthetic.get("acceptance_png") else [])
  links += [f"[{pathlib.PurePath(g).stem.replace('_', ' ')}]({g})" for g in synthetic["grids"]]
  if links:
    out += ["", "Figures: " + ", ".join(links) + "."]
  return out


def timings_markdown(stages):
  """Returns the text of timings.md: wall time, runs, images and images/s per stage.

  `stages` are the eval stage's rows (stage, seconds, runs, images and, for
  train, rate_seconds: the epochs' training seconds, killed runs included).
  """
  out = ["# Stage times", "", "| stage | wall time (s) | runs | images | images/s |",
         "|---|---:|---:|---:|---:|"]
  for s in stages:
    images = s.get("images")
    seconds = s.get("rate_seconds", s["seconds"])
    rate = f"{images / seconds:.1f}" if images and seconds > 0 else "-"
    out.append(f"| {s['stage']} | {s['seconds']:.1f} | {s['runs']} | "
               f"{images if images is not None else '-'} | {rate} |")
  out += ["", "Wall time is summed over every completed run of a stage (resumed runs "
          "included). Train's images and images/s count the images trained and their "
          "training time in every run, killed ones included (timings.jsonl).", ""]
  return "\n".join(out)


def unfinished(rows, epochs, final):
  """Returns the warning for a run that has not trained all `epochs` (or has no final
  result), or "" for a finished one."""
  trained = len({r.get("epoch") for r in rows})
  if trained >= epochs and final is not None:
    return ""
  missing = "" if final is not None else f"; {wd.TRAIN_RESULT} is missing"
  return (f"unfinished run: {trained} of {epochs} epochs trained{missing}; rerun the train "
          "stage to finish it (the best epoch below is the best of those trained)")


def run_section(run):
  """Returns markdown lines: where the stage times are, package versions, the commit."""
  environment = run.get("environment") or {}
  packages = ", ".join(f"{k} {v}" for k, v in sorted(environment.get("packages", {}).items()))
  return [f"Stage wall times and images/s: [{wd.TIMINGS_REPORT}]({wd.TIMINGS_REPORT}).", "",
          f"Code: commit `{environment.get('commit') or 'unknown'}`. Packages: {packages}."]


def render_markdown(rows, *, final=None, config=None, per_class=None, hard=None, run=None):
  """Returns the text of report.md.

  `final` is the train loop's result dict (its "best_epoch", "selected_on"
  and best-epoch metrics); `per_class` a dict with preds, labels,
  class_names, groups, train_counts (the best epoch's test predictions);
  `hard` the hard stage's figures (hard_summary.json) or None; `run` the
  eval stage's `run_summary` (synthetic data, stage timings, environment).
  """
  splits = splits_in(rows)
  out = ["# DisCL run report", ""]
  if config is not None:
    out += [_config_summary(config), ""]
    warning = unfinished(rows, config.train.epochs, final)
    if warning:
      out += [f"**Warning: {warning}.**", ""]
  best = best_row(rows, (final or {}).get("best_epoch"))
  if best is not None and (final or {}).get("evaluated_as_is"):
    out += ["## Result of train.init_checkpoint as it is (train.epochs=0)", "",
            "Top-1 accuracy (%) per class group and macro-F1 (%) of the initial checkpoint, "
            "no training step taken.", "", results_table(best, splits), ""]
  elif best is not None:
    values = dict(best)
    values.update({k: v for k, v in (final or {}).items() if "/" in k})
    selected_on = (final or {}).get("selected_on", "val/all")
    out += [f"## Result at the best validation epoch ({best.get('epoch')})", "",
            "Top-1 accuracy (%) per class group and macro-F1 (%); the epoch is chosen on "
            f"`{selected_on}`, never on test.", "", results_table(values, splits), ""]
  out += best_test_section(rows, (final or {}).get("selected_on", "val/all"))
  alternative = id_val_row(rows, (final or {}).get("selected_on", "val/all"))
  if alternative is not None:
    out += [f"## Result at the epoch chosen on id_val ({alternative.get('epoch')})", "",
            "The same run with the epoch chosen on the ID validation split instead (the "
            "reference evaluated id_val, id_test and test only).", "",
            results_table(alternative, splits), ""]
  if rows:
    out += [f"## Last epoch ({rows[-1].get('epoch')})", "", results_table(rows[-1], splits), ""]
  out += ["## Curves", "", f"![accuracy and curriculum level per epoch]({CURVES})", ""]
  if per_class is not None:
    out += ["## Per-class accuracy (test, best epoch)", "",
            per_class_table(**per_class), ""]
  levels = tuple(config.curriculum.levels) if config is not None else None
  adaptive = adaptive_table(rows, levels)
  if adaptive:
    out += ["## Adaptive curriculum choices", "",
            "Before each synthetic phase: mean change of the validation images' true-class "
            "probability per candidate since the last reference point (IQR outliers "
            "dropped); the phase trains on the argmax.", "", adaptive, ""]
  if hard is not None:
    out += ["## Hard images", ""] + hard_section(hard) + [""]
  if run is not None and run.get("synthetic"):
    out += ["## Synthetic data", ""] + synthetic_section(run["synthetic"]) + [""]
  out += ["## Epochs", "", epoch_table(rows, splits), ""]
  if run is not None:
    out += ["## Run", ""] + run_section(run) + [""]
  return "\n".join(out)


def render_curves(rows, best_epoch=None):
  """Returns PNG bytes: top, accuracy per split and group; bottom, the curriculum level."""
  fig = Figure(figsize=(9, 7), dpi=100)
  FigureCanvasAgg(fig)
  acc_ax, level_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
  epochs = np.asarray([r.get("epoch", i) for i, r in enumerate(rows)], np.float64)
  for split, style in zip(splits_in(rows), _STYLES * 4):
    for group, color in _COLORS.items():
      values = np.asarray([_float(r.get(f"{split}/{group}")) for r in rows])
      if np.all(np.isnan(values)):
        continue
      acc_ax.plot(epochs, 100 * values, style, color=color, marker=".",
                  linewidth=2.0 if group == "all" else 1.2, label=f"{split} {group}")
  acc_ax.set_ylabel("top-1 accuracy (%)")
  acc_ax.grid(alpha=0.3)
  if acc_ax.lines:
    acc_ax.legend(fontsize=7, ncol=2, loc="best")

  uniform = False
  for epoch, row in zip(epochs, rows):
    if row.get("curriculum_phase") == "uniform":
      uniform = True
      level_ax.axvspan(epoch - 0.5, epoch + 0.5, color="0.9", linewidth=0)
    levels = row.get("curriculum_levels")
    if levels is None:
      levels = [] if row.get("curriculum_level") is None else [row["curriculum_level"]]
    if levels:
      level_ax.scatter([epoch] * len(levels), levels, color="tab:green", s=18, zorder=3)
    else:
      level_ax.scatter([epoch], [REAL_LEVEL], color="tab:gray", marker="s", s=14, zorder=3)
  level_ax.set_ylim(-0.05, 1.1)
  level_ax.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0], ["0", "0.25", "0.5", "0.75", "real"])
  level_ax.set_ylabel("image guidance λ")
  level_ax.set_xlabel("epoch (grey bands: adaptive uniform phases)" if uniform else "epoch")
  level_ax.grid(alpha=0.3)
  level_ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
  if best_epoch is not None and best_epoch >= 0:
    for ax in (acc_ax, level_ax):
      ax.axvline(best_epoch, color="tab:purple", linestyle=":", linewidth=1)
    acc_ax.set_title(f"best validation epoch: {best_epoch}", fontsize=9)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  return buffer.getvalue()


def write_report(workdir, rows, *, final=None, config=None, per_class=None, run=None):
  """Writes workdir/report.md and workdir/curves.png atomically; returns their paths."""
  if not rows:
    raise ValueError(f"{wd.path(workdir, wd.METRICS)}: no epoch rows to report on")
  best = best_row(rows, (final or {}).get("best_epoch"))
  best_epoch = None if best is None else best.get("epoch")
  curves = wd.atomic_write_bytes(wd.path(workdir, CURVES), render_curves(rows, best_epoch))
  hard_path = wd.path(workdir, wd.HARD_SUMMARY)
  hard = json.loads(hard_path.read_text(encoding="utf-8")) if hard_path.is_file() else None
  report = wd.atomic_write_text(
      wd.path(workdir, wd.REPORT),
      render_markdown(rows, final=final, config=config, per_class=per_class, hard=hard,
                      run=run))
  return report, curves


def _config_summary(config):
  c = config
  parts = [
      f"data `{c.data.name}`", f"model `{c.train.model}`", f"loss `{c.train.loss}`",
      f"{c.train.epochs} epochs", f"schedule `{c.curriculum.schedule}`"]
  if c.curriculum.schedule not in ("none", "resample"):  # resample: real epochs only
    parts += [f"levels {tuple(c.curriculum.levels)}",
              f"{c.curriculum.curriculum_epochs} curriculum epochs"]
  if c.curriculum.schedule != "none":
    parts.append(f"non-tail fraction {c.curriculum.nontail_fraction}")
  parts.append(f"seed {c.seed}")
  return "Run: " + ", ".join(parts) + "."


def _float(value):
  return float(value) if _finite(value) else float("nan")


def _finite(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value):
  return f"{100 * value:.2f}" if _finite(value) else "-"


def _num(value):
  return f"{value:.4f}" if _finite(value) else "-"


def _int(value):
  return str(int(value)) if _finite(value) else "-"
