"""Device mesh, shardings and multi-host start-up (jit + NamedSharding, no pmap)."""

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize(config):
  """Starts jax.distributed when `config.mesh.multi_host` is set; returns None."""
  if config.mesh.multi_host:
    jax.distributed.initialize()


def make_mesh(shape=(-1,), devices=None):
  """Returns a 1-D mesh with axis `data` over `devices` (default: all of them)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = tuple(shape)
  if len(shape) != 1:
    raise ValueError(f"mesh.shape must have one entry (data axis), got {shape}")
  size = len(devices) if shape[0] == -1 else shape[0]
  if size > len(devices) or size < 1:
    raise ValueError(f"mesh.shape {shape} needs {size} devices, have {len(devices)}")
  return jax.sharding.Mesh(np.asarray(devices[:size]), (DATA_AXIS,))


def batch_sharding(mesh):
  """Returns the sharding that splits a batch's leading axis over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh):
  """Returns the sharding that puts a full copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def put_replicated(tree, mesh):
  """Returns `tree` with every leaf replicated across `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def put_batch(tree, mesh):
  """Returns host-local numpy batch `tree` as global arrays sharded over `data`.

  Each process passes its own slice; the global batch is their concatenation.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      tree)


def data_size(mesh):
  """Returns the number of devices along the `data` axis."""
  return mesh.shape[DATA_AXIS]


def pad_to_multiple(n, multiple):
  """Returns the smallest integer >= n divisible by `multiple`."""
  return -(-n // multiple) * multiple


def batch_sizes(train_batch, eval_batch, mesh):
  """Returns (train, eval) global batch sizes; eval is padded to a multiple every process can split.

  Raises ValueError when `train_batch` does not divide over the mesh's data
  devices and the processes.
  """
  n_dev, n_proc = data_size(mesh), jax.process_count()
  if train_batch % n_dev or train_batch % n_proc:
    raise ValueError(f"train.batch_size={train_batch} must be divisible by the "
                     f"{n_dev} devices of the mesh and {n_proc} processes")
  return train_batch, pad_to_multiple(eval_batch, math.lcm(n_dev, n_proc))


def barrier(name):
  """Blocks until every process reaches barrier `name`; a no-op on one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"discl_jax.{name}")
