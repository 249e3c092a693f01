"""The curriculum's data: its spec (fixed for a run), its state (a pytree) and epoch plans.

`CurriculumSpec` holds everything a schedule needs that does not change during a
run: the schedule and its keys, which real training images are hard ("tail"),
the accepted synthetic rows with their levels, and the curriculum validation
set. `CurriculumState` is the part that changes (the adaptive rule's memory);
it is a pytree of numpy arrays so orbax checkpoints it with the train state.
An `EpochPlan` is one epoch's sample list as (source, row) picks: source 0 is
the real train split, source 1 the synthetic rows in the order given to the spec.
"""

import dataclasses
import logging
import math

import flax.struct
import numpy as np

from discl_jax.curriculum import sampling

SCHEDULES = ("none", "resample", "syn_to_real", "real_to_syn", "fixed", "all_levels",
             "text_only", "random", "adaptive")
REAL_ONLY_SCHEDULES = ("none", "resample")  # never read the spectrum
TAIL_FILLS = ("pooled", "per_class")
SIGNALS = ("prob_gain", "loss_decrease")
STAGELESS = ("none", "resample", "adaptive")  # schedules without fixed stages
SINGLE_STAGE = ("fixed", "text_only", "all_levels")
REAL = 0
SYNTHETIC = 1
TEXT_ONLY_LEVEL = 0.0

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class CurriculumSpec:
  """What a schedule needs, fixed for a run; build it with `from_config`.

  Attributes:
    schedule: one of SCHEDULES.
    levels: the synthetic levels (image guidance lambda) the schedule may use;
      `text_only` uses (0.0,), `none` uses ().
    curriculum_epochs: epochs 0 .. curriculum_epochs - 1 follow the schedule;
      every later epoch trains on real data only.
    stage_epochs: explicit epochs per stage of a stage schedule (summing to
      curriculum_epochs); () splits the curriculum epochs into equal stages.
    nontail_fraction: share of the non-tail real images drawn each epoch.
    tail_share: the tail's share of every epoch's sample list.
    tail_fill: how the tail share is filled, one of TAIL_FILLS (see `sampling`).
    signal: the adaptive rule's progress signal, one of SIGNALS.
    uniform_rows: adaptive: training rows of each uniform phase (0: every
      usable real image); `rows_per_image` rows per image.
    merge_real: adaptive: synthetic phases also train on the non-hard real images.
    rows_per_image: training records per image (FLYP: one per caption template).
    seed: the config seed every random choice derives from.
    num_classes: classes of the dataset.
    train_labels: int [N] labels of the real train split (source 0).
    hard: bool [N] the real images that are hard (tail).
    train_usable: bool [N] real images that may be trained on (all but the
      curriculum validation images).
    tail_classes: int [C] the classes that hold hard images, sorted.
    syn_labels: int [M] labels of the synthetic rows (source 1).
    syn_levels: float [M] image guidance lambda of each synthetic row.
    syn_sources: int [M] the real row each synthetic row was made from (-1:
      its source is not in the train split).
    syn_usable: bool [M] synthetic rows that may be trained on.
    val_real_rows: int [V] curriculum validation images: rows of the real split.
    val_syn_rows: int [len(levels), V] for each level, one synthetic row of
      each validation image (row g of `val_probs` is evaluated on these).
  """
  schedule: str
  levels: tuple
  curriculum_epochs: int
  stage_epochs: tuple
  nontail_fraction: float
  tail_share: float
  tail_fill: str
  signal: str
  uniform_rows: int
  merge_real: bool
  rows_per_image: int
  seed: int
  num_classes: int
  train_labels: np.ndarray
  hard: np.ndarray
  train_usable: np.ndarray
  tail_classes: np.ndarray
  syn_labels: np.ndarray
  syn_levels: np.ndarray
  syn_sources: np.ndarray
  syn_usable: np.ndarray
  val_real_rows: np.ndarray
  val_syn_rows: np.ndarray

  @classmethod
  def from_config(cls, config, *, train, groups, synthetic_rows=(), seed=0,
                  hard_ids=None, rows_per_image=1):
    """Returns the spec of `config` (the `curriculum` section) for this data.

    Args:
      config: the `curriculum` ConfigDict (or any mapping with its keys).
      train: the real train split, a `LabeledImages` (source 0 of every plan).
      groups: "many"/"medium"/"few" per class (`longtail.class_groups`).
      synthetic_rows: the accepted spectrum manifest rows (dicts with "label",
        "image_guidance" and "source_id"), in the order of source 1.
      seed: the config seed.
      hard_ids: ids of the real images that are hard (`hard.jsonl`); None
        means every training image of a "few" class.
      rows_per_image: training records the trainer makes of one image (FLYP:
        one per caption template), for `uniform_rows`.

    Raises ValueError naming the key for an unknown schedule or signal and for
    values out of range.
    """
    schedule = str(config["schedule"])
    if schedule not in SCHEDULES:
      raise ValueError(f"unknown curriculum.schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    signal = str(config["signal"])
    if signal not in SIGNALS:
      raise ValueError(f"unknown curriculum.signal {signal!r}; valid: {', '.join(SIGNALS)}")
    levels = _schedule_levels(schedule, config["levels"])
    curriculum_epochs = int(config["curriculum_epochs"])
    if curriculum_epochs < 0:
      raise ValueError(f"curriculum.curriculum_epochs must be >= 0, got {curriculum_epochs}")
    stage_epochs = check_stage_epochs(schedule, config["levels"], curriculum_epochs,
                                      config.get("stage_epochs", ()))
    nontail_fraction = float(config["nontail_fraction"])
    if not 0.0 < nontail_fraction <= 1.0:
      raise ValueError(f"curriculum.nontail_fraction must be in (0, 1], got {nontail_fraction}")
    uniform_rows = int(config.get("uniform_rows", 0))
    if uniform_rows < 0:
      raise ValueError(f"curriculum.uniform_rows must be >= 0, got {uniform_rows}")
    val_sources = int(config.get("val_sources", 0))
    if val_sources < 0:
      raise ValueError(f"curriculum.val_sources must be >= 0, got {val_sources}")
    tail_share = float(config.get("tail_share", 0.0))
    if not 0.0 <= tail_share < 1.0:
      raise ValueError(f"curriculum.tail_share must be in [0, 1), got {tail_share}")
    tail_fill = str(config.get("tail_fill", "per_class"))
    if tail_fill not in TAIL_FILLS:
      raise ValueError(f"unknown curriculum.tail_fill {tail_fill!r}; valid: {', '.join(TAIL_FILLS)}")

    train_labels = np.asarray(train.labels, np.int64)
    groups = np.asarray(groups)
    if len(groups) != train.num_classes:
      raise ValueError(f"groups has {len(groups)} entries, the train split {train.num_classes} classes")
    if hard_ids is None:
      hard = groups[train_labels] == "few"
    else:
      hard = np.isin(np.asarray(train.ids).astype(str), np.asarray(list(hard_ids), dtype=str))
    tail_classes = np.unique(train_labels[hard])
    if tail_share == 0.0:
      tail_share = len(tail_classes) / train.num_classes

    syn_labels, syn_levels, syn_sources = sampling.synthetic_arrays(synthetic_rows, train.ids)
    if schedule == "adaptive":
      val_real_rows, val_syn_rows = sampling.validation_set(
          hard, syn_sources, syn_levels, levels, val_sources, seed)
    else:
      val_real_rows = np.zeros([0], np.int64)
      val_syn_rows = np.zeros([len(levels), 0], np.int64)
    train_usable = np.ones(len(train_labels), bool)
    train_usable[val_real_rows] = False
    syn_usable = np.isin(syn_labels, tail_classes)
    syn_usable &= ~np.isin(syn_sources, val_real_rows)

    spec = cls(
        schedule=schedule, levels=levels, curriculum_epochs=curriculum_epochs,
        stage_epochs=stage_epochs,
        nontail_fraction=nontail_fraction, tail_share=tail_share, tail_fill=tail_fill,
        signal=signal,
        uniform_rows=uniform_rows, merge_real=bool(config.get("merge_real", True)),
        rows_per_image=int(rows_per_image), seed=int(seed), num_classes=train.num_classes,
        train_labels=train_labels, hard=hard, train_usable=train_usable,
        tail_classes=tail_classes, syn_labels=syn_labels, syn_levels=syn_levels,
        syn_sources=syn_sources, syn_usable=syn_usable, val_real_rows=val_real_rows, val_syn_rows=val_syn_rows)
    spec.warn_empty_pools(train.class_names)
    return spec

  def level_sets(self):
    """Returns the tuples of levels an epoch of this schedule may draw from."""
    if self.schedule in REAL_ONLY_SCHEDULES:
      return []
    if self.schedule == "all_levels":
      return [self.levels]
    return [(level,) for level in self.levels]

  def warn_empty_pools(self, class_names=None):
    """Logs a warning for each level set with tail classes that have no synthetic rows.

    Those classes fall back to their real images (see `sampling.epoch_picks`).
    Returns {level set: array of such classes}.
    """
    if self.schedule in REAL_ONLY_SCHEDULES:
      return {}
    if len(self.tail_classes) == 0:
      _log.warning(
          "curriculum %r: the train split has no hard (tail) images, so no epoch "
          "draws synthetic images", self.schedule)
    if len(self.tail_classes) and not np.any(
        self.train_usable & ~self.hard):
      _log.warning(
          "curriculum %r: every training image is hard (tail), so there is no non-tail "
          "share to hold the tail proportion against; epochs draw no synthetic images",
          self.schedule)
    if self.schedule == "adaptive" and len(self.val_real_rows) == 0 and self.levels:
      _log.warning(
          "curriculum 'adaptive': no hard image has synthetic rows at every level %s, "
          "so the validation set is empty; synthetic phases fall back to real images",
          list(self.levels))
    empty = {}
    for level_set in self.level_sets():
      missing = sampling.classes_without_synthetic(self, level_set)
      if len(missing):
        empty[level_set] = missing
        names = [class_names[c] if class_names is not None else int(c) for c in missing]
        instead = ("get no synthetic images from the pooled tail fill, only their real "
                   "images" if self.tail_fill == "pooled" else
                   "fill their tail share with their real images instead")
        _log.warning(
            "curriculum %r: no accepted synthetic images at lambda=%s for %d tail "
            "class(es) %s; epochs at this level %s", self.schedule, _fmt_levels(level_set),
            len(missing), names, instead)
    return empty

  def initial_state(self):
    """Returns the `CurriculumState` before epoch 0."""
    return CurriculumState.create(len(self.levels), len(self.val_real_rows))

  def validation(self):
    """Returns (real_rows [V], syn_rows [len(levels), V]): the curriculum validation set.

    The adaptive rule's `val_probs[g]` are the true-class probabilities of
    synthetic rows `syn_rows[g]` (source 1) for g < len(levels), and of real
    rows `real_rows` (source 0) for the last row. None of these images, nor any
    synthetic image made from them, is ever in a plan's picks. Empty unless
    the schedule is `adaptive`.
    """
    return self.val_real_rows, self.val_syn_rows


@flax.struct.dataclass
class CurriculumState:
  """The curriculum's changing part, a pytree of numpy arrays.

  Attributes:
    level_index: int32 scalar, the adaptive rule's current pick: an index into
      `spec.levels`, len(spec.levels) for real images, -1 before the first pick.
    ref_probs: float32 [len(levels) + 1, V] validation true-class probabilities
      at the last reference point.
    has_ref: bool scalar, whether `ref_probs` holds a reference point yet.
    gains: float32 [len(levels) + 1] IQR-filtered mean progress per candidate at
      the last pick (NaN before).
    phase: int32 scalar, the adaptive stream's phase (even: uniform, odd: synthetic).
    phase_step: int32 scalar, steps of that phase already handed out.
  """
  level_index: np.ndarray
  ref_probs: np.ndarray
  has_ref: np.ndarray
  gains: np.ndarray
  phase: np.ndarray
  phase_step: np.ndarray

  @classmethod
  def create(cls, num_levels, num_val):
    """Returns the initial state for `num_levels` levels and `num_val` validation images."""
    return cls(
        level_index=np.array(-1, np.int32),
        ref_probs=np.zeros([num_levels + 1, num_val], np.float32),
        has_ref=np.array(False),
        gains=np.full([num_levels + 1], np.nan, np.float32),
        phase=np.array(0, np.int32), phase_step=np.array(0, np.int32))


@dataclasses.dataclass(frozen=True, eq=False)
class EpochPlan:
  """One epoch's sample list and what the curriculum fed it.

  Attributes:
    epoch: the epoch this plan is for.
    level: the single synthetic level of the epoch, None for real images only,
      NaN when several levels are mixed (`all_levels`; see `levels`).
    picks: int64 [K, 2] (source, row) pairs; source 0 real, 1 synthetic.
    phase: "real" (real images only), "synthetic" (a synthetic stage or
      phase) or "uniform" (the adaptive schedule's uniform real phase).
    levels: every synthetic level the epoch draws from (empty: real only).
    fallback_classes: tail classes with no synthetic image at the epoch's
      level(s) (per_class: filled with their real images instead).
  """
  epoch: int
  level: float | None
  picks: np.ndarray
  phase: str
  levels: tuple = ()
  fallback_classes: tuple = ()

  @property
  def num_real(self):
    """Returns how many picks are real images."""
    return int(np.sum(self.picks[:, 0] == REAL))

  @property
  def num_synthetic(self):
    """Returns how many picks are synthetic images."""
    return int(np.sum(self.picks[:, 0] == SYNTHETIC))

  def summary(self):
    """Returns a JSON-ready dict of the plan for metrics.jsonl (no picks)."""
    level = None if self.level is None or math.isnan(self.level) else float(self.level)
    return {
        "curriculum_phase": self.phase,
        "curriculum_level": level,
        "curriculum_levels": [float(v) for v in self.levels],
        "num_real": self.num_real,
        "num_synthetic": self.num_synthetic,
    }


def num_stages(schedule, levels):
  """Returns how many stages `schedule` splits its curriculum epochs into (0: no stages)."""
  if schedule in STAGELESS:
    return 0
  if schedule in SINGLE_STAGE:
    return 1
  return len(levels) + 1  # syn_to_real, real_to_syn, random: each level and a real stage


def check_stage_epochs(schedule, levels, curriculum_epochs, stage_epochs):
  """Returns `stage_epochs` (curriculum.stage_epochs) as a tuple of ints.

  A schedule without stages (none, resample, adaptive) does not use it: (). Raises
  ValueError naming the key unless it is empty, or has one whole number >= 0 per
  stage of `schedule` (`num_stages`) summing to `curriculum_epochs`.
  """
  stage_epochs = tuple(stage_epochs or ())
  count = num_stages(schedule, levels)
  if not stage_epochs or not count:
    return ()
  if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in stage_epochs):
    raise ValueError(f"curriculum.stage_epochs={stage_epochs} must hold whole numbers >= 0")
  if len(stage_epochs) != count:
    raise ValueError(f"curriculum.stage_epochs={stage_epochs} has {len(stage_epochs)} entries; "
                     f"curriculum.schedule={schedule!r} with curriculum.levels={tuple(levels)} "
                     f"has {count} stages")
  if sum(stage_epochs) != curriculum_epochs:
    raise ValueError(f"curriculum.stage_epochs={stage_epochs} sums to {sum(stage_epochs)}, "
                     f"not curriculum.curriculum_epochs={curriculum_epochs}")
  return tuple(int(e) for e in stage_epochs)


def _schedule_levels(schedule, levels):
  levels = tuple(float(v) for v in levels)
  for value in levels:
    if not 0.0 <= value < 1.0:
      raise ValueError(
          f"curriculum.levels holds {value}; a level is image guidance lambda = "
          "1 - strength, in [0, 1)")
  if schedule in REAL_ONLY_SCHEDULES:
    return ()
  if schedule == "text_only":
    return (TEXT_ONLY_LEVEL,)
  if schedule == "fixed" and len(levels) != 1:
    raise ValueError(
        f"curriculum.schedule='fixed' trains on one level; set curriculum.levels "
        f"to one value, got {levels}")
  if not levels:
    raise ValueError(f"curriculum.schedule={schedule!r} needs at least one curriculum.levels value")
  return levels


def _fmt_levels(level_set):
  return "+".join(f"{v:.2f}" for v in level_set)
