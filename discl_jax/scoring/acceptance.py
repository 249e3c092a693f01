"""The CLIPScore filter: which generated images are kept, and the acceptance report.

A row is accepted when it was scored without error and its image-text cosine
similarity `clip_text` is >= the threshold. Rows whose image could not be read
carry an error naming the file; they are excluded and listed in the report.
With `score.regenerate` a job may have several attempts (see
`diffusion.regeneration`); its final row is the best-scoring attempt, and only
final rows are filtered and trained on.
"""

import collections
import io
import math

import numpy as np

from discl_jax.data import spectrum_store


def check_threshold(threshold):
  """Returns `threshold` as a float; ValueError when it is not a cosine in [-1, 1]."""
  try:
    value = float(threshold)
  except (TypeError, ValueError):
    raise ValueError(f"score.threshold must be a number in [-1, 1], got {threshold!r}") from None
  if not math.isfinite(value) or not -1.0 <= value <= 1.0:
    raise ValueError(
        f"score.threshold={threshold!r} is outside [-1, 1]: CLIP scores are cosine "
        "similarities (the reference keeps >= 0.30, or >= 0.25 on iWildCam)")
  return value


def is_scored(row):
  """Returns True when `row` has a score or a recorded scoring error."""
  return row.get("clip_text") is not None or row.get("score_error") is not None


def is_accepted(row, threshold):
  """Returns True when `row` was scored without error and clip_text >= threshold."""
  return (row.get("score_error") is None and row.get("clip_text") is not None
          and row["clip_text"] >= threshold)


def max_attempt(score_config):
  """Returns the last regeneration attempt `score_config` uses (0: regeneration off).

  Raises ValueError naming score.max_regenerations when it is negative.
  """
  count = int(score_config.max_regenerations)
  if count < 0:
    raise ValueError(f"score.max_regenerations must be >= 0, got {count}")
  return count if score_config.regenerate else 0


def final_rows(rows, last_attempt=0):
  """Returns one row per job: its best-scoring attempt among attempts 0..`last_attempt`.

  Ties go to the earlier attempt; a job with no attempt scored without error
  gives its attempt-0 row.
  """
  best = {}
  for row in rows:
    attempt = spectrum_store.attempt_of(row)
    if attempt > last_attempt:
      continue
    job = spectrum_store.original_job_id(row)
    key = (_valid_score(row), row["clip_text"] if _valid_score(row) else 0.0, -attempt)
    if job not in best or key > best[job][0]:
      best[job] = (key, row)
  return [row for _, row in best.values()]


def accepted_rows(rows, threshold, last_attempt=0):
  """Returns the final rows (manifest rows with scores merged) that pass the filter, by job id.

  Ordered by job id, not manifest order: an image regenerated after a crash
  appends its row at the end of the manifest, and training must not change.
  """
  threshold = check_threshold(threshold)
  return sorted((row for row in final_rows(rows, last_attempt) if is_accepted(row, threshold)),
                key=lambda row: row["job_id"])


def _valid_score(row):
  return row.get("score_error") is None and row.get("clip_text") is not None


def raise_nothing_accepted(rows, threshold, root, schedule):
  """Raises the error for a curriculum `schedule` with no accepted row in `rows` (of `root`).

  FileNotFoundError: no spectrum (run generate and score); ValueError: nothing
  scored (run score) or nothing at `threshold`.
  """
  fix = "or train on real data only with curriculum.schedule=none"
  if not rows:
    raise FileNotFoundError(
        f"curriculum.schedule={schedule!r} trains on synthetic images, but there are none in "
        f"{root}: run the generate and score stages first ({fix})")
  scored = [r for r in rows if r.get("clip_text") is not None]
  if not scored:
    raise ValueError(
        f"curriculum.schedule={schedule!r}: none of the {len(rows)} spectrum images in {root} "
        f"is scored: run the score stage first ({fix})")
  best = max(r["clip_text"] for r in scored)
  raise ValueError(
      f"curriculum.schedule={schedule!r}: none of the {len(scored)} scored spectrum images "
      f"reaches score.threshold={threshold} (best {best:.3f}); lower the threshold "
      f"(acceptance.json shows the scores per level) ({fix})")


def _rate(accepted, total):
  return accepted / total if total else None


def _summary(group_rows, threshold):
  scored = [r for r in group_rows if r.get("score_error") is None and r.get("clip_text") is not None]
  accepted = sum(is_accepted(r, threshold) for r in scored)
  text = np.asarray([r["clip_text"] for r in scored], np.float64)
  source = np.asarray([r["clip_source"] for r in scored if r.get("clip_source") is not None],
                      np.float64)
  return dict(
      generated=len(group_rows), scored=len(scored),
      errors=sum(r.get("score_error") is not None for r in group_rows),
      unscored=sum(not is_scored(r) for r in group_rows),
      accepted=int(accepted), rate=_rate(int(accepted), len(scored)),
      clip_text_mean=float(text.mean()) if len(text) else None,
      clip_source_mean=float(source.mean()) if len(source) else None)


def build_report(rows, threshold, *, model="", text_template="", last_attempt=0):
  """Returns the acceptance report (a JSON-able dict) of merged manifest rows.

  Counts before (generated, scored) and after (accepted) the filter overall,
  per image-guidance level, per class and per (class, level), of each job's
  final row; the rows that could not be scored, by path; and a warning for
  each (class, level) that is left without an accepted image. With
  regeneration (`last_attempt` > 0) "regeneration" gives the acceptance of the
  first attempts and of the final rows, overall and per level.
  """
  threshold = check_threshold(threshold)
  all_rows = list(rows)
  rows = final_rows(all_rows, last_attempt)
  levels = sorted({float(r["image_guidance"]) for r in rows})
  classes = sorted({(int(r["label"]), r["class_name"]) for r in rows})
  by_level, by_class, by_pair = (collections.defaultdict(list) for _ in range(3))
  for row in rows:
    level = float(row["image_guidance"])
    by_level[level].append(row)
    by_class[int(row["label"])].append(row)
    by_pair[(int(row["label"]), level)].append(row)

  per_level = [dict(image_guidance=level, strength=round(1.0 - level, 6),
                    **_summary(by_level[level], threshold)) for level in levels]
  per_class = [dict(label=label, class_name=name, **_summary(by_class[label], threshold))
               for label, name in classes]
  per_class_level, warnings = [], []
  for label, name in classes:
    for level in levels:
      pair_rows = by_pair.get((label, level), [])
      accepted = sum(is_accepted(r, threshold) for r in pair_rows)
      per_class_level.append(dict(label=label, class_name=name, image_guidance=level,
                                  generated=len(pair_rows), accepted=int(accepted)))
      if not accepted:
        warnings.append(
            f"class {name!r} has no accepted image at image guidance {level:.2f} "
            f"({len(pair_rows)} generated, threshold {threshold})")
  errors = [dict(job_id=r["job_id"], path=r["path"], error=r["score_error"])
            for r in rows if r.get("score_error") is not None]
  report = dict(
      threshold=threshold, model=model, text_template=text_template,
      overall=_summary(rows, threshold), per_level=per_level, per_class=per_class,
      per_class_level=per_class_level, errors=errors, warnings=warnings)
  if last_attempt:
    report["regeneration"] = _regeneration_summary(all_rows, rows, threshold, last_attempt)
  return report


def _regeneration_summary(all_rows, final, threshold, last_attempt):
  """Returns acceptance of the first attempts ("before") and the final rows ("after")."""
  first = [r for r in all_rows if spectrum_store.attempt_of(r) == 0]
  retries = [r for r in all_rows if 0 < spectrum_store.attempt_of(r) <= last_attempt]

  def entry(first_rows, final_rows_, retry_rows):
    before, after = _summary(first_rows, threshold), _summary(final_rows_, threshold)
    return dict(accepted_before=before["accepted"], rate_before=before["rate"],
                accepted_after=after["accepted"], rate_after=after["rate"],
                regenerated_jobs=len({spectrum_store.original_job_id(r) for r in retry_rows}),
                attempts=len(retry_rows),
                from_retry=sum(spectrum_store.attempt_of(r) > 0 for r in final_rows_
                               if is_accepted(r, threshold)))

  per_level = []
  for level in sorted({float(r["image_guidance"]) for r in first}):
    at = lambda rows: [r for r in rows if float(r["image_guidance"]) == level]
    per_level.append(dict(image_guidance=level, **entry(at(first), at(final), at(retries))))
  return dict(max_regenerations=last_attempt, overall=entry(first, final, retries),
              per_level=per_level)


def plot_png(report, rows):
  """Returns PNG bytes of the acceptance figure: rates per level and class, score spread."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  levels = [e["image_guidance"] for e in report["per_level"]]
  labels = [f"{level:.2f}" for level in levels]
  ax = axes[0]
  ax.bar(labels, [e["rate"] or 0.0 for e in report["per_level"]], color="tab:blue")
  for i, e in enumerate(report["per_level"]):
    ax.annotate(f"{e['accepted']}/{e['scored']}", (i, e["rate"] or 0.0),
                ha="center", va="bottom", fontsize=8)
  ax.set(title="acceptance rate per level", xlabel="image guidance lambda",
         ylabel="accepted / scored", ylim=(0, 1.1))

  ax = axes[1]
  spread = [[r["clip_text"] for r in rows
             if r.get("clip_text") is not None and r.get("score_error") is None
             and float(r["image_guidance"]) == level] for level in levels]
  if any(spread):
    ax.boxplot([s if s else [np.nan] for s in spread], tick_labels=labels)
  ax.axhline(report["threshold"], color="tab:red", linestyle="--",
             label=f"threshold {report['threshold']}")
  ax.set(title="CLIP image-text similarity", xlabel="image guidance lambda", ylabel="cosine")
  ax.legend(loc="best", fontsize=8)

  ax = axes[2]
  per_class = report["per_class"]
  rates = [e["rate"] or 0.0 for e in per_class]
  if len(per_class) <= 40:
    ax.barh([e["class_name"] for e in per_class], rates, color="tab:green")
    ax.set(xlabel="accepted / scored", xlim=(0, 1.05))
    ax.tick_params(axis="y", labelsize=7)
  else:
    ax.hist(rates, bins=20, range=(0, 1), color="tab:green")
    ax.set(xlabel="acceptance rate", ylabel="classes")
  ax.set_title("acceptance rate per class")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  return buffer.getvalue()
