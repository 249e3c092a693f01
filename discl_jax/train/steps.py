"""Jitted train and eval steps, data-parallel over the mesh's `data` axis.

The state is replicated and each batch is sharded along its leading axis, so
XLA splits the work and all-reduces gradients and batch norm statistics: the
result is the same computation as on one device, on the global batch.
"""

import jax
import jax.numpy as jnp
import optax

from discl_jax import parallel
from discl_jax.train import losses


def make_train_step(model, tx, loss_fn, mesh, mixup_alpha=0.0, seed=0):
  """Returns jitted `train_step(state, batch, lr) -> (state, metrics)`.

  `batch` holds "image" [B, S, S, 3] and "label" [B]; `metrics` holds the
  batch-mean "loss" and "accuracy" (of the unmixed labels). With
  `mixup_alpha` > 0 each batch is mixed (`losses.mixup`) with the key of
  (`seed`, state.step), so a resumed run mixes as an uninterrupted one. The
  input state is donated.
  """
  def train_step(state, batch, lr):
    images, labels = batch["image"], batch["label"]
    if mixup_alpha > 0:
      images, perm, lam = losses.mixup(losses.mixup_key(seed, state.step), images, mixup_alpha)
      per_example = lambda logits: losses.mixup_loss(loss_fn, logits, labels, perm, lam)
    else:
      per_example = lambda logits: loss_fn(logits, labels)

    def loss_of(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images,
          train=True, mutable=["batch_stats"])
      return per_example(logits).mean(), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_of, has_aux=True)(state.params)
    opt_state = state.opt_state
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy}

  replicated = parallel.replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated),
                 donate_argnums=(0,))


def make_eval_step(model, mesh):
  """Returns jitted `eval_step(state, batch) -> dict` of per-example arrays [B].

  Keys: "pred" (argmax class), "prob_true" (softmax probability of the label),
  "loss" (cross-entropy). Batch norm uses its running statistics.
  """
  def eval_step(state, batch):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False)
    log_probs = jax.nn.log_softmax(logits)
    log_true = jnp.take_along_axis(log_probs, batch["label"][:, None], axis=-1)[:, 0]
    return {"pred": jnp.argmax(logits, -1).astype(jnp.int32),
            "prob_true": jnp.exp(log_true), "loss": -log_true}

  return jax.jit(eval_step,
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))
