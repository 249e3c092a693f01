"""Where each stage's files live in a workdir, and atomic file writes.

Stages talk only through these files. Writes go to a temp file in the same
folder and are renamed into place, so a killed process never leaves half a file.
"""

import json
import os
import pathlib
import tempfile

import jax

HARD = "hard.jsonl"
PROMPTS = "prompts.json"
SPECTRUM = "spectrum"
MODELS = "models"
CKPT = "ckpt"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
HARD_SUMMARY = "hard_summary.json"  # the hard stage's figures (misclassified rule)
PREDICTIONS = "predictions.npz"   # val/test predictions of the best-val epoch
TRAIN_RESULT = "train_result.json"
REPORT = "report.md"
ACCEPTANCE_PNG = "acceptance.png"  # the score stage's acceptance figure
STAGE_TIMES = "stage_times.json"  # per stage: wall seconds summed over its runs
CONFIG = "config.json"         # {stage: the config its current output was made with}
PROVENANCE = "%s.provenance.json"  # a stage's fingerprint and config, beside its output


def path(workdir, *parts):
  """Returns pathlib.Path of `parts` under `workdir`."""
  return pathlib.Path(workdir, *parts)


def atomic_write_bytes(target, data):
  """Writes `data` to `target` via temp file + rename; returns the Path."""
  target = pathlib.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return target


def atomic_write_text(target, text):
  """Writes `text` (utf-8) to `target` atomically; returns the Path."""
  return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target, obj):
  """Writes `obj` as indented JSON to `target` atomically; returns the Path."""
  return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(target):
  """Returns the list of objects in a JSONL file; a torn last line is ignored.

  A bad line anywhere else raises ValueError naming the file and line number.
  """
  target = pathlib.Path(target)
  if not target.exists():
    return []
  lines = target.read_text(encoding="utf-8").split("\n")
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):
        break
      raise ValueError(f"{target}: line {number} is not valid JSON: {e}") from e
  return rows


def append_jsonl(target, rows):
  """Appends `rows` as JSON lines to `target` and fsyncs; returns the Path."""
  target = pathlib.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(target, "a", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
  return target


def is_main_process():
  """Returns True on process 0, the only one that writes reports and plots."""
  return jax.process_index() == 0
