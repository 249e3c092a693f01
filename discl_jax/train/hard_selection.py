"""The hard set of a run: the training images that get a synthetic spectrum, by rule or by class list.

Rules live in `RULES` (name -> function of (config, splits, workdir) returning
(indices, reason, extra fields per index, figures or None)); `hard.classes`
overrides the rule with an explicit list of class names. See stages/hard_stage.py
for the rules' meaning and the files the stage writes.
"""

import numpy as np

from discl_jax import parallel
from discl_jax.data import class_names as class_names_lib
from discl_jax.data import longtail
from discl_jax.train import checkpoint as checkpoint_lib
from discl_jax.train import clip_trainer
from discl_jax.train import hardness


def few_classes(config, splits, workdir):
  """Returns (indices, reason, {}, None): every train image of a Few class (< data.few_threshold)."""
  del workdir
  train = splits["train"]
  groups = longtail.class_groups(
      train.class_counts(), config.data.many_threshold, config.data.few_threshold)
  return np.flatnonzero(groups[train.labels] == "few"), "few_class", {}, None


ZERO_SHOT = "zero_shot"


def check_config(config):
  """Returns None, or raises ValueError naming `hard.model_checkpoint` when a DisCL
  schedule would take its hard set from no trained model (run before any stage)."""
  hc = config.hard
  if (hc.rule == "misclassified" and not hc.classes and not hc.model_checkpoint
      and config.curriculum.schedule != "none"):
    raise ValueError(
        f"hard.rule='misclassified' with curriculum.schedule={config.curriculum.schedule!r} "
        "needs hard.model_checkpoint: the ckpt directory of a curriculum.schedule=none run "
        "on this data (step 1 of the protocol, configs/iwildcam.py), whose train-split "
        f"errors are the hard images; or {ZERO_SHOT!r} for the zero-shot CLIP's errors")


def misclassified(config, splits, workdir):
  """Returns (indices, reason, extra, figures): train images the original-data model gets wrong.

  The model is the CLIP of `hard.model_checkpoint` (or the CLIP to fine-tune,
  zero-shot, for "zero_shot" or ""), its head from `train.clip_templates`;
  `extra` maps index -> {true_prob, pred_class_name}; `figures` is
  `hardness.summary` plus the model and its train accuracy.
  """
  if config.train.model != clip_trainer.MODEL:
    raise ValueError("hard.rule='misclassified' predicts with the CLIP of train.model='clip'; "
                     f"got train.model={config.train.model!r}")
  train = splits["train"]
  mesh = parallel.make_mesh(config.mesh.shape)
  trainer = clip_trainer.ClipTrainer(config, train.class_names, mesh, workdir)
  state = trainer.initial_state()
  source = config.hard.model_checkpoint or ZERO_SHOT
  if source != ZERO_SHOT:
    try:
      variables = checkpoint_lib.load_variables(source, state)
    except (FileNotFoundError, ValueError) as e:
      raise ValueError(f"hard.model_checkpoint={source!r}: {e}") from e
    state = state.replace(params=parallel.put_replicated(variables["params"], mesh))
  out = trainer.predict(state, train)
  excluded = listed_classes(train.class_names, config.hard.exclude_classes, "hard.exclude_classes")
  selection = hardness.select_hard(
      out["prob_true"], out["pred"], out["label"], len(train.class_names),
      misclassified=True, prob_quantile=config.hard.prob_quantile, exclude_labels=excluded)
  extra = {int(i): {"true_prob": float(out["prob_true"][i]),
                    "pred_class_name": str(train.class_names[int(out["pred"][i])])}
           for i in np.flatnonzero(selection.mask)}
  figures = hardness.summary(selection, train.class_names, misclassified=True,
                             prob_quantile=config.hard.prob_quantile,
                             excluded=config.hard.exclude_classes)
  figures["model"] = (clip_trainer.clip_model_path(config, workdir) if source == ZERO_SHOT
                      else str(source))
  figures["train_accuracy"] = float(np.mean(out["pred"] == out["label"])) if len(out["pred"]) else None
  return np.flatnonzero(selection.mask), "misclassified", extra, figures


RULES = dict(zip(hardness.RULES, (few_classes, misclassified)))  # hard.rule -> its function


def listed_classes(class_names, wanted, key="hard.classes"):
  """Returns the label ids of class names `wanted`; ValueError names `key` and valid names."""
  index = {name: i for i, name in enumerate(class_names)}
  unknown = [c for c in wanted if c not in index]
  if unknown:
    raise ValueError(f"{key} names unknown class(es) {unknown}; valid class "
                     f"names: {list(class_names)}")
  return sorted({index[c] for c in wanted})


def select_hard(config, splits, workdir):
  """Returns the hard rows (dicts) for the train split of `splits`, in split order."""
  return select_hard_with_figures(config, splits, workdir)[0]


def select_hard_with_figures(config, splits, workdir):
  """Returns (hard rows in split order, the rule's figures dict or None)."""
  train = splits["train"]
  counts = train.class_counts()
  if config.hard.classes:
    labels = listed_classes(train.class_names, config.hard.classes)
    indices, reason = np.flatnonzero(np.isin(train.labels, labels)), "listed_class"
    extra, figures = {}, None
  else:
    if config.hard.rule not in RULES:
      raise ValueError(f"unknown hard.rule {config.hard.rule!r}; available: {sorted(RULES)}")
    indices, reason, extra, figures = RULES[config.hard.rule](config, splits, workdir)
  excluded = listed_classes(train.class_names, config.hard.exclude_classes, "hard.exclude_classes")
  indices = np.asarray(indices, np.int64)
  indices = indices[~np.isin(train.labels[indices], excluded)]
  captions = (class_names_lib.caption_names(config.data, train.class_names)
              if config.data.name == "iwildcam" else None)
  rows = []
  for i in np.sort(indices):
    label = int(train.labels[i])
    row = dict(source_id=str(train.ids[i]), label=label,
               class_name=str(train.class_names[label]), reason=reason,
               class_count=int(counts[label]), **extra.get(int(i), {}))
    if captions is not None:
      row["caption_name"] = captions[label]
    rows.append(row)
  return rows, figures
