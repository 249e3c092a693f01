"""Stage `score`: CLIP scores for every generated image, then the acceptance report.

For each manifest row without a score this computes the cosine similarity of
the image to its class text (`score.text_template`) and to its source image,
and appends it to this process's score shard after every batch, so a killed
run resumes with the rows it had not scored. An image that cannot be read gets
a score row with an error naming its path: excluded from acceptance, listed in
the report. Process 0 then writes workdir/acceptance.json and acceptance.png.
"""

import concurrent.futures

import jax
import numpy as np
import tqdm
from absl import logging

from discl_jax import parallel
from discl_jax import provenance
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.data import class_names as class_names_lib
from discl_jax.data import datasets
from discl_jax.data import records
from discl_jax.data import spectrum_store
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
      crops.append(preprocess.resize_and_crop(records.read_rgb(store.image_path(row)), spec))
      rows.append(row)
    except records.BadImageError as e:
      errors.append(dict(job_id=row["job_id"], clip_text=None, clip_source=None, error=str(e)))
  return rows, crops, errors


def score_rows(scorer, store, rows, text_embeddings, sources, progress=None):
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
              job_id=row["job_id"], error=None,
              clip_text=float(embedding @ text_embeddings[int(row["label"])]),
              clip_source=None if source is None else float(embedding @ source)))
      for error in errors:
        logging.warning("score: %s", error["error"])
      store.add_scores(scores)
      done += len(scores)
      if progress is not None:
        progress.update(len(scores))
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


def run(config, workdir):
  """Scores unscored manifest rows, then (process 0) writes the acceptance report.

  Returns the report dict on process 0, None elsewhere.
  """
  threshold = acceptance.check_threshold(config.score.threshold)
  check_template(config.score.text_template)
  if config.score.regenerate:
    raise NotImplementedError(
        "score.regenerate=True (regenerating rejected images with a new seed and prompt) "
        "is not implemented yet; set score.regenerate=False")
  root = wd.path(workdir, wd.SPECTRUM)
  if not root.is_dir():
    raise FileNotFoundError(f"{root} does not exist: run the generate stage first")
  provenance.check_stage(workdir, "score", config, provenance.fingerprint(config, "score"),
                         target=root / spectrum_store.SCORE_PROVENANCE,
                         outputs=[root / spectrum_store.SCORES_GLOB])
  store = spectrum_store.SpectrumStore(root)
  rows = store.rows()
  todo = [r for r in _owned(rows) if not acceptance.is_scored(r)]
  logging.info("score: %d rows, %d already scored, %d to score here",
               len(rows), sum(map(acceptance.is_scored, rows)), len(todo))
  checkpoint = clip.configured_model(config, workdir)  # every process: it may wait for process 0
  if todo:
    splits = datasets.load(config.data)
    sources = SourceImages(splits)
    missing = sources.missing({r["source_id"] for r in todo})
    if missing:
      raise ValueError(f"score: {len(missing)} source id(s) of the manifest are not in "
                       f"data {config.data.name!r}: {missing[:5]}")
    models = clip.load_clip(checkpoint, config.score.dtype)
    scorer = clip.ClipScorer(models, _mesh(config), config.score.batch_size)
    labels = sorted({int(r["label"]) for r in todo})
    # Common names where the dataset has them (iWildCam), else the class names.
    names = class_names_lib.caption_names(config.data, next(iter(splits.values())).class_names)
    texts = class_texts(config.score.text_template, [names[l] for l in labels])
    text_embeddings = dict(zip(labels, scorer.text_embeddings(texts)))
    with tqdm.tqdm(total=len(todo), desc="score", unit="img",
                   disable=not wd.is_main_process()) as progress:
      score_rows(scorer, store, todo, text_embeddings, sources, progress)
  parallel.barrier("stages.score.scored")
  if not wd.is_main_process():
    return None
  return write_report(config, workdir, store.rows(), threshold)


def write_report(config, workdir, rows, threshold):
  """Writes acceptance.json and acceptance.png to `workdir`; returns the report."""
  report = acceptance.build_report(
      rows, threshold, model="tiny" if config.score.tiny else config.score.model,
      text_template=config.score.text_template)
  wd.atomic_write_json(wd.path(workdir, ACCEPTANCE_JSON), report)
  wd.atomic_write_bytes(wd.path(workdir, ACCEPTANCE_PNG), acceptance.plot_png(report, rows))
  spectrum_grid.write_scored_grids(
      workdir, rows, wd.read_jsonl(wd.path(workdir, wd.HARD)),
      SourceImages(datasets.load(config.data)).image, threshold, config.diffusion.grid_sources)
  overall = report["overall"]
  logging.info("score: accepted %d of %d scored images (threshold %s); %d unreadable",
               overall["accepted"], overall["scored"], threshold, overall["errors"])
  for error in report["errors"]:
    logging.warning("score: excluded %s: %s", error["path"], error["error"])
  for warning in report["warnings"]:
    logging.warning("score: %s", warning)
  return report
