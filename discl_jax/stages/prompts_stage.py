"""Stage `prompts`: one text prompt per hard image, from the configured source.

Reads workdir/hard.jsonl; writes workdir/prompts.json:
{"classes": {class: [candidate prompts]}, "sources": {source_id: prompt}}.
"""

import collections

from absl import logging

from discl_jax import parallel
from discl_jax import workdir as wd
from discl_jax.diffusion import prompts


def read_hard(workdir):
  """Returns the rows of workdir/hard.jsonl; FileNotFoundError says which stage makes it."""
  target = wd.path(workdir, wd.HARD)
  if not target.exists():
    raise FileNotFoundError(f"{target} not found: run the `hard` stage first")
  return wd.read_jsonl(target)


def run(config, workdir):
  """Writes workdir/prompts.json (process 0) for the images in hard.jsonl."""
  hard_rows = read_hard(workdir)
  document = prompts.build_prompts(config.prompts, hard_rows, config.seed)
  used = collections.Counter(document["sources"].values())
  logging.info("prompts: %d images, %d classes, %d distinct prompts (source %s)",
               len(document["sources"]), len(document["classes"]), len(used),
               config.prompts.source)
  if wd.is_main_process():
    wd.atomic_write_json(wd.path(workdir, wd.PROMPTS), document)
  parallel.barrier("stages.prompts")
