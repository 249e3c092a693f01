"""Classification losses: cross-entropy and Balanced Softmax.

Balanced Softmax (Ren et al. 2020) is cross-entropy on logits shifted by the
log of the training class prior, which undoes the long-tail label shift.
"""

import jax.numpy as jnp
import numpy as np
import optax


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
