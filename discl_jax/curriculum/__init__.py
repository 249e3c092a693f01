"""Curriculum: a spec fixed per run, a pytree state, and pure per-epoch plans.

  spec = CurriculumSpec.from_config(config.curriculum, train=..., groups=...,
                                    synthetic_rows=..., seed=config.seed)
  state = spec.initial_state()
  for epoch in ...:
    if in_stream(spec, epoch):   # adaptive curriculum epochs: segments of its phase stream
      state, records, summary = next_segment(spec, state, steps_left=..., batch_size=...,
                                             records_fn=..., measure=...)
    else:
      state, plan = plan_epoch(spec, state, epoch)
"""

from discl_jax.curriculum.adaptive import (
    epoch_steps, in_stream, iqr_filtered_mean, merge_summaries, next_segment, reset, update)
from discl_jax.curriculum.schedules import plan_epoch, stages
from discl_jax.curriculum.state import (
    REAL, REAL_ONLY_SCHEDULES, SCHEDULES, SIGNALS, SYNTHETIC, TAIL_FILLS, CurriculumSpec,
    CurriculumState, EpochPlan)

__all__ = [
    "CurriculumSpec", "CurriculumState", "EpochPlan", "REAL", "REAL_ONLY_SCHEDULES",
    "SCHEDULES", "SIGNALS", "SYNTHETIC", "TAIL_FILLS", "epoch_steps", "in_stream",
    "iqr_filtered_mean", "merge_summaries", "next_segment", "plan_epoch", "reset", "stages",
    "update",
]
