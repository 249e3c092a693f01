"""Per-class text prompts for the spectrum, and a deterministic choice per image.

Two sources (`prompts.source`):
  templates: format strings with "{c}" (the class name), or the name of a
      built-in set below, e.g. templates=("photo", "a drawing of a {c}").
  file: a JSON file {class: [descriptions]} (e.g. LLM-written scene
      descriptions), each used as `description_format` ("a 8k real photo: {d}";
      "{c}" may appear too).
Every hard image gets one prompt, chosen from its class's candidates by a stable
hash of (seed, class, image id): the same on every run, host and process.
"""

import json
import pathlib

from discl_jax import seeding

SOURCES = ("templates", "file")  # prompts.source
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
  """Returns the class name as it reads in a sentence ("great_white" -> "great white")."""
  return str(class_name).replace("_", " ").strip()


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


def class_prompts(prompts_config, class_names):
  """Returns {class: [candidate prompts]} for each of `class_names`."""
  class_names = list(dict.fromkeys(class_names))
  if prompts_config.source == "templates":
    templates = expand_templates(prompts_config.templates)
    return {c: [t.format(c=display_name(c)) for t in templates] for c in class_names}
  if prompts_config.source == "file":
    fmt = prompts_config.description_format
    if "{d}" not in fmt:
      raise ValueError(f"prompts.description_format {fmt!r} must contain '{{d}}'")
    descriptions = load_descriptions(prompts_config.descriptions_file, class_names)
    return {c: [fmt.format(d=d, c=display_name(c)) for d in descriptions[c]]
            for c in class_names}
  raise ValueError(f"unknown prompts.source {prompts_config.source!r}; valid: {', '.join(SOURCES)}")


def choose_prompt(candidates, class_name, source_id, seed):
  """Returns the candidate chosen for image `source_id` by a stable hash."""
  if not candidates:
    raise ValueError(f"no prompt candidates for class {class_name!r}")
  return candidates[seeding.stable_hash("prompt", seed, class_name, source_id) % len(candidates)]


def build_prompts(prompts_config, hard_rows, seed):
  """Returns the prompts document: {"classes": {class: [...]}, "sources": {id: prompt}}."""
  hard_rows = list(hard_rows)
  classes = class_prompts(prompts_config, [row["class_name"] for row in hard_rows])
  sources = {row["source_id"]: choose_prompt(classes[row["class_name"]], row["class_name"],
                                             row["source_id"], seed)
             for row in hard_rows}
  return {"classes": classes, "sources": sources}
