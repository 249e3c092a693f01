"""Orbax checkpoints: train state, curriculum state, data iterator and run meta together.

One checkpoint per global train step (its directory name) holds the items
  "state"       the TrainState pytree,
  "curriculum"  the CurriculumState pytree (JSON: small, may hold empty arrays),
  "data_iter"   the grain iterator state of the epoch in progress,
  "plan"        that epoch's picks (so a mid-epoch resume replays the same epoch),
  "meta"        JSON: next epoch, batches done in it, level, phase, best-so-far.
and, for the checkpoint at an epoch's end, orbax's "metrics" item: the value
the best epoch is chosen on. Retention keeps the newest `max_to_keep`
checkpoints and, beside them, the best epoch's (the weights report.md
describes), so rotation never deletes the reported model.
Saves are asynchronous; orbax finalises a checkpoint atomically, so a killed
run restores the last complete one, and a damaged one (torn, partly deleted)
is moved aside with a warning for the previous intact one. SIGTERM, SIGINT
(Ctrl-C) and orbax's multi-host preemption notice all make `preempted(step)`
true so the loop can save and stop.
"""

import contextlib
import errno
import hashlib
import logging as std_logging
import pathlib
import signal
import sys
import threading
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from discl_jax.models import resnet_weights as import_torch

ITEMS = ("state", "curriculum", "data_iter", "plan", "meta")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
NOT_AN_EPOCH_END = -1.0  # the selection value of a mid-epoch checkpoint: below any accuracy


def selection_key(metrics):
  """Returns the sort key of a checkpoint's metrics: higher value, then earlier step, is better."""
  return (float(metrics["value"]), -int(metrics["step"]))


def _options(max_to_keep, enable_async=True, read_only=False):
  keep = ocp.checkpoint_managers
  policy = keep.AnyPreservationPolicy([
      keep.LatestN(n=max_to_keep),
      keep.BestN(get_metric_fn=selection_key, n=1, keep_checkpoints_without_metrics=False)])
  return ocp.CheckpointManagerOptions(
      create=not read_only, read_only=read_only, enable_async_checkpointing=enable_async,
      best_fn=selection_key, best_mode="max",
      preservation_policy=None if read_only else policy)


class Checkpointer:
  """Saves and restores the loop's checkpoints under `directory`."""

  def __init__(self, directory, max_to_keep=2, enable_async=True):
    if max_to_keep < 1:
      raise ValueError(f"train.keep_checkpoints={max_to_keep}: keep at least 1 checkpoint")
    self.directory = pathlib.Path(directory).absolute()
    if jax.process_index() == 0:
      move_incomplete_aside(self.directory)
    self.manager = ocp.CheckpointManager(self.directory,
                                         options=_options(max_to_keep, enable_async))
    drop_shutdown_race_errors()
    self._stop_signal = None
    self._previous_handlers = {}

  def watch_sigterm(self):
    """Makes SIGTERM or SIGINT set the preempted flag; returns self.

    A second SIGINT interrupts at once. The calling (main) thread also blocks
    both signals until `close`, so the data loader's worker processes it
    starts inherit the block: a signal to the whole process group (a
    scheduler, Ctrl-C) leaves them running until the loop has saved and
    closed them, instead of killing them under a main process that then
    waits for their batches forever.
    """
    def handler(signum, frame):
      name = signal.Signals(signum).name
      if self._stop_signal is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt
      logging.warning("%s received: will checkpoint and stop at the next step", name)
      self._stop_signal = name
    try:
      for signum in STOP_SIGNALS:
        self._previous_handlers[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: the caller handles signals
      return self
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    return self

  def preempted(self, step):
    """Returns True when this run should checkpoint at `step` and stop."""
    if self._stop_signal is None and self._previous_handlers:
      pending = signal.sigtimedwait(STOP_SIGNALS, 0)  # one no thread took (all block it)
      if pending is not None:
        self._stop_signal = signal.Signals(pending.si_signo).name
        logging.warning("%s received: will checkpoint and stop at the next step",
                        self._stop_signal)
    return self._stop_signal is not None or self.manager.reached_preemption(int(step))

  def latest_step(self):
    """Returns the newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def best_step(self):
    """Returns the step of the best epoch-end checkpoint kept, or None."""
    return best_step(self.manager)

  def all_steps(self):
    """Returns the steps of every checkpoint kept, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step, *, state, curriculum, data_iter, picks, meta, selection_value=None):
    """Starts an async save of everything at `step`; returns None.

    `selection_value` (the epoch's `{select_split}/{select_metric}`) marks an
    epoch-end checkpoint that may be kept as the best; None marks a mid-epoch one.
    An existing checkpoint at `step` (an epoch that took no step) is replaced.
    """
    step = int(step)
    if step in self.manager.all_steps():
      self.wait()
      self.manager.delete(step)
    end = selection_value is not None
    value = float(selection_value) if end and np.isfinite(selection_value) else NOT_AN_EPOCH_END
    metrics = {"value": value, "step": step, "epoch_end": end}
    args = dict(
        state=ocp.args.StandardSave(state),
        curriculum=ocp.args.JsonSave(tree_to_json(curriculum)),
        plan=ocp.args.JsonSave(tree_to_json({"picks": np.asarray(picks, np.int64)})),
        meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    with self._naming_write_errors():
      self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)

  def restore_latest(self, state_target, curriculum_target):
    """Returns (step, meta, picks, train state, curriculum state) of the newest intact checkpoint.

    Returns None when there is no checkpoint. A checkpoint that fails to
    restore (torn, partly deleted) is moved aside to `<step>.damaged-<time>`
    with a warning and the previous one is tried; ValueError when none restores.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      try:
        meta, picks = self.restore_meta(step)
        if meta.get("mid_epoch") and not self.has_item(step, "data_iter"):
          raise FileNotFoundError("item 'data_iter' of a mid-epoch checkpoint is missing")
        state, curriculum = self.restore_states(step, state_target, curriculum_target)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        continue
      for bad, reason in damaged:
        moved = self._move_aside(bad)
        logging.warning("checkpoint %s is damaged (%s); moved it to %s and resumed from "
                        "checkpoint %d", self.directory / str(bad), reason, moved, step)
      return step, meta, picks, state, curriculum
    if damaged:
      listing = "; ".join(f"{step}: {reason}" for step, reason in damaged)
      raise ValueError(f"no checkpoint in {self.directory} restores ({listing}); delete "
                       "that directory to train from the start")
    return None

  def _move_aside(self, step):
    """Renames checkpoint `step` so orbax no longer lists it; returns the new path."""
    source = self.directory / str(step)
    target = source.with_name(f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0 and source.exists():
      source.rename(target)
    self.manager.reload()
    return target

  def restore_meta(self, step):
    """Returns the meta dict and the epoch's picks of checkpoint `step`."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(), plan=ocp.args.JsonRestore()))
    picks = tree_from_json(out["plan"], {"picks": np.zeros([0, 2], np.int64)})["picks"]
    return dict(out["meta"]), picks

  def restore_states(self, step, state_target, curriculum_target):
    """Returns (train state, curriculum state) of `step` shaped like the targets.

    `state_target` may hold arrays or ShapeDtypeStructs with shardings; the
    restored arrays take those shardings. `curriculum_target` gives the
    curriculum state's structure.
    """
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state_target)),
        curriculum=ocp.args.JsonRestore()))
    return out["state"], tree_from_json(out["curriculum"], curriculum_target)

  def restore_iterator(self, step, data_iter):
    """Returns `data_iter` moved to its position saved at `step`."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return out["data_iter"]

  def has_item(self, step, name):
    """Returns True when checkpoint `step` holds item `name`."""
    return (self.directory / str(step) / name).exists()

  def wait(self):
    """Blocks until pending async saves are complete; returns None.

    A save that failed (a full disk) raises OSError naming the checkpoint
    directory and the remedy; the checkpoints before it are intact.
    """
    with self._naming_write_errors():
      self.manager.wait_until_finished()

  def close(self):
    """Finishes pending saves, restores the signal handlers and mask; returns None."""
    try:
      self.wait()
    finally:
      self._close_manager()
    if self._previous_handlers:
      signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # delivers a pending one here
      for signum, previous in self._previous_handlers.items():
        signal.signal(signum, previous)
      self._previous_handlers = {}

  def _close_manager(self):
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if not is_write_error(e):  # else the failed save that `wait` already reported
        raise

  @contextlib.contextmanager
  def _naming_write_errors(self):
    """Re-raises a failed (background) checkpoint write as one OSError line naming the
    directory and the remedy."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if not is_write_error(e):
        raise
      reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(":")[0]
      raise OSError(getattr(e, "errno", None) or errno.ENOSPC,
                    f"cannot write a checkpoint in {self.directory} ({reason}): free space "
                    "(or fix the folder) and rerun; training resumes from the last complete "
                    "checkpoint") from e


def is_write_error(error):
  """Returns True for what a failed checkpoint write raises: an OSError (a full disk, a
  read-only folder) or tensorstore's RESOURCE_EXHAUSTED / failed-write errors."""
  return isinstance(error, OSError) or any(
      mark in str(error) for mark in ("RESOURCE_EXHAUSTED", "Failed writing", "No space left"))


class _OrbaxWriteErrors(std_logging.Filter):
  """Drops orbax's own error logs of a failed checkpoint write (one traceback per
  background thread); `Checkpointer` raises the error as one line."""

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not ("orbax" in record.pathname and error is not None and (
        is_write_error(error) or _is_shutdown_race(error)))


_ORBAX_WRITE_ERRORS = _OrbaxWriteErrors()


_SHUTDOWN_RACES = ("Event loop is closed", "cannot schedule new futures after")
_hooks_installed = []


def _is_shutdown_race(error):
  return isinstance(error, RuntimeError) and str(error).startswith(_SHUTDOWN_RACES)


def drop_shutdown_race_errors():
  """Installs (once per process) exception hooks that drop the "Event loop is closed" errors
  tensorstore's callback threads raise after orbax has given up on a damaged or unwritable
  checkpoint (one traceback per array otherwise, also at exit), and a log filter that
  drops orbax's tracebacks of a failed write, which `Checkpointer` raises as one line;
  every other error is shown as before. Returns None."""
  if _hooks_installed:
    return
  hooks = sys.excepthook, threading.excepthook, sys.unraisablehook
  _hooks_installed.append(hooks)
  logging.get_absl_logger().addFilter(_ORBAX_WRITE_ERRORS)

  def excepthook(kind, error, trace):
    if not _is_shutdown_race(error):
      hooks[0](kind, error, trace)

  def thread_hook(args):
    if not _is_shutdown_race(args.exc_value):
      hooks[1](args)

  def unraisable_hook(args):
    if not _is_shutdown_race(args.exc_value):
      hooks[2](args)

  sys.excepthook, threading.excepthook, sys.unraisablehook = (
      excepthook, thread_hook, unraisable_hook)


def incomplete(step_dir):
  """Returns what checkpoint directory `step_dir` lacks (a file of every item's layout, or
  an emptied data folder), "" when it looks whole: a deletion cut short by a kill leaves
  a step directory that orbax still lists."""
  step_dir = pathlib.Path(step_dir)
  needed = ["_CHECKPOINT_METADATA", "state/_METADATA"] + [
      f"{item}/metadata" for item in ("curriculum", "plan", "meta")]
  missing = [name for name in needed if not (step_dir / name).is_file()]
  emptied = [d.relative_to(step_dir).as_posix() for d in step_dir.glob("state/**/d")
             if d.is_dir() and not any(d.iterdir())]
  return ", ".join(missing + [f"{name}/ (empty)" for name in emptied])


def move_incomplete_aside(directory):
  """Renames the step directories under `directory` that `incomplete` finds (half-deleted
  by a kill during rotation) to `<step>.incomplete-<time>`, so orbax no longer lists
  them; returns the new paths."""
  moved = []
  for step_dir in sorted(pathlib.Path(directory).glob("*")):
    if not (step_dir.is_dir() and step_dir.name.isdigit()):
      continue
    lacking = incomplete(step_dir)
    if lacking:
      target = step_dir.with_name(f"{step_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
      step_dir.rename(target)
      moved.append(target)
      logging.warning("checkpoint %s is incomplete (no %s: a deletion or write cut short); "
                      "moved it to %s (delete it when you like)", step_dir, lacking, target)
  return moved


def tree_to_json(tree):
  """Returns a JSON-ready dict of the numpy leaves of `tree` (exact for float32/ints)."""
  leaves = jax.tree.leaves(tree)
  return {"leaves": [{"dtype": np.asarray(x).dtype.str, "shape": list(np.shape(x)),
                      "data": np.asarray(x).reshape(-1).tolist()} for x in leaves]}


def tree_from_json(obj, target):
  """Returns `target`'s structure filled with the leaves stored by `tree_to_json`."""
  treedef = jax.tree.structure(target)
  stored = obj["leaves"]
  if len(stored) != treedef.num_leaves:
    raise ValueError(f"checkpoint holds {len(stored)} leaves, expected {treedef.num_leaves}")
  leaves = [np.asarray(leaf["data"], dtype=np.dtype(leaf["dtype"])).reshape(leaf["shape"])
            for leaf in stored]
  return jax.tree.unflatten(treedef, leaves)


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_host(path):
  """Returns the pytree item at `path` (e.g. ckpt/<step>/state) as host numpy arrays.

  Works whatever device count saved it (the saved shardings are ignored). The
  item is read by its handler directly: an item directory has no step metadata,
  which a Checkpointer would warn about.
  """
  handler = ocp.StandardCheckpointHandler()
  item = pathlib.Path(path)
  tree = handler.metadata(item).tree
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
  return handler.restore(item, args=ocp.args.StandardRestore(target))


def best_step(manager):
  """Returns the step of `manager`'s best epoch-end checkpoint, or None when it has none."""
  ends = [(selection_key(m), step) for step in manager.all_steps()
          if (m := manager.metrics(step)) is not None and m.get("epoch_end")]
  return max(ends)[1] if ends else None


def state_item(path):
  """Returns the "state" item directory `train.init_checkpoint=path` names.

  `path` is a workdir of this project or its checkpoint directory (the best
  epoch's checkpoint is used; the newest when none is marked), one step
  directory inside it, or that step's "state" item.
  """
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"train.init_checkpoint {str(path)!r} does not exist")
  if (path / "ckpt").is_dir():
    path = path / "ckpt"
  if (path / "state").is_dir():
    return path / "state"
  if (path / "_METADATA").exists() or (path / "_CHECKPOINT_METADATA").exists():
    return path
  steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()), reverse=True)
  if not steps:
    raise ValueError(f"train.init_checkpoint {str(path)!r} holds no checkpoint")
  manager = ocp.CheckpointManager(path, options=_options(None, read_only=True))
  try:
    chosen = best_step(manager)
  finally:
    manager.close()
  return path / str(steps[0] if chosen is None else chosen) / "state"


def init_checkpoint_sha256(path):
  """Returns the content hash of what `train.init_checkpoint=path` loads (`state_item`).

  A file, or a directory that holds no checkpoint of ours, counts as a whole.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    try:
      path = state_item(path)
    except ValueError:
      pass
  return content_sha256(path)


def content_sha256(path):
  """Returns the sha256 hex digest of the file `path`, or of every file under it
  (relative names and bytes)."""
  digest = hashlib.sha256()
  root = pathlib.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"{str(root)!r} does not exist")
  files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
  for item in files:
    digest.update(str(item.relative_to(root) if item != root else "").encode("utf-8") + b"\0")
    with open(item, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()


def load_variables(path, target):
  """Returns {"params", "batch_stats"} from the train checkpoint `path` names (`state_item`),
  or from a PyTorch ResNet checkpoint file (`import_torch`).

  Shapes must match `target` (a TrainState); a mismatch raises ValueError
  naming the leaves.
  """
  if pathlib.Path(path).is_file():
    return import_torch.load_variables(pathlib.Path(path).absolute(), target)
  path = state_item(path)
  restored = restore_host(path)
  variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
  wanted = {"params": target.params, "batch_stats": target.batch_stats}
  got_shapes = {jax.tree_util.keystr(k): tuple(v.shape)
                for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  want_shapes = {jax.tree_util.keystr(k): tuple(v.shape)
                 for k, v in jax.tree_util.tree_leaves_with_path(wanted)}
  if got_shapes != want_shapes:
    bad = sorted(k for k in set(got_shapes) | set(want_shapes)
                 if got_shapes.get(k) != want_shapes.get(k))
    raise ValueError(f"train.init_checkpoint {str(path)!r} does not match the model "
                     f"(config train.model); differing leaves: {bad[:10]}")
  return variables
