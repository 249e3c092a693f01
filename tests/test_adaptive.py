"""The adaptive curriculum's phase stream (docs/design.md §6): phase sizes in steps, the
validation set's count, the progress window reset in each uniform phase, exact resume."""

import math

import numpy as np
import pytest

import test_curriculum
from discl_jax import curriculum
from discl_jax.curriculum import REAL, SYNTHETIC
from discl_jax.train import checkpoint as checkpoint_lib
from discl_jax.train import flyp

BATCH = 4
LEVELS = (0.1, 0.3, 0.5)


def _spec(**overrides):
  settings = dict(levels=LEVELS, curriculum_epochs=20, val_sources=3)
  settings.update(overrides)
  train = test_curriculum._train()
  c = test_curriculum.config_lib.base_config().curriculum
  c.schedule = "adaptive"
  for key, value in settings.items():
    c[key] = value
  return curriculum.CurriculumSpec.from_config(
      c, train=train, groups=test_curriculum.GROUPS, seed=0, rows_per_image=2,
      synthetic_rows=test_curriculum._synthetic_rows(train))


def _pairs(picks, key):
  """FLYP's records: every (image, caption) pair, the last batch filled (the trainer's)."""
  return flyp.pair_picks(picks, 2, BATCH, np.random.default_rng(key))


def _stream(spec, state, measure, segments, steps_left=10**6):
  out = []
  for _ in range(segments):
    state, records, summary = curriculum.next_segment(
        spec, state, steps_left=steps_left, batch_size=BATCH, records_fn=_pairs, measure=measure)
    out.append((records, summary))
  return state, out


def test_validation_set_is_a_total_count_held_out_with_its_synthetic_images():
  spec = _spec(val_sources=3)
  real_rows, syn_rows = spec.validation()
  assert len(real_rows) == 3 and syn_rows.shape == (3, 3)  # 3 images in all, not per class
  assert spec.hard[real_rows].all()
  for g, level in enumerate(spec.levels):
    assert np.allclose(spec.syn_levels[syn_rows[g]], level)
    np.testing.assert_array_equal(spec.syn_sources[syn_rows[g]], real_rows)
  assert len(_spec(val_sources=1000).val_real_rows) == int(spec.hard.sum())  # capped
  measure = lambda: np.full([len(LEVELS) + 1, 3], 0.5, np.float32)
  _, segments = _stream(spec, spec.initial_state(), measure, 12)
  held_syn = np.flatnonzero(np.isin(spec.syn_sources, real_rows))
  for records, _ in segments:
    assert not np.isin(records[records[:, 0] == REAL, 1], real_rows).any()
    assert not np.isin(records[records[:, 0] == SYNTHETIC, 1], held_syn).any()


def test_phase_lengths_are_counted_in_steps():
  spec = _spec(uniform_rows=10)
  measure = lambda: np.full([len(LEVELS) + 1, 3], 0.5, np.float32)
  state, segments = _stream(spec, spec.initial_state(), measure, 3)
  # Uniform: 10 rows = 5 random real images x 2 captions -> ceil(10 / 4) = 3 steps, cut at the
  # reference point after 2 steps.
  assert [len(r) // BATCH for r, _ in segments[:2]] == [2, 1]
  assert [s["curriculum_phase"] for _, s in segments] == ["uniform", "uniform", "synthetic"]
  assert len({int(row) for row in segments[0][0][:, 1]} | {int(row) for row in segments[1][0][:, 1]}) == 5
  # Synthetic at g* (all tie: the first level): one pass over every accepted synthetic row at
  # 0.1 of the usable hard images (all seeds) plus every non-hard real image, as pairs.
  records, summary = segments[2]
  syn_rows = np.flatnonzero(spec.syn_usable & np.isclose(spec.syn_levels, 0.1))
  nonhard = np.flatnonzero(spec.train_usable & ~spec.hard)
  assert summary["curriculum_level"] == 0.1
  assert len(records) // BATCH == math.ceil(2 * (len(syn_rows) + len(nonhard)) / BATCH)
  assert set(records[records[:, 0] == SYNTHETIC, 1].tolist()) == set(syn_rows.tolist())
  assert set(records[records[:, 0] == REAL, 1].tolist()) == set(nonhard.tolist())
  # merge_real=False: the synthetic rows alone.
  alone = _spec(uniform_rows=10, merge_real=False)
  _, segments = _stream(alone, alone.initial_state(), measure, 3)
  assert len(segments[2][0]) // BATCH == math.ceil(2 * len(syn_rows) / BATCH)
  # An epoch boundary cuts a phase; the next call goes on where it stopped.
  state, cut = _stream(spec, spec.initial_state(), measure, 2, steps_left=1)
  assert [len(r) // BATCH for r, _ in cut] == [1, 1] and int(state.phase_step) == 2
  np.testing.assert_array_equal(np.concatenate([r for r, _ in cut]), segments_first(spec, measure))


def segments_first(spec, measure):
  _, segments = _stream(spec, spec.initial_state(), measure, 1)
  return segments[0][0]


def test_level_trained_in_the_synthetic_phase_gets_no_credit_for_it():
  """Uniform phases move level 1 first, then level 0; the synthetic phase on level 1 lifts it
  a lot. With the window reset in each uniform phase, the second pick is level 0."""
  spec = _spec(uniform_rows=16)  # uniform phases of 4 steps: reference after 2, pick after 4
  probs = np.full([len(LEVELS) + 1, 3], 0.1, np.float32)
  rounds = {"uniform": 0}
  state = spec.initial_state()
  picks = []
  while len(picks) < 2:
    state, records, summary = curriculum.next_segment(
        spec, state, steps_left=10**6, batch_size=BATCH, records_fn=_pairs,
        measure=lambda: probs.copy())
    steps = len(records) // BATCH
    if "curriculum_choice" in summary:
      picks.append((summary["curriculum_choice"], summary["curriculum_gains"]))
    if summary["curriculum_phase"] == "uniform":
      if summary["curriculum_phase_step"] == 0:
        rounds["uniform"] += 1
      fast = 1 if rounds["uniform"] == 1 else 0
      probs[fast] += 0.02 * steps
      probs[1 - fast] += 0.01 * steps
    else:
      probs[summary["curriculum_choice"] if "curriculum_choice" in summary else
            LEVELS.index(summary["curriculum_level"])] += 0.3
  assert [p[0] for p in picks] == [1, 0]
  # The second pick's gains cover the 2 uniform steps after the reset only.
  np.testing.assert_allclose(picks[1][1][:2], [0.04, 0.02], atol=1e-6)


def test_stream_resumes_exactly_from_a_checkpointed_state():
  spec = _spec(uniform_rows=12)
  rng = np.random.default_rng(0)
  draws = [rng.uniform(size=(len(LEVELS) + 1, 3)).astype(np.float32) for _ in range(40)]

  def measure_from(counter):
    def measure():
      counter[0] += 1
      return draws[counter[0]]
    return measure

  counter = [0]
  _, straight = _stream(spec, spec.initial_state(), measure_from(counter), 10, steps_left=3)
  counter = [0]
  state, first = _stream(spec, spec.initial_state(), measure_from(counter), 5, steps_left=3)
  saved = checkpoint_lib.tree_to_json(state)
  state = checkpoint_lib.tree_from_json(saved, spec.initial_state())
  _, rest = _stream(spec, state, measure_from(counter), 5, steps_left=3)
  for (a, sa), (b, sb) in zip(straight, first + rest):
    np.testing.assert_array_equal(a, b)
    assert sa == sb


def test_bad_keys_are_named():
  with pytest.raises(ValueError, match="curriculum.uniform_rows must be >= 0"):
    _spec(uniform_rows=-1)
  with pytest.raises(ValueError, match="curriculum.val_sources must be >= 0"):
    _spec(val_sources=-1)
  spec = _spec(uniform_rows=1)
  with pytest.raises(ValueError, match="raise curriculum.uniform_rows"):
    curriculum.next_segment(spec, spec.initial_state(), steps_left=5, batch_size=64,
                            records_fn=lambda p, k: p, measure=None)
