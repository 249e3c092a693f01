"""The train state: a plain pytree of arrays (no functions inside)."""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Step counter, model params, batch norm statistics and optimizer state."""
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: tuple


def create(model, tx, rng, image_size):
  """Returns a fresh TrainState for `model` on `image_size`^2 RGB inputs."""
  def init(rng):
    variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                           train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params))
  return jax.jit(init)(rng)


def variables(state):
  """Returns the flax variables dict of `state` for `model.apply`."""
  return {"params": state.params, "batch_stats": state.batch_stats}
