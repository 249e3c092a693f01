"""Stage `train`: curriculum training from the workdir's data and spectrum.

Reads the accepted spectrum rows (workdir/spectrum, or `data.spectrum_dir`) and
the hard set, checks the run's provenance, then runs the loop
(`train/loop.py`), which writes workdir/ckpt, metrics.jsonl, tb/, predictions.npz
and train_result.json. Rerunning resumes from the latest checkpoint; a finished
run returns at once.
"""

import functools
import pathlib

from absl import logging

from discl_jax import config_checks
from discl_jax import curriculum
from discl_jax import provenance
from discl_jax import workdir as wd
from discl_jax.data import spectrum_store
from discl_jax.diffusion import jobs
from discl_jax.scoring import acceptance
from discl_jax.train import checkpoint as checkpoint_lib
from discl_jax.train import clip_trainer
from discl_jax.train import loop

TRAIN_OUTPUTS = (wd.CKPT, wd.METRICS, wd.TRAIN_RESULT, wd.PREDICTIONS, wd.TENSORBOARD,
                 wd.TIMINGS)


def spectrum_root(config, workdir):
  """Returns the spectrum directory training reads: `data.spectrum_dir` (or its spectrum/ when
  it names a workdir), else workdir/spectrum.

  Raises FileNotFoundError when `data.spectrum_dir` is set and is not a directory.
  """
  if not config.data.spectrum_dir:
    return wd.path(workdir, wd.SPECTRUM)
  root = pathlib.Path(config.data.spectrum_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"data.spectrum_dir {str(root)!r} is not a directory (give "
                            f"another workdir's {wd.SPECTRUM}/ folder)")
  return wd.spectrum_folder(root)


def hard_path(config, workdir):
  """Returns workdir/hard.jsonl, or the one beside `data.spectrum_dir` when this workdir has none."""
  own = wd.path(workdir, wd.HARD)
  if own.exists() or not config.data.spectrum_dir:
    return own
  return wd.spectrum_folder(config.data.spectrum_dir).parent / wd.HARD


def accepted_rows(config, workdir):
  """Returns the spectrum rows of this config's job grid (`jobs.grid_rows`) whose CLIP
  text score is >= `score.threshold`, by job id.

  Raises FileNotFoundError / ValueError naming the stage to run when the
  curriculum has no spectrum, no scores or no accepted image to train on.
  """
  root = spectrum_root(config, workdir)
  rows = spectrum_store.SpectrumStore(root).rows() if root.is_dir() else []
  rows = jobs.grid_rows(rows, config.diffusion)
  accepted = acceptance.accepted_rows(rows, config.score.threshold,
                                      acceptance.max_attempt(config.score))
  if not accepted:
    acceptance.raise_nothing_accepted(rows, config.score.threshold, root,
                                      config.curriculum.schedule)
  return accepted


def config_fingerprint(config):
  """Returns the part of a training run's fingerprint the config alone decides.

  `provenance.fingerprint(config, "train")` and the content hash of
  `train.init_checkpoint`; the pipeline checks it before any stage runs.
  """
  out = provenance.fingerprint(config, "train", reads_spectrum=config.curriculum.schedule
                               not in curriculum.REAL_ONLY_SCHEDULES)
  if config.train.init_checkpoint:
    out["train.init_checkpoint_sha256"] = checkpoint_lib.init_checkpoint_sha256(
        config.train.init_checkpoint)
  return out


def train_fingerprint(config, workdir, accepted_ids):
  """Returns the provenance fingerprint of a training run (`provenance.STAGE_KEYS["train"]`).

  `config_fingerprint`, plus the accepted synthetic set (count and a hash of
  its job ids) and the fingerprints of the spectrum it comes from
  (generation and score).
  """
  out = config_fingerprint(config)
  ids = sorted(accepted_ids)
  out["synthetic.accepted"] = len(ids)
  out["synthetic.accepted_sha256"] = provenance.sha256_bytes("\n".join(ids))
  if ids:
    root = spectrum_root(config, workdir)
    out["synthetic.generation"] = provenance.stored_fingerprint(root / spectrum_store.GENERATION)
    scored = provenance.read_record(root / spectrum_store.SCORE_PROVENANCE) or {}
    out["synthetic.score"] = scored.get("fingerprint", {})
  return out


def load_data(config, workdir):
  """Returns the loop's `loop.Data` of this workdir: splits, accepted synthetic images,
  class groups, curriculum spec.

  The hard images are those of workdir/hard.jsonl (the `hard` stage) when it
  exists, else every training image of a Few class.
  """
  real_only = config.curriculum.schedule in curriculum.REAL_ONLY_SCHEDULES
  rows = [] if real_only else accepted_rows(config, workdir)
  hard_rows = wd.read_jsonl(hard_path(config, workdir))
  hard_ids = {row["source_id"] for row in hard_rows} if hard_rows else None
  return loop.load_data(config, rows, spectrum_root(config, workdir) if rows else None, hard_ids)


def train_and_evaluate(config, workdir):
  """Trains with the configured curriculum on `workdir`'s data and spectrum; returns the
  final metrics dict (`loop.train`), {"preempted": True, ...} when asked to stop."""
  config = config_checks.validate(config)
  workdir = pathlib.Path(workdir)
  data = load_data(config, workdir)
  provenance.check_stage(
      workdir, "train", config, train_fingerprint(config, workdir, data.accepted_ids),
      target=wd.path(workdir, wd.PROVENANCE % "train"),
      outputs=[wd.path(workdir, name) for name in TRAIN_OUTPUTS])
  return loop.train(config, data, workdir,
                    clip_model=functools.partial(clip_trainer.clip_model_path, config, workdir))


def run(config, workdir):
  """Trains and evaluates; returns the final metrics dict.

  Raises SystemExit when the run was preempted (a checkpoint was saved; rerun
  the stage to resume), so later stages do not run on a partial model.
  """
  result = train_and_evaluate(config, workdir)
  if result.get("preempted"):
    raise SystemExit(
        f"train: preempted in epoch {result['epoch']} after batch "
        f"{result['batches_done']}; checkpoint saved in {workdir}, rerun to resume")
  logging.info("train: best epoch %s, test/all %s", result.get("best_epoch"),
               result.get("test/all"))
  return result
