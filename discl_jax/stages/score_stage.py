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

import json

from absl import logging

from discl_jax import parallel
from discl_jax import provenance
from discl_jax import workdir as wd
from discl_jax.data import datasets
from discl_jax.data import spectrum_store
from discl_jax.diffusion import jobs
from discl_jax.diffusion import spectrum_run
from discl_jax.evaluation import spectrum_grid
from discl_jax.scoring import acceptance
from discl_jax.scoring import clip
from discl_jax.scoring import image_scores
from discl_jax.scoring import regenerate

ACCEPTANCE_JSON = "acceptance.json"
ACCEPTANCE_PNG = "acceptance.png"


def run(config, workdir):
  """Scores unscored manifest rows, regenerates if asked, then (process 0) writes the report.

  Returns the report dict on process 0, None elsewhere.
  """
  threshold = acceptance.check_threshold(config.score.threshold)
  image_scores.check_template(config.score.text_template)
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
  owned = store.owned(rows)
  changed = image_scores.damaged_ids(store, [r for r in owned if r.get("clip_text") is not None])
  todo = [r for r in owned if r.get("clip_text") is None or r["job_id"] in changed]
  logging.info("score: %d rows, %d already scored, %d to score here (%d retried)",
               len(rows), sum(r.get("clip_text") is not None for r in rows), len(todo),
               sum(r.get("score_error") is not None for r in todo))
  checkpoint = clip.configured_model(config, workdir)  # every process: it may wait for process 0
  scoring = image_scores.Scoring(config, checkpoint)
  if todo:
    scoring.score(store, todo)
  parallel.barrier("stages.score.scored")
  if last_attempt:
    prompt_document = _read_prompts(workdir)
    jobs.check_provenance(config, workdir, store)
    regenerate.regenerate(
        config, store, scoring, threshold, last_attempt, prompt_document,
        lambda: spectrum_run.make_sampler(config, spectrum_run.checkpoint_dir(config, workdir)))
  if not wd.is_main_process():
    return None
  return write_report(config, workdir, jobs.grid_rows(store.rows(), config.diffusion), threshold,
                      last_attempt)


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
      image_scores.SourceImages(datasets.load(config.data)).image, threshold,
      config.diffusion.grid_sources)
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
