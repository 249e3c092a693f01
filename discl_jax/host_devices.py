"""How many XLA host devices a CPU-only run starts: one per usable core by default.

XLA:CPU runs the small ops of a UNet or ResNet step mostly on one thread, so on
a CPU host the way to every core is one host device per core with the mesh
splitting the batch (docs/benchmarks.md). The count must be set before JAX
starts its backends; accelerator hosts are unaffected (their default backend is
not the CPU).
"""

import os
import re

import jax

XLA_COUNT_FLAG = "--xla_force_host_platform_device_count"
_FLAG_PATTERN = re.compile(re.escape(XLA_COUNT_FLAG) + r"=(\d+)")
_DECIDED = []  # the reason `configure` gave in this process, for the start-up line


def usable_cores():
  """Returns the number of cores this process may run on (its CPU affinity)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # platforms without affinity (macOS)
    return os.cpu_count() or 1


def choose(requested, xla_flags, cores, batch_size=0):
  """Returns (device count to set or None to keep XLA_FLAGS', the reason in words).

  `requested` is `mesh.cpu_devices` (0: one per core, N: exactly N); a device
  count already in `xla_flags` wins over the default but not over an explicit N.
  The default takes the most cores that divide `batch_size` (the global train
  batch; 0: any), so every device gets an equal share and the batch is unchanged.
  """
  if requested < 0:
    raise ValueError(f"mesh.cpu_devices must be >= 0 (0: one per usable core), got {requested}")
  if requested:
    return requested, f"mesh.cpu_devices={requested}"
  match = _FLAG_PATTERN.search(xla_flags or "")
  if match:
    return None, f"XLA_FLAGS sets {XLA_COUNT_FLAG}={match.group(1)}"
  count = max(d for d in range(1, max(cores, 1) + 1) if not batch_size or batch_size % d == 0)
  reason = f"one per usable core: {cores} in os.sched_getaffinity, mesh.cpu_devices=0"
  if count != cores:
    reason += f"; {count} divide train.batch_size={batch_size}"
  return count, reason


def configure(requested=0, batch_size=0):
  """Sets JAX's CPU device count before its backends start; returns the reason in words.

  Where JAX already started in this process (a notebook, a test), its devices
  are kept and the reason says so.
  """
  count, reason = choose(requested, os.environ.get("XLA_FLAGS", ""), usable_cores(), batch_size)
  if count is not None:
    try:
      jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
      reason = "JAX had already started in this process: its devices are kept"
  _DECIDED[:] = [reason]
  return reason


def decided():
  """Returns the reason `configure` gave in this process, or "" when it was not called."""
  return _DECIDED[0] if _DECIDED else ""
