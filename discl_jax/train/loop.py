"""The training loop: curriculum epochs, evaluation, metrics and checkpoints.

`train(config, data, out_dir)` takes the data and accepted synthetic images the
train stage read (`load_data`) and runs a step-indexed loop over segments of
records (a plain epoch's plan, or stretches of an adaptive run's phase stream).
Around the steps, periodic events: TensorBoard every `train.log_every_steps`,
a mid-epoch checkpoint every `train.checkpoint_every_steps` (or on
preemption), and at the end of an epoch the evaluation on the `eval.splits`
(long-tail: val and test; iWildCam: id_val, id_test, val, test), a row appended
to `metrics.jsonl` (and TensorBoard under `tb/`) and a checkpoint (named by the
global step). Where the run stands is a small `Progress` record, kept as every
checkpoint's meta. A killed run resumes from the latest checkpoint to the same
result as an uninterrupted one; a resumed run does not load
`train.init_checkpoint` again. The best epoch is chosen on
`{eval.select_split}/{eval.select_metric}` (a validation split, never a test
split); its numbers on every split are reported.

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
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax import curriculum
from discl_jax.data import datasets
from discl_jax.data import longtail
from discl_jax.data import pipeline
from discl_jax.data import spectrum_store
from discl_jax.data import transforms
from discl_jax.evaluation import metrics as metrics_lib
from discl_jax.evaluation import sharded_predict
from discl_jax.evaluation import report
from discl_jax.scoring import clip as clip_lib
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
  """What the loop trains and evaluates on: splits, synthetic images, groups, curriculum."""
  train: object
  eval_splits: dict
  synthetic: object
  groups: np.ndarray
  spec: object
  accepted_ids: tuple = ()


def load_data(config, synthetic_rows, synthetic_root, hard_ids):
  """Returns the loop's `Data`: splits, synthetic images, class groups, curriculum spec.

  `synthetic_rows` are the accepted spectrum rows (their images under
  `synthetic_root`); `hard_ids` the source ids of the hard images, or None for
  every training image of a Few class.
  """
  splits = datasets.load(config.data)
  eval_names = check_eval_splits(config.eval, splits, config.data.name)
  train = splits["train"]
  groups = longtail.class_groups(train.class_counts(), config.data.many_threshold,
                                 config.data.few_threshold)
  rows = synthetic_rows
  synthetic = (spectrum_store.to_labeled_images(rows, train.class_names, synthetic_root)
               if rows else None)
  spec = curriculum.CurriculumSpec.from_config(
      config.curriculum, train=train, groups=groups, synthetic_rows=rows,
      seed=config.seed, hard_ids=hard_ids,
      rows_per_image=len(config.train.clip_templates) if config.train.model == clip_trainer.MODEL else 1)
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


def make_trainer(config, data, mesh, clip_model=None):
  """Returns the trainer `train.model` asks for: ClipTrainer for "clip" (fine-tuning the CLIP
  at `clip_model()`), else Trainer."""
  if config.train.model == clip_trainer.MODEL:
    if config.train.mixup_alpha > 0:
      raise ValueError("train.mixup_alpha > 0 needs a ResNet train.model; FLYP ('clip') has no mixup")
    models = clip_lib.load_clip(clip_model(), "float32")
    return clip_trainer.ClipTrainer(config, data.train.class_names, mesh, None, models=models)
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


@dataclasses.dataclass
class Progress:
  """Where a run stands: the epoch, the batches done in it, the best epoch so far and the
  epoch's running sums. Every checkpoint keeps it as its meta (`to_meta` / `from_meta`)."""
  epoch: int = 0
  batches_done: int = 0
  segment_start: int = 0
  mid_epoch: bool = False
  best_epoch: int = -1
  best_val: float = -1.0
  best: dict = dataclasses.field(default_factory=dict)
  plan: dict | None = None
  epoch_loss_sum: float = 0.0
  epoch_acc_sum: float = 0.0
  history: list | None = None  # the metrics rows of the finished epochs

  @classmethod
  def from_meta(cls, meta):
    """Returns the Progress a checkpoint's meta dict records."""
    return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta})

  def to_meta(self):
    """Returns the checkpoint meta dict (no "history" before the first epoch ends)."""
    meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if self.history is None:
      del meta["history"]
    return meta

  def restart_epoch(self, plan=False):
    """Zeroes the batch count, segment start and running sums (and the plan when `plan`)."""
    self.batches_done, self.segment_start = 0, 0
    self.epoch_loss_sum, self.epoch_acc_sum = 0.0, 0.0
    if plan:
      self.plan = None


@dataclasses.dataclass
class Segment:
  """A stretch of training records fed by one loader: a whole plain epoch, or one stretch of
  an adaptive run's phase stream (several make an epoch)."""
  picks: object
  plan_summary: dict
  stream: bool
  resumed: bool  # restored mid-way from a checkpoint
  iterator: object = None
  num_steps: int = 0  # the epoch's batch index this segment ends at
  epoch_steps: int = 0  # the epoch's batches in all


@dataclasses.dataclass
class Run:
  """The fixed parts of one training run."""
  config: object
  data: Data
  trainer: object
  ckpt: object
  out_dir: pathlib.Path
  writer: object
  select_key: str
  sources: list
  stream_steps: int


def train(config, data, out_dir, clip_model=None):
  """Trains on `data` (a `Data`) with the configured curriculum; returns the final metrics dict.

  Writes into directory `out_dir`: ckpt/ (orbax), metrics.jsonl, tb/ (TensorBoard),
  predictions.npz (best-val epoch) and train_result.json. Returns
  {"preempted": True, ...} early when asked to stop (SIGTERM or a multi-host
  preemption notice) after saving a mid-epoch checkpoint. With
  `train.epochs=0` it evaluates `train.init_checkpoint` as it is (`evaluate_as_is`).
  `clip_model()` returns the CLIP to fine-tune (`train.model == "clip"`).
  """
  tc = config.train
  out_dir = pathlib.Path(out_dir)
  mesh = parallel.make_mesh(config.mesh.shape)
  sources = [data.train] + ([data.synthetic] if data.synthetic is not None else [])
  trainer = make_trainer(config, data, mesh, clip_model)
  trainer.train_step = progress.first_call_notice(trainer.train_step, "the train step")
  select_key = f"{config.eval.select_split}/{config.eval.select_metric}"
  if tc.epochs == 0:
    return evaluate_as_is(trainer, data, out_dir, select_key)
  ckpt = checkpoint_lib.Checkpointer(wd.path(out_dir, wd.CKPT), tc.keep_checkpoints).watch_sigterm()
  writer = None
  try:
    state, cstate, where, resume, history = _start(trainer, data, ckpt, out_dir)
    if wd.is_main_process():
      writer = _tb_writer(out_dir, int(state.step) if resume is not None else None)
    # Adaptive: its curriculum epochs are stretches of a phase stream (curriculum.next_segment),
    # cut where the curriculum measures its validation images; each epoch as long as a plain one.
    run = Run(config, data, trainer, ckpt, out_dir, writer, select_key, sources,
              curriculum.epoch_steps(data.spec, trainer.train_picks, tc.batch_size))
    return _train_epochs(run, state, cstate, where, resume, history)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


def _start(trainer, data, ckpt, out_dir):
  """Returns (train state, curriculum state, Progress, (checkpoint step, picks) or None,
  metrics rows of the finished epochs): the initial ones, or the newest checkpoint's, with
  out_dir's metrics.jsonl rebuilt from its meta."""
  resuming = ckpt.latest_step() is not None
  state = trainer.initial_state(load_init=not resuming)
  cstate = data.spec.initial_state()
  meta, resume = Progress().to_meta(), None
  restored = ckpt.restore_latest(state, cstate) if resuming else None
  if restored is not None:
    latest, meta, picks, state, cstate = restored
    resume = (latest, picks)
    logging.info("resumed from checkpoint %d: epoch %d, batch %d", latest,
                 meta["epoch"], meta["batches_done"])
  history = restore_metrics(wd.path(out_dir, wd.METRICS), meta, ckpt.directory,
                            write=wd.is_main_process())
  return state, cstate, Progress.from_meta(meta), resume, history


def _train_epochs(run, state, cstate, where, resume, history):
  """Returns the final metrics dict after training segment by segment from `where` to the
  last epoch; the end of an epoch evaluates and checkpoints (`_end_epoch`)."""
  tc = run.config.train
  clock = None
  while where.epoch < tc.epochs:
    cstate, segment = _next_segment(run, state, cstate, where, resume)
    resume = None
    if where.batches_done == 0 or segment.resumed:  # a stream epoch spans several segments
      clock = (time.time(), where.batches_done)
    state, lr, preempted = _train_segment(run, state, cstate, where, segment)
    if preempted:
      return {"preempted": True, "epoch": where.epoch, "batches_done": where.batches_done}
    if segment.stream and where.batches_done < segment.epoch_steps:
      where.plan, where.mid_epoch = segment.plan_summary, False  # the stream's next segment
      continue
    _end_epoch(run, state, cstate, where, segment, lr, clock, history)
  rebuild_predictions(wd.path(run.out_dir, wd.PREDICTIONS), run.ckpt, run.trainer, run.data,
                      where.to_meta(), (state, cstate), write=wd.is_main_process())
  result = {"epochs": tc.epochs, "best_epoch": where.best_epoch,
            "selected_on": run.select_key, **where.best}
  if wd.is_main_process():
    wd.atomic_write_json(wd.path(run.out_dir, wd.TRAIN_RESULT), result)
  return result


def _next_segment(run, state, cstate, where, resume):
  """Returns (curriculum state, the Segment to train next): the checkpoint's picks when
  resuming mid-segment, the phase stream's next stretch, or a plain epoch's plan."""
  tc, spec, epoch = run.config.train, run.data.spec, where.epoch
  resumed = where.mid_epoch and resume is not None
  stream = curriculum.in_stream(spec, epoch)
  if resumed:
    picks, plan_summary = resume[1], where.plan
  elif stream:
    if where.batches_done == 0:
      where.restart_epoch(plan=True)
    cstate, picks, stretch = curriculum.next_segment(
        spec, cstate, steps_left=run.stream_steps - where.batches_done,
        batch_size=tc.batch_size, records_fn=run.trainer.train_picks,
        measure=lambda: validation_probs(run.trainer, state, run.data))
    plan_summary = curriculum.merge_summaries(where.plan, stretch)
    where.segment_start = where.batches_done
  else:
    cstate, plan = curriculum.plan_epoch(spec, cstate, epoch)
    picks, plan_summary = run.trainer.train_picks(plan.picks, epoch), plan.summary()
    where.restart_epoch()
  segment = Segment(picks, plan_summary, stream, resumed)
  segment.num_steps = where.segment_start + len(picks) // tc.batch_size
  segment.epoch_steps = run.stream_steps if stream else segment.num_steps
  if segment.num_steps == 0:
    logging.warning("epoch %d: %d samples < train.batch_size=%d, no step taken",
                    epoch, len(picks), tc.batch_size)
  else:
    segment.iterator = iter(_loader(run, segment, epoch, where.segment_start))
  if resumed:
    segment.iterator = run.ckpt.restore_iterator(resume[0], segment.iterator)
  return cstate, segment


def _loader(run, segment, epoch, segment_start):
  """Returns the train loader of `segment`: a stream segment's is seeded by its first batch."""
  config, trainer = run.config, run.trainer
  dc = config.data
  return pipeline.train_loader(
      run.sources, segment.picks, image_size=trainer.image_size,
      batch_size=config.train.batch_size, seed=config.seed,
      epoch=epoch * _SEGMENT_SEEDS + segment_start if segment.stream else epoch,
      shuffle=not segment.stream, augment=dc.augment,
      shard=(jax.process_index(), jax.process_count()), num_workers=dc.num_workers,
      on_bad_image=dc.on_bad_image, mean=trainer.mean, std=trainer.std,
      recipe=transforms.recipe_for(config.train.model), crop_scale=dc.crop_scale,
      color_jitter=dc.color_jitter)


def _train_segment(run, state, cstate, where, segment):
  """Returns (train state, last learning rate, preempted) after the segment's steps.

  Each step is an event point: TensorBoard every `train.log_every_steps`, a
  mid-epoch checkpoint every `train.checkpoint_every_steps` or on preemption.
  """
  tc, epoch, mesh = run.config.train, where.epoch, run.trainer.mesh
  batch_index, step = where.batches_done, int(state.step)
  lr = optim.learning_rate(tc, step, epoch / tc.epochs)
  # Running sums stay on device (float32), so steps dispatch without a host sync.
  sums = {"loss": np.float32(where.epoch_loss_sum), "accuracy": np.float32(where.epoch_acc_sum)}
  bar = progress.bar(segment.num_steps * tc.batch_size, f"epoch {epoch} ({epoch + 1}/{tc.epochs})",
                     initial=batch_index * tc.batch_size)
  for batch in segment.iterator if segment.iterator is not None else ():
    if batch_index >= segment.num_steps:
      break
    lr = optim.learning_rate(tc, step, (epoch + batch_index / segment.epoch_steps) / tc.epochs)
    images = run.trainer.batch_inputs(batch, run.sources, epoch)
    state, step_metrics = run.trainer.train_step(state, parallel.put_batch(images, mesh), lr)
    sums = {k: sums[k] + step_metrics[k] for k in sums}
    batch_index += 1
    bar.update(tc.batch_size)
    if run.writer is not None and step % tc.log_every_steps == 0:
      run.writer.add_scalar("train/step_loss", float(step_metrics["loss"]), step)
      run.writer.add_scalar("train/lr", lr, step)
    step += 1
    if batch_index >= segment.epoch_steps:
      continue  # the epoch-end checkpoint follows
    preempted = run.ckpt.preempted(step)
    if preempted or (tc.checkpoint_every_steps > 0 and step % tc.checkpoint_every_steps == 0):
      where.mid_epoch, where.plan = True, segment.plan_summary
      _record_batches(where, batch_index, sums)
      run.ckpt.save(step, state=state, curriculum=cstate, data_iter=segment.iterator,
                    picks=segment.picks, meta=where.to_meta())
    if preempted:
      bar.close()
      logging.warning("preempted: saved epoch %d after batch %d (step %d)", epoch,
                      batch_index, step)
      return state, lr, True
  bar.close()
  _record_batches(where, batch_index, sums)
  return state, lr, False


def _record_batches(where, batch_index, sums):
  where.batches_done = batch_index
  where.epoch_loss_sum, where.epoch_acc_sum = float(sums["loss"]), float(sums["accuracy"])


def _end_epoch(run, state, cstate, where, segment, lr, clock, history):
  """Evaluates the finished epoch on every eval split, appends its metrics row, keeps the
  best epoch's predictions and checkpoints; moves `where` to the next epoch."""
  tc, epoch, out_dir = run.config.train, where.epoch, run.out_dir
  started, first_batch = clock
  train_seconds = time.time() - started
  batches = where.batches_done
  row = {"epoch": epoch, "step": int(state.step), "lr": lr,
         "loss": where.epoch_loss_sum / max(batches, 1),
         "train_accuracy": where.epoch_acc_sum / max(batches, 1)}
  row.update(segment.plan_summary)
  outs = {}
  for name, split in run.data.eval_splits.items():
    split_row, outs[name] = evaluate(run.trainer, state, split, run.data.groups, name)
    row.update(split_row)
  if row[run.select_key] > where.best_val:
    prefixes = tuple(f"{name}/" for name in run.data.eval_splits)
    where.best_val, where.best_epoch = row[run.select_key], epoch
    where.best = {k: v for k, v in row.items() if k.startswith(prefixes)}
    if wd.is_main_process():
      _save_predictions(wd.path(out_dir, wd.PREDICTIONS), epoch, outs)
  row["best_epoch"] = where.best_epoch
  images = (batches - first_batch) * tc.batch_size
  if wd.is_main_process():
    wd.append_jsonl(wd.path(out_dir, wd.METRICS), [row])
    wd.append_jsonl(wd.path(out_dir, wd.TIMINGS), [
        {"epoch": epoch, "images": images, "seconds": train_seconds}])
    _log_tb(run.writer, row)
  logging.info("%s", epoch_line(row, tc.epochs, run.data.eval_splits, images,
                                time.time() - started, train_seconds))
  history.append(row)
  where.history, where.epoch, where.mid_epoch = history, epoch + 1, False
  where.restart_epoch(plan=True)
  run.ckpt.save(int(state.step), state=state, curriculum=cstate, data_iter=segment.iterator,
                picks=segment.picks, meta=where.to_meta(), selection_value=row[run.select_key])


def evaluate_as_is(trainer, data, out_dir, select_key):
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
    _save_predictions(wd.path(out_dir, wd.PREDICTIONS), 0, outs)
    wd.atomic_write_text(wd.path(out_dir, wd.METRICS), _json_line(row))
    wd.atomic_write_json(wd.path(out_dir, wd.TRAIN_RESULT), result)
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


def _tb_writer(out_dir, purge_step):
  import tensorboardX  # pylint: disable=g-import-not-at-top
  return tensorboardX.SummaryWriter(str(wd.path(out_dir, wd.TENSORBOARD)), purge_step=purge_step)


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
