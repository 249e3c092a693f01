"""CLIP scores of generated images: source images, batched loading and scoring into the store.

Each scored batch is appended to the store's score shard at once, so a killed
run resumes with the rows it had not scored; an unreadable image gets a score
row with an error naming its path.
"""

import concurrent.futures

import jax
import numpy as np
from absl import logging

from discl_jax import parallel
from discl_jax import progress
from discl_jax.data import class_names as class_names_lib
from discl_jax.data import datasets
from discl_jax.data import records
from discl_jax.scoring import clip
from discl_jax.scoring import preprocess


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
