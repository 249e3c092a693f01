"""Classification losses: cross-entropy and Balanced Softmax; mixup of a batch.

Balanced Softmax (Ren et al. 2020) is cross-entropy on logits shifted by the
log of the training class prior, which undoes the long-tail label shift.
Mixup (Zhang et al. 2018; the reference's base recipe uses alpha 0.2,
docs/design.md §6) blends each batch with a permutation of itself by one lambda
~ Beta(alpha, alpha) per batch and blends the two labels' losses likewise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from discl_jax import seeding


def cross_entropy(logits, labels):
  """Returns per-example softmax cross-entropy [B] for int `labels`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def log_prior(class_counts):
  """Returns float32 log(count / total) per class; empty classes get count 1."""
  counts = np.maximum(np.asarray(class_counts, np.float64), 1.0)
  return np.log(counts / counts.sum()).astype(np.float32)


def balanced_softmax(logits, labels, prior):
  """Returns per-example Balanced Softmax loss [B]: CE on `logits + prior`."""
  return cross_entropy(logits + jnp.asarray(prior, logits.dtype), labels)


LOSSES = ("ce", "balanced_softmax")


def get_loss(name, class_counts):
  """Returns `loss(logits, labels) -> [B]` for loss `name`.

  `class_counts` (training images per class) sets the Balanced Softmax prior.
  Raises ValueError listing the valid names when `name` is unknown.
  """
  if name == "ce":
    return cross_entropy
  if name == "balanced_softmax":
    prior = log_prior(class_counts)
    return lambda logits, labels: balanced_softmax(logits, labels, prior)
  raise ValueError(f"unknown loss {name!r} (config train.loss); valid: {', '.join(LOSSES)}")


def mixup_key(seed, step):
  """Returns the PRNG key of the mixup at global train `step` of a run with `seed`."""
  run_key = jax.random.fold_in(jax.random.key(seed), seeding.stable_hash("train/mixup"))
  return jax.random.fold_in(run_key, step)


def mixup(key, images, alpha):
  """Returns (lam * images + (1 - lam) * images[perm], perm [B], lam), lam ~ Beta(alpha, alpha)."""
  lam_key, perm_key = jax.random.split(key)
  lam = jax.random.beta(lam_key, alpha, alpha).astype(images.dtype)
  perm = jax.random.permutation(perm_key, images.shape[0])
  return lam * images + (1 - lam) * images[perm], perm, lam


def mixup_loss(loss_fn, logits, labels, perm, lam):
  """Returns per-example lam * loss(labels) + (1 - lam) * loss(labels[perm]) [B]."""
  return lam * loss_fn(logits, labels) + (1 - lam) * loss_fn(logits, labels[perm])
