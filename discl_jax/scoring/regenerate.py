"""Regeneration rounds of the score stage: another attempt of every job whose attempts all
scored at or below the threshold, generated into the same store and scored (docs/design.md §6)."""

from absl import logging

from discl_jax import parallel
from discl_jax import seeding
from discl_jax.data import upsample
from discl_jax.diffusion import jobs
from discl_jax.diffusion import regeneration
from discl_jax.diffusion import spectrum_run
from discl_jax.scoring import acceptance


def regenerate(config, store, scoring, threshold, last_attempt, prompt_document, make_sampler):
  """Runs regeneration rounds 1 .. `last_attempt` into `store`; returns the images made here.

  Round a generates and scores attempt a of every job whose attempts so far
  all scored at or below `threshold` (docs/design.md §6 "CLIP filter"); it stops
  early when no job needs another attempt. `scoring` is an `image_scores.Scoring`;
  `prompt_document` the prompts stage's candidates; `make_sampler()` returns the
  sampler, called once, when this process first has a job to generate.
  """
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
    owned = store.owned(rows)
    todo = [r for r in owned if r["job_id"] not in done]
    logging.info("score: regeneration attempt %d: %d jobs at or below %s, %d to generate here",
                 attempt, len(rows), threshold, len(todo))
    if todo:
      if sampler is None:
        sampler = make_sampler()
      made += spectrum_run.run_rows(
          sampler, store, todo, source_image, lambda s: source_image(s).shape[:2], config,
          order=lambda r: r["job_id"])
    ids = {r["job_id"] for r in owned}
    unscored = [r for r in store.rows() if r["job_id"] in ids and not acceptance.is_scored(r)]
    if unscored:
      scoring.score(store, unscored, desc=f"score attempt {attempt}")
    parallel.barrier(f"stages.score.regenerate.{attempt}")
  return made
