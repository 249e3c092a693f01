"""Device memory of the packed sampler's step as a function of `diffusion.slots`.

XLA's memory analysis of the compiled step at two slot counts gives a linear
model: a fixed part (the UNet's params, the schedule tables, the text
conditioning of the negative prompt) and a part per slot (its latents, its
conditioning and the activations of its two CFG rows). With slots sharded over
`devices` data-parallel devices and params replicated, each device holds the
fixed part and ceil(slots / devices) slots.
"""

import math

GIB = 2**30


def footprint(stats):
  """Returns the bytes a compiled program needs on its device from `memory_analysis()` stats.

  Arguments plus outputs (less those aliased to donated arguments) plus
  temporaries and generated code.
  """
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes
             + stats.generated_code_size_in_bytes)


def linear_fit(slots_a, bytes_a, slots_b, bytes_b):
  """Returns (fixed_bytes, per_slot_bytes) of the line through two (slots, bytes) measurements.

  Raises ValueError for equal slot counts, or a fit with a negative part (the
  measurements do not grow with slots, so a line cannot project them).
  """
  if slots_a == slots_b:
    raise ValueError(f"two different slot counts are needed for a fit, got {slots_a} twice")
  per_slot = (bytes_b - bytes_a) / (slots_b - slots_a)
  fixed = bytes_a - per_slot * slots_a
  if per_slot <= 0 or fixed < 0:
    raise ValueError(f"memory at {slots_a} slots ({bytes_a} B) and {slots_b} slots ({bytes_b} B) "
                     f"gives fixed {fixed:.0f} B and per slot {per_slot:.0f} B: not a usable line")
  return fixed, per_slot


def projected_bytes(fixed_bytes, per_slot_bytes, slots, devices=1):
  """Returns the bytes per device of a step over `slots` global slots on `devices` devices."""
  return fixed_bytes + per_slot_bytes * math.ceil(slots / devices)


def max_slots(fixed_bytes, per_slot_bytes, device_bytes, headroom=0.9, devices=1):
  """Returns the most global slots whose step fits `headroom` x `device_bytes` per device (0: none).

  The count is a multiple of `devices` (the sampler pads slots to one).
  """
  if per_slot_bytes <= 0:
    raise ValueError(f"per_slot_bytes must be positive, got {per_slot_bytes}")
  if not 0 < headroom <= 1:
    raise ValueError(f"headroom must be in (0, 1], got {headroom}")
  budget = headroom * device_bytes - fixed_bytes
  if budget < per_slot_bytes:
    return 0
  return int(budget // per_slot_bytes) * devices
