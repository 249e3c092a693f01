"""Checkpoint retention (the best epoch survives rotation), init from a run, damaged fallback."""

import errno

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from discl_jax.train import checkpoint as checkpoint_lib
from discl_jax.train import loop

_META = {"epoch": 1, "batches_done": 0, "mid_epoch": False}


def _state(value):
  return {"w": jnp.full((3,), value, jnp.float32), "b": jnp.zeros((2,), jnp.float32)}


def _curriculum():
  return {"gains": np.zeros((2,), np.float32)}


def _save(ckpt, step, value, selection_value):
  ckpt.save(step, state=_state(value), curriculum=_curriculum(), data_iter=None,
            picks=np.zeros((4, 2), np.int64), meta=dict(_META, value=value),
            selection_value=selection_value)


def _filled(directory, values, keep=2):
  """Saves epoch ends (step, selection value) in order; returns the Checkpointer."""
  ckpt = checkpoint_lib.Checkpointer(directory, keep, enable_async=False)
  for step, selection in values:
    _save(ckpt, step, float(step), selection)
  ckpt.wait()
  return ckpt


def test_best_epoch_survives_rotation_and_init_takes_it(tmp_path):
  # Epoch ends at steps 10..40 (val 0.5, 0.9, 0.3, 0.4) and a mid-epoch save at 35.
  ckpt = _filled(tmp_path / "ckpt", [(10, 0.5), (20, 0.9), (30, 0.3), (35, None), (40, 0.4)])
  assert ckpt.all_steps() == [20, 35, 40]
  assert ckpt.best_step() == 20 and ckpt.latest_step() == 40
  ckpt.close()
  # A later process sees the same best; init_checkpoint=<workdir> takes the best epoch.
  again = checkpoint_lib.Checkpointer(tmp_path / "ckpt", 2, enable_async=False)
  assert again.best_step() == 20
  again.close()
  assert checkpoint_lib.state_item(tmp_path) == tmp_path / "ckpt" / "20" / "state"
  assert checkpoint_lib.state_item(tmp_path / "ckpt" / "40") == tmp_path / "ckpt" / "40" / "state"
  restored = checkpoint_lib.restore_host(checkpoint_lib.state_item(tmp_path))
  np.testing.assert_array_equal(restored["w"], np.full(3, 20.0, np.float32))


def test_ties_keep_the_earliest_best_epoch(tmp_path):
  ckpt = _filled(tmp_path, [(5, 0.7), (10, 0.7), (15, 0.2), (20, 0.1)], keep=1)
  assert ckpt.all_steps() == [5, 20] and ckpt.best_step() == 5
  ckpt.close()


@pytest.mark.parametrize("damage", ["delete_item", "truncate_files"])
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, damage, caplog):
  ckpt = _filled(tmp_path, [(10, 0.5), (20, 0.6)])
  ckpt.close()
  state_dir = tmp_path / "20" / "state"
  if damage == "delete_item":
    for item in sorted(state_dir.rglob("*"), reverse=True):
      item.rmdir() if item.is_dir() else item.unlink()
    state_dir.rmdir()
  else:
    for item in state_dir.rglob("*"):
      if item.is_file():
        item.write_bytes(item.read_bytes()[:7])
  with caplog.at_level("WARNING"):
    ckpt = checkpoint_lib.Checkpointer(tmp_path, 2, enable_async=False)
    step, meta, _, state, _ = ckpt.restore_latest(_state(0.0), _curriculum())
  assert step == 10 and meta["value"] == 10.0
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full(3, 10.0, np.float32))
  # A deleted item is seen on start (incomplete), truncated files when restoring (damaged).
  kind = "incomplete" if damage == "delete_item" else "damaged"
  assert "checkpoint" in caplog.text and f"is {kind}" in caplog.text
  assert ckpt.all_steps() == [10]
  assert [p.name.startswith(f"20.{kind}-") for p in tmp_path.iterdir() if p.name != "10"] == [True]
  # Training goes on past the damaged step.
  _save(ckpt, 20, 20.0, 0.6)
  ckpt.close()


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
  ckpt = _filled(tmp_path, [(10, 0.5)])
  for item in (tmp_path / "10" / "state").rglob("*"):
    if item.is_file():
      item.write_bytes(b"")
  with pytest.raises(ValueError, match="no checkpoint in .* restores .*delete that directory"):
    ckpt.restore_latest(_state(0.0), _curriculum())
  ckpt.close()


def test_a_checkpoint_half_deleted_by_a_kill_during_rotation_is_moved_aside_on_start(
    tmp_path, caplog):
  ckpt = _filled(tmp_path, [(10, 0.9), (20, 0.5), (30, 0.6)])
  ckpt.close()
  assert ckpt.all_steps() == [10, 20, 30]
  # orbax deletes a rotated checkpoint's files in parallel, then the folders: a kill leaves
  # some of them.
  files = sorted(p for p in (tmp_path / "20").rglob("*") if p.is_file())
  for item in files[::2]:
    item.unlink()
  with caplog.at_level("WARNING"):
    again = checkpoint_lib.Checkpointer(tmp_path, 2, enable_async=False)
  assert again.all_steps() == [10, 30] and again.best_step() == 10
  (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("20.")]
  assert aside.name.startswith("20.incomplete-") and f"moved it to {aside}" in caplog.text
  assert checkpoint_lib.incomplete(tmp_path / "30") == ""
  again.close()


def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_folder(tmp_path, monkeypatch,
                                                                       caplog):
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt", 2)
  _save(ckpt, 10, 1.0, 0.5)
  ckpt.wait()
  real_write = epath.Path.write_text

  def full_disk(self, *args, **kwargs):
    if "ckpt" in str(self):
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(self, *args, **kwargs)

  monkeypatch.setattr(epath.Path, "write_text", full_disk)
  with caplog.at_level("INFO"), pytest.raises(OSError) as raised:
    _save(ckpt, 20, 2.0, 0.6)
    ckpt.close()
  message = str(raised.value)
  assert message.startswith("[Errno 28] cannot write a checkpoint in ") and "\n" not in message
  assert str(tmp_path / "ckpt") in message and "rerun" in message
  assert not [r for r in caplog.records if r.exc_info]     # no traceback per orbax thread
  monkeypatch.undo()
  again = checkpoint_lib.Checkpointer(tmp_path / "ckpt", 2, enable_async=False)
  assert again.latest_step() == 10                          # nothing lost
  again.close()


def test_the_loops_progress_is_the_checkpoint_meta_of_earlier_versions():
  """A checkpoint's meta dict (as versions with the mutable `meta` dict wrote it) reads into
  `loop.Progress` and writes back unchanged; a fresh run's has no history yet."""
  meta = {"epoch": 3, "batches_done": 2, "segment_start": 1, "mid_epoch": True,
          "best_epoch": 1, "best_val": 0.5, "best": {"val/all": 0.5},
          "plan": {"curriculum_phase": "synthetic"}, "epoch_loss_sum": 1.5,
          "epoch_acc_sum": 0.25, "history": [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]}
  assert loop.Progress.from_meta(meta).to_meta() == meta
  assert list(loop.Progress.from_meta(meta).to_meta()) == list(meta)
  assert loop.Progress().to_meta() == {
      "epoch": 0, "batches_done": 0, "segment_start": 0, "mid_epoch": False, "best_epoch": -1,
      "best_val": -1.0, "best": {}, "plan": None, "epoch_loss_sum": 0.0, "epoch_acc_sum": 0.0}
