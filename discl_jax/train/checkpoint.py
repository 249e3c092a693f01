"""Orbax checkpoints: train state, curriculum state, data iterator and run meta together.

One checkpoint per step id (the global train step) holds the items
  "state"       the TrainState pytree,
  "curriculum"  the CurriculumState pytree (JSON: small, may hold empty arrays),
  "data_iter"   the grain iterator state of the epoch in progress,
  "plan"        that epoch's picks (so a mid-epoch resume replays the same epoch),
  "meta"        JSON: next epoch, batches done in it, level, phase, best-so-far.
Saves are asynchronous; orbax finalises a checkpoint atomically, so a killed
run restores the last complete one. SIGTERM and orbax's multi-host preemption
notice both make `preempted(step)` true so the loop can save and stop.
"""

import pathlib
import signal

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from discl_jax.train import import_torch

ITEMS = ("state", "curriculum", "data_iter", "plan", "meta")


class Checkpointer:
  """Saves and restores the loop's checkpoints under `directory`."""

  def __init__(self, directory, max_to_keep=2, enable_async=True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=enable_async)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._sigterm = False
    self._previous_handler = None

  def watch_sigterm(self):
    """Makes SIGTERM (a preemption notice) set the preempted flag; returns self."""
    def handler(signum, frame):
      del signum, frame
      logging.warning("SIGTERM received: will checkpoint and stop at the next step")
      self._sigterm = True
    try:
      self._previous_handler = signal.signal(signal.SIGTERM, handler)
    except ValueError:
      self._previous_handler = None
    return self

  def preempted(self, step):
    """Returns True when this run should checkpoint at `step` and stop."""
    return self._sigterm or self.manager.reached_preemption(int(step))

  def latest_step(self):
    """Returns the newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def save(self, step, *, state, curriculum, data_iter, picks, meta):
    """Starts an async save of everything at `step`; returns None."""
    args = dict(
        state=ocp.args.StandardSave(state),
        curriculum=ocp.args.JsonSave(tree_to_json(curriculum)),
        plan=ocp.args.JsonSave(tree_to_json({"picks": np.asarray(picks, np.int64)})),
        meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(int(step), args=ocp.args.Composite(**args), force=True)

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
    """Blocks until pending async saves are complete; returns None."""
    self.manager.wait_until_finished()

  def close(self):
    """Finishes pending saves, restores the SIGTERM handler; returns None."""
    self.manager.wait_until_finished()
    self.manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


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


def load_variables(path, target):
  """Returns {"params", "batch_stats"} from the train checkpoint at `path`.

  `path` is a checkpoint directory of this project (the newest step is used),
  one step directory inside it, or that step's "state" item; or a PyTorch
  ResNet checkpoint file (`import_torch`). Shapes must match `target` (a
  TrainState); a mismatch raises ValueError naming the leaves.
  """
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"train.init_checkpoint {str(path)!r} does not exist")
  if path.is_file():
    return import_torch.load_variables(path, target)
  if (path / "state").is_dir():
    path = path / "state"
  elif not (path / "_METADATA").exists() and not (path / "_CHECKPOINT_METADATA").exists():
    steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()), reverse=True)
    if not steps:
      raise ValueError(f"train.init_checkpoint {str(path)!r} holds no checkpoint")
    path = path / str(steps[0]) / "state"
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
