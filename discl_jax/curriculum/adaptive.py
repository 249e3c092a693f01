"""The adaptive (DoCL-style) curriculum: a stream of phases counted in steps.

As in the reference (docs/design.md §6), within the curriculum epochs training is a
stream of alternating phases that runs across epoch boundaries:
  uniform    `uniform_rows` training rows of random real images (reference:
             30,000 image-caption rows; 0: every usable real image);
  synthetic  one pass over every accepted synthetic row at the picked level g*
             of the hard images (all seeds), plus the non-hard real images when
             `merge_real` (the reference's README; its code merges them only
             with a data limit set). g* = real trains on the hard images' real
             versions.
Each phase is shuffled from (seed, phase) and lasts ceil(rows / batch) steps
(its records come from the trainer, e.g. FLYP's image-caption pairs). The
curriculum validation images (progress signal) are measured twice per round:
after the uniform phase's first `RESET_AFTER_STEPS` steps (the reference point,
reset every uniform phase as the reference does) and at its end; per candidate
level and validation image, the change in between, outliers outside
[Q1 - 1.5 IQR, Q3 + 1.5 IQR] dropped, argmax of the mean picks g* for the next
synthetic phase. A level's gain is thus the progress made while training on
real data only, never credit for the synthetic phase trained on it.
Candidates are the synthetic levels and, last, the real images.

`next_segment` cuts the stream at epoch ends and at the two measuring points;
the loop trains each segment and checkpoints the `CurriculumState` (which holds
the stream position), so a run resumes mid-phase exactly.
"""

import logging
import math

import numpy as np

from discl_jax import seeding
from discl_jax.curriculum import sampling
from discl_jax.curriculum.state import REAL, SIGNALS, SYNTHETIC

_PROB_FLOOR = 1e-12
_log = logging.getLogger(__name__)
RESET_AFTER_STEPS = 2  # the reference records its reference point after a uniform phase's 2nd step


def iqr_filtered_mean(values):
  """Returns the mean of `values` after dropping those outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR]."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return float("nan")
  q1, q3 = np.percentile(values, [25, 75])
  spread = 1.5 * (q3 - q1)
  kept = values[(values >= q1 - spread) & (values <= q3 + spread)]
  return float(np.mean(kept))


def progress(ref_probs, val_probs, signal="prob_gain"):
  """Returns float [G, V]: per candidate and validation image, progress since the reference.

  `prob_gain`: the increase of the true-class probability; `loss_decrease`:
  the decrease of the cross-entropy -log p, i.e. log p_new - log p_ref.
  """
  if signal not in SIGNALS:
    raise ValueError(f"unknown curriculum.signal {signal!r}; valid: {', '.join(SIGNALS)}")
  ref = np.asarray(ref_probs, np.float64)
  new = np.asarray(val_probs, np.float64)
  if signal == "prob_gain":
    return new - ref
  return np.log(np.maximum(new, _PROB_FLOOR)) - np.log(np.maximum(ref, _PROB_FLOOR))


def _checked(state, val_probs):
  ref = np.asarray(state.ref_probs)
  val_probs = np.asarray(val_probs, np.float32)
  if val_probs.shape != ref.shape:
    raise ValueError(
        f"val_probs has shape {val_probs.shape}; expected {ref.shape} "
        "(len(curriculum.levels) + 1 rows, one column per curriculum validation image)")
  if not np.all(np.isfinite(val_probs)) or np.any(val_probs < 0) or np.any(val_probs > 1):
    raise ValueError("val_probs must be probabilities in [0, 1] (got NaN, inf or out-of-range values)")
  return val_probs


def reset(state, val_probs):
  """Returns the state with `val_probs` [len(levels) + 1, V] as the new reference point."""
  return state.replace(ref_probs=_checked(state, val_probs), has_ref=np.array(True))


def update(state, val_probs, signal="prob_gain"):
  """Returns the state after measuring `val_probs` [len(levels) + 1, V].

  Without a reference point yet it only records one (`reset`); otherwise it
  also picks `level_index` = argmax over candidates of the IQR-filtered mean
  progress since the reference, and `val_probs` becomes the reference.
  """
  val_probs = _checked(state, val_probs)
  if not bool(np.asarray(state.has_ref)):
    return reset(state, val_probs)
  gains = np.asarray(
      [iqr_filtered_mean(row) for row in progress(state.ref_probs, val_probs, signal)], np.float32)
  return state.replace(
      level_index=np.array(int(np.argmax(gains)), np.int32), ref_probs=val_probs,
      has_ref=np.array(True), gains=gains)


def in_stream(spec, epoch):
  """Returns True when `epoch` trains on the adaptive phase stream (its curriculum epochs)."""
  return spec.schedule == "adaptive" and epoch < spec.curriculum_epochs


def phase_name(phase):
  """Returns "uniform" for even phase numbers, "synthetic" for odd ones."""
  return "synthetic" if int(phase) % 2 else "uniform"


def phase_picks(spec, state):
  """Returns (picks int64 [K, 2], level or None, fallback classes) of phase `state.phase`."""
  phase = int(np.asarray(state.phase))
  usable = np.flatnonzero(spec.train_usable)
  if phase_name(phase) == "uniform":
    rng = seeding.numpy_rng(spec.seed, "adaptive-uniform", phase)
    count = len(usable)
    if spec.uniform_rows:
      count = min(count, math.ceil(spec.uniform_rows / spec.rows_per_image))
    return _picks(np.sort(rng.choice(usable, count, replace=False))), None, ()
  nonhard = np.flatnonzero(spec.train_usable & ~spec.hard) if spec.merge_real else np.zeros(0, int)
  hard = np.flatnonzero(spec.train_usable & spec.hard)
  index = int(np.asarray(state.level_index))
  if index < 0 or index >= len(spec.levels):  # no pick yet, or real: the hard images as they are
    return _picks(np.sort(np.concatenate([nonhard, hard]))), None, ()
  level = spec.levels[index]
  syn = np.flatnonzero(spec.syn_usable & sampling.level_mask(spec.syn_levels, (level,)))
  covered = np.isin(hard, spec.syn_sources[syn])
  fallback = tuple(sorted({int(c) for c in spec.train_labels[hard[~covered]]}))
  real = np.sort(np.concatenate([nonhard, hard[~covered]]))
  return _picks(real, syn), float(level), fallback


def _picks(real_rows, syn_rows=()):
  """Returns int64 [K, 2] (source, row) picks: the real rows, then the synthetic rows."""
  real = np.asarray(real_rows, np.int64)
  syn = np.asarray(syn_rows, np.int64)
  return np.concatenate([np.stack([np.full(len(real), REAL), real], 1),
                         np.stack([np.full(len(syn), SYNTHETIC), syn], 1)]).astype(np.int64)


def phase_records(spec, state, records_fn, batch_size):
  """Returns the current phase's training records in training order, whole batches only.

  `records_fn(picks, key)` turns image picks into the trainer's records (the
  loop passes `trainer.train_picks`); the order is drawn from (seed, phase).
  """
  phase = int(np.asarray(state.phase))
  picks, _, _ = phase_picks(spec, state)
  records = records_fn(picks, seeding.stable_hash("adaptive-phase", phase))
  order = seeding.numpy_rng(spec.seed, "adaptive-order", phase).permutation(len(records))
  return np.asarray(records)[order][: len(records) // batch_size * batch_size]


def epoch_steps(spec, records_fn, batch_size):
  """Returns the steps of one plain epoch (every usable real image's records), the
  length of each adaptive curriculum epoch; 0 for other schedules."""
  if spec.schedule != "adaptive":
    return 0
  return len(records_fn(_picks(np.flatnonzero(spec.train_usable)), 0)) // batch_size


def next_segment(spec, state, *, steps_left, batch_size, records_fn, measure):
  """Returns (state, records, summary): the stream's next stretch of at most `steps_left` steps.

  First takes the measurements due at the current position (`measure()`
  returns the validation probabilities [len(levels) + 1, V]): the reference
  point `RESET_AFTER_STEPS` steps into a uniform phase, and the pick of g* when
  a synthetic phase starts. The segment ends at the phase's end, the next
  measuring point or after `steps_left` steps; the returned state is the
  position after it. `summary`: phase, level, the phase number and step, the
  pick's gains and choice when one was made, real / synthetic record counts.
  """
  measured = len(spec.val_real_rows) > 0
  summary = {}
  while True:
    records = phase_records(spec, state, records_fn, batch_size)
    steps = len(records) // batch_size
    if int(np.asarray(state.phase_step)) < steps:
      break
    if steps == 0 and phase_name(state.phase) == "uniform":
      raise ValueError(
          f"the adaptive uniform phase holds fewer records ({len(records)}) than one batch "
          f"(train.batch_size={batch_size}); raise curriculum.uniform_rows")
    state = state.replace(phase=np.array(int(np.asarray(state.phase)) + 1, np.int32),
                          phase_step=np.array(0, np.int32))
    if phase_name(state.phase) == "synthetic" and measured:
      state = update(state, measure(), spec.signal)
      choice = int(np.asarray(state.level_index))
      _log.info("adaptive curriculum: phase %d trains on %s (mean progress per candidate %s)",
                int(np.asarray(state.phase)),
                "real" if choice >= len(spec.levels) else f"lambda={spec.levels[choice]:.2f}",
                np.round(np.asarray(state.gains), 5).tolist())
      summary.update(curriculum_gains=[float(g) for g in np.asarray(state.gains)],
                     curriculum_choice=int(np.asarray(state.level_index)))
  position = int(np.asarray(state.phase_step))
  uniform = phase_name(state.phase) == "uniform"
  reset_at = min(RESET_AFTER_STEPS, steps - 1)
  if uniform and measured and position == reset_at:
    state = reset(state, measure())
  end = steps
  if uniform and position < reset_at:
    end = reset_at
  end = min(end, position + steps_left)
  segment = records[position * batch_size: end * batch_size]
  _, level, fallback = phase_picks(spec, state)
  summary.update(
      curriculum_phase=phase_name(state.phase), curriculum_level=level,
      curriculum_levels=[] if level is None else [level],
      curriculum_phase_index=int(np.asarray(state.phase)), curriculum_phase_step=position,
      num_real=int(np.sum(segment[:, 0] == REAL)),
      num_synthetic=int(np.sum(segment[:, 0] == SYNTHETIC)))
  if fallback:
    summary["curriculum_fallback_classes"] = list(fallback)
  return state.replace(phase_step=np.array(end, np.int32)), segment, summary


def merge_summaries(epoch_summary, segment):
  """Returns the metrics-row summary of an epoch so far, `segment` appended.

  Counts add up; phase and level name the epoch's last segment; the phases and
  levels the epoch trained on are listed; the last pick's gains and choice stay.
  """
  out = dict(epoch_summary or {})
  out["num_real"] = out.get("num_real", 0) + segment["num_real"]
  out["num_synthetic"] = out.get("num_synthetic", 0) + segment["num_synthetic"]
  for key in ("curriculum_phase", "curriculum_level", "curriculum_phase_index",
              "curriculum_gains", "curriculum_choice", "curriculum_fallback_classes"):
    if key in segment:
      out[key] = segment[key]
  phases = out.setdefault("curriculum_phases", [])
  if not phases or phases[-1] != segment["curriculum_phase"]:
    phases.append(segment["curriculum_phase"])
  levels = out.setdefault("curriculum_levels", [])
  for level in segment["curriculum_levels"]:
    if level not in levels:
      levels.append(level)
  return out
