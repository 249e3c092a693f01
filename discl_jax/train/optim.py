"""Optimizers from the `train` config: Adam, AdamW, SGD (+ Nesterov); cosine or step rates.

The learning rate is an injected hyperparameter of the optimizer state, set by
the train step from `learning_rate(...)`:
  cosine: a cosine over the run's fractional epoch progress. Epochs of a
      curriculum can differ in length, so progress, not a step total fixed in
      advance, drives it; with equal epochs it is the usual per-step cosine.
  step: the rate times `lr_decay` at each epoch of `lr_milestones` (PyTorch's
      MultiStepLR, stepped per epoch).
Both are multiplied by an epoch-wise warm-up, (epoch + 1) / `warmup_epochs`
in the first `warmup_epochs` epochs (the reference's base recipe, docs/design.md
§6: LambdaLR per epoch), and a step-wise linear warm-up over the first
`warmup_steps` steps.
"""

import math

import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("cosine", "step")


def learning_rate(train_config, step, progress):
  """Returns the rate at global `step` and run `progress` in [0, 1] (epochs done / epochs).

  Raises ValueError listing the valid names when `lr_schedule` is unknown.
  """
  tc = train_config
  progress = min(max(progress, 0.0), 1.0)
  epoch = math.floor(progress * tc.epochs + 1e-6)  # the epoch in progress (0-based)
  if tc.lr_schedule == "cosine":
    rate = tc.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
  elif tc.lr_schedule == "step":
    rate = tc.learning_rate * tc.lr_decay ** sum(epoch >= m for m in tc.lr_milestones)
  else:
    raise ValueError(f"unknown train.lr_schedule {tc.lr_schedule!r}; "
                     f"valid: {', '.join(LR_SCHEDULES)}")
  if tc.warmup_epochs > 0 and epoch < tc.warmup_epochs:
    rate *= (epoch + 1) / tc.warmup_epochs
  if tc.warmup_steps > 0 and step < tc.warmup_steps:
    rate *= (step + 1) / tc.warmup_steps
  return rate


def make_optimizer(train_config):
  """Returns the optax transformation for `train_config.optimizer`.

  Its state holds `hyperparams["learning_rate"]`, which the train step sets.
  Adam and SGD add weight decay to the gradient (L2, as PyTorch's
  `weight_decay` does); AdamW decouples it. SGD's Nesterov momentum
  (`train.nesterov`) is PyTorch's: v = mu v + g, step g + mu v. Raises ValueError listing the
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
        optax.sgd(learning_rate, momentum=train_config.momentum,
                  nesterov=train_config.nesterov))
  else:
    raise ValueError(f"unknown optimizer {name!r} (config train.optimizer); "
                     f"valid: {', '.join(OPTIMIZERS)}")
  return optax.inject_hyperparams(make)(learning_rate=train_config.learning_rate)
