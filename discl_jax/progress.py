"""What a long run shows while it works: progress bars, compile notices, the start-up line.

Bars are tqdm bars on process 0 only, and quiet when stderr is not a terminal
(tqdm's `disable=None`), so logs written to files stay clean. The persistent
JAX compilation cache makes a rerun or resumed run load its compiled programs
instead of compiling them again.
"""

import os
import pathlib

import jax
from absl import logging
from tqdm import tqdm

from discl_jax import host_devices

_ANNOUNCED = set()
CACHE_ENV = "DISCL_JAX_CACHE_DIR"


def bar(total, desc, unit="img", initial=0):
  """Returns a tqdm bar on process 0 (disabled elsewhere and when stderr is not a tty)."""
  return tqdm(total=total, initial=initial, desc=desc, unit=unit,
              dynamic_ncols=True, leave=False,
              disable=None if jax.process_index() == 0 else True)


def compiling(name):
  """Logs "compiling NAME ..." the first time this process announces `name`; returns None."""
  if name not in _ANNOUNCED:
    _ANNOUNCED.add(name)
    logging.info("compiling %s ... (first call; the persistent cache serves reruns)", name)


def first_call_notice(fn, name):
  """Returns `fn` wrapped to announce its compilation (`compiling`) before its first call."""
  def wrapped(*args, **kwargs):
    compiling(name)
    return fn(*args, **kwargs)
  return wrapped


def cache_dir():
  """Returns the persistent compilation cache directory: $DISCL_JAX_CACHE_DIR, else the
  user cache ($XDG_CACHE_HOME or ~/.cache)/discl_jax/jax."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base, "discl_jax", "jax")


def enable_compilation_cache():
  """Turns on JAX's persistent compilation cache (unless already configured); returns its dir."""
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return pathlib.Path(configured)
  target = cache_dir()
  try:
    target.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    logging.warning("no persistent compilation cache (%s): %s", target, e)
    return None
  jax.config.update("jax_compilation_cache_dir", str(target))
  return target


def startup_line():
  """Returns the start-up text: backend, devices (and on CPU why that many) and processes."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  why = ""
  if jax.default_backend() == "cpu" and host_devices.decided():
    why = f" [{host_devices.decided()}]"
  return (f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} device(s) "
          f"({', '.join(kinds)}){why}, {jax.local_device_count()} local; process "
          f"{jax.process_index()} of {jax.process_count()}")


def counted(iterable, total, desc, count):
  """Yields the items of `iterable` under a bar of `total` units, `count(item)` per item."""
  with bar(total, desc) as progress_bar:
    for item in iterable:
      yield item
      progress_bar.update(count(item))
