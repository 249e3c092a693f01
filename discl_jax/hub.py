"""Hugging Face hub weights: which files a model needs, getting them once, failing fast without them.

`select` is the one file selection: the loaders' download (`download`, called by
`diffusion.models.resolve` and `scoring.clip.load_clip`) and `discl --stage=fetch`
(`fetch`) both use it. A diffusers pipeline repo gives `model_index.json`, the
sub-folders it names that the sampler reads, their configs and one weight format per
sub-folder; a CLIP repo its root configs, tokenizer files and one weight format.
Weights in order of preference: the fp16 safetensors variant, full-precision
safetensors (either one file or shards with their index), Flax msgpack. Single-file
checkpoints, ONNX/OpenVINO exports, `.bin`/`.h5` duplicates and other components are
never downloaded.

With `HF_HUB_OFFLINE=1`, or when the hub cannot be reached, only a complete cached
snapshot is used; otherwise `HubUnavailable` says in one line which config key and
repo id lack weights and how to fetch them ahead (`check_models`, called before the
first stage, and the loaders both raise it).
"""

import json
import pathlib
import re

from absl import logging

DIFFUSION = "diffusion"  # a diffusers pipeline repo (model_index.json)
CLIP = "clip"            # a transformers CLIP repo (weights at the root)
# Sub-folders of a pipeline the sampler reads (those model_index.json names are fetched).
DIFFUSION_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                     "scheduler")
# Weight file stems per folder ("": the repo root of a CLIP): (PyTorch, Flax).
_WEIGHT_STEMS = {"unet": ("diffusion_pytorch_model", "diffusion_flax_model"),
                 "vae": ("diffusion_pytorch_model", "diffusion_flax_model"),
                 "text_encoder": ("model", "flax_model"), "text_encoder_2": ("model", "flax_model"),
                 "": ("model", "flax_model")}
# Config files each folder must have for the loaders ("": a CLIP's root).
_REQUIRED_CONFIGS = {"unet": ("config.json",), "vae": ("config.json",),
                     "text_encoder": ("config.json",), "text_encoder_2": ("config.json",),
                     "tokenizer": ("vocab.json", "merges.txt"),
                     "tokenizer_2": ("vocab.json", "merges.txt"),
                     "scheduler": ("scheduler_config.json",),
                     "": ("config.json", "vocab.json", "merges.txt")}
_SHARD = r"-(\d{5})-of-(\d{5})\.safetensors"
PROBE_TIMEOUT_S = 10  # one hub API call decides whether the hub is reachable; no retries
FETCH_HINT = ("fetch it ahead: run `discl --config=CONFIG --stage=fetch` (or `python -m "
              "discl_jax.fetch --config=CONFIG`) with this run's config flags on a machine with "
              "internet and the same HF_HOME, or give a local directory")
# What `fetch` itself says when the hub cannot be reached.
ONLINE_HINT = "the fetch needs the hub: run it where the hub can be reached (or set HF_ENDPOINT)"


# {endpoint: why it cannot be reached}: a failed connection is detected once per process.
_UNREACHABLE = {}


class HubUnavailable(OSError):
  """Hub weights that can be had neither from the Hugging Face cache nor the hub (one line)."""


def is_hub_id(name):
  """Returns True when model `name` is a hub id ("owner/name") rather than a local path."""
  name = str(name)
  return (name.count("/") == 1 and not name.startswith(("/", ".", "~")) and "\\" not in name
          and not pathlib.Path(name).expanduser().exists())


def kind_of(key):
  """Returns the repo kind (DIFFUSION | CLIP) of config key `key`."""
  return DIFFUSION if key.startswith("diffusion.") else CLIP


def _safetensors_weights(names, stem, variant):
  """Returns the `stem` safetensors files of `variant` ("" | ".fp16") among `names`, or []."""
  single = f"{stem}{variant}.safetensors"
  if single in names:
    return [single]
  shards = sorted(n for n in names if re.fullmatch(re.escape(stem + variant) + _SHARD, n))
  indexes = [n for n in (f"{stem}{variant}.safetensors.index.json",
                         f"{stem}.safetensors.index{variant}.json") if n in names]
  return indexes[:1] + shards if shards and indexes else []


def weight_files(names, stems):
  """Returns the weight files to take among the file names `names` of one folder, or [].

  `stems` is (PyTorch stem, Flax stem): the fp16 safetensors variant, else
  full-precision safetensors (one file, or shards with their index), else Flax msgpack.
  """
  names = set(names)
  torch_stem, flax_stem = stems
  for variant in (".fp16", ""):
    found = _safetensors_weights(names, torch_stem, variant)
    if found:
      return found
  return [f"{flax_stem}.msgpack"] if f"{flax_stem}.msgpack" in names else []


def _missing_shards(weights):
  """Returns the shard file names a sharded `weights` list lacks ([] when complete or not sharded)."""
  shards = [re.search(_SHARD + "$", w) for w in weights]
  shards = [(w, m) for w, m in zip(weights, shards) if m]
  if not shards:
    return []
  total, have = int(shards[0][1].group(2)), {int(m.group(1)) for _, m in shards}
  prefix = shards[0][0][:shards[0][1].start()]
  return [f"{prefix}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)
          if i not in have]


def needed_folders(model_index):
  """Returns the sub-folders of a diffusers pipeline that `model_index` names and the sampler reads."""
  return [f for f in DIFFUSION_FOLDERS
          if isinstance(model_index.get(f), list) and model_index[f] and model_index[f][0] is not None]


def _is_config(name):
  return name.endswith((".json", ".txt")) and ".index" not in name


def select(kind, listing, model_index=None):
  """Returns (files to download, [what is missing]) of a `kind` repo whose files are `listing`.

  `model_index` is the parsed model_index.json of a DIFFUSION repo (None: not read).
  Missing parts are named "folder/file" or "folder weights"; a complete repo gives [].
  """
  listing = set(listing)
  if kind == DIFFUSION:
    if model_index is None or "model_index.json" not in listing:
      return [], ["model_index.json"]
    folders, files = needed_folders(model_index), ["model_index.json"]
  else:
    folders, files = [""], []
  missing = []
  for folder in folders:
    prefix = f"{folder}/" if folder else ""
    names = {f[len(prefix):] for f in listing if f.startswith(prefix) and "/" not in f[len(prefix):]}
    files += [prefix + n for n in sorted(names) if _is_config(n)]
    missing += [prefix + n for n in _REQUIRED_CONFIGS[folder] if n not in names]
    if folder in _WEIGHT_STEMS:
      weights = weight_files(names, _WEIGHT_STEMS[folder])
      files += [prefix + w for w in weights]
      missing += [prefix + w for w in _missing_shards(weights)]
      if not weights:
        missing.append(f"{folder or 'root'} weights (.safetensors or .msgpack)")
  return sorted(files), missing


def _read_index(folder):
  """Returns the model_index.json in `folder` as a dict, or None when it has none."""
  path = pathlib.Path(folder) / "model_index.json"
  return json.loads(path.read_text()) if path.is_file() else None


def local_listing(folder):
  """Returns the relative posix paths of the (complete) files under `folder`."""
  folder = pathlib.Path(folder)
  return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _cache_dir():
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  return constants.HF_HUB_CACHE


def _cached(repo, kind):
  """Returns (snapshot folder, [what it lacks]) of `repo` in the Hugging Face cache; (None, None): none.

  Reads the cache's layout (refs/main -> snapshots/COMMIT) itself: huggingface_hub 2's
  offline snapshot_download refuses a snapshot that holds only the files we selected.
  """
  root = pathlib.Path(_cache_dir(), "models--" + repo.replace("/", "--"))
  ref = root / "refs" / "main"
  folder = root / "snapshots" / ref.read_text().strip() if ref.is_file() else None
  if folder is None or not folder.is_dir():
    return None, None
  _, missing = select(kind, local_listing(folder), _read_index(folder))
  return folder, missing


def _describe(key, repo):
  return f"{key}={repo!r}" if key else f"hub id {repo!r}"


def _unavailable(key, repo, reason, missing, hint):
  cached = ("is not in the Hugging Face cache" if missing is None else
            f"is only partly in the Hugging Face cache (lacks {', '.join(missing[:3])})")
  return HubUnavailable(f"{_describe(key, repo)} {cached} ({_cache_dir()}) and {reason}: {hint}")


def _transport_errors():
  """Returns the exception classes a failed connection raises in the installed HTTP clients
  (huggingface_hub < 1 uses requests, later releases httpx or httpx2)."""
  import importlib  # pylint: disable=g-import-not-at-top
  classes = [ConnectionError, TimeoutError]
  for module, name in (("requests.exceptions", "RequestException"), ("httpx", "TransportError"),
                       ("httpx2", "TransportError")):
    try:
      classes.append(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError):
      continue
  return tuple(classes)


def _probe(repo, key):
  """Returns (ModelInfo, None) of `repo`, or (None, why the hub cannot be reached).

  One API call without retries, none after a failed connection to the same endpoint
  in this process; a repo the hub does not have raises HubUnavailable.
  """
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  endpoint = constants.ENDPOINT
  if endpoint in _UNREACHABLE:
    return None, _UNREACHABLE[endpoint]
  try:
    return huggingface_hub.HfApi(endpoint=endpoint).model_info(repo, timeout=PROBE_TIMEOUT_S), None
  except errors.HfHubHTTPError as e:  # also RepositoryNotFoundError, GatedRepoError
    status = getattr(e.response, "status_code", None)
    if not isinstance(e, (errors.RepositoryNotFoundError, errors.GatedRepoError)) and status != 404:
      return None, f"{endpoint} cannot be reached (HTTP {status})"
    raise HubUnavailable(
        f"{_describe(key, repo)}: the hub ({endpoint}) has no such repo or it is gated or private "
        f"(HTTP {status}); check the id (e.g. openai/clip-vit-base-patch32, "
        f"stabilityai/stable-diffusion-xl-refiner-1.0), log in for a gated repo, or give a "
        f"local directory") from e
  except _transport_errors() as e:
    _UNREACHABLE[endpoint] = f"{endpoint} cannot be reached ({type(e).__name__})"
    return None, _UNREACHABLE[endpoint]


def _offline():
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  return bool(constants.HF_HUB_OFFLINE)


def _locate(repo, kind, key, hint):
  """Returns (complete cached snapshot or None, the hub's ModelInfo or None when offline).

  Offline (HF_HUB_OFFLINE) or with the hub unreachable (one request), a cache that
  lacks files raises HubUnavailable (its message ends with `hint`).
  """
  folder, missing = _cached(repo, kind)
  complete = folder if missing == [] else None
  if _offline():
    if complete is None:
      raise _unavailable(key, repo, "HF_HUB_OFFLINE is set", missing, hint)
    return complete, None
  info, reason = _probe(repo, key)
  if info is None:
    if complete is None:
      raise _unavailable(key, repo, reason, missing, hint)
    logging.warning("%s: %s; using the cached snapshot %s", _describe(key, repo), reason, complete)
  return complete, info


def download(repo, kind, key=None, hint=FETCH_HINT):
  """Returns the local snapshot folder of hub repo `repo` holding the files `select` picks.

  Online, downloads what the cache lacks; offline (HF_HUB_OFFLINE=1) or when the hub
  cannot be reached, returns a complete cached snapshot or raises HubUnavailable.
  """
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  folder, info = _locate(repo, kind, key, hint)
  if info is None:
    return folder
  listing = [s.rfilename for s in info.siblings or ()]
  index = None
  if kind == DIFFUSION and "model_index.json" in listing:
    index = json.loads(pathlib.Path(
        huggingface_hub.hf_hub_download(repo, "model_index.json")).read_text())
  files, missing = select(kind, listing, index)
  if missing:
    raise HubUnavailable(f"{_describe(key, repo)} is not a {kind} checkpoint this project reads: "
                         f"the repo lacks {', '.join(missing[:3])}")
  return pathlib.Path(huggingface_hub.snapshot_download(repo, allow_patterns=files))


def check_available(repo, kind, key=None):
  """Returns None when hub repo `repo` is complete in the cache or the hub has it, else raises.

  HubUnavailable names `key`, `repo` and the fetch command; nothing is downloaded.
  """
  if _cached(repo, kind)[1] == []:
    return
  _, info = _locate(repo, kind, key, FETCH_HINT)
  if kind == DIFFUSION and "model_index.json" not in {s.rfilename for s in info.siblings or ()}:
    raise HubUnavailable(f"{_describe(key, repo)} is not a diffusers pipeline repo (no "
                         f"model_index.json); give a Stable Diffusion / SDXL repo or folder")


def configured_models(config, stages):
  """Returns [(config key, model name)] of the weights `stages` load (tiny models left out).

  The rule `config_checks.inputs` applies to local model folders.
  """
  stages, models = set(stages), []
  if "generate" in stages and not config.diffusion.tiny:
    models.append(("diffusion.model", config.diffusion.model))
  uses_clip = (config.train.model == "clip" and stages & {"train", "eval"}) or (
      config.hard.rule == "misclassified" and not config.hard.classes and "hard" in stages)
  if uses_clip:
    models.append(("train.clip_model", config.train.clip_model))
  if ("score" in stages or (uses_clip and not config.train.clip_model)) and not config.score.tiny:
    models.append(("score.model", config.score.model))
  return [(key, str(name)) for key, name in models if name]


def check_models(config, stages):
  """Returns None; raises HubUnavailable before any stage when a hub model of `stages` cannot be had."""
  for key, name in configured_models(config, stages):
    if is_hub_id(name):
      check_available(name, kind_of(key), key)


def _size_gb(folder, files):
  return sum((folder / f).stat().st_size for f in files if (folder / f).is_file()) / 1e9


def fetch(config, stages):
  """Downloads the hub weights `stages` of `config` load into the Hugging Face cache.

  Returns [(key, model, local folder or None, what was done)]; logs one line per model.
  """
  done = []
  for key, flag in (("diffusion.model", "diffusion.tiny"), ("score.model", "score.tiny")):
    if config[key.split(".")[0]].tiny:
      done.append((key, "", None, f"{flag}=True: built into the workdir, nothing to fetch"))
  for key, name in configured_models(config, stages):
    if not is_hub_id(name):
      path = pathlib.Path(name).expanduser()
      done.append((key, name, None, "local directory, nothing to fetch" if path.is_dir() else
                   "local path, nothing to fetch (it does not exist here)"))
      continue
    folder = download(name, kind_of(key), key, ONLINE_HINT)
    files, _ = select(kind_of(key), local_listing(folder), _read_index(folder))
    done.append((key, name, folder, f"{len(files)} files, {_size_gb(folder, files):.2f} GB"))
  for key, name, folder, what in done:
    logging.info("fetch %s%s: %s%s", key, f"={name}" if name else "", what,
                 f" ({folder})" if folder else "")
  return done
