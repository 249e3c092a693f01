"""Curriculum: a spec fixed per run, a pytree state, and pure per-epoch plans.

  spec = CurriculumSpec.from_config(config.curriculum, train=..., groups=...,
                                    synthetic_rows=..., seed=config.seed)
  state = spec.initial_state()
  for epoch in ...:
    signals = {"val_probs": ...} if needs_signals(spec, epoch) else None
    state, plan = plan_epoch(spec, state, epoch, signals)
"""

from discl_jax.curriculum.adaptive import iqr_filtered_mean, needs_signals, update
from discl_jax.curriculum.schedules import plan_epoch, stages
from discl_jax.curriculum.state import (
    REAL, REAL_ONLY_SCHEDULES, SCHEDULES, SIGNALS, SYNTHETIC, TAIL_FILLS, CurriculumSpec,
    CurriculumState, EpochPlan)

__all__ = [
    "CurriculumSpec", "CurriculumState", "EpochPlan", "REAL", "REAL_ONLY_SCHEDULES",
    "SCHEDULES", "SIGNALS", "SYNTHETIC", "TAIL_FILLS", "iqr_filtered_mean", "needs_signals",
    "plan_epoch", "stages", "update",
]
