"""CLIP-guided regeneration (`score.regenerate`): which jobs get another attempt, and its rows.

The reference regenerates an image while its CLIP text score is at or below the
threshold, with a new description and new noise, up to 5 more times, and keeps
the best-scoring attempt (docs/design.md §6 "CLIP filter"). Here attempt a
(1 .. score.max_regenerations) of job J is a job of its own: id "J|retry{a}"
(so its own noise key), the prompt `a` candidates after J's
(`prompts.choose_prompt`), its own file next to J's. Attempt a is made only when
attempts 0 .. a-1 of J are all scored, without error, at or below the
threshold, so round a is one sampler run over every job that needs it, and a
rerun after a kill derives the same rounds from the stored scores.
"""

from discl_jax.data import spectrum_store
from discl_jax.diffusion import prompts


def needing_attempt(rows, threshold, attempt):
  """Returns the attempt-0 rows of the jobs that get regeneration attempt `attempt`.

  Those whose attempts 0 .. attempt-1 are all in `rows` (merged manifest rows
  with scores), scored without error, with clip_text <= `threshold`.
  """
  by_job = {}
  for row in rows:
    by_job.setdefault(spectrum_store.original_job_id(row), {})[
        spectrum_store.attempt_of(row)] = row
  out = []
  for attempts in by_job.values():
    earlier = [attempts.get(a) for a in range(attempt)]
    if all(r is not None and r.get("score_error") is None and r.get("clip_text") is not None
           and r["clip_text"] <= threshold for r in earlier):
      out.append(attempts[0])
  return out


def attempt_rows(first_rows, attempt, prompt_document, seed):
  """Returns the manifest rows of attempt `attempt` of the jobs of `first_rows`.

  `prompt_document` is prompts.json (its "classes", "source_classes" and
  "choice"); `seed` the config seed the prompts were chosen with.
  """
  try:
    classes = prompt_document["classes"]
    source_classes = prompt_document["source_classes"]
    choice = prompt_document["choice"]
  except KeyError as e:
    raise ValueError(f"prompts.json lacks {e}: rerun the `prompts` stage") from None
  out = []
  for row in first_rows:
    class_key = source_classes.get(row["source_id"])
    if class_key not in classes:
      raise ValueError(f"prompts.json has no candidates for hard image {row['source_id']!r}: "
                       "rerun the `prompts` stage")
    prompt = prompts.choose_prompt(classes[class_key], class_key, row["source_id"], seed,
                                   row["seed"], attempt=attempt, choice=choice)
    out.append(spectrum_store.make_row(
        source_id=row["source_id"], label=row["label"], class_name=row["class_name"],
        strength=row["strength"], seed=row["seed"], prompt=prompt, attempt=attempt))
  return out
