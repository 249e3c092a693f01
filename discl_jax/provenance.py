"""Provenance: the config keys a stage's output depends on, recorded beside it.

A stage computes its fingerprint (`select` of its keys, plus content hashes of
the inputs it reads) and calls `check` before writing: the first run records
the fingerprint and the whole config next to the output; a rerun with the same
fingerprint continues; a rerun with another one is refused with an error that
names the first differing key and says how to start fresh. workdir/config.json
maps each stage to the config its current output was made with (rewritten only
when a stage starts a fresh output), and the report reads the stored config,
never the current flags.
"""

import hashlib
import importlib.metadata
import json
import os
import pathlib
import subprocess

import ml_collections

from discl_jax import seeding
from discl_jax import workdir as wd

UNSET = "<unset>"


def canonical(obj):
  """Returns `obj` as it reads back from JSON (ConfigDicts and tuples become dicts and lists)."""
  if isinstance(obj, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    obj = obj.to_dict()
  return json.loads(json.dumps(obj, default=str))


def flatten(obj, prefix=""):
  """Returns {dotted key: leaf value} of nested dicts `obj`."""
  if isinstance(obj, dict) and obj:
    flat = {}
    for key, value in obj.items():
      flat.update(flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: obj}


def select(config, keys, exclude=()):
  """Returns {dotted key: value} of `config` for `keys` (a section name takes all its keys).

  Keys in `exclude` (dotted) are left out; the result keeps the order of `keys`.
  """
  out = {}
  for key in keys:
    node = config
    for part in key.split("."):
      node = node[part]
    for dotted, value in flatten(canonical(node), f"{key}.").items():
      if dotted not in exclude:
        out[dotted] = value
  return out


def sha256_bytes(data):
  """Returns the sha256 hex digest of `data` (bytes or str)."""
  return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def sha256_file(path):
  """Returns the sha256 hex digest of the file at `path`, or "" when it does not exist."""
  path = pathlib.Path(path)
  if not path.is_file():
    return ""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def differences(stored, current):
  """Returns [(key, stored value, current value)] of differing keys, in `current`'s order."""
  old, new = flatten(canonical(stored)), flatten(canonical(current))
  keys = list(new) + [k for k in old if k not in new]
  return [(k, old.get(k, UNSET), new.get(k, UNSET)) for k in keys
          if old.get(k, UNSET) != new.get(k, UNSET)]


def mismatch_message(what, record, differing, outputs):
  """Returns the refusal text: the first differing key, all of them, and how to start fresh."""
  key, old, new = differing[0]
  listing = "; ".join(f"{k}: {o!r} then, {n!r} now" for k, o, n in differing)
  return (f"{what} was made with a different config: {key} is {new!r} now but was {old!r} "
          f"(recorded in {record}; differing key(s): {listing}). To start fresh, use another "
          f"--workdir, or delete {', '.join(str(o) for o in outputs)}.")


def read_record(target):
  """Returns the JSON object stored at `target`, or None when there is none."""
  target = pathlib.Path(target)
  if not target.exists():
    return None
  try:
    return json.loads(target.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{target} is not valid JSON: {e}; delete it with the stage's "
                     "output to start fresh") from e


def recorded_fingerprint(record):
  """Returns the fingerprint of provenance `record`; {} for None.

  A spectrum/generation.json written before generate used `check` holds the
  bare fingerprint (no "fingerprint" field): it is returned as it is.
  """
  if record is None:
    return {}
  return record["fingerprint"] if "fingerprint" in record else record


def stored_fingerprint(target):
  """Returns the fingerprint recorded at provenance file `target` (either format), or {}."""
  return recorded_fingerprint(read_record(target))


def check(target, fingerprint, *, what, outputs, config=None, write=None):
  """Records `fingerprint` (and `config`) at `target` on first use; returns True if it did.

  Returns False when `target` holds the same fingerprint. Raises ValueError
  naming the first differing key when it holds another. Only process 0 writes
  unless `write` says otherwise.
  """
  current = canonical(fingerprint)
  stored = read_record(target)
  if stored is not None:
    differing = differences(recorded_fingerprint(stored), current)
    if differing:
      raise ValueError(mismatch_message(what, target, differing, outputs))
    return False
  if wd.is_main_process() if write is None else write:
    record = {"fingerprint": current, "environment": environment()}
    if config is not None:
      record["config"] = canonical(config)
    wd.atomic_write_json(target, record)
  return True


def check_unchanged(target, fingerprint, *, what, outputs):
  """Returns None; raises ValueError (as `check` would) when `target` records other values
  for the keys of `fingerprint`.

  For checking a stage before any stage runs (or before its model loads):
  `fingerprint` may be the part of the stage's fingerprint the config alone
  decides, so only its keys are compared.
  """
  stored = read_record(target)
  if stored is None:
    return
  stored = recorded_fingerprint(stored)
  keys = set(flatten(canonical(fingerprint)))
  differing = [d for d in differences(stored, fingerprint) if d[0] in keys]
  if differing:
    raise ValueError(mismatch_message(what, target, differing, outputs))


def _stage_what(workdir, stage, outputs):
  """Returns how a refusal names `stage`'s output: "{stage}: the output in {where}"."""
  where = outputs[0] if len(outputs) == 1 else os.path.commonpath(
      [str(o) for o in outputs] or [str(workdir)])
  return f"{stage}: the output in {where}"


def check_stage_unchanged(workdir, stage, fingerprint, *, target, outputs):
  """Returns None; raises `check_stage`'s refusal when `target` records other values for
  the keys of `fingerprint` (`check_unchanged`); writes nothing."""
  check_unchanged(target, fingerprint, what=_stage_what(workdir, stage, outputs),
                  outputs=list(outputs) + [target])


def check_stage(workdir, stage, config, fingerprint, *, target, outputs):
  """Checks `stage`'s fingerprint at `target` (see `check`); returns True for a fresh output.

  A fresh output also records `config` as `stage`'s entry of workdir/config.json.
  """
  what = _stage_what(workdir, stage, outputs)
  fresh = check(target, fingerprint, what=what, outputs=list(outputs) + [target], config=config)
  if fresh and wd.is_main_process():
    record_config(workdir, stage, config)
  return fresh


def record_config(workdir, stage, config):
  """Sets `stage`'s entry of workdir/config.json to `config`; returns the file's Path."""
  target = wd.path(workdir, wd.CONFIG)
  records = read_record(target) or {}
  if not all(isinstance(v, dict) for v in records.values()) or "seed" in records:
    records = {}  # a config.json of an older version: one config, no stages
  records[stage] = canonical(config)
  return wd.atomic_write_json(target, records)


def stored_record(target):
  """Returns the provenance record at `target` ({"fingerprint", "config", "environment"}) or {}."""
  return read_record(target) or {}


def stored_config(target):
  """Returns the ConfigDict recorded at provenance file `target`, or None."""
  record = read_record(target)
  if not record or "config" not in record:
    return None
  return ml_collections.ConfigDict(record["config"])


# The one table of which stages' outputs a config key changes: per stage, (keys, excluded
# keys); a section name takes all its keys. `fingerprint` adds the keys that count only
# under some values and content hashes of the files a stage reads.
_DATA_MOVABLE = ("data.num_workers", "data.augment", "data.verify_images", "data.on_bad_image",
                 "data.data_dir", "data.manual_dir", "data.root", "data.spectrum_dir")
STAGE_KEYS = {
    "hard": (("hard", "data"), _DATA_MOVABLE),
    # The endpoint may move (a local server's port); the model and the answers count.
    "prompts": (("prompts",), ("prompts.descriptions_file", "prompts.llm_base_url")),
    # The keys that change a job's image. Strengths and seeds_per_level (they add or leave
    # out jobs: readers take only their config's jobs, `jobs.grid_rows`), slots and the mesh
    # (outputs do not depend on batching) and data paths (source ids name the images) may
    # change freely.
    "generate": (("diffusion.model", "diffusion.tiny", "diffusion.tiny_family", "diffusion.dtype",
                  "diffusion.scheduler", "diffusion.num_inference_steps",
                  "diffusion.guidance_scale", "diffusion.negative_prompt",
                  "diffusion.aesthetic_score", "diffusion.negative_aesthetic_score",
                  "diffusion.source_size", "diffusion.resolution", "prompts.source",
                  "prompts.templates", "prompts.description_format", "data.name",
                  "data.tfds_name"), ()),
    "score": (("score.model", "score.tiny", "score.dtype", "score.text_template", "data.name",
               "data.tfds_name"), ()),
    # train.init_checkpoint counts by content (the loop adds its hash), not by path.
    "train": (("seed", "train", "curriculum", "eval", "data", "score.threshold"),
              ("train.log_every_steps", "train.keep_checkpoints", "train.checkpoint_every_steps",
               "train.init_checkpoint")),
}
# hard.rule="misclassified" predicts with the CLIP FLYP fine-tunes.
_MISCLASSIFIED_KEYS = ("train.clip_model", "train.clip_templates", "score.model", "score.tiny")
# train of a schedule that reads the spectrum: the job grid and the regeneration attempts
# pick the synthetic rows it reads (`jobs.grid_rows`, `acceptance.accepted_rows`).
_SPECTRUM_READER_KEYS = ("diffusion.strengths", "diffusion.seeds_per_level", "score.regenerate")


def fingerprint(config, stage, workdir=None, *, reads_spectrum=False):
  """Returns {dotted key: value} that `stage`'s output depends on (`STAGE_KEYS`).

  "generate": nested by section, as spectrum/generation.json holds it
  (`generation_fingerprint`). "prompts" also counts workdir/hard.jsonl and the
  descriptions file by content and the spectrum seed; "score" counts the
  class-names file by content (and the spectrum seed for a tiny CLIP); "train"
  with `reads_spectrum` (its schedule reads synthetic images) counts the job
  grid and the regeneration attempts. The train loop adds its own hashes (init
  checkpoint, accepted synthetic set, the spectrum's fingerprints).
  """
  if stage == "generate":
    return generation_fingerprint(config)
  keys, exclude = STAGE_KEYS[stage]
  out = select(config, keys, exclude)
  if stage == "hard" and config.hard.rule == "misclassified" and not config.hard.classes:
    out.update(select(config, _MISCLASSIFIED_KEYS))
  seed = seeding.generation_seed(config)
  if stage == "train" and reads_spectrum:
    out.update(select(config, _SPECTRUM_READER_KEYS))
    out["diffusion.strengths"] = sorted(float(s) for s in config.diffusion.strengths)
    if config.score.regenerate:
      out["score.max_regenerations"] = int(config.score.max_regenerations)
  if stage == "prompts":
    out["spectrum_seed"] = seed
    out["prompts.descriptions_sha256"] = (sha256_file(config.prompts.descriptions_file)
                                          if config.prompts.source == "file" else "")
    out["hard.jsonl_sha256"] = sha256_file(wd.path(workdir, wd.HARD))
  if stage == "score":
    out["data.class_names_sha256"] = sha256_file(config.data.class_names_file)
    if config.score.tiny:
      out["spectrum_seed"] = seed
  return out


def generation_fingerprint(config):
  """Returns {"seed", "diffusion": {...}, "prompts": {...}, "data": {...}}: the values that
  determine each generated image (`STAGE_KEYS["generate"]`).

  Keys added later are recorded only when set away from the value stores made
  before them had, so older stores stay valid. A descriptions file counts by
  its content (sha256), not its path.
  """
  flat = {"seed": seeding.generation_seed(config), **select(config, STAGE_KEYS["generate"][0])}
  if config.diffusion.source_upsample:
    flat["diffusion.source_upsample"] = config.diffusion.source_upsample
  if config.prompts.choice != "per_image":
    flat["prompts.choice"] = config.prompts.choice
  if config.prompts.source == "llm":
    flat.update(select(config, ("prompts.llm_model", "prompts.llm_descriptions")))
  descriptions = ""
  if config.prompts.source == "file":
    path = pathlib.Path(config.prompts.descriptions_file)
    if not path.is_file():
      raise FileNotFoundError(f"prompts.descriptions_file not found: {str(path)!r}")
    descriptions = sha256_file(path)
  flat["prompts.descriptions_sha256"] = descriptions
  nested = {}
  for dotted, value in flat.items():
    section, _, key = dotted.rpartition(".")
    (nested.setdefault(section, {}) if section else nested)[key] = value
  return nested


PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "diffusers",
            "transformers", "discl-jax")


def environment():
  """Returns {"packages": {name: version}, "commit": git commit of the project or None}.

  The commit gains "+dirty" when the work tree has uncommitted changes.
  """
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return {"packages": versions, "commit": git_commit(pathlib.Path(__file__).resolve().parents[1])}


def git_commit(root):
  """Returns the git commit checked out at `root` (with "+dirty" for local changes), or None."""
  if not (pathlib.Path(root) / ".git").exists():
    return None
  try:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "")
