"""Per-epoch sample lists (the reference's sampling) and the curriculum validation set.

Every epoch: the non-tail real images are subsampled to `nontail_fraction`
(re-drawn each epoch), and the tail gets `tail_share` of the epoch's list.
How the tail share is filled is `tail_fill`:
  pooled     as the reference (docs/design.md §6 "Sampling"): a synthetic epoch
             takes all real tail images plus draws from ONE pool of every
             accepted synthetic image at the epoch's level(s) over all tail
             classes (with replacement only when the pool is too small), so
             the class mix follows the pool; a real epoch draws the whole
             share from the real tail images with replacement.
  per_class  all real tail images, plus a fill split evenly over the tail
             classes: in a synthetic epoch from each class's accepted
             synthetic images (a class with none falls back to its own real
             images, with a warning at spec build), in a real epoch from its
             real images.
The adaptive schedule instead trains on a stream of uniform and synthetic
phases (`adaptive.py`); its validation set comes from `validation_set`.
"""

import numpy as np

from discl_jax import seeding

LEVEL_ATOL = 1e-4


def synthetic_arrays(rows, train_ids):
  """Returns (labels int [M], levels float [M], source rows int [M]) of manifest rows.

  The source row is the index of the row's `source_id` in `train_ids`, -1 when
  the source is not in the train split.
  """
  row_of = {str(i): k for k, i in enumerate(np.asarray(train_ids))}
  labels, levels, sources = [], [], []
  for n, row in enumerate(rows):
    try:
      labels.append(int(row["label"]))
      levels.append(float(row["image_guidance"]))
      sources.append(row_of.get(str(row.get("source_id")), -1))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(
          f"synthetic row {n} needs an int 'label' and a float 'image_guidance': {row!r}") from e
  return (np.asarray(labels, np.int64), np.asarray(levels, np.float64),
          np.asarray(sources, np.int64))


def level_mask(syn_levels, level_set):
  """Returns bool [M]: which synthetic rows have one of the levels in `level_set`."""
  syn_levels = np.asarray(syn_levels, np.float64)
  mask = np.zeros(len(syn_levels), bool)
  for level in level_set:
    mask |= np.abs(syn_levels - level) < LEVEL_ATOL
  return mask


def validation_set(hard, syn_sources, syn_levels, levels, count, seed):
  """Returns (real rows [V], synthetic rows [len(levels), V]) of the curriculum validation set.

  Candidates are hard real images that have at least one synthetic row at every
  level; `count` of them in all (docs/design.md §6: 2,000) are drawn deterministically
  from `seed`, and for each level the lowest-numbered synthetic row of that image is used.
  """
  syn_sources = np.asarray(syn_sources)
  first_row = []
  for level in levels:
    rows = np.flatnonzero(level_mask(syn_levels, (level,)) & (syn_sources >= 0))
    first = {}
    for r in rows:
      first.setdefault(int(syn_sources[r]), int(r))
    first_row.append(first)
  complete = np.asarray([i for i in np.flatnonzero(hard) if all(i in f for f in first_row)],
                        np.int64)
  rng = seeding.numpy_rng(seed, "curriculum-validation")
  real_rows = np.sort(rng.choice(complete, min(count, len(complete)), replace=False))
  syn_rows = np.asarray([[f[int(i)] for i in real_rows] for f in first_row],
                        np.int64).reshape(len(levels), len(real_rows))
  return real_rows.astype(np.int64), syn_rows


def classes_without_synthetic(spec, level_set):
  """Returns the tail classes with no usable synthetic row at any level of `level_set`."""
  usable = spec.syn_usable & level_mask(spec.syn_levels, level_set)
  return np.setdiff1d(spec.tail_classes, spec.syn_labels[usable])


def all_real_picks(spec):
  """Returns int64 [K, 2]: every usable real image once (the `none` schedule)."""
  rows = np.flatnonzero(spec.train_usable)
  return _picks(rows, np.zeros([0], np.int64))


def epoch_picks(spec, level_set, rng):
  """Returns (picks int64 [K, 2], fallback classes): one epoch's sample list.

  `level_set` is the tuple of synthetic levels to fill the tail share with;
  empty means real images only. Fallback classes are the tail classes with no
  accepted synthetic image at those levels.
  """
  usable = spec.train_usable
  nontail = np.flatnonzero(usable & ~spec.hard)
  tail = np.flatnonzero(usable & spec.hard)
  num_nontail = int(spec.nontail_fraction * len(nontail))
  nontail_pick = np.sort(rng.choice(nontail, num_nontail, replace=False))
  if num_nontail:
    tail_total = int(spec.tail_share / (1.0 - spec.tail_share) * num_nontail)
  else:  # every class is tail: no proportion to hold, the real tail images only
    tail_total = len(tail)
  if spec.tail_fill == "pooled":
    return _pooled_picks(spec, level_set, nontail_pick, tail, tail_total, rng)
  num_fill = max(0, tail_total - len(tail))

  classes = spec.tail_classes
  syn_ok = spec.syn_usable & level_mask(spec.syn_levels, level_set) if level_set else None
  shares = _even_split(num_fill, len(classes), rng)
  real_fill, syn_fill, fallback = [], [], []
  for c, share in zip(classes, shares):
    real_pool = tail[spec.train_labels[tail] == c]
    if level_set:
      syn_pool = np.flatnonzero(syn_ok & (spec.syn_labels == c))
      if len(syn_pool):
        syn_fill.append(_draw(syn_pool, share, rng))
        continue
      fallback.append(int(c))
    if len(real_pool):
      real_fill.append(_draw(real_pool, share, rng))
  real_rows = np.concatenate([nontail_pick, tail] + real_fill).astype(np.int64)
  syn_rows = np.concatenate([np.zeros([0], np.int64)] + syn_fill).astype(np.int64)
  return _picks(real_rows, syn_rows), tuple(fallback)


def _pooled_picks(spec, level_set, nontail_pick, tail, tail_total, rng):
  """Returns (picks, fallback classes) with the tail share filled from one pool (the reference)."""
  syn_pool = np.zeros([0], np.int64)
  if level_set:
    syn_pool = np.flatnonzero(spec.syn_usable & level_mask(spec.syn_levels, level_set))
  fallback = tuple(int(c) for c in np.setdiff1d(spec.tail_classes, spec.syn_labels[syn_pool])
                   ) if level_set else ()
  if len(syn_pool):
    num_fill = max(0, tail_total - len(tail))
    syn_rows = rng.choice(syn_pool, num_fill, replace=len(syn_pool) <= num_fill)
    return _picks(np.concatenate([nontail_pick, tail]), np.sort(syn_rows)), fallback
  if not len(nontail_pick) or not len(tail):  # no proportion to hold: the real tail once
    return _picks(np.concatenate([nontail_pick, tail]), np.zeros([0], np.int64)), fallback
  tail_rows = np.sort(rng.choice(tail, tail_total, replace=True))
  return _picks(np.concatenate([nontail_pick, tail_rows]), np.zeros([0], np.int64)), fallback


def _picks(real_rows, syn_rows):
  real = np.stack([np.zeros(len(real_rows), np.int64), real_rows], axis=1)
  syn = np.stack([np.ones(len(syn_rows), np.int64), syn_rows], axis=1)
  return np.concatenate([real, syn], axis=0).reshape(-1, 2)


def _even_split(total, parts, rng):
  """Returns int [parts] summing to `total`; the remainder goes to random parts."""
  if parts == 0:
    return np.zeros([0], np.int64)
  shares = np.full(parts, total // parts, np.int64)
  shares[rng.choice(parts, total % parts, replace=False)] += 1
  return shares


def _draw(pool, n, rng):
  """Returns `n` rows of `pool`: whole copies of it, then a random subset for the rest."""
  pool = np.asarray(pool, np.int64)
  reps, rest = divmod(int(n), len(pool))
  return np.concatenate([np.tile(pool, reps), np.sort(rng.choice(pool, rest, replace=False))])
