"""Optimizers from the `train` config: Adam, AdamW, SGD + momentum, cosine per step.

The learning rate is an injected hyperparameter of the optimizer state, set by
the train step from `learning_rate(...)`: a linear warmup over the first
`warmup_steps` steps times a cosine over the run's fractional epoch progress.
Epochs of a curriculum can differ in length, so progress, not a step total
fixed in advance, drives the cosine; with equal epochs it is the usual
per-step cosine.
"""

import math

import optax

OPTIMIZERS = ("adam", "adamw", "sgd")


def learning_rate(train_config, step, progress):
  """Returns the rate at global `step` and run `progress` in [0, 1] (epochs done / epochs)."""
  rate = train_config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
  if train_config.warmup_steps > 0 and step < train_config.warmup_steps:
    rate *= (step + 1) / train_config.warmup_steps
  return rate


def make_optimizer(train_config):
  """Returns the optax transformation for `train_config.optimizer`.

  Its state holds `hyperparams["learning_rate"]`, which the train step sets.
  Adam and SGD add weight decay to the gradient (L2, as PyTorch's
  `weight_decay` does); AdamW decouples it. Raises ValueError listing the
  valid names when the optimizer is unknown.
  """
  name = train_config.optimizer
  wd = train_config.weight_decay
  if name == "adam":
    make = lambda learning_rate: optax.chain(
        optax.add_decayed_weights(wd), optax.adam(learning_rate))
  elif name == "adamw":
    make = lambda learning_rate: optax.adamw(learning_rate, weight_decay=wd)
  elif name == "sgd":
    make = lambda learning_rate: optax.chain(
        optax.add_decayed_weights(wd),
        optax.sgd(learning_rate, momentum=train_config.momentum))
  else:
    raise ValueError(f"unknown optimizer {name!r} (config train.optimizer); "
                     f"valid: {', '.join(OPTIMIZERS)}")
  return optax.inject_hyperparams(make)(learning_rate=train_config.learning_rate)
