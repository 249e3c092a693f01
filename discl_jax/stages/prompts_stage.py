"""Stage `prompts`: a text prompt per hard image and generation seed, from the configured source.

Reads workdir/hard.jsonl (template prompts use a row's caption_name, the
iWildCam common name, when it has one); with `prompts.source="llm"` process 0
first asks the chat endpoint for the descriptions of every class it lacks in
workdir/llm_descriptions.json (the cache, in the format of a descriptions
file); writes workdir/prompts.json:
{"choice": prompts.choice, "classes": {class: [candidate prompts]},
 "source_classes": {source_id: class}, "sources": {source_id: [prompt per seed index]}}.
"""

import collections

from absl import logging

from discl_jax import parallel
from discl_jax import provenance
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.data import class_names as class_names_lib
from discl_jax.diffusion import llm_descriptions
from discl_jax.diffusion import prompts

LLM_DESCRIPTIONS = "llm_descriptions.json"  # source "llm": {class: [descriptions]}, the cache


def read_hard(workdir):
  """Returns the rows of workdir/hard.jsonl; FileNotFoundError says which stage makes it."""
  target = wd.path(workdir, wd.HARD)
  if not target.exists():
    raise FileNotFoundError(f"{target} not found: run the `hard` stage first")
  return wd.read_jsonl(target)


def caption_named(hard_rows, source):
  """Returns `hard_rows` with class_name set to caption_name (the common name) where a row
  has one and prompts come from templates, so iWildCam prompts read
  "a photo of {common name} in the wild"; prompts.json's classes are keyed by that name.
  """
  if source != "templates":
    return hard_rows
  return [dict(row, class_name=row["caption_name"]) if row.get("caption_name") else row
          for row in hard_rows]


def llm_class_descriptions(prompts_config, class_names, workdir):
  """Returns {class: [descriptions]} of source "llm": process 0 asks the endpoint for the
  classes workdir/llm_descriptions.json lacks (caching each), then every process reads it."""
  cache = wd.path(workdir, LLM_DESCRIPTIONS)
  count = int(prompts_config.llm_descriptions)
  names = sorted(set(class_names))
  if wd.is_main_process():
    client = llm_descriptions.ChatClient(prompts_config.llm_base_url, prompts_config.llm_model)
    log = lambda k, name: logging.info("prompts: %s descriptions of %r (%d/%d classes)",
                                       prompts_config.llm_model, name, k, len(names))
    llm_descriptions.fetch_descriptions(client, names, cache, count,
                                        display=prompts.display_name, log=log)
  parallel.barrier("stages.prompts.llm")
  cached = llm_descriptions.read_cache(cache)
  return {name: cached[name][:count] for name in names}


def run(config, workdir):
  """Writes workdir/prompts.json (process 0) for the images in hard.jsonl."""
  hard_rows = caption_named(read_hard(workdir), config.prompts.source)
  llm = config.prompts.source == "llm"
  provenance.check_stage(workdir, "prompts", config, provenance.fingerprint(config, "prompts", workdir),
                         target=wd.path(workdir, wd.PROVENANCE % "prompts"),
                         outputs=[wd.path(workdir, wd.PROMPTS)]
                         + ([wd.path(workdir, LLM_DESCRIPTIONS)] if llm else []))
  classes = {row["class_name"] for row in hard_rows}
  class_names_lib.check_readable(config.data, classes,
                                 "the prompts (and later score's CLIP texts)")
  descriptions = llm_class_descriptions(config.prompts, classes, workdir) if llm else None
  document = prompts.build_prompts(config.prompts, hard_rows, seeding.generation_seed(config),
                                   config.diffusion.seeds_per_level, descriptions)
  used = collections.Counter(p for per_seed in document["sources"].values() for p in per_seed)
  logging.info("prompts: %d images, %d classes, %d distinct prompts (source %s, %s)",
               len(document["sources"]), len(document["classes"]), len(used),
               config.prompts.source, config.prompts.choice)
  if wd.is_main_process():
    wd.atomic_write_json(wd.path(workdir, wd.PROMPTS), document)
  parallel.barrier("stages.prompts")
