"""Per-class text prompts for the spectrum, and a deterministic choice per image.

Three sources (`prompts.source`):
  templates: format strings with "{c}" (the class name), or the name of a
      built-in set below, e.g. templates=("photo", "a drawing of a {c}").
  file: a JSON file {class: [descriptions]} (e.g. LLM-written scene
      descriptions), each used as `description_format` ("a 8k real photo: {d}";
      "{c}" may appear too).
  llm: the same, with the descriptions asked of an OpenAI-compatible chat
      endpoint by the prompts stage (`llm_descriptions`) and passed in.
The choice (`prompts.choice`) is deterministic, from a stable hash (never
Python's `hash`), the same on every run, host and process:
  per_seed   as the reference (docs/design.md §6 "Prompts"), per (class, image,
             generation seed): the hash of (seed, class, image id) picks the
             candidate of seed index 0 and seed index k takes the k-th next one,
             so an image's seeds get different descriptions (all distinct while
             there are as many candidates as seeds).
  per_image  one candidate per image for all its seeds (the hash's pick).
A regeneration attempt a (`score.regenerate`) takes the candidate a places after
its job's, a fresh description.
"""

import json
import pathlib

from discl_jax import seeding
from discl_jax.data import class_names as class_names_lib

SOURCES = ("templates", "file", "llm")  # prompts.source
CHOICES = ("per_seed", "per_image")
BUILTIN_TEMPLATES = {
    "photo": ("a photo of a {c}", "a close-up photo of a {c}", "a bright photo of a {c}",
              "a cropped photo of a {c}", "a good photo of a {c}"),
    "wild": ("a {c} in the wild", "a photo of a {c} in the wild",
             "a camera trap photo of a {c}", "a photo of a {c} in its natural habitat"),
    "scenes": ("a photo of a {c} outdoors", "a photo of a {c} indoors",
               "a photo of a {c} at night", "a photo of a {c} in the rain",
               "a blurry photo of a {c}", "a photo of a small {c}", "a photo of a large {c}"),
}


def display_name(class_name):
  """Returns the class name as it reads in a sentence ("great_white" -> "great white",
  "baluster / handrail" -> "baluster or handrail")."""
  return class_names_lib.readable(str(class_name).replace("_", " "))


def expand_templates(templates):
  """Returns the tuple of format strings that `templates` names.

  Raises ValueError naming an entry that is neither a "{c}" template nor a
  built-in set.
  """
  expanded = []
  for template in templates:
    if template in BUILTIN_TEMPLATES:
      expanded.extend(BUILTIN_TEMPLATES[template])
    elif "{c}" in template:
      expanded.append(template)
    else:
      raise ValueError(
          f"prompts.templates entry {template!r} has no '{{c}}' and is not a built-in "
          f"set; built-in sets: {sorted(BUILTIN_TEMPLATES)}")
  if not expanded:
    raise ValueError("prompts.templates is empty; give at least one template")
  return tuple(expanded)


def load_descriptions(path, class_names):
  """Returns {class: [descriptions]} from the JSON file at `path` for `class_names`.

  Raises ValueError naming the file and the classes it lacks, or the entry
  that is not a non-empty list of strings.
  """
  if not str(path):
    raise ValueError("prompts.source is 'file' but prompts.descriptions_file is empty")
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompts.descriptions_file not found: {str(path)!r}")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"prompts.descriptions_file {path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"prompts.descriptions_file {path} must hold a JSON object "
                     f"{{class: [descriptions]}}, got {type(data).__name__}")
  missing = [c for c in class_names if c not in data]
  if missing:
    raise ValueError(f"prompts.descriptions_file {path} has no descriptions for "
                     f"class(es) {missing}")
  out = {}
  for c in class_names:
    value = data[c]
    if (not isinstance(value, list) or not value
        or not all(isinstance(d, str) and d.strip() for d in value)):
      raise ValueError(f"prompts.descriptions_file {path}: class {c!r} must map to a "
                       f"non-empty list of non-empty strings, got {value!r}")
    out[c] = [d.strip() for d in value]
  return out


def class_prompts(prompts_config, class_names, descriptions=None):
  """Returns {class: [candidate prompts]} for each of `class_names`.

  `descriptions` ({class: [descriptions]}) is what source "llm" formats; source
  "file" reads them from `prompts.descriptions_file`.
  """
  class_names = list(dict.fromkeys(class_names))
  if prompts_config.source == "templates":
    templates = expand_templates(prompts_config.templates)
    return {c: [t.format(c=display_name(c)) for t in templates] for c in class_names}
  if prompts_config.source in ("file", "llm"):
    fmt = prompts_config.description_format
    if "{d}" not in fmt:
      raise ValueError(f"prompts.description_format {fmt!r} must contain '{{d}}'")
    if prompts_config.source == "file":
      descriptions = load_descriptions(prompts_config.descriptions_file, class_names)
    elif descriptions is None or any(not descriptions.get(c) for c in class_names):
      raise ValueError("prompts.source='llm': no descriptions for class(es) "
                       f"{[c for c in class_names if not (descriptions or {}).get(c)]}")
    return {c: [fmt.format(d=d, c=display_name(c)) for d in descriptions[c]]
            for c in class_names}
  raise ValueError(f"unknown prompts.source {prompts_config.source!r}; valid: {', '.join(SOURCES)}")


def check_choice(choice):
  """Returns `choice`; ValueError names prompts.choice when it is not one of CHOICES."""
  if choice not in CHOICES:
    raise ValueError(f"unknown prompts.choice {choice!r}; valid: {', '.join(CHOICES)}")
  return choice


def choose_prompt(candidates, class_name, source_id, seed, seed_index=0, attempt=0,
                  choice="per_seed"):
  """Returns the candidate of image `source_id` at generation seed index `seed_index`.

  `attempt` > 0 is a regeneration attempt of that job (a fresh candidate).
  """
  if not candidates:
    raise ValueError(f"no prompt candidates for class {class_name!r}")
  step = int(seed_index) if check_choice(choice) == "per_seed" else 0
  first = seeding.stable_hash("prompt", seed, class_name, source_id)
  return candidates[(first + step + int(attempt)) % len(candidates)]


def build_prompts(prompts_config, hard_rows, seed, seeds_per_level, descriptions=None):
  """Returns the prompts document of `hard_rows` (see `prompts_stage`); `descriptions`
  are source "llm"'s {class: [descriptions]}.

  {"choice": prompts.choice, "classes": {class: [candidates]},
   "source_classes": {id: class}, "sources": {id: [prompt of seed index 0, 1, ...]}}.
  """
  hard_rows = list(hard_rows)
  choice = check_choice(prompts_config.choice)
  classes = class_prompts(prompts_config, [row["class_name"] for row in hard_rows], descriptions)
  sources = {row["source_id"]: [
      choose_prompt(classes[row["class_name"]], row["class_name"], row["source_id"], seed, k,
                    choice=choice) for k in range(int(seeds_per_level))]
             for row in hard_rows}
  source_classes = {row["source_id"]: row["class_name"] for row in hard_rows}
  return {"choice": choice, "classes": classes, "source_classes": source_classes,
          "sources": sources}
