"""Device mesh, shardings and multi-host start-up (jit + NamedSharding, no pmap)."""

import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


# What a multi-host start needs: a cluster jax.distributed.initialize() detects, or the
# coordinator given by hand.
MULTI_HOST_ENV = (
    "SLURM (srun sets SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID), Open MPI (mpirun sets "
    "OMPI_MCA_orte_hnp_uri), Kubernetes (KUBERNETES_SERVICE_HOST, with the `kubernetes` "
    "package) or a Cloud TPU VM are detected; elsewhere set JAX_COORDINATOR_ADDRESS=host:port, "
    "JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process")


def initialize(config):
  """Starts jax.distributed when `config.mesh.multi_host` is set; returns None.

  The coordinator, process count and index come from a cluster
  jax.distributed.initialize() detects, or from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID. Without either it raises ValueError
  in one line naming `mesh.multi_host` and those variables.
  """
  if not config.mesh.multi_host:
    return
  given = {}
  for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(name, "").strip():
      try:
        given[arg] = int(os.environ[name])
      except ValueError:
        raise ValueError(f"{name}={os.environ[name]!r} is not an integer") from None
  try:
    jax.distributed.initialize(**given)
  except ValueError as e:  # a missing coordinator, process count or index
    cause = " ".join(str(e).split())
    raise ValueError(
        f"mesh.multi_host=True, but jax.distributed.initialize() found no coordinator "
        f"({cause}): {MULTI_HOST_ENV}; on one host leave mesh.multi_host=False") from e


def make_mesh(shape=(-1,), devices=None):
  """Returns a 1-D `jax.make_mesh` with axis `data` over the first devices of `devices`
  (default: all of them); -1 takes every device.

  The axis is Auto-sharded (jit propagates shardings), as the project's code expects.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = tuple(shape)
  if len(shape) != 1:
    raise ValueError(f"mesh.shape must have one entry (data axis), got {shape}")
  size = len(devices) if shape[0] == -1 else shape[0]
  if size > len(devices) or size < 1:
    raise ValueError(f"mesh.shape {shape} needs {size} devices, have {len(devices)}")
  return jax.make_mesh((size,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:size])


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
