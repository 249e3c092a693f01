"""Stage `score`: CLIP scores for every generated image, then the acceptance report.

For each manifest row without a score this computes the cosine similarity of
the image to its class text (`score.text_template`) and to its source image,
and appends it to this process's score shard after every batch, so a killed
run resumes with the rows it had not scored. An image that cannot be read gets
a score row with an error naming its path: excluded from acceptance, listed in
the report, and scored again by the next run (after `generate` has remade
it). With `score.regenerate`, rounds of regeneration attempts follow
(`diffusion.regeneration`): each round generates an attempt of every job whose
attempts so far all scored at or below the threshold, into the same store, and
scores it; a killed run resumes at the round and job it reached. Process 0 then
writes workdir/acceptance.json and acceptance.png (of each job's best attempt).
"""

import concurrent.futures
import json

import jax
import numpy as np
from absl import logging

from discl_jax import parallel
from discl_jax import progress
from discl_jax import provenance
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.data import class_names as class_names_lib
from discl_jax.data import datasets
from discl_jax.data import records
from discl_jax.data import spectrum_store
from discl_jax.data import upsample
from discl_jax.diffusion import jobs
from discl_jax.diffusion import regeneration
from discl_jax.diffusion import spectrum_run
from discl_jax.evaluation import spectrum_grid
from discl_jax.scoring import acceptance
from discl_jax.scoring import clip
from discl_jax.scoring import preprocess

ACCEPTANCE_JSON = "acceptance.json"
ACCEPTANCE_PNG = "acceptance.png"


def check_template(template):
  """Returns `template`; ValueError when it lacks the class placeholder {c}."""
  if "{c}" not in template:
    raise ValueError(f"score.text_template {template!r} must contain '{{c}}' (the class name)")
  return template


def class_texts(template, class_names):
  """Returns template.format(c=name) per class name."""
  return [check_template(template).format(c=name) for name in class_names]


class SourceImages:
  """The real images spectra were made from, found by source id over all splits."""

  def __init__(self, splits):
    self._where = {}
    for split in splits.values():
      for index, source_id in enumerate(split.ids):
        self._where.setdefault(str(source_id), (split, index))

  def missing(self, source_ids):
    """Returns the sorted ids in `source_ids` that no split holds."""
    return sorted(set(source_ids) - self._where.keys())

  def image(self, source_id):
    """Returns the uint8 image of `source_id`; BadImageError names an unreadable file."""
    split, index = self._where[source_id]
    return split.image(index)


def _load_chunk(store, chunk, spec):
  """Returns (rows read, their uint8 crops, error score rows) for one batch of rows."""
  rows, crops, errors = [], [], []
  for row in chunk:
    try:
      crops.append(preprocess.resize_and_crop(store.read_image(row), spec))
      rows.append(row)
    except records.BadImageError as e:
      errors.append(dict(job_id=row["job_id"], clip_text=None, clip_source=None, error=str(e)))
  return rows, crops, errors


def score_rows(scorer, store, rows, text_embeddings, sources, bar=None):
  """Scores `rows` batch by batch, appending each batch's score rows to `store`.

  `text_embeddings` maps label -> embedding; `sources` is a SourceImages.
  Returns the number of rows scored (errors included).
  """
  spec = scorer.models.preprocess
  source_embeddings = {}
  chunks = [rows[i:i + scorer.batch_size] for i in range(0, len(rows), scorer.batch_size)]
  done = 0
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = pool.submit(_load_chunk, store, chunks[0], spec) if chunks else None
    for number in range(len(chunks)):
      good, crops, errors = pending.result()
      if number + 1 < len(chunks):
        pending = pool.submit(_load_chunk, store, chunks[number + 1], spec)
      _embed_sources(scorer, sources, {r["source_id"] for r in good}, source_embeddings)
      scores = list(errors)
      if good:
        embeddings = scorer.pixel_embeddings(np.stack(crops))
        for row, embedding in zip(good, embeddings):
          source = source_embeddings.get(row["source_id"])
          scores.append(dict(
              job_id=row["job_id"], error=None, sha256=row.get("sha256"),
              clip_text=float(embedding @ text_embeddings[int(row["label"])]),
              clip_source=None if source is None else float(embedding @ source)))
      for error in errors:
        logging.warning("score: %s", error["error"])
      store.add_scores(scores)
      done += len(scores)
      if bar is not None:
        bar.update(len(scores))
  return done


def _embed_sources(scorer, sources, source_ids, cache):
  """Adds the embeddings of `source_ids` not in `cache` to it (None if unreadable)."""
  new = sorted(set(source_ids) - cache.keys())
  images, ids = [], []
  for source_id in new:
    try:
      images.append(sources.image(source_id))
      ids.append(source_id)
    except records.BadImageError as e:
      logging.warning("score: source image of %s unreadable, clip_source left empty: %s",
                      source_id, e)
      cache[source_id] = None
  if images:
    cache.update(zip(ids, scorer.image_embeddings(images)))


def _owned(rows):
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return rows
  return [r for r in rows if seeding.process_owns(r["job_id"], index, count)]


def _mesh(config):
  if jax.process_count() == 1:
    return parallel.make_mesh(config.mesh.shape)
  return parallel.make_mesh((-1,), devices=jax.local_devices())


class Scoring:
  """The CLIP scorer, source images and class text embeddings of a run, loaded on first use."""

  def __init__(self, config, checkpoint):
    self.config = config
    self.checkpoint = checkpoint
    self.sources = None
    self._scorer, self._names, self._texts = None, None, {}

  def _load(self):
    if self._scorer is not None:
      return
    config = self.config
    splits = datasets.load(config.data)
    self.sources = SourceImages(splits)
    models = clip.load_clip(self.checkpoint, config.score.dtype)
    self._scorer = clip.ClipScorer(models, _mesh(config), config.score.batch_size)
    # Common names where the dataset has them (iWildCam), else the class names.
    self._names = class_names_lib.text_names(
        config.data, next(iter(splits.values())).class_names, "score's CLIP texts")

  def source_image(self, source_id):
    """Returns the uint8 image of source `source_id`."""
    self._load()
    return self.sources.image(source_id)

  def score(self, store, rows, desc="score"):
    """Scores manifest `rows` into `store` (see `score_rows`); returns how many."""
    self._load()
    missing = self.sources.missing({r["source_id"] for r in rows})
    if missing:
      raise ValueError(f"score: {len(missing)} source id(s) of the manifest are not in "
                       f"data {self.config.data.name!r}: {missing[:5]}")
    labels = sorted({int(r["label"]) for r in rows} - self._texts.keys())
    if labels:
      texts = class_texts(self.config.score.text_template, [self._names[l] for l in labels])
      self._texts.update(zip(labels, self._scorer.text_embeddings(texts)))
    with progress.bar(len(rows), desc) as bar:
      return score_rows(self._scorer, store, rows, self._texts, self.sources, bar)


def run(config, workdir):
  """Scores unscored manifest rows, regenerates if asked, then (process 0) writes the report.

  Returns the report dict on process 0, None elsewhere.
  """
  threshold = acceptance.check_threshold(config.score.threshold)
  check_template(config.score.text_template)
  last_attempt = acceptance.max_attempt(config.score)
  root = wd.path(workdir, wd.SPECTRUM)
  if not root.is_dir():
    raise FileNotFoundError(f"{root} does not exist: run the generate stage first")
  provenance.check_stage(workdir, "score", config, provenance.fingerprint(config, "score"),
                         target=root / spectrum_store.SCORE_PROVENANCE,
                         outputs=[root / spectrum_store.SCORES_GLOB])
  store = spectrum_store.SpectrumStore(root)
  store.repair_scores()
  rows = jobs.grid_rows(store.rows(), config.diffusion)  # a larger grid's extra jobs stay unread
  # Unscored rows, rows whose image could not be read last time (retried) and scored rows
  # whose image no longer matches its manifest checksum (scored again: an error until
  # `generate` has made it again).
  changed = damaged_ids(store, [r for r in _owned(rows) if r.get("clip_text") is not None])
  todo = [r for r in _owned(rows) if r.get("clip_text") is None or r["job_id"] in changed]
  logging.info("score: %d rows, %d already scored, %d to score here (%d retried)",
               len(rows), sum(r.get("clip_text") is not None for r in rows), len(todo),
               sum(r.get("score_error") is not None for r in todo))
  checkpoint = clip.configured_model(config, workdir)  # every process: it may wait for process 0
  scoring = Scoring(config, checkpoint)
  if todo:
    scoring.score(store, todo)
  parallel.barrier("stages.score.scored")
  if last_attempt:
    regenerate(config, workdir, store, scoring, threshold, last_attempt)
  if not wd.is_main_process():
    return None
  return write_report(config, workdir, jobs.grid_rows(store.rows(), config.diffusion), threshold,
                      last_attempt)


def damaged_ids(store, rows):
  """Returns the job ids of `rows` whose image differs from its manifest checksum (truncated,
  overwritten or replaced since `generate` wrote it), with a warning naming the first."""
  damaged = store.damaged(rows)
  if damaged:
    logging.warning("score: %d scored image(s) no longer match their manifest row, e.g. %s "
                    "(%s): their scores no longer count; rerun the generate stage, which "
                    "makes them again", len(damaged), *damaged[0])
  bad_paths = {path for path, _ in damaged}
  return {r["job_id"] for r in rows if store.image_path(r) in bad_paths}


def regenerate(config, workdir, store, scoring, threshold, last_attempt):
  """Runs regeneration rounds 1 .. `last_attempt` into `store`; returns the images made here.

  Round a generates and scores attempt a of every job whose attempts so far
  all scored at or below `threshold` (docs/design.md §6 "CLIP filter"); it stops
  early when no job needs another attempt.
  """
  prompt_document = _read_prompts(workdir)
  jobs.check_provenance(config, workdir, store)
  sampler, made = None, 0

  def source_image(source_id):  # as `generate` saw it (docs/design.md §6: CIFAR sources upsampled)
    return upsample.upsample(scoring.source_image(source_id), config.diffusion.source_upsample)

  for attempt in range(1, last_attempt + 1):
    first = regeneration.needing_attempt(jobs.grid_rows(store.rows(), config.diffusion),
                                         threshold, attempt)
    if not first:
      break
    rows = regeneration.attempt_rows(first, attempt, prompt_document,
                                      seeding.generation_seed(config))
    store.reconcile(rows)
    done = store.done_job_ids()
    owned = _owned(rows)
    todo = [r for r in owned if r["job_id"] not in done]
    logging.info("score: regeneration attempt %d: %d jobs at or below %s, %d to generate here",
                 attempt, len(rows), threshold, len(todo))
    if todo:
      if sampler is None:
        sampler = spectrum_run.make_sampler(
            config, spectrum_run.checkpoint_dir(config, workdir))
      made += spectrum_run.run_rows(
          sampler, store, todo, source_image, lambda s: source_image(s).shape[:2], config,
          order=lambda r: r["job_id"])
    ids = {r["job_id"] for r in owned}
    unscored = [r for r in store.rows() if r["job_id"] in ids and not acceptance.is_scored(r)]
    if unscored:
      scoring.score(store, unscored, desc=f"score attempt {attempt}")
    parallel.barrier(f"stages.score.regenerate.{attempt}")
  return made


def _read_prompts(workdir):
  target = wd.path(workdir, wd.PROMPTS)
  if not target.exists():
    raise FileNotFoundError(f"{target} not found: score.regenerate needs the `prompts` stage's "
                            "candidates")
  try:
    return json.loads(target.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{target} is not valid JSON: {e}") from e


def write_report(config, workdir, rows, threshold, last_attempt=0):
  """Writes acceptance.json and acceptance.png to `workdir`; returns the report."""
  report = acceptance.build_report(
      rows, threshold, model="tiny" if config.score.tiny else config.score.model,
      text_template=config.score.text_template, last_attempt=last_attempt)
  wd.atomic_write_json(wd.path(workdir, ACCEPTANCE_JSON), report)
  wd.atomic_write_bytes(wd.path(workdir, ACCEPTANCE_PNG), acceptance.plot_png(
      report, acceptance.final_rows(rows, last_attempt)))
  spectrum_grid.write_scored_grids(
      workdir, acceptance.final_rows(rows, last_attempt), wd.read_jsonl(wd.path(workdir, wd.HARD)),
      SourceImages(datasets.load(config.data)).image, threshold, config.diffusion.grid_sources)
  overall = report["overall"]
  logging.info("score: accepted %d of %d scored images (threshold %s); %d unreadable",
               overall["accepted"], overall["scored"], threshold, overall["errors"])
  if "regeneration" in report:
    regen = report["regeneration"]["overall"]
    logging.info("score: regeneration: %d attempts for %d jobs; accepted %d before, %d after",
                 regen["attempts"], regen["regenerated_jobs"], regen["accepted_before"],
                 regen["accepted_after"])
  for error in report["errors"]:
    logging.warning("score: excluded %s: %s", error["path"], error["error"])
  for warning in report["warnings"]:
    logging.warning("score: %s", warning)
  return report
