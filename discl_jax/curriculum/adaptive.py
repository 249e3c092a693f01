"""The adaptive (DoCL-style) rule: pick the level whose validation images progress most.

Within the curriculum epochs the adaptive schedule alternates phases of
`phase_epochs` epochs: a uniform phase on real data, then a synthetic phase on
the hard images at the picked level g* (plus the non-hard real images), and
so on. The loop evaluates the curriculum validation set at epoch 0 (the first
reference point) and before each synthetic phase; `update` then measures, per
candidate level and per validation image, the change since the last reference
point, drops outliers outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR], and picks the
argmax of the mean. Candidates are the synthetic levels and, last, the real
images (as in the reference, whose guidance list includes the real data).
"""

import numpy as np

from discl_jax.curriculum.state import SIGNALS

_PROB_FLOOR = 1e-12


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


def update(state, val_probs, signal="prob_gain"):
  """Returns the state after a reference point at which `val_probs` was measured.

  `val_probs` is float [len(levels) + 1, V]: true-class probabilities of the
  validation images at each level, the last row on the real images. The
  first call only records the reference; later calls also pick
  `level_index` = argmax over candidates of the IQR-filtered mean progress.
  """
  ref = np.asarray(state.ref_probs)
  val_probs = np.asarray(val_probs, np.float32)
  if val_probs.shape != ref.shape:
    raise ValueError(
        f"val_probs has shape {val_probs.shape}; expected {ref.shape} "
        "(len(curriculum.levels) + 1 rows, one column per curriculum validation image)")
  if not np.all(np.isfinite(val_probs)) or np.any(val_probs < 0) or np.any(val_probs > 1):
    raise ValueError("val_probs must be probabilities in [0, 1] (got NaN, inf or out-of-range values)")
  if not bool(np.asarray(state.has_ref)):
    return state.replace(ref_probs=val_probs, has_ref=np.array(True))
  gains = np.asarray(
      [iqr_filtered_mean(row) for row in progress(ref, val_probs, signal)], np.float32)
  return state.replace(
      level_index=np.array(int(np.argmax(gains)), np.int32), ref_probs=val_probs,
      has_ref=np.array(True), gains=gains)


def phase_of(spec, epoch):
  """Returns "uniform", "synthetic" or "real" (after the curriculum) for `epoch`."""
  if epoch >= spec.curriculum_epochs:
    return "real"
  return "synthetic" if (epoch // spec.phase_epochs) % 2 else "uniform"


def needs_signals(spec, epoch):
  """Returns True when `plan_epoch` for `epoch` needs `signals["val_probs"]`.

  That is epoch 0 (the first reference point) and the first epoch of every
  synthetic phase, for the adaptive schedule with a non-empty validation set.
  """
  if spec.schedule != "adaptive" or len(spec.val_real_rows) == 0:
    return False
  if epoch >= spec.curriculum_epochs:
    return False
  return epoch == 0 or (phase_of(spec, epoch) == "synthetic" and epoch % spec.phase_epochs == 0)
