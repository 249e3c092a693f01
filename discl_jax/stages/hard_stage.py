"""Stage `hard`: choose the training images that get a synthetic spectrum.

Writes workdir/hard.jsonl, one row per image: source_id, label, class_name,
reason (the rule, or "listed_class") and class_count (the class's training
images). Rules live in `RULES` (name -> function); `hard.classes` overrides the
rule with an explicit list of class names.
"""

import collections
import json

import numpy as np
from absl import logging

from discl_jax import parallel
from discl_jax import workdir as wd
from discl_jax.data import datasets
from discl_jax.data import longtail


def few_classes(config, splits, workdir):
  """Returns (indices, reason): every train image of a Few class (< data.few_threshold)."""
  del workdir
  train = splits["train"]
  groups = longtail.class_groups(
      train.class_counts(), config.data.many_threshold, config.data.few_threshold)
  return np.flatnonzero(groups[train.labels] == "few"), "few_class"


RULES = {"few_classes": few_classes}


def listed_classes(class_names, wanted):
  """Returns the label ids of class names `wanted`; ValueError lists valid names."""
  index = {name: i for i, name in enumerate(class_names)}
  unknown = [c for c in wanted if c not in index]
  if unknown:
    raise ValueError(f"hard.classes names unknown class(es) {unknown}; valid class "
                     f"names: {list(class_names)}")
  return sorted({index[c] for c in wanted})


def select_hard(config, splits, workdir):
  """Returns the hard rows (dicts) for the train split of `splits`, in split order."""
  train = splits["train"]
  counts = train.class_counts()
  if config.hard.classes:
    labels = listed_classes(train.class_names, config.hard.classes)
    indices, reason = np.flatnonzero(np.isin(train.labels, labels)), "listed_class"
  else:
    if config.hard.rule not in RULES:
      raise ValueError(f"unknown hard.rule {config.hard.rule!r}; available: {sorted(RULES)}")
    indices, reason = RULES[config.hard.rule](config, splits, workdir)
  rows = []
  for i in np.sort(np.asarray(indices, np.int64)):
    label = int(train.labels[i])
    rows.append(dict(source_id=str(train.ids[i]), label=label,
                     class_name=str(train.class_names[label]), reason=reason,
                     class_count=int(counts[label])))
  return rows


def run(config, workdir):
  """Writes workdir/hard.jsonl (process 0) and logs the per-class counts."""
  splits = datasets.load(config.data, config.seed)
  rows = select_hard(config, splits, workdir)
  per_class = collections.Counter(row["class_name"] for row in rows)
  logging.info("hard: %d images from %d classes: %s", len(rows), len(per_class),
               dict(sorted(per_class.items())))
  if not rows:
    logging.warning("hard: no hard images selected (rule %r, classes %r)",
                    config.hard.rule, tuple(config.hard.classes))
  if wd.is_main_process():
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    wd.atomic_write_text(wd.path(workdir, wd.HARD), text)
  parallel.barrier("stages.hard")
