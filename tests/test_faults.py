"""Faults a long run meets: torn appends, a full disk, a read-only workdir, two runs on one
workdir, shared file modes, truncated model files, stray files in the spectrum store."""

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from discl_jax import config as config_lib
from discl_jax import pipeline
from discl_jax import workdir as wd


def _torn(path, rows, fragment='{"job_id": "torn'):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + fragment)


def test_append_trims_a_torn_last_line_first(tmp_path, caplog):
  target = tmp_path / "scores-00000.jsonl"
  _torn(target, [{"a": 1}, {"a": 2}])
  assert wd.read_jsonl(target) == [{"a": 1}, {"a": 2}]
  assert "torn last line" in caplog.text            # a reader says what it dropped
  wd.append_jsonl(target, [{"a": 3}])
  assert target.read_text().splitlines() == ['{"a": 1}', '{"a": 2}', '{"a": 3}']
  assert wd.read_jsonl(target) == [{"a": 1}, {"a": 2}, {"a": 3}]
  only_torn = tmp_path / "metrics.jsonl"
  only_torn.write_text('{"epoch": 0, "val/al')
  assert wd.trim_torn_tail(only_torn) == len('{"epoch": 0, "val/al')
  assert only_torn.read_bytes() == b""
  assert wd.trim_torn_tail(tmp_path / "missing.jsonl") == 0


def test_disk_full_during_append_names_the_file_and_the_rerun_recovers(tmp_path, monkeypatch):
  target = tmp_path / "manifest-00000.jsonl"
  wd.append_jsonl(target, [{"job_id": "a"}])
  real_open = open

  class FullDisk:
    """A text file that writes part of a line, then raises ENOSPC."""

    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, text):
      self.f.write(text[:7])
      self.f.flush()
      raise OSError(errno.ENOSPC, "No space left on device")

  def full_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return FullDisk(f) if mode == "a" else f

  monkeypatch.setattr("builtins.open", full_open)
  with pytest.raises(OSError, match=rf"No space left on device: '{target}'"):
    wd.append_jsonl(target, [{"job_id": "b"}])
  monkeypatch.undo()
  assert target.read_text().endswith('{"job_i')      # the torn fragment is on disk
  wd.append_jsonl(target, [{"job_id": "c"}])         # the rerun trims it, then appends
  assert wd.read_jsonl(target) == [{"job_id": "a"}, {"job_id": "c"}]


def test_atomic_writes_name_the_path_and_leave_no_temp_file(tmp_path, monkeypatch):
  target = tmp_path / "report.md"

  def no_space(fd, data):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(os, "fsync", lambda fd: no_space(fd, b""))
  with pytest.raises(OSError, match=rf"\[Errno 28\] No space left on device: '{target}'"):
    wd.atomic_write_text(target, "hello")
  monkeypatch.undo()

  def read_only(*args, **kwargs):  # what mkstemp meets in a read-only folder (root ignores chmod)
    raise PermissionError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(wd.tempfile, "mkstemp", read_only)
  with pytest.raises(PermissionError, match=rf"Read-only file system: '{target}'"):
    wd.atomic_write_text(target, "hello")
  monkeypatch.undo()
  assert list(tmp_path.iterdir()) == []


def test_files_get_the_process_umask_not_0600(tmp_path):
  old = os.umask(0o022)
  try:
    atomic = wd.atomic_write_text(tmp_path / "report.md", "x")
    appended = wd.append_jsonl(tmp_path / "metrics.jsonl", [{"epoch": 0}])
    assert stat.S_IMODE(atomic.stat().st_mode) == 0o644
    assert stat.S_IMODE(appended.stat().st_mode) == 0o644
    os.umask(0o077)
    assert wd.process_umask() == 0o077
    assert stat.S_IMODE(wd.atomic_write_text(tmp_path / "private", "x").stat().st_mode) == 0o600
  finally:
    os.umask(old)


_HOLDER = textwrap.dedent("""
    import sys, time
    from discl_jax import workdir as wd
    with wd.exclusive(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(60)
""")


def test_one_workdir_one_run(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(wd.WorkdirBusy, match=rf"'{tmp_path}' is in use by another run "
                       rf"\(pid {holder.pid}"):
      with wd.exclusive(tmp_path):
        pass
    with pytest.raises(wd.WorkdirBusy, match=f"pid {holder.pid}"):   # what every stage run takes
      pipeline.run_stages(config_lib.base_config(), tmp_path, ("hard",))
    assert not (tmp_path / wd.HARD).exists() and not (tmp_path / wd.CONFIG).exists()
  finally:
    holder.kill()
    holder.wait()
  with wd.exclusive(tmp_path):                      # released when its holder dies (even SIGKILL)
    with pytest.raises(wd.WorkdirBusy):
      with wd.exclusive(tmp_path):                  # and exclusive within one process too
        pass


def _digits_config():
  c = config_lib.base_config()
  c.data.max_per_class = 30
  c.data.imbalance_ratio = 10.0
  c.data.val_per_class = 2
  c.data.test_per_class = 4
  c.data.image_size = 16
  c.data.many_threshold, c.data.few_threshold = 20, 8
  c.train.model = "tiny"
  c.train.epochs = 1
  c.score.threshold = 0.5
  return c


def test_a_discl_schedule_without_accepted_spectrum_says_which_stage_to_run(tmp_path):
  from discl_jax.data import datasets, spectrum_store  # pylint: disable=g-import-not-at-top
  from discl_jax.stages import train_stage  # pylint: disable=g-import-not-at-top
  config = _digits_config()
  with pytest.raises(FileNotFoundError, match="syn_to_real.*run the generate and score stages"):
    train_stage.train_and_evaluate(config, tmp_path)
  train = datasets.load(config.data)["train"]
  store = spectrum_store.SpectrumStore(wd.path(tmp_path, wd.SPECTRUM), 0, 1)
  rows = [spectrum_store.make_row(source_id=train.ids[i], label=int(train.labels[i]),
                                  class_name="x", strength=0.5, seed=0, prompt="p")
          for i in (-1, -2)]
  for row in rows:
    store.add(row, train.image(0))
  with pytest.raises(ValueError, match="none of the 2 spectrum images .* is scored: run the score"):
    train_stage.train_and_evaluate(config, tmp_path)
  store.add_scores([dict(job_id=r["job_id"], clip_text=0.2, clip_source=0.9, error=None)
                    for r in rows])
  with pytest.raises(ValueError, match=r"reaches score.threshold=0.5 \(best 0.200\)"):
    train_stage.train_and_evaluate(config, tmp_path)
  assert not wd.path(tmp_path, wd.METRICS).exists()
  config.score.threshold = 0.1
  assert [r["job_id"] for r in train_stage.accepted_rows(config, tmp_path)] == sorted(
      r["job_id"] for r in rows)


def test_a_truncated_model_file_is_named(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from discl_jax import digit_models  # pylint: disable=g-import-not-at-top
  from discl_jax.models import weights  # pylint: disable=g-import-not-at-top
  from discl_jax.scoring import clip  # pylint: disable=g-import-not-at-top
  shutil.copytree(digit_models.path("clip"), tmp_path / "clip")
  msgpack = tmp_path / "clip" / clip.FLAX_WEIGHTS
  os.truncate(msgpack, msgpack.stat().st_size // 2)
  with pytest.raises(ValueError, match=rf"cannot read model weights '{msgpack}' .*incomplete input"
                     r".*truncated or damaged"):
    clip.load_clip(str(tmp_path / "clip"))
  torn = tmp_path / "model.safetensors"
  torn.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":")
  with pytest.raises(ValueError, match=rf"cannot read model weights '{torn}'"):
    weights.read_safetensors([torn])


def _metric_rows(epochs):
  return [{"epoch": e, "step": 5 * (e + 1), "loss": 1.0 / (e + 1), "val/all": 0.5 + 0.01 * e}
          for e in range(epochs)]


@pytest.mark.parametrize("damage", ["last_line_lost", "torn", "deleted", "garbled_middle"])
def test_metrics_are_rebuilt_from_the_checkpoints_copy(tmp_path, damage, caplog):
  from discl_jax.train import loop  # pylint: disable=import-outside-toplevel
  target = tmp_path / wd.METRICS
  rows = _metric_rows(20)
  text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
  damaged = {"last_line_lost": "".join(text.splitlines(keepends=True)[:-1]),
             "torn": text[:-30], "deleted": None,
             "garbled_middle": text.replace('"epoch": 7,', '"epoch": 7', 1)}[damage]
  if damaged is not None:
    target.write_text(damaged)
  meta = {"epoch": 20, "history": rows}
  assert loop.restore_metrics(target, meta, tmp_path / "ckpt") == rows
  assert target.read_text() == text
  assert "rebuilt its 20 epoch rows from the checkpoint's copy" in caplog.text


def test_metrics_missing_rows_without_a_copy_are_refused_with_the_remedy(tmp_path):
  from discl_jax.train import loop  # pylint: disable=import-outside-toplevel
  target = tmp_path / wd.METRICS
  rows = _metric_rows(3)
  wd.append_jsonl(target, rows)
  meta = {"epoch": 3}                       # a checkpoint of an older version: no copy
  assert loop.restore_metrics(target, meta, tmp_path / "ckpt") == rows
  wd.atomic_write_text(target, "".join(json.dumps(r) + "\n" for r in rows[:2]))
  with pytest.raises(ValueError, match=rf"{target} holds 2 of the 3 epoch rows .* delete "
                     rf"{tmp_path / 'ckpt'} to train again"):
    loop.restore_metrics(target, meta, tmp_path / "ckpt")


def test_spectrum_dir_may_name_the_workdir_that_holds_the_spectrum(tmp_path):
  from discl_jax.stages import train_stage  # pylint: disable=import-outside-toplevel
  other = tmp_path / "other"
  (other / wd.SPECTRUM).mkdir(parents=True)
  (other / wd.HARD).write_text("")
  c = _digits_config()
  for given in (other, other / wd.SPECTRUM):
    c.data.spectrum_dir = str(given)
    assert train_stage.spectrum_root(c, tmp_path / "w") == other / wd.SPECTRUM
    assert train_stage.hard_path(c, tmp_path / "w") == other / wd.HARD
