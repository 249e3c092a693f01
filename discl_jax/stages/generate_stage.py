"""Stage `generate`: the guidance spectrum of every hard image, into the spectrum store.

Reads workdir/hard.jsonl and workdir/prompts.json; jobs are hard image x
strength x per-level seed. Each process runs the jobs it owns (stable hash of
the job id) that the store does not have yet, and stores each image as it
comes, so a killed run resumes where it stopped. Process 0 then draws
workdir/spectrum_grid_{class}.png.
"""

import json
import time

from absl import logging

from discl_jax import parallel
from discl_jax import progress
from discl_jax import workdir as wd
from discl_jax.data import datasets
from discl_jax.data import upsample
from discl_jax.data import records
from discl_jax.data import spectrum_store
from discl_jax.diffusion import jobs
from discl_jax.diffusion import spectrum_run
from discl_jax.evaluation import spectrum_grid

def _read_inputs(workdir):
  """Returns (hard rows, prompts document) written by the earlier stages."""
  hard = wd.path(workdir, wd.HARD)
  prompts = wd.path(workdir, wd.PROMPTS)
  for target, stage in ((hard, "hard"), (prompts, "prompts")):
    if not target.exists():
      raise FileNotFoundError(f"{target} not found: run the `{stage}` stage first")
  try:
    document = json.loads(prompts.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{prompts} is not valid JSON: {e}") from e
  return wd.read_jsonl(hard), document


def _source_index(train, hard_rows):
  """Returns {source_id: row in train}; ValueError names a hard id not in train."""
  index = {str(s): i for i, s in enumerate(train.ids)}
  unknown = sorted({r["source_id"] for r in hard_rows} - index.keys())
  if unknown:
    raise ValueError(f"hard.jsonl names {len(unknown)} image(s) not in the train split, "
                     f"e.g. {unknown[:5]}: rerun the `hard` stage for this data config")
  return index


def _check_sources(train, index, todo, on_bad_image):
  """Returns (todo without unreadable sources, {source_id: (h, w)})."""
  sources = sorted({r["source_id"] for r in todo}, key=lambda s: index[s])
  sizes, bad = jobs.source_sizes(train, [index[s] for s in sources])
  if bad:
    listing = "\n  ".join(bad)
    if on_bad_image != "skip":
      raise records.BadImageError(
          f"{len(bad)} unreadable source image(s) for generate (set data.on_bad_image="
          f"skip to leave them out):\n  {listing}")
    logging.warning("generate: skipping %d unreadable source image(s):\n  %s",
                    len(bad), listing)
  by_id = {s: sizes[index[s]] for s in sources if index[s] in sizes}
  return [r for r in todo if r["source_id"] in by_id], by_id


def _generate(config, workdir, checkpoint, store, train, index, owned, todo, sizes):
  """Runs the sampler over `todo`, storing each image; returns the number made.

  The store records the generation fingerprint once the model has loaded,
  before the first image.
  """
  if not todo:
    jobs.check_provenance(config, workdir, store)
    return 0
  sampler = spectrum_run.make_sampler(config, checkpoint)
  jobs.check_provenance(config, workdir, store)
  start = time.perf_counter()
  with progress.bar(len(owned), "generate", initial=len(owned) - len(todo)) as bar:
    made = spectrum_run.run_rows(
        sampler, store, todo, lambda source: train.image(index[source]), sizes.__getitem__,
        config, order=lambda r: (index[r["source_id"]], r["strength"], r["seed"]), progress=bar)
  seconds = time.perf_counter() - start
  logging.info("generate: %d images in %.1f s (%.2f images/s)", made, seconds,
               made / max(seconds, 1e-9))
  return made


def run(config, workdir):
  """Generates every missing spectrum image of this process, then (process 0) the grids."""
  strengths = jobs.validate_strengths(config.diffusion.strengths)
  hard_rows, prompt_doc = _read_inputs(workdir)
  expected = jobs.build_rows(hard_rows, prompt_doc.get("sources", {}), strengths,
                             config.diffusion.seeds_per_level)
  store = spectrum_store.SpectrumStore(wd.path(workdir, wd.SPECTRUM))
  jobs.check_provenance(config, workdir, store, record=False)
  counts = store.reconcile(expected)
  logging.info("generate: store reconciled: %s", counts)
  done = store.done_job_ids()
  owned = store.owned(expected)
  todo = [r for r in owned if r["job_id"] not in done]
  logging.info("generate: %d jobs in all, %d for this process, %d still to do",
               len(expected), len(owned), len(todo))
  train = upsample.upsampled(datasets.load(config.data)["train"], config.diffusion.source_upsample)
  index = _source_index(train, hard_rows)
  todo, sizes = _check_sources(train, index, todo, config.data.on_bad_image)
  checkpoint = spectrum_run.checkpoint_dir(config, workdir)
  _generate(config, workdir, checkpoint, store, train, index, owned, todo, sizes)
  parallel.barrier("stages.generate.generated")
  if wd.is_main_process():
    spectrum_grid.write_spectrum_grids(config, workdir, store, train.image, index, hard_rows)
