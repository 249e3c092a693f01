"""The training loop: curriculum epochs, evaluation, metrics and checkpoints.

`train_and_evaluate(config, workdir)` loads the data and the accepted synthetic
images, builds the curriculum, and per epoch: plans the epoch's samples, trains
on them with the jitted step, evaluates on the `eval.splits` (long-tail: val
and test; iWildCam: id_val, id_test, val, test), appends a row to
`metrics.jsonl` (and TensorBoard under `tb/`) and checkpoints (named by the
global step; also every `train.checkpoint_every_steps` steps inside an epoch).
A killed run resumes from the latest checkpoint to the same result as an
uninterrupted one; a resumed run does not load `train.init_checkpoint` again.
The best epoch is chosen on `{eval.select_split}/{eval.select_metric}` (a
validation split, never a test split); its numbers on every split are reported.

One loop, two trainers picked by the config: `Trainer` (ResNets, CE or
Balanced Softmax) and, for `train.model == "clip"`,
`clip_trainer.ClipTrainer` (FLYP fine-tuning, zero-shot head evaluation).
"""

import dataclasses
import io
import json
import math
import pathlib
import time
import zipfile

import jax
import numpy as np
from absl import logging

from discl_jax import parallel
from discl_jax import progress
from discl_jax import provenance
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax import curriculum
from discl_jax.data import datasets
from discl_jax.data import longtail
from discl_jax.data import pipeline
from discl_jax.data import spectrum_store
from discl_jax.data import transforms
from discl_jax.diffusion import jobs
from discl_jax.evaluation import metrics as metrics_lib
from discl_jax.evaluation import sharded_predict
from discl_jax.evaluation import report
from discl_jax.scoring import acceptance
from discl_jax.models import resnet
from discl_jax.train import checkpoint as checkpoint_lib
from discl_jax.train import clip_trainer
from discl_jax.train import losses
from discl_jax.train import optim
from discl_jax.train import state as state_lib
from discl_jax.train import steps as steps_lib

_SEGMENT_SEEDS = 1_000_000  # a stream segment's loader seed: epoch * this + its first batch


@dataclasses.dataclass
class Data:
  """Everything the loop reads from the workdir and the dataset."""
  train: object
  eval_splits: dict
  synthetic: object
  groups: np.ndarray
  spec: object
  accepted_ids: tuple = ()


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
  """Returns the loop's `Data`: splits, synthetic images, class groups, curriculum spec.

  The hard images are those of workdir/hard.jsonl (the `hard` stage) when it
  exists, else every training image of a Few class.
  """
  splits = datasets.load(config.data)
  eval_names = check_eval_splits(config.eval, splits, config.data.name)
  train = splits["train"]
  groups = longtail.class_groups(train.class_counts(), config.data.many_threshold,
                                 config.data.few_threshold)
  real_only = config.curriculum.schedule in curriculum.REAL_ONLY_SCHEDULES
  rows = [] if real_only else accepted_rows(config, workdir)
  synthetic = (spectrum_store.to_labeled_images(
      rows, train.class_names, spectrum_root(config, workdir)) if rows else None)
  hard_rows = wd.read_jsonl(hard_path(config, workdir))
  hard_ids = {row["source_id"] for row in hard_rows} if hard_rows else None
  spec = curriculum.CurriculumSpec.from_config(
      config.curriculum, train=train, groups=groups, synthetic_rows=rows,
      seed=config.seed, hard_ids=hard_ids,
      rows_per_image=(len(config.train.clip_templates)
                      if config.train.model == clip_trainer.MODEL else 1))
  return Data(train=train, eval_splits={name: splits[name] for name in eval_names},
              synthetic=synthetic, groups=groups, spec=spec,
              accepted_ids=tuple(str(row["job_id"]) for row in rows))


def check_eval_splits(eval_config, splits, data_name="data"):
  """Returns the tuple `eval.splits` after checking them against the loaded `splits`.

  Raises ValueError naming a split the dataset does not have or that is
  empty (and the splits it has), a select_split outside `eval.splits`, a
  test split used for selection, or an unknown select_metric.
  """
  names = tuple(eval_config.splits)
  for name in ("train",) + names:
    if name not in splits:
      raise ValueError(f"data.name={data_name!r} has no split {name!r} (eval.splits="
                       f"{names}); its splits: {sorted(splits)}")
    if not len(splits[name]):
      raise ValueError(f"data.name={data_name!r} gives no {name!r} images; the loop trains "
                       f"on 'train' and evaluates eval.splits={names} (long-tail val: "
                       "data.val_per_class or data.val_list)")
  select = eval_config.select_split
  if select not in names:
    raise ValueError(f"eval.select_split={select!r} is not one of eval.splits={names}")
  if "test" in select:
    raise ValueError(f"eval.select_split={select!r}: the best epoch is chosen on a "
                     "validation split, never on a test split")
  if eval_config.select_metric not in metrics_lib.SELECT_METRICS:
    raise ValueError(f"eval.select_metric={eval_config.select_metric!r}; "
                     f"valid: {', '.join(metrics_lib.SELECT_METRICS)}")
  return names


class Trainer:
  """The model, optimizer, jitted steps and mesh of one run."""

  def __init__(self, config, class_counts, mesh):
    self.config = config
    self.mesh = mesh
    tc = config.train
    _, self.eval_batch = parallel.batch_sizes(tc.batch_size, config.eval.batch_size, mesh)
    self.model = resnet.get_model(tc.model, len(class_counts))
    self.loss_fn = losses.get_loss(tc.loss, class_counts)
    self.tx = optim.make_optimizer(tc)
    self.train_step = steps_lib.make_train_step(self.model, self.tx, self.loss_fn, mesh,
                                                mixup_alpha=tc.mixup_alpha, seed=config.seed)
    self.eval_step = steps_lib.make_eval_step(self.model, mesh)
    self.image_size = config.data.image_size
    self.mean, self.std = transforms.IMAGENET_MEAN, transforms.IMAGENET_STD

  def train_picks(self, picks, epoch):
    """Returns the epoch's training records: the plan's (source, row) picks as they are."""
    del epoch
    return picks

  def batch_inputs(self, batch, sources, epoch):
    """Returns the host arrays of one train batch the step reads: image and label."""
    del sources, epoch
    return {"image": batch["image"], "label": batch["label"]}

  def initial_state(self, load_init=True):
    """Returns the replicated initial TrainState (from `train.init_checkpoint` if set
    and `load_init`; a resumed run's checkpoint replaces it anyway)."""
    # RBG keys: XLA-CPU compiles a threefry ResNet init ~10x slower.
    rng = jax.random.key(seeding.stable_hash("train/init", self.config.seed), impl="rbg")
    state = state_lib.create(self.model, self.tx, rng, self.config.data.image_size)
    if self.config.train.init_checkpoint and load_init:
      variables = checkpoint_lib.load_variables(self.config.train.init_checkpoint, state)
      state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                            opt_state=self.tx.init(variables["params"]))
      logging.info("initialised from %s", self.config.train.init_checkpoint)
    return parallel.put_replicated(state, self.mesh)

  def predict(self, state, split):
    """Returns host dict "pred", "prob_true", "loss", "label" [len(split)], in split order."""
    return sharded_predict.predict_split(
        split, lambda batch: self.eval_step(state, batch), self.mesh, eval_batch=self.eval_batch,
        image_size=self.image_size, on_bad_image=self.config.data.on_bad_image)


def make_trainer(config, data, mesh, workdir):
  """Returns the trainer `train.model` asks for: ClipTrainer for "clip", else Trainer."""
  if config.train.model == clip_trainer.MODEL:
    if config.train.mixup_alpha > 0:
      raise ValueError("train.mixup_alpha > 0 needs a ResNet train.model; FLYP ('clip') has no mixup")
    return clip_trainer.ClipTrainer(config, data.train.class_names, mesh, workdir)
  if config.train.loss == clip_trainer.LOSS:
    raise ValueError(f"train.loss='flyp' needs train.model='clip', got {config.train.model!r}")
  return Trainer(config, data.train.class_counts(), mesh)


def evaluate(trainer, state, split, groups, prefix):
  """Returns ({f"{prefix}/{many|medium|few|all|macro_f1|loss}": value}, predictions).

  Accuracies are fractions in [0, 1] (`evaluation.metrics.split_metrics`).
  """
  out = trainer.predict(state, split)
  row = metrics_lib.split_metrics(prefix, out["pred"], out["label"], groups)
  row[f"{prefix}/loss"] = float(np.mean(out["loss"])) if len(out["loss"]) else float("nan")
  return {k: float(v) for k, v in row.items()}, out


def validation_probs(trainer, state, data):
  """Returns float32 [len(levels) + 1, V]: true-class probabilities of the curriculum
  validation images at each level (rows of the synthetic split) and real (last row)."""
  real_rows, syn_rows = data.spec.validation()
  probs = [trainer.predict(state, data.synthetic.subset(rows))["prob_true"] for rows in syn_rows]
  probs.append(trainer.predict(state, data.train.subset(real_rows))["prob_true"])
  return np.stack(probs).astype(np.float32)


def train_and_evaluate(config, workdir):
  """Trains with the configured curriculum; returns the final metrics dict.

  Writes workdir/ckpt (orbax), workdir/metrics.jsonl, workdir/tb (TensorBoard),
  workdir/predictions.npz (best-val epoch) and workdir/train_result.json.
  Returns {"preempted": True, ...} early when asked to stop (SIGTERM or a
  multi-host preemption notice) after saving a mid-epoch checkpoint. With
  `train.epochs=0` it evaluates `train.init_checkpoint` as it is (`evaluate_as_is`).
  """
  workdir = pathlib.Path(workdir)
  tc = config.train
  mesh = parallel.make_mesh(config.mesh.shape)
  data = load_data(config, workdir)
  provenance.check_stage(
      workdir, "train", config, train_fingerprint(config, workdir, data.accepted_ids),
      target=wd.path(workdir, wd.PROVENANCE % "train"),
      outputs=[wd.path(workdir, name) for name in TRAIN_OUTPUTS])
  sources = [data.train] + ([data.synthetic] if data.synthetic is not None else [])
  trainer = make_trainer(config, data, mesh, workdir)
  trainer.train_step = progress.first_call_notice(trainer.train_step, "the train step")
  select_key = f"{config.eval.select_split}/{config.eval.select_metric}"
  if tc.epochs == 0:
    return evaluate_as_is(trainer, data, workdir, select_key)
  ckpt = checkpoint_lib.Checkpointer(wd.path(workdir, wd.CKPT), tc.keep_checkpoints).watch_sigterm()
  main = wd.is_main_process()

  resuming = ckpt.latest_step() is not None
  state = trainer.initial_state(load_init=not resuming)
  cstate = data.spec.initial_state()
  meta = {"epoch": 0, "batches_done": 0, "segment_start": 0, "mid_epoch": False,
          "best_epoch": -1, "best_val": -1.0,
          "best": {}, "plan": None, "epoch_loss_sum": 0.0, "epoch_acc_sum": 0.0}
  resume_picks = None
  latest = None
  restored = ckpt.restore_latest(state, cstate) if resuming else None
  if restored is not None:
    latest, meta, resume_picks, state, cstate = restored
    logging.info("resumed from checkpoint %d: epoch %d, batch %d", latest,
                 meta["epoch"], meta["batches_done"])
  metrics_path = wd.path(workdir, wd.METRICS)
  history = restore_metrics(metrics_path, meta, ckpt.directory, write=main)
  writer = _tb_writer(workdir, int(state.step) if latest is not None else None) if main else None

  shard = (jax.process_index(), jax.process_count())
  # Adaptive: its curriculum epochs are stretches of a phase stream (curriculum.next_segment),
  # cut where the curriculum measures its validation images; each epoch as long as a plain one.
  stream_steps = curriculum.epoch_steps(data.spec, trainer.train_picks, tc.batch_size)
  epoch = meta["epoch"]
  try:
    while epoch < tc.epochs:
      mid_epoch = bool(meta["mid_epoch"]) and resume_picks is not None
      stream = curriculum.in_stream(data.spec, epoch)
      if mid_epoch:
        picks, plan_summary = resume_picks, meta["plan"]
      elif stream:
        if meta["batches_done"] == 0:
          meta.update(plan=None, epoch_loss_sum=0.0, epoch_acc_sum=0.0)
        cstate, picks, segment = curriculum.next_segment(
            data.spec, cstate, steps_left=stream_steps - meta["batches_done"],
            batch_size=tc.batch_size, records_fn=trainer.train_picks,
            measure=lambda: validation_probs(trainer, state, data))
        plan_summary = curriculum.merge_summaries(meta["plan"], segment)
        meta["segment_start"] = meta["batches_done"]
      else:
        cstate, plan = curriculum.plan_epoch(data.spec, cstate, epoch)
        picks, plan_summary = trainer.train_picks(plan.picks, epoch), plan.summary()
        meta.update(batches_done=0, segment_start=0, epoch_loss_sum=0.0, epoch_acc_sum=0.0)
      resume_picks = None
      segment_start = meta.get("segment_start", 0)
      num_steps = segment_start + len(picks) // tc.batch_size
      epoch_steps = stream_steps if stream else num_steps
      if num_steps == 0:
        logging.warning("epoch %d: %d samples < train.batch_size=%d, no step taken",
                        epoch, len(picks), tc.batch_size)
        iterator = None
      else:
        iterator = iter(pipeline.train_loader(
            sources, picks, image_size=trainer.image_size, batch_size=tc.batch_size,
            seed=config.seed, epoch=epoch * _SEGMENT_SEEDS + segment_start if stream else epoch,
            shuffle=not stream, augment=config.data.augment, shard=shard,
            num_workers=config.data.num_workers, on_bad_image=config.data.on_bad_image,
            mean=trainer.mean, std=trainer.std, recipe=transforms.recipe_for(tc.model),
            crop_scale=config.data.crop_scale, color_jitter=config.data.color_jitter))
      if mid_epoch:
        iterator = ckpt.restore_iterator(latest, iterator)
      batch_index = meta["batches_done"]
      step = int(state.step)
      lr = optim.learning_rate(tc, step, epoch / tc.epochs)
      # Running sums stay on device (float32), so steps dispatch without a host sync.
      sums = {"loss": np.float32(meta["epoch_loss_sum"]),
              "accuracy": np.float32(meta["epoch_acc_sum"])}
      if meta["batches_done"] == 0 or mid_epoch:  # a stream epoch spans several segments
        started, first_batch = time.time(), batch_index
      train_bar = progress.bar(num_steps * tc.batch_size, f"epoch {epoch} ({epoch + 1}/{tc.epochs})",
                               initial=batch_index * tc.batch_size)
      for batch in iterator if iterator is not None else ():
        if batch_index >= num_steps:
          break
        lr = optim.learning_rate(tc, step, (epoch + batch_index / epoch_steps) / tc.epochs)
        images = trainer.batch_inputs(batch, sources, epoch)
        state, step_metrics = trainer.train_step(state, parallel.put_batch(images, mesh), lr)
        sums = {k: sums[k] + step_metrics[k] for k in sums}
        batch_index += 1
        train_bar.update(tc.batch_size)
        if writer is not None and step % tc.log_every_steps == 0:
          writer.add_scalar("train/step_loss", float(step_metrics["loss"]), step)
          writer.add_scalar("train/lr", lr, step)
        step += 1
        if batch_index >= epoch_steps:
          continue  # the epoch-end checkpoint follows
        preempted = ckpt.preempted(step)
        if preempted or (tc.checkpoint_every_steps > 0 and step % tc.checkpoint_every_steps == 0):
          meta.update(epoch=epoch, batches_done=batch_index, segment_start=segment_start,
                      mid_epoch=True, plan=plan_summary,
                      epoch_loss_sum=float(sums["loss"]), epoch_acc_sum=float(sums["accuracy"]))
          ckpt.save(step, state=state, curriculum=cstate, data_iter=iterator, picks=picks,
                    meta=meta)
        if preempted:
          train_bar.close()
          logging.warning("preempted: saved epoch %d after batch %d (step %d)", epoch,
                          batch_index, step)
          return {"preempted": True, "epoch": epoch, "batches_done": batch_index}
      train_bar.close()
      meta.update(batches_done=batch_index, epoch_loss_sum=float(sums["loss"]),
                  epoch_acc_sum=float(sums["accuracy"]))
      if stream and batch_index < epoch_steps:  # the epoch goes on with the stream's next segment
        meta.update(plan=plan_summary, mid_epoch=False)
        continue
      train_seconds = time.time() - started
      row = {"epoch": epoch, "step": int(state.step), "lr": lr,
             "loss": meta["epoch_loss_sum"] / max(batch_index, 1),
             "train_accuracy": meta["epoch_acc_sum"] / max(batch_index, 1)}
      row.update(plan_summary)
      outs = {}
      for name, split in data.eval_splits.items():
        split_row, outs[name] = evaluate(trainer, state, split, data.groups, name)
        row.update(split_row)
      if row[select_key] > meta["best_val"]:
        prefixes = tuple(f"{name}/" for name in data.eval_splits)
        meta.update(best_val=row[select_key], best_epoch=epoch,
                    best={k: v for k, v in row.items() if k.startswith(prefixes)})
        if main:
          _save_predictions(wd.path(workdir, wd.PREDICTIONS), epoch, outs)
      row["best_epoch"] = meta["best_epoch"]
      images = (batch_index - first_batch) * tc.batch_size
      if main:
        wd.append_jsonl(metrics_path, [row])
        wd.append_jsonl(wd.path(workdir, wd.TIMINGS), [
            {"epoch": epoch, "images": images, "seconds": train_seconds}])
        _log_tb(writer, row)
      logging.info("%s", epoch_line(row, tc.epochs, data.eval_splits, images,
                                    time.time() - started, train_seconds))
      history.append(row)
      meta.update(history=history, epoch=epoch + 1, batches_done=0, segment_start=0,
                  mid_epoch=False, plan=None, epoch_loss_sum=0.0, epoch_acc_sum=0.0)
      ckpt.save(int(state.step), state=state, curriculum=cstate, data_iter=iterator,
                picks=picks, meta=meta, selection_value=row[select_key])
      epoch += 1
    rebuild_predictions(wd.path(workdir, wd.PREDICTIONS), ckpt, trainer, data, meta,
                        (state, cstate), write=main)
    result = {"epochs": tc.epochs, "best_epoch": meta["best_epoch"],
              "selected_on": select_key, **meta["best"]}
    if main:
      wd.atomic_write_json(wd.path(workdir, wd.TRAIN_RESULT), result)
    return result
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


def evaluate_as_is(trainer, data, workdir, select_key):
  """Returns the result of `train.epochs=0`: `train.init_checkpoint` evaluated as it is.

  Writes what a trained run writes (one metrics row as epoch 0, no step taken,
  the predictions, train_result.json with "evaluated_as_is"), so the report follows.
  """
  state = trainer.initial_state()
  row, outs = {"epoch": 0, "step": int(state.step), "evaluated_as_is": True}, {}
  for name, split in data.eval_splits.items():
    split_row, outs[name] = evaluate(trainer, state, split, data.groups, name)
    row.update(split_row)
  row["best_epoch"] = 0
  result = {"epochs": 0, "best_epoch": 0, "selected_on": select_key, "evaluated_as_is": True,
            **{k: v for k, v in row.items() if "/" in k}}
  if wd.is_main_process():
    _save_predictions(wd.path(workdir, wd.PREDICTIONS), 0, outs)
    wd.atomic_write_text(wd.path(workdir, wd.METRICS), _json_line(row))
    wd.atomic_write_json(wd.path(workdir, wd.TRAIN_RESULT), result)
  logging.info("train.epochs=0: %s evaluated as it is | %s", trainer.config.train.init_checkpoint,
               " ".join(f"{k} {100 * v:.1f}" for k, v in result.items()
                        if k.endswith("/all")))
  return result


def epoch_line(row, epochs, split_names, images, seconds, train_seconds=None):
  """Returns the log line of one finished epoch: loss, Many / Medium / Few / All (%) per
  split, the curriculum phase and level, seconds and training images/s (over
  `train_seconds`, the training part of `seconds`, when given)."""
  groups = " ".join(
      f"{name} " + " ".join(f"{group.capitalize()} {100 * row.get(f'{name}/{group}', float('nan')):.1f}"
                            for group in ("many", "medium", "few", "all")) + " %"
      for name in split_names)
  train_seconds = seconds if train_seconds is None else train_seconds
  return (f"epoch {row['epoch']} ({row['epoch'] + 1}/{epochs}): loss {row['loss']:.4f} | "
          f"{groups} | {row.get('curriculum_phase', '-')} level {report.level_label(row)} | "
          f"{seconds:.1f} s ({images / max(train_seconds, 1e-9):.0f} img/s training)")


def restore_metrics(target, meta, checkpoints, write=True):
  """Returns the metrics rows of the epochs before `meta["epoch"]`, after rewriting `target`
  (metrics.jsonl) to exactly them when `write`.

  The checkpoint's own copy (meta "history") wins, so a torn, shortened or
  deleted metrics.jsonl is rebuilt. A checkpoint of an older version has no
  copy: then the file's rows are kept, and ValueError names the remedy when
  some are missing.
  """
  history = meta.get("history")
  try:
    on_disk = [r for r in wd.read_jsonl(target) if r.get("epoch", -1) < meta["epoch"]]
  except ValueError:
    if history is None:
      raise
    on_disk = None
  if history is None:
    if [r.get("epoch") for r in on_disk] != list(range(meta["epoch"])):
      raise ValueError(
          f"{target} holds {len(on_disk)} of the {meta['epoch']} epoch rows that the checkpoint "
          f"in {checkpoints} has trained, and that checkpoint (of an older version) keeps no "
          f"copy: restore the file, or delete {checkpoints} to train again from the start")
    history = on_disk
  elif on_disk != history:
    logging.warning("%s: rebuilt its %d epoch rows from the checkpoint's copy (it held %s)",
                    target, len(history), "unreadable lines" if on_disk is None
                    else f"{len(on_disk)} matching rows")
  text = "".join(_json_line(r) for r in history)
  if write and (not target.exists() or target.read_text(encoding="utf-8") != text):
    wd.atomic_write_text(target, text)
  return list(history)


def rebuild_predictions(target, ckpt, trainer, data, meta, targets, write=True):
  """Writes the best epoch's predictions (`target`, predictions.npz) again from its kept
  checkpoint when the file is missing, unreadable or of another epoch; returns True then.

  Every process predicts (the evaluation is sharded); only `write` ones write.
  `targets` is the (train state, curriculum state) structure to restore into.
  """
  best = meta["best_epoch"]
  if best < 0 or predictions_epoch(target) == best:
    return False
  step = ckpt.best_step()
  if step is None or ckpt.restore_meta(step)[0].get("epoch") != best + 1:
    logging.warning("%s is missing or damaged and no kept checkpoint is the best epoch's "
                    "(%d): the report will have no per-class table", target, best)
    return False
  try:
    state, _ = ckpt.restore_states(step, *targets)
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
    logging.warning("%s is missing or damaged and checkpoint %d does not restore (%s): the "
                    "report will have no per-class table", target, step, type(e).__name__)
    return False
  outs = {name: evaluate(trainer, state, split, data.groups, name)[1]
          for name, split in data.eval_splits.items()}
  if write:
    _save_predictions(target, best, outs)
    logging.warning("%s was missing or damaged: wrote it again from checkpoint %d (epoch %d)",
                    target, step, best)
  return True


def predictions_epoch(target):
  """Returns the epoch recorded in predictions file `target`, or None when it is missing or
  unreadable."""
  try:
    with np.load(target) as saved:
      return int(saved["epoch"])
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None


def _json_line(row):
  return json.dumps(row, sort_keys=True) + "\n"


def _tb_writer(workdir, purge_step):
  import tensorboardX  # pylint: disable=g-import-not-at-top
  return tensorboardX.SummaryWriter(str(wd.path(workdir, wd.TENSORBOARD)), purge_step=purge_step)


def _log_tb(writer, row):
  step = row["step"]
  for key, value in row.items():
    if key in ("epoch", "step") or isinstance(value, (str, list)) or value is None:
      continue
    if isinstance(value, (int, float)) and math.isfinite(value):
      writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
  writer.flush()


def _save_predictions(target, epoch, outs):
  buffer = io.BytesIO()
  np.savez(buffer, epoch=epoch,
           **{f"{split}_{k}": out[k] for split, out in outs.items()
              for k in ("pred", "label", "prob_true")})
  wd.atomic_write_bytes(target, buffer.getvalue())
