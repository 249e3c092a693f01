"""Optimizers from the `train` config: Adam, AdamW, SGD + momentum, cosine per step."""

import optax

OPTIMIZERS = ("adam", "adamw", "sgd")


def learning_rate_schedule(train_config, total_steps):
  """Returns the per-step schedule: linear warmup to the rate, then cosine to 0."""
  warmup = min(int(train_config.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else train_config.learning_rate,
      peak_value=train_config.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=0.0)


def make_optimizer(train_config, total_steps):
  """Returns (optax transformation, schedule) for `train_config.optimizer`.

  Adam and SGD add weight decay to the gradient (L2, as PyTorch's
  `weight_decay` does); AdamW decouples it. Raises ValueError listing the
  valid names when the optimizer is unknown.
  """
  name = train_config.optimizer
  schedule = learning_rate_schedule(train_config, total_steps)
  wd = train_config.weight_decay
  if name == "adam":
    tx = optax.chain(optax.add_decayed_weights(wd), optax.adam(schedule))
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=wd)
  elif name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd),
                     optax.sgd(schedule, momentum=train_config.momentum))
  else:
    raise ValueError(f"unknown optimizer {name!r} (config train.optimizer); "
                     f"valid: {', '.join(OPTIMIZERS)}")
  return tx, schedule
