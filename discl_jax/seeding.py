"""Stable ids to integers and keys: every random choice derives from the config seed.

Python's `hash` is salted per process, so nothing here uses it.
"""

import hashlib

import jax
import numpy as np


def stable_hash(*parts):
  """Returns a uint32-range int from the sha256 of the parts' string forms."""
  text = "\x1f".join(str(p) for p in parts)
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "little")


def generation_seed(config):
  """Returns the seed of the spectrum (prompts, generation): `diffusion.seed`, or `seed` when < 0."""
  return int(config.seed) if config.diffusion.seed < 0 else int(config.diffusion.seed)


def job_key(seed, job_id):
  """Returns the PRNG key of job `job_id` under config seed `seed`."""
  return jax.random.fold_in(jax.random.key(seed), stable_hash(job_id))


def numpy_rng(seed, *parts):
  """Returns a numpy Generator seeded from `seed` and stable `parts` (names, epochs)."""
  return np.random.default_rng(np.random.SeedSequence([seed, stable_hash(*parts)]))


def process_owns(job_id, process_index, process_count):
  """Returns True when `job_id` belongs to `process_index` of `process_count`."""
  return stable_hash("process", job_id) % process_count == process_index
