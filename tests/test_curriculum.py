"""Curriculum schedules: epoch plans per docs/design.md 1.5, the adaptive rule, fallbacks."""

import logging

import jax
import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax.curriculum import (
    REAL, SCHEDULES, SYNTHETIC, CurriculumSpec, CurriculumState, iqr_filtered_mean,
    plan_epoch, stages, update)
from discl_jax.curriculum import sampling
from discl_jax.data.records import LabeledImages

# A long-tailed train split: classes 6..9 are Few (< 20 images), 4 of 10 classes.
COUNTS = (200, 120, 80, 50, 30, 20, 12, 8, 5, 3)
GROUPS = np.array(["many", "many", "medium", "medium", "medium", "medium",
                   "few", "few", "few", "few"])
LEVELS = (0.0, 0.1, 0.3, 0.5)
SEEDS = 2


def _train():
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(COUNTS)])
  return LabeledImages(
      ids=np.array([f"img{i}" for i in range(len(labels))]), labels=labels,
      class_names=tuple(f"class{c}" for c in range(len(COUNTS))),
      pixels=np.zeros([len(labels), 1, 1, 3], np.uint8))


def _synthetic_rows(train, skip=()):
  """Every Few image at every level with SEEDS seeds, except (class, level) in `skip`."""
  rows = []
  for i in np.flatnonzero(GROUPS[train.labels] == "few"):
    label = int(train.labels[i])
    for level in LEVELS:
      if (label, level) in skip:
        continue
      for seed in range(SEEDS):
        rows.append({"label": label, "image_guidance": level, "source_id": train.ids[i],
                     "seed": seed, "strength": round(1 - level, 6)})
  return rows


def _spec(schedule, train=None, rows=None, **overrides):
  train = train if train is not None else _train()
  rows = rows if rows is not None else _synthetic_rows(train)
  c = config_lib.base_config().curriculum
  c.schedule = schedule
  for key, value in overrides.items():
    c[key] = value
  return CurriculumSpec.from_config(c, train=train, groups=GROUPS, synthetic_rows=rows, seed=0)


def _plans(spec, epochs):
  state = spec.initial_state()
  plans = []
  for epoch in range(epochs):
    state, plan = plan_epoch(spec, state, epoch)
    plans.append(plan)
  return state, plans


def _tail_count(spec, plan):
  real = plan.picks[plan.picks[:, 0] == REAL, 1]
  return int(np.sum(spec.hard[real])) + plan.num_synthetic


def _check_epoch_sizes(spec, plan):
  """Non-tail drawn at nontail_fraction; tail share held; synthetic fills it."""
  train = _train()
  nontail_total = int(np.sum(GROUPS[train.labels] != "few"))
  real_tail = int(np.sum(spec.hard & spec.train_usable))
  num_nontail = int(spec.nontail_fraction * nontail_total)
  tail_total = int(spec.tail_share / (1 - spec.tail_share) * num_nontail)
  assert len(plan.picks) == num_nontail + tail_total
  assert _tail_count(spec, plan) == tail_total
  if plan.levels and not plan.fallback_classes:
    assert plan.num_synthetic == tail_total - real_tail
    assert plan.num_real == num_nontail + real_tail
  if plan.levels:
    syn_levels = spec.syn_levels[plan.picks[plan.picks[:, 0] == SYNTHETIC, 1]]
    assert np.all(sampling.level_mask(syn_levels, plan.levels))
  else:
    assert plan.num_synthetic == 0


def test_syn_to_real_reference_setting():
  # 65 epochs, 60 curriculum epochs, levels 0.1 -> 0.3 -> 0.5 -> real: 15 each.
  spec = _spec("syn_to_real", levels=(0.1, 0.3, 0.5), curriculum_epochs=60)
  assert spec.tail_share == pytest.approx(0.4)  # 4 of 10 classes are tail
  _, plans = _plans(spec, 65)
  expected = [0.1] * 15 + [0.3] * 15 + [0.5] * 15 + [None] * 20
  assert [p.level for p in plans] == expected
  assert [p.phase for p in plans] == ["synthetic"] * 45 + ["real"] * 20
  for plan in plans:
    _check_epoch_sizes(spec, plan)
    assert plan.fallback_classes == ()
    assert _tail_count(spec, plan) / len(plan.picks) == pytest.approx(0.4, abs=0.01)
  # Every epoch keeps all real tail images; non-tail is re-drawn every epoch.
  tail_rows = set(np.flatnonzero(spec.hard))
  real0 = set(plans[0].picks[plans[0].picks[:, 0] == REAL, 1])
  real1 = set(plans[1].picks[plans[1].picks[:, 0] == REAL, 1])
  assert tail_rows <= real0 and tail_rows <= real1
  assert real0 != real1


def test_stage_remainder_goes_to_early_stages():
  spec = _spec("syn_to_real", levels=(0.1, 0.3, 0.5), curriculum_epochs=9)
  assert stages(spec) == [(0, 3, (0.1,)), (3, 5, (0.3,)), (5, 7, (0.5,)), (7, 9, ())]


def test_real_to_syn_reverses_the_stages():
  spec = _spec("real_to_syn", levels=(0.1, 0.3, 0.5), curriculum_epochs=60)
  _, plans = _plans(spec, 65)
  expected = [None] * 15 + [0.5] * 15 + [0.3] * 15 + [0.1] * 15 + [None] * 5
  assert [p.level for p in plans] == expected
  for plan in plans:
    _check_epoch_sizes(spec, plan)


@pytest.mark.parametrize("schedule,levels,expected", [
    ("fixed", (0.3,), (0.3,)),
    ("all_levels", (0.1, 0.3, 0.5), (0.1, 0.3, 0.5)),
    ("text_only", (0.1, 0.3, 0.5), (0.0,)),
])
def test_single_stage_schedules(schedule, levels, expected):
  spec = _spec(schedule, levels=levels, curriculum_epochs=6)
  _, plans = _plans(spec, 8)
  for plan in plans[:6]:
    assert plan.levels == expected and plan.phase == "synthetic"
    _check_epoch_sizes(spec, plan)
    drawn = set(np.round(spec.syn_levels[plan.picks[plan.picks[:, 0] == SYNTHETIC, 1]], 6))
    if schedule == "all_levels":
      assert drawn == set(expected)  # every level mixed in one epoch
  for plan in plans[6:]:
    assert plan.level is None and plan.levels == () and plan.phase == "real"
  if schedule == "all_levels":
    assert np.isnan(plans[0].level) and plans[0].summary()["curriculum_level"] is None
  else:
    assert plans[0].level == expected[0]


def test_none_trains_on_every_real_image_once():
  spec = _spec("none", curriculum_epochs=6)
  _, plans = _plans(spec, 3)
  n = len(_train())
  for plan in plans:
    assert plan.level is None and plan.num_synthetic == 0
    assert sorted(plan.picks[:, 1].tolist()) == list(range(n))


def test_random_is_a_level_per_stage_deterministic_from_the_seed():
  spec = _spec("random", levels=(0.1, 0.3, 0.5), curriculum_epochs=8)
  _, plans = _plans(spec, 10)
  _, again = _plans(spec, 10)
  assert [p.level for p in plans] == [p.level for p in again]
  assert all(np.array_equal(a.picks, b.picks) for a, b in zip(plans, again))
  for start, end, level_set in stages(spec):
    assert end - start == 2 and level_set in ((0.1,), (0.3,), (0.5,), ())
    assert len({plans[e].level for e in range(start, end)}) == 1
  assert [p.level for p in plans[8:]] == [None, None]
  sequences = set()
  for seed in range(6):
    c = config_lib.base_config().curriculum
    c.schedule, c.curriculum_epochs = "random", 8
    train = _train()
    s = CurriculumSpec.from_config(c, train=train, groups=GROUPS,
                                   synthetic_rows=_synthetic_rows(train), seed=seed)
    sequences.add(tuple(level_set for _, _, level_set in stages(s)))
  assert len(sequences) > 1


def test_plans_are_deterministic_and_seed_dependent():
  spec = _spec("syn_to_real", curriculum_epochs=8)
  _, a = _plans(spec, 3)
  _, b = _plans(spec, 3)
  assert all(np.array_equal(x.picks, y.picks) for x, y in zip(a, b))
  c = config_lib.base_config().curriculum
  c.curriculum_epochs = 8
  train = _train()
  other = CurriculumSpec.from_config(c, train=train, groups=GROUPS,
                                     synthetic_rows=_synthetic_rows(train), seed=1)
  _, d = _plans(other, 1)
  assert not np.array_equal(a[0].picks, d[0].picks)


def test_adaptive_rule_uses_the_iqr_filtered_mean():
  # Level 0: small gains with one huge outlier; the raw mean would pick it.
  ref = np.full([3, 10], 0.02, np.float32)
  new = ref.copy()
  new[0] += 0.05
  new[0, 9] = 0.98  # outlier gain 0.96
  new[1] += np.linspace(0.09, 0.11, 10)  # steady gain 0.1
  new[2] -= 0.01
  raw = (new - ref).mean(axis=1)
  assert np.argmax(raw) == 0
  assert iqr_filtered_mean(new[0] - ref[0]) == pytest.approx(0.05, abs=1e-6)
  state = CurriculumState.create(2, 10)
  state = update(state, ref)
  assert int(state.level_index) == -1 and bool(state.has_ref)
  state = update(state, new)
  assert int(state.level_index) == 1
  assert state.gains[1] == pytest.approx(0.1, abs=1e-6)
  np.testing.assert_array_equal(state.ref_probs, new)


def test_adaptive_loss_decrease_signal():
  ref = np.array([[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5]], np.float32)
  new = np.array([[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.7, 0.7]], np.float32)
  # prob_gain: +0.2 beats +0.1; loss_decrease: log 2 beats log 1.4.
  state = update(CurriculumState.create(1, 4), ref)
  assert int(update(state, new, "prob_gain").level_index) == 1
  assert int(update(state, new, "loss_decrease").level_index) == 0


def test_update_rejects_bad_val_probs():
  state = CurriculumState.create(2, 3)
  with pytest.raises(ValueError, match="shape"):
    update(state, np.zeros([2, 3]))
  with pytest.raises(ValueError, match="probabilities"):
    update(state, np.full([3, 3], np.nan))


def test_state_is_a_pytree():
  state = CurriculumState.create(3, 5)
  leaves, treedef = jax.tree.flatten(state)
  assert len(leaves) == 6
  assert jax.tree.unflatten(treedef, leaves).ref_probs.shape == (4, 5)


def test_empty_spectrum_warns_and_falls_back_to_real(caplog):
  train = _train()
  rows = _synthetic_rows(train, skip={(9, 0.3)})
  with caplog.at_level(logging.WARNING):
    spec = _spec("syn_to_real", train=train, rows=rows, levels=(0.1, 0.3), curriculum_epochs=6)
  assert any("lambda=0.30" in r.message and "class9" in r.message for r in caplog.records)
  _, plans = _plans(spec, 6)
  assert plans[0].fallback_classes == ()
  plan = plans[2]  # lambda = 0.3
  assert plan.level == 0.3 and plan.fallback_classes == (9,)
  _check_epoch_sizes(spec, plan)
  real = plan.picks[plan.picks[:, 0] == REAL, 1]
  syn = plan.picks[plan.picks[:, 0] == SYNTHETIC, 1]
  assert 9 not in set(spec.syn_labels[syn].tolist())
  assert np.sum(spec.train_labels[real] == 9) > COUNTS[9]  # its share: resampled real images


def test_everything_filtered_out_trains_on_real(caplog):
  with caplog.at_level(logging.WARNING):
    spec = _spec("syn_to_real", rows=[], curriculum_epochs=4)
  assert caplog.records
  _, plans = _plans(spec, 4)
  for plan in plans:
    assert plan.num_synthetic == 0
    assert _tail_count(spec, plan) == int(spec.tail_share / (1 - spec.tail_share)
                                          * int(0.3 * sum(COUNTS[:6])))


def test_unknown_schedule_lists_valid_names():
  with pytest.raises(ValueError) as e:
    _spec("warmup")
  for name in SCHEDULES:
    assert name in str(e.value)


@pytest.mark.parametrize("overrides,match", [
    (dict(schedule="fixed", levels=(0.1, 0.3)), "one value"),
    (dict(signal="accuracy"), "prob_gain"),
    (dict(nontail_fraction=0.0), "nontail_fraction"),
    (dict(levels=(1.5,)), "levels"),
    (dict(tail_share=1.0), "tail_share"),
])
def test_bad_curriculum_values_name_the_key(overrides, match):
  schedule = overrides.pop("schedule", "syn_to_real")
  with pytest.raises(ValueError, match=match):
    _spec(schedule, **overrides)


def test_all_classes_tail_trains_on_the_real_tail(caplog):
  train = _train()
  groups = np.full(len(COUNTS), "few")
  c = config_lib.base_config().curriculum
  c.curriculum_epochs = 4
  with caplog.at_level(logging.WARNING):
    spec = CurriculumSpec.from_config(c, train=train, groups=groups,
                                      synthetic_rows=_synthetic_rows(train), seed=0)
  assert any("every training image is hard" in r.message for r in caplog.records)
  _, plans = _plans(spec, 2)
  assert len(plans[0].picks) == len(train) and plans[0].num_synthetic == 0


def test_hard_ids_mark_single_images_as_tail():
  # iWildCam-style: the hard images are chosen per image (hard.jsonl), not per class.
  train = _train()
  hard_rows = [0, 1, 250, 251, 252]  # two of class 0, three of class 1
  rows = [{"label": int(train.labels[i]), "image_guidance": 0.3, "source_id": train.ids[i]}
          for i in hard_rows]
  c = config_lib.base_config().curriculum
  c.levels, c.curriculum_epochs = (0.3,), 2
  spec = CurriculumSpec.from_config(c, train=train, groups=GROUPS, synthetic_rows=rows,
                                    seed=0, hard_ids=[train.ids[i] for i in hard_rows])
  assert np.flatnonzero(spec.hard).tolist() == hard_rows
  assert spec.tail_classes.tolist() == [0, 1] and spec.tail_share == pytest.approx(0.2)
  _, plans = _plans(spec, 1)
  nontail = len(train) - len(hard_rows)
  assert _tail_count(spec, plans[0]) == int(0.2 / 0.8 * int(0.3 * nontail))
  syn = plans[0].picks[plans[0].picks[:, 0] == SYNTHETIC, 1]
  assert set(spec.syn_labels[syn].tolist()) == {0, 1}


def test_resample_is_the_real_epoch_sampling_in_every_epoch():
  # The reference's baseline: real images only, non-tail re-subsampled and the
  # tail share held with real tail images, exactly as a DisCL real epoch.
  spec = _spec("resample", curriculum_epochs=4)
  syn = _spec("syn_to_real", levels=(0.1, 0.3, 0.5), curriculum_epochs=4)
  _, plans = _plans(spec, 6)
  _, syn_plans = _plans(syn, 6)
  train = _train()
  for plan in plans:
    assert plan.level is None and plan.phase == "real" and plan.num_synthetic == 0
    _check_epoch_sizes(spec, plan)
    assert _tail_count(spec, plan) / len(plan.picks) == pytest.approx(0.4, abs=0.01)
    tail_real = np.sum(GROUPS[train.labels] == "few")
    assert _tail_count(spec, plan) > tail_real  # the tail is oversampled, unlike `none`
  for epoch in (3, 4, 5):  # syn_to_real's real stage and its real epochs after it
    assert syn_plans[epoch].level is None
    np.testing.assert_array_equal(plans[epoch].picks, syn_plans[epoch].picks)
  assert spec.level_sets() == [] and spec.levels == ()


def _class_mix(spec, plans, source):
  counts = np.zeros(len(COUNTS))
  for plan in plans:
    rows = plan.picks[plan.picks[:, 0] == source, 1]
    labels = spec.syn_labels[rows] if source == SYNTHETIC else spec.train_labels[rows]
    counts += np.bincount(labels, minlength=len(COUNTS))
  return counts


def test_tail_fill_pooled_follows_the_pool_per_class_is_even():
  # Fill 22 synthetic images per epoch (nontail 75, tail share 50, 28 real tail)
  # from a pool of 56 rows per level: Few classes hold 12:8:5:3 of it.
  few = np.asarray(COUNTS[6:], np.float64)
  pooled = _spec("fixed", levels=(0.3,), curriculum_epochs=200, nontail_fraction=0.15,
                 tail_fill="pooled")
  per_class = _spec("fixed", levels=(0.3,), curriculum_epochs=200, nontail_fraction=0.15)
  assert per_class.tail_fill == "per_class"  # the schema default keeps the old sampling
  _, pooled_plans = _plans(pooled, 200)
  _, even_plans = _plans(per_class, 2)
  for plan in pooled_plans[:3] + even_plans:
    _check_epoch_sizes(pooled, plan)
    syn = plan.picks[plan.picks[:, 0] == SYNTHETIC, 1]
    assert len(syn) == 22
  for plan in pooled_plans:  # the pool is larger than the fill: drawn without replacement
    syn = plan.picks[plan.picks[:, 0] == SYNTHETIC, 1]
    assert len(np.unique(syn)) == len(syn)
  mix = _class_mix(pooled, pooled_plans, SYNTHETIC)[6:]
  np.testing.assert_allclose(mix / mix.sum(), few / few.sum(), atol=0.02)
  for plan in even_plans:
    mix = _class_mix(per_class, [plan], SYNTHETIC)[6:]
    assert mix.max() - mix.min() <= 1


def test_tail_fill_pooled_real_epochs_draw_the_tail_share_with_replacement():
  spec = _spec("resample", curriculum_epochs=0, tail_fill="pooled")
  _, plans = _plans(spec, 100)
  for plan in plans[:3]:
    _check_epoch_sizes(spec, plan)
  few = np.asarray(COUNTS[6:], np.float64)
  mix = _class_mix(spec, plans, REAL)[6:]
  np.testing.assert_allclose(mix / mix.sum(), few / few.sum(), atol=0.02)
  # Not every real tail image in every epoch: the share is one draw with replacement.
  tail_rows = set(np.flatnonzero(spec.hard))
  assert any(not tail_rows <= set(p.picks[:, 1].tolist()) for p in plans)


def test_unknown_tail_fill_names_the_key():
  with pytest.raises(ValueError, match="curriculum.tail_fill"):
    _spec("syn_to_real", tail_fill="even")


def test_tail_fill_pooled_class_without_synthetic_keeps_its_real_images():
  train = _train()
  rows = _synthetic_rows(train, skip={(9, 0.3)})
  spec = _spec("fixed", train=train, rows=rows, levels=(0.3,), curriculum_epochs=2,
               tail_fill="pooled")
  _, plans = _plans(spec, 1)
  plan = plans[0]
  assert plan.fallback_classes == (9,)
  _check_epoch_sizes(spec, plan)
  real = plan.picks[plan.picks[:, 0] == REAL, 1]
  assert np.sum(spec.train_labels[real] == 9) == COUNTS[9]
  assert 9 not in set(spec.syn_labels[plan.picks[plan.picks[:, 0] == SYNTHETIC, 1]].tolist())
