"""Where each stage's files live in a workdir, and atomic file writes.

Stages talk only through these files. Writes go to a temp file in the same
folder and are renamed into place, so a killed process never leaves half a file.
"""

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import shutil
import tempfile

import jax
from absl import logging

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
TIMINGS = "timings.jsonl"  # per trained epoch (killed runs included): images and training seconds
TIMINGS_REPORT = "timings.md"  # the eval stage's table of stage times and images/s
CONFIG = "config.json"         # {stage: the config its current output was made with}
LOCK = ".discl.lock"  # held (flock) by the one run using the workdir
PROVENANCE = "%s.provenance.json"  # a stage's fingerprint and config, beside its output


def path(workdir, *parts):
  """Returns pathlib.Path of `parts` under `workdir`."""
  return pathlib.Path(workdir, *parts)


def check_workdir(workdir):
  """Returns `workdir` as a Path; ValueError when it is empty, NotADirectoryError naming it
  when it (or a folder above it) is a file."""
  if workdir is None or not str(workdir).strip():
    raise ValueError("--workdir is empty: give the directory for the run's files "
                     "(e.g. --workdir=runs/demo); it is created when missing")
  workdir = pathlib.Path(workdir)
  for folder in (workdir, *workdir.parents):
    if folder.exists():
      if not folder.is_dir():
        raise NotADirectoryError(
            f"--workdir {str(workdir)!r}: {str(folder)!r} is a file, not a directory")
      break
  return workdir


def make_workdir(workdir):
  """Creates `workdir` (and its parents) when missing; returns its Path.

  An OSError (permissions, a read-only or full disk) names the folder.
  """
  target = check_workdir(workdir)
  try:
    target.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise _named(e, target) from e
  return target


def spectrum_folder(path):
  """Returns the spectrum folder `data.spectrum_dir=path` names: `path` itself, or its
  spectrum/ when `path` is the workdir that holds one (it has no manifest of its own)."""
  path = pathlib.Path(path)
  inner = path / SPECTRUM
  if inner.is_dir() and not any(path.glob("manifest-*.jsonl")):
    return inner
  return path


def process_umask():
  """Returns the process umask (read from /proc where possible, so no thread sees it change)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _named(error, target):
  """Returns OSError `error` with `target` as its filename when it names no file."""
  if error.filename is not None:
    return error
  return type(error)(error.errno, error.strerror or os.strerror(error.errno or 0), str(target))


def atomic_write_bytes(target, data):
  """Writes `data` to `target` via temp file + rename; returns the Path.

  The file gets the mode a plain `open` would give (0666 less the umask), not
  mkstemp's 0600, so a shared workdir stays readable. An OSError (disk full,
  read-only folder) names `target` and leaves no temp file behind.
  """
  target = pathlib.Path(target)
  tmp = None
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), 0o666 & ~process_umask())
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except OSError as e:
    if tmp is not None:
      pathlib.Path(tmp).unlink(missing_ok=True)
    raise _named(e, target) from e
  except BaseException:
    if tmp is not None:
      pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return target


def atomic_write_text(target, text):
  """Writes `text` (utf-8) to `target` atomically; returns the Path."""
  return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_folder(target, write):
  """Calls write(staging folder) and moves it to `target` in one rename (replacing it);
  returns the Path. A failed write leaves `target` as it was and no staging folder."""
  target = pathlib.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
  try:
    write(staging)
    if target.exists():
      shutil.rmtree(target)
    os.replace(staging, target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return target


def atomic_write_json(target, obj):
  """Writes `obj` as indented JSON to `target` atomically; returns the Path."""
  return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(target):
  """Returns the list of objects in a JSONL file; a torn last line is dropped with a warning.

  A torn last line (a killed or disk-full append) is what `append_jsonl` trims
  before its next append. A bad line anywhere else raises ValueError naming
  the file and line number.
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
        logging.warning("%s: ignoring its torn last line %d (%d bytes, an interrupted "
                        "append; the next append trims it)", target, number, len(line))
        break
      raise ValueError(f"{target}: line {number} is not valid JSON: {e}") from e
  return rows


def trim_torn_tail(target):
  """Cuts `target` back to its last newline when its last line is torn; returns bytes cut.

  Append-only files (manifest and score shards, metrics.jsonl) call it before
  appending, so a fragment left by a kill or a full disk is never glued to the
  next row.
  """
  target = pathlib.Path(target)
  try:
    with open(target, "r+b") as f:
      size = f.seek(0, os.SEEK_END)
      if size == 0:
        return 0
      f.seek(size - 1)
      if f.read(1) == b"\n":
        return 0
      keep, block = 0, 1 << 16
      position = size
      while position > 0:
        start = max(0, position - block)
        f.seek(start)
        chunk = f.read(position - start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
          keep = start + newline + 1
          break
        position = start
      f.truncate(keep)
      f.flush()
      os.fsync(f.fileno())
  except FileNotFoundError:
    return 0
  except OSError as e:
    raise _named(e, target) from e
  logging.warning("%s: trimmed a torn last line (%d bytes) before appending", target,
                  size - keep)
  return size - keep


def append_jsonl(target, rows):
  """Appends `rows` as JSON lines to `target` and fsyncs; returns the Path.

  A torn last line is trimmed first (`trim_torn_tail`); an OSError names `target`.
  """
  target = pathlib.Path(target)
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    trim_torn_tail(target)
    with open(target, "a", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise _named(e, target) from e
  return target


@contextlib.contextmanager
def reading_weights(target):
  """Re-raises any error while reading weights file `target` as ValueError naming it.

  A truncated msgpack otherwise fails with "Unpack failed: incomplete input"
  and no file name.
  """
  try:
    yield target
  except (FileNotFoundError, PermissionError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (msgpack, safetensors, flax raise many kinds)
    raise ValueError(f"cannot read model weights {str(target)!r} ({type(e).__name__}: {e}); the "
                     "file may be truncated or damaged: copy or download it again") from e


class WorkdirBusy(RuntimeError):
  """Another process holds the workdir's lock."""


@contextlib.contextmanager
def exclusive(workdir):
  """Holds an exclusive lock on `workdir` (flock on workdir/.discl.lock) while inside.

  Raises WorkdirBusy at once, naming the workdir and the holder's pid, when
  another run holds it. The lock goes with the process (also on SIGKILL).
  """
  target = path(workdir, LOCK)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise _named(e, target) from e
      holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
      raise WorkdirBusy(f"workdir {str(workdir)!r} is in use by another run (pid {holder}, "
                        f"lock {target}); wait for it or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    yield target
  finally:
    os.close(fd)


def is_main_process():
  """Returns True on process 0, the only one that writes reports and plots."""
  return jax.process_index() == 0
