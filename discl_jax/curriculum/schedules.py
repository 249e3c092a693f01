"""Schedules: which level(s) each epoch draws, and `plan_epoch` that turns it into picks.

Stage schedules split the curriculum epochs into equal stages (the remainder
goes to the earliest stages), or into the lengths `curriculum.stage_epochs`
gives (the reference's ImageNet-LT plan: 14 / 15 / 15 / 17); every epoch from
`curriculum_epochs` on is real only:
  none         real images only, every image once per epoch (CE / BS baselines).
  resample     real images only, every epoch sampled as the other schedules'
               real epochs (non-tail subsampled, tail share held with real tail
               images): the reference's `augment_type='baseline'` (docs/design.md §6).
  syn_to_real  levels in order, then a real stage: 0.1 -> 0.3 -> 0.5 -> real
               (60 curriculum epochs: 15 each).
  real_to_syn  the reverse: real -> 0.5 -> 0.3 -> 0.1.
  random       as many stages as syn_to_real, each a level (or real) drawn
               from the seed.
  fixed        the one level of `levels` for all curriculum epochs.
  all_levels   every level of `levels` mixed for all curriculum epochs.
  text_only    lambda = 0 (strength 1.0) for all curriculum epochs.
  adaptive     a stream of uniform / synthetic phases counted in steps during the
               curriculum epochs (`adaptive.next_segment`), real only after.
"""

import numpy as np

from discl_jax import seeding
from discl_jax.curriculum import sampling
from discl_jax.curriculum.state import SINGLE_STAGE, STAGELESS, EpochPlan

def stage_lengths(total, num_stages):
  """Returns int [num_stages] epochs per stage, summing to `total`, earliest stages longest."""
  lengths = np.full(num_stages, total // num_stages, np.int64)
  lengths[: total % num_stages] += 1
  return lengths


def stages(spec):
  """Returns [(first epoch, end epoch, level set)] of the curriculum epochs.

  A level set is a tuple of levels; () is real only. Not defined for the
  `none`, `resample` and `adaptive` schedules (they have no fixed stages).
  """
  if spec.schedule in STAGELESS:
    raise ValueError(f"schedule {spec.schedule!r} has no fixed stages")
  if spec.schedule in SINGLE_STAGE:
    sets = [spec.levels]
  elif spec.schedule == "syn_to_real":
    sets = [(v,) for v in spec.levels] + [()]
  elif spec.schedule == "real_to_syn":
    sets = [()] + [(v,) for v in reversed(spec.levels)]
  elif spec.schedule == "random":
    candidates = [(v,) for v in spec.levels] + [()]
    sets = [candidates[seeding.numpy_rng(spec.seed, "curriculum-random", k).integers(len(candidates))]
            for k in range(len(candidates))]
  else:
    raise ValueError(f"unknown schedule {spec.schedule!r}")
  lengths = spec.stage_epochs or stage_lengths(spec.curriculum_epochs, len(sets))
  out, start = [], 0
  for level_set, length in zip(sets, lengths):
    if length:
      out.append((start, start + int(length), tuple(level_set)))
    start += int(length)
  return out


def level_set_for(spec, state, epoch):
  """Returns (level set, phase) of `epoch` under `state` (adaptive: its current pick)."""
  if spec.schedule in ("none", "resample") or epoch >= spec.curriculum_epochs:
    return (), "real"
  if spec.schedule == "adaptive":
    raise ValueError(f"epoch {epoch} of the adaptive curriculum is a stretch of its phase "
                     "stream (adaptive.next_segment), not an epoch plan")
  for start, end, level_set in stages(spec):
    if start <= epoch < end:
      return level_set, "synthetic" if level_set else "real"
  return (), "real"


def plan_epoch(spec, state, epoch):
  """Returns (state, EpochPlan) for `epoch`; pure given its arguments.

  Randomness comes from (spec.seed, epoch). The adaptive schedule's curriculum
  epochs are not planned here but streamed (`adaptive.next_segment`).
  """
  epoch = int(epoch)
  if spec.schedule == "none":
    return state, EpochPlan(epoch=epoch, level=None, picks=sampling.all_real_picks(spec), phase="real")
  level_set, phase = level_set_for(spec, state, epoch)
  if spec.schedule == "adaptive":  # after its curriculum epochs: every real image
    return state, EpochPlan(epoch=epoch, level=None, picks=sampling.all_real_picks(spec),
                            phase=phase)
  rng = seeding.numpy_rng(spec.seed, "curriculum-epoch", epoch)
  picks, fallback = sampling.epoch_picks(spec, level_set, rng)
  if not level_set:
    level = None
  elif len(level_set) == 1:
    level = float(level_set[0])
  else:
    level = float("nan")
  return state, EpochPlan(epoch=epoch, level=level, picks=picks, phase=phase,
                          levels=tuple(float(v) for v in level_set),
                          fallback_classes=fallback)
