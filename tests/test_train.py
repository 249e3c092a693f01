"""Training: losses, optimizer, checkpoint encoding, resume after kill, 8 devices = 1.

The loop tests run real curriculum training (tiny ResNet, 16x16 digits-LT and a
spectrum written through `SpectrumStore`) in subprocesses that share a
persistent XLA compilation cache:
  full    an uninterrupted run,
  broken  SIGTERM mid-epoch 1 (mid-epoch checkpoint with the grain iterator
          state), resume in the same process with a checkpoint every K steps
          (one inside epoch 2), then SIGKILL right after epoch 2's metrics row
          (before its checkpoint), then a fresh process resumes from the
          in-epoch checkpoint,
  group   data.num_workers=2 and SIGTERM to the whole process group while the
          grain workers start: the run checkpoints and exits,
  multi   the full run on 8 fake CPU devices.
Checkpoints are named by the global step.
"""

import json
import os
import pathlib
import signal
import shutil
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax.train import checkpoint as checkpoint_lib
from discl_jax.train import losses
from discl_jax.train import optim

EPOCHS = 3

_CHILD = textwrap.dedent("""
    import os
    import pathlib
    import signal
    import sys

    import jax
    from absl import logging
    logging.set_verbosity("info")
    jax.config.update("jax_compilation_cache_dir", sys.argv[3])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from discl_jax import config as config_lib
    from discl_jax import workdir as wd
    from discl_jax.data import pipeline
    from discl_jax.train import checkpoint as checkpoint_lib
    from discl_jax.stages import train_stage
    from discl_jax.train import steps as steps_lib

    def make_config():
      c = config_lib.base_config()
      c.data.name = "digits_lt"
      c.data.imbalance_ratio = 10.0
      c.data.max_per_class = 30
      c.data.val_per_class = 2
      c.data.test_per_class = 4
      c.data.image_size = 16
      c.data.many_threshold = 20
      c.data.few_threshold = 8
      c.score.threshold = 0.2
      c.train.model = "tiny"
      c.train.batch_size = 16
      c.train.epochs = %(epochs)d
      c.train.warmup_steps = 3
      c.train.log_every_steps = 1
      c.eval.batch_size = 32
      c.curriculum.schedule = "syn_to_real"
      c.curriculum.levels = (0.1, 0.3)
      c.curriculum.curriculum_epochs = 2
      c.curriculum.nontail_fraction = 0.5
      c.train.checkpoint_every_steps = int(os.environ.get("CHECKPOINT_EVERY", "0"))
      c.data.num_workers = int(os.environ.get("NUM_WORKERS", "0"))
      c.seed = int(os.environ.get("SEED", "0"))
      c.data.spectrum_dir = os.environ.get("SPECTRUM_DIR", "")
      return c

    def main(workdir, mode):
      if mode == "broken":
        broken(workdir)
      if mode == "group":
        # Marks the start of epoch 1 (its grain workers are about to start).
        make_loader = pipeline.train_loader
        def train_loader(*args, **kwargs):
          if kwargs["epoch"] == 1:
            pathlib.Path(workdir, "epoch1_started").touch()
          return make_loader(*args, **kwargs)
        pipeline.train_loader = train_loader
        print("RESULT", train_stage.train_and_evaluate(make_config(), workdir), flush=True)
        return
      result = train_stage.train_and_evaluate(make_config(), workdir)
      assert "preempted" not in result, result
      print("RESULT", result)

    def broken(workdir):
      # 1) SIGTERM after the 2nd step of epoch 1: the loop saves mid-epoch and returns.
      make_step = steps_lib.make_train_step
      calls = {"n": 0}
      def make_train_step(*args, **kwargs):
        step = make_step(*args, **kwargs)
        def counted(state, batch, lr):
          calls["n"] += 1
          if calls["n"] == int(sys.argv[4]) + 2:
            os.kill(os.getpid(), signal.SIGTERM)
          return step(state, batch, lr)
        return counted
      steps_lib.make_train_step = make_train_step
      result = train_stage.train_and_evaluate(make_config(), workdir)
      assert result["preempted"] and result["epoch"] == 1, result
      steps_lib.make_train_step = make_step
      # 2) resume in this process, saving every CHECKPOINT_EVERY steps (synchronously, so
      # the kill below finds them on disk); SIGKILL once epoch 2's row is written, before
      # its checkpoint: the latest checkpoint is then the one inside epoch 2.
      save = checkpoint_lib.Checkpointer.save
      def save_and_wait(self, *args, **kwargs):
        save(self, *args, **kwargs)
        self.wait()
      checkpoint_lib.Checkpointer.save = save_and_wait
      append = wd.append_jsonl
      def append_then_die(target, rows):
        append(target, rows)
        if rows[-1].get("epoch") == 2:
          os.kill(os.getpid(), signal.SIGKILL)
      wd.append_jsonl = append_then_die

    if __name__ == "__main__":  # grain's spawned workers import this file too
      main(sys.argv[1], sys.argv[2])
""") % {"epochs": EPOCHS}


def _write_spectrum(workdir):
  """Writes two levels of synthetic images for every tail image, some below threshold."""
  from discl_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from discl_jax.data import datasets, longtail, spectrum_store  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.data.name, c.data.imbalance_ratio, c.data.max_per_class = "digits_lt", 10.0, 30
  c.data.val_per_class, c.data.test_per_class = 2, 4
  train = datasets.load(c.data)["train"]
  groups = longtail.class_groups(train.class_counts(), 20, 8)
  store = spectrum_store.SpectrumStore(pathlib.Path(workdir, "spectrum"), 0, 1)
  rng = np.random.default_rng(0)
  scores = []
  for i in np.flatnonzero(groups[train.labels] == "few"):
    for strength in (0.9, 0.7):
      row = spectrum_store.make_row(
          source_id=train.ids[i], label=train.labels[i],
          class_name=train.class_names[train.labels[i]], strength=strength, seed=0,
          prompt="a digit")
      noise = rng.integers(-40, 40, train.image(i).shape)
      store.add(row, np.clip(train.image(i).astype(int) + noise, 0, 255).astype(np.uint8))
      scores.append({"job_id": row["job_id"], "clip_source": 0.9, "error": None,
                     "clip_text": 0.1 if len(scores) % 5 == 4 else 0.5})
  store.add_scores(scores)
  return len(scores)


def _steps_per_epoch0(workdir):
  """Returns the number of train steps epoch 0 takes (from the full run's metrics)."""
  return _metrics(workdir)[0]["step"]


def _child(tmp_root, name, mode, *extra, devices=1, **env_extra):
  """Returns (workdir, argv, env) of one child run; writes the spectrum once (unless the
  run reads another's, SPECTRUM_DIR)."""
  workdir = tmp_root / name
  if not (workdir / "spectrum").exists() and "SPECTRUM_DIR" not in env_extra:
    _write_spectrum(workdir)
  script = tmp_root / "child.py"
  script.write_text(_CHILD)
  env = dict(os.environ, **{k: str(v) for k, v in env_extra.items()})
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  argv = [sys.executable, str(script), str(workdir), mode, str(tmp_root / "xla_cache"), *extra]
  return workdir, argv, env


def _run(tmp_root, name, mode, *extra, devices=1, **env_extra):
  workdir, argv, env = _child(tmp_root, name, mode, *extra, devices=devices, **env_extra)
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
  return workdir, proc


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "ckpt").iterdir() if p.name.isdigit())


def _params(workdir, step=None):
  """Returns (params, batch_stats) of checkpoint `step` (default: the newest)."""
  step = _checkpoint_steps(workdir)[-1] if step is None else step
  restored = checkpoint_lib.restore_host((workdir / "ckpt" / str(step) / "state").absolute())
  return restored["params"], restored["batch_stats"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("train_runs")
  full, proc = _run(root, "full", "full")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root, full


def test_full_run_follows_the_curriculum(runs):
  _, full = runs
  rows = _metrics(full)
  assert [r["epoch"] for r in rows] == list(range(EPOCHS))
  assert [r["curriculum_level"] for r in rows] == [0.1, 0.3, None]
  assert rows[0]["num_synthetic"] > 0 and rows[2]["num_synthetic"] == 0
  assert all(np.isfinite(r["loss"]) for r in rows)
  for key in ("val/many", "val/medium", "val/few", "val/all", "test/all", "lr"):
    assert key in rows[0]
  result = json.loads((full / "train_result.json").read_text())
  best = max(range(EPOCHS), key=lambda e: (rows[e]["val/all"], -e))
  assert result["best_epoch"] == best
  assert result["test/all"] == rows[best]["test/all"]
  assert (full / "predictions.npz").exists() and any((full / "tb").iterdir())
  # Named by global step; keep_checkpoints=2 keeps the last two epochs and the best one.
  assert _checkpoint_steps(full) == sorted({rows[1]["step"], rows[2]["step"], rows[best]["step"]})


@pytest.fixture(scope="module")
def killed(runs):
  """Returns (copy_to(name): a copy of a run killed inside epoch 2, its last checkpoint step)."""
  root, full = runs
  rows = _metrics(full)
  every = rows[1]["step"] + 2  # the only in-epoch checkpoint: 2 steps into epoch 2
  assert every < rows[2]["step"]
  broken, proc = _run(root, "broken", "broken", str(_steps_per_epoch0(full)),
                      CHECKPOINT_EVERY=every)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert "preempted: saved epoch 1" in proc.stderr
  assert [r["epoch"] for r in _metrics(broken)] == [0, 1, 2]
  assert _checkpoint_steps(broken)[-1] == every

  def copy_to(name):
    shutil.copytree(broken, root / name)
    return root / name
  return copy_to, every


def test_killed_and_resumed_run_equals_uninterrupted(runs, killed):
  root, full = runs
  copy_to, every = killed
  copy_to("resumed")
  resumed, proc = _run(root, "resumed", "resume", CHECKPOINT_EVERY=every)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resumed from checkpoint {every}: epoch 2, batch 2" in proc.stderr
  assert _metrics(resumed) == _metrics(full)
  got, want = _params(resumed), _params(full)
  for a, b in zip(_leaves(got), _leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


def test_run_killed_on_one_device_resumes_on_two(runs, killed):
  root, full = runs
  copy_to, every = killed
  copy_to("recount")
  resumed, proc = _run(root, "recount", "resume", devices=2, CHECKPOINT_EVERY=every)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resumed from checkpoint {every}: epoch 2, batch 2" in proc.stderr
  got, want = _metrics(resumed), _metrics(full)
  assert got[:2] == want[:2]  # the epochs finished on one device stay as written
  np.testing.assert_allclose(got[2]["loss"], want[2]["loss"], rtol=1e-4)
  for a, b in zip(_leaves(_params(resumed)), _leaves(_params(full)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_process_group_sigterm_with_workers_checkpoints_and_exits(runs):
  root, _ = runs
  workdir, argv, env = _child(root, "group", "group", NUM_WORKERS=2)
  marker = workdir / "epoch1_started"
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  try:
    deadline = time.time() + 400
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    assert marker.exists(), proc.communicate()[1][-3000:]
    time.sleep(1.0)  # the grain workers of epoch 1 are starting
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM received" in err and "RESULT {'preempted': True, 'epoch': 1" in out
  assert [r["epoch"] for r in _metrics(workdir)] == [0]
  assert _checkpoint_steps(workdir)[-1] > _metrics(workdir)[0]["step"]  # saved inside epoch 1


def test_changed_key_on_a_finished_run_is_refused_and_names_it(runs):
  from discl_jax import provenance  # pylint: disable=g-import-not-at-top
  from discl_jax.stages import train_stage  # pylint: disable=g-import-not-at-top
  _, full = runs
  result = (full / "train_result.json").read_text()
  stored = provenance.stored_config(full / "train.provenance.json")
  stored.train.epochs = 2
  with pytest.raises(ValueError, match=r"^train: .*train\.epochs is 2 now but was 3.*"
                                       r"another --workdir, or delete .*ckpt"):
    train_stage.train_and_evaluate(stored, full)
  stored = provenance.stored_config(full / "train.provenance.json")
  stored.curriculum.schedule = "none"
  with pytest.raises(ValueError, match=r"curriculum\.schedule is 'none' now"):
    train_stage.train_and_evaluate(stored, full)
  stored = provenance.stored_config(full / "train.provenance.json")
  stored.score.threshold = 0.6  # accepts none of the synthetic images: refused up front
  with pytest.raises(ValueError, match=r"none of the \d+ scored spectrum images reaches "
                                       r"score\.threshold=0\.6"):
    train_stage.train_and_evaluate(stored, full)
  stored.score.threshold = 0.05  # also accepts the images scored 0.1: another accepted set
  with pytest.raises(ValueError, match=r"score\.threshold is 0\.05 now.*synthetic\.accepted"):
    train_stage.train_and_evaluate(stored, full)
  assert (full / "train_result.json").read_text() == result


def test_two_training_seeds_share_one_spectrum(runs):
  root, full = runs
  shared, proc = _run(root, "seed1", "full", SEED=1, SPECTRUM_DIR=full / "spectrum")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (shared / "spectrum").exists()
  fingerprints = [json.loads((w / "train.provenance.json").read_text())["fingerprint"]
                  for w in (full, shared)]
  for key in ("synthetic.accepted", "synthetic.accepted_sha256"):
    assert fingerprints[0][key] == fingerprints[1][key]
  assert fingerprints[0]["synthetic.accepted"] > 0
  assert (fingerprints[0]["seed"], fingerprints[1]["seed"]) == (0, 1)
  ours, theirs = _metrics(full), _metrics(shared)
  assert theirs[0]["num_synthetic"] > 0
  assert [r["loss"] for r in ours] != [r["loss"] for r in theirs]


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


def test_eight_devices_match_one(runs):
  root, full = runs
  multi, proc = _run(root, "multi", "full", devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, eight = _metrics(full), _metrics(multi)
  np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in one],
                             rtol=1e-4)
  np.testing.assert_allclose([r["val/loss"] for r in eight], [r["val/loss"] for r in one],
                             rtol=1e-3)
  got, want = _params(multi), _params(full)
  for a, b in zip(_leaves(got), _leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_balanced_softmax_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 3, 0])
  counts = np.array([50, 20, 5, 1])
  shifted = logits + np.log(counts / counts.sum())
  shifted -= shifted.max(axis=1, keepdims=True)
  want = -(shifted[np.arange(6), labels] - np.log(np.exp(shifted).sum(axis=1)))
  got = losses.get_loss("balanced_softmax", counts)(logits, labels)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  ce = losses.get_loss("ce", counts)(logits, labels)
  assert not np.allclose(np.asarray(ce), want)


def test_unknown_loss_and_optimizer_list_valid_names():
  with pytest.raises(ValueError, match="unknown loss 'focal'.*ce, balanced_softmax"):
    losses.get_loss("focal", [1, 2])
  train = ml_collections.ConfigDict(dict(optimizer="lamb", learning_rate=1e-3,
                                         weight_decay=0.0, momentum=0.9))
  with pytest.raises(ValueError, match="unknown optimizer 'lamb'.*adam, adamw, sgd"):
    optim.make_optimizer(train)


def test_learning_rate_warmup_then_cosine():
  train = config_lib.base_config().train
  train.update(learning_rate=1.0, warmup_steps=4)
  assert optim.learning_rate(train, 0, 0.0) == pytest.approx(0.25)
  assert optim.learning_rate(train, 3, 0.0) == pytest.approx(1.0)
  assert optim.learning_rate(train, 10, 0.5) == pytest.approx(0.5)
  assert optim.learning_rate(train, 10, 1.0) == pytest.approx(0.0)


def test_curriculum_tree_json_round_trip_is_exact():
  tree = {"a": np.array([0.1, np.nan, 1e-30], np.float32), "b": np.zeros([3, 0], np.float32),
          "c": np.array(-1, np.int32), "d": np.array(True)}
  encoded = json.loads(json.dumps(checkpoint_lib.tree_to_json(tree)))
  back = checkpoint_lib.tree_from_json(encoded, tree)
  for key in tree:
    assert back[key].dtype == tree[key].dtype and back[key].shape == tree[key].shape
    np.testing.assert_array_equal(back[key], tree[key])


def test_init_checkpoint_loads_weights_and_rejects_other_models(runs):
  import jax  # pylint: disable=g-import-not-at-top
  from discl_jax.models import resnet  # pylint: disable=g-import-not-at-top
  from discl_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  _, full = runs
  train = ml_collections.ConfigDict(dict(optimizer="adam", learning_rate=1e-3,
                                         weight_decay=0.0, momentum=0.9))
  tx = optim.make_optimizer(train)

  def target(name):
    model = resnet.get_model(name, 10)
    return jax.eval_shape(lambda: state_lib.create(model, tx, jax.random.key(0, impl="rbg"), 16))

  variables = checkpoint_lib.load_variables(full, target("tiny"))  # the best epoch's weights
  rows = _metrics(full)
  best = json.loads((full / "train_result.json").read_text())["best_epoch"]
  params, batch_stats = _params(full, rows[best]["step"])
  for a, b in zip(_leaves((variables["params"], variables["batch_stats"])),
                  _leaves((params, batch_stats)), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="does not match the model"):
    checkpoint_lib.load_variables(full / "ckpt", target("resnet32"))
  with pytest.raises(FileNotFoundError, match="init_checkpoint"):
    checkpoint_lib.load_variables(full / "nowhere", target("tiny"))
