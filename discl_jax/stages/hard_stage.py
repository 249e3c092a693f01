"""Stage `hard`: choose the training images that get a synthetic spectrum.

Writes workdir/hard.jsonl, one row per image: source_id, label, class_name,
reason (the rule, or "listed_class") and class_count (the class's training
images); iWildCam rows also carry caption_name (the class's common name, which
the prompts use). Rules live in `hard_selection.RULES` (name -> function returning
(indices, reason, extra fields per index, figures or None)); `hard.classes`
overrides the rule with an explicit list of class names.

Rules (train/hard_selection.py):
  few_classes    every training image of a Few class (long-tail tasks).
  misclassified  low-quality tasks (docs/design.md 1.1, §6): a model trained on the
                 original data predicts every training image; hard = misclassified,
                 or true-class probability below the `hard.prob_quantile` quantile
                 (when > 0). The model is the CLIP of `hard.model_checkpoint`: the
                 checkpoint directory of a `curriculum.schedule=none` FLYP run on
                 the same data (the reference's protocol: about 6 % of iWildCam's
                 train split is hard), or "zero_shot" for the CLIP to fine-tune as
                 loaded (many more errors on camera-trap images). A DisCL schedule
                 without it is refused before any stage runs (`check_config`).
                 Its figures (hard images per class, the hard share) go to
                 workdir/hard_summary.json and the log; each row gains true_prob and
                 pred_class_name.
Images of the classes in `hard.exclude_classes` are never hard (iWildCam:
"empty", which gets no spectrum in the reference).
"""

import collections
import json

from absl import logging

from discl_jax import parallel
from discl_jax import provenance
from discl_jax import workdir as wd
from discl_jax.data import datasets
from discl_jax.train import hard_selection


def run(config, workdir):
  """Writes workdir/hard.jsonl (process 0) and logs the per-class counts."""
  provenance.check_stage(workdir, "hard", config, provenance.fingerprint(config, "hard"),
                         target=wd.path(workdir, wd.PROVENANCE % "hard"),
                         outputs=[wd.path(workdir, wd.HARD), wd.path(workdir, wd.HARD_SUMMARY)])
  splits = datasets.load(config.data)
  rows, figures = hard_selection.select_hard_with_figures(config, splits, workdir)
  per_class = collections.Counter(row["class_name"] for row in rows)
  logging.info("hard: %d images from %d classes: %s", len(rows), len(per_class),
               dict(sorted(per_class.items())))
  if not rows:
    logging.warning("hard: no hard images selected (rule %r, classes %r)",
                    config.hard.rule, tuple(config.hard.classes))
  if wd.is_main_process():
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    wd.atomic_write_text(wd.path(workdir, wd.HARD), text)
    if figures is not None:
      wd.atomic_write_json(wd.path(workdir, wd.HARD_SUMMARY), figures)
  if figures is not None:
    logging.info("hard: rule %s, %d of %d training images hard (%.2f %%; train accuracy %s); "
                 "per class (hard/total): %s", figures["rule"], figures["num_hard"],
                 figures["num_images"], 100 * (figures["hard_share"] or 0.0),
                 figures["train_accuracy"],
                 {c: f"{v['hard']}/{v['total']}" for c, v in figures["per_class"].items()})
  parallel.barrier("stages.hard")
