"""discl_jax/hub.py without a network: the file selection on the real repos' listings, and
the one-line refusals before any stage (offline with an uncached id, a hub that refuses or 404s).

The listings under tests/data/hub_listings/ are reconstructed (their headers say from what).
The refusal tests run `config_checks.check_inputs` in a subprocess because huggingface_hub
reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME once at import.
"""

import json
import pathlib
import re
import socket
import subprocess
import sys

import pytest

from discl_jax import config as config_lib
from discl_jax import config_checks
from discl_jax import hub
from discl_jax import stages as stages_lib
from discl_jax.configs import common

REPO = pathlib.Path(__file__).resolve().parents[1]
LISTINGS = pathlib.Path(__file__).parent / "data" / "hub_listings"


def _listing(repo):
  """Returns (file names, model_index or None) recorded for hub repo `repo`."""
  stem = repo.replace("/", "--")
  lines = (LISTINGS / f"{stem}.txt").read_text().splitlines()
  index_file = LISTINGS / f"{stem}.model_index.json"
  index = json.loads(index_file.read_text()) if index_file.is_file() else None
  return [line for line in lines if line and not line.startswith("#")], index


def test_sdxl_refiner_takes_the_fp16_weights_of_its_four_components_only():
  files, missing = hub.select(hub.DIFFUSION, *_listing("stabilityai/stable-diffusion-xl-refiner-1.0"))
  assert missing == []
  assert files == [
      "model_index.json", "scheduler/scheduler_config.json",
      "text_encoder_2/config.json", "text_encoder_2/model.fp16.safetensors",
      "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json",
      "tokenizer_2/tokenizer_config.json", "tokenizer_2/vocab.json",
      "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
      "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"]


def test_sd15_leaves_out_safety_checker_checkpoints_bin_and_non_ema():
  files, missing = hub.select(hub.DIFFUSION, *_listing("stable-diffusion-v1-5/stable-diffusion-v1-5"))
  assert missing == []
  assert files == [
      "model_index.json", "scheduler/scheduler_config.json",
      "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
      "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
      "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
      "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
      "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"]


@pytest.mark.parametrize("repo", ["openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16"])
def test_clip_takes_one_weight_format_and_its_tokenizer(repo):
  listing, _ = _listing(repo)
  files, missing = hub.select(hub.CLIP, listing)
  assert missing == []
  # main has no model.safetensors: the Flax weights, never pytorch_model.bin or tf_model.h5.
  assert files == ["config.json", "flax_model.msgpack", "merges.txt", "preprocessor_config.json",
                   "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                   "vocab.json"]
  # Once the safetensors conversion is merged, it alone.
  files, missing = hub.select(hub.CLIP, listing + ["model.safetensors"])
  assert missing == [] and [f for f in files if f.endswith((".safetensors", ".msgpack"))] == [
      "model.safetensors"]


def test_sharded_weights_come_with_their_index_and_every_shard():
  # diffusers' and transformers' names for sharded weights and their fp16 variant
  # (`_add_variant`: the variant before the last suffix of the index name).
  names = ["diffusion_pytorch_model.safetensors.index.json",
           "diffusion_pytorch_model-00001-of-00002.safetensors",
           "diffusion_pytorch_model-00002-of-00002.safetensors",
           "diffusion_pytorch_model.safetensors.index.fp16.json",
           "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
           "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
           "diffusion_pytorch_model.bin", "config.json"]
  stems = ("diffusion_pytorch_model", "diffusion_flax_model")
  assert hub.weight_files(names, stems) == [
      "diffusion_pytorch_model.safetensors.index.fp16.json",
      "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
      "diffusion_pytorch_model.fp16-00002-of-00002.safetensors"]
  full = [n for n in names if ".fp16" not in n]
  assert hub.weight_files(full, stems) == full[:3]
  # A cache that kept the index but lost a shard is incomplete, named by the missing shard.
  listing = ["config.json", "vocab.json", "merges.txt", "model.safetensors.index.json",
             "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"]
  _, missing = hub.select(hub.CLIP, listing)
  assert missing == ["model-00002-of-00003.safetensors"]


def test_a_repo_without_usable_weights_or_index_is_named_incomplete():
  listing, index = _listing("stable-diffusion-v1-5/stable-diffusion-v1-5")
  only_bin = [f for f in listing if not f.startswith("unet/") or f.endswith((".bin", ".json"))]
  _, missing = hub.select(hub.DIFFUSION, only_bin, index)
  assert missing == ["unet weights (.safetensors or .msgpack)"]
  assert hub.select(hub.DIFFUSION, listing, None)[1] == ["model_index.json"]


def test_hub_ids_and_paths():
  assert hub.is_hub_id("openai/clip-vit-base-patch32")
  for path in ("./a/b", "/abs/path", "~/x/y", "a/b/c", "clip", "a\\b"):
    assert not hub.is_hub_id(path), path


def test_configured_models_agree_with_the_input_check():
  """The keys hub.check_models probes are those config_checks.inputs checks as local folders."""
  for name in ("iwildcam", "imagenet_lt", "cifar100_lt", "inat2018", "demo"):
    for schedule_stages in (stages_lib.ORDER, ("hard",), ("score",), ("train", "eval"),
                            ("generate",)):
      config = config_lib.load_file(REPO / "configs" / f"{name}.py")
      with config.unlocked():
        for key in ("diffusion.model", "score.model", "train.clip_model"):
          section, field = key.split(".")
          if config[section][field]:
            config[section][field] = f"/nonexistent/{key}"
      local = {k for k, _, _ in config_checks.inputs(config, schedule_stages)
               if k in ("diffusion.model", "score.model", "train.clip_model")}
      assert {k for k, _ in hub.configured_models(config, schedule_stages)} == local, (
          name, schedule_stages)


def test_iwildcam_needs_three_hub_models():
  config = config_lib.load_file(REPO / "configs" / "iwildcam.py")
  assert hub.configured_models(config, stages_lib.ORDER) == [
      ("diffusion.model", common.SDXL_REFINER),
      ("train.clip_model", "openai/clip-vit-base-patch16"),
      ("score.model", "openai/clip-vit-base-patch32")]


_CHECK = """
import sys
from discl_jax import config as config_lib, config_checks
config = config_lib.base_config()
config.data.name = "digits_lt"
config.score.model = sys.argv[1]
config_checks.check_inputs(config, ("score",))
print("available")
"""


def _check_in_subprocess(tmp_path, repo, **env):
  env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"),
         "HF_HUB_DISABLE_TELEMETRY": "1", **env}
  return subprocess.run([sys.executable, "-c", _CHECK, repo], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=120)


def _error_line(result):
  assert result.returncode != 0, result.stdout
  last = result.stderr.strip().splitlines()[-1]
  assert "Retrying" not in result.stderr and "retry" not in result.stderr.lower(), result.stderr
  return last


def test_offline_with_an_uncached_id_fails_at_once_naming_key_id_and_fetch(tmp_path):
  result = _check_in_subprocess(tmp_path, "openai/clip-vit-base-patch33", HF_HUB_OFFLINE="1")
  line = _error_line(result)
  assert line.startswith("discl_jax.hub.HubUnavailable: score.model='openai/clip-vit-base-patch33' "
                         "is not in the Hugging Face cache"), line
  assert "HF_HUB_OFFLINE is set" in line and "--stage=fetch" in line


def test_a_refused_connection_fails_at_once(tmp_path):
  with socket.socket() as sock:  # a loopback port nobody listens on
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  result = _check_in_subprocess(tmp_path, "openai/clip-vit-base-patch32",
                                HF_ENDPOINT=f"http://127.0.0.1:{port}")
  line = _error_line(result)
  assert f"score.model='openai/clip-vit-base-patch32' is not in the Hugging Face cache" in line
  assert re.search(rf"http://127.0.0.1:{port} cannot be reached \((ConnectionError|ConnectError)\)",
                   line), line  # requests' name, httpx's name
  assert "--stage=fetch" in line


def test_fetch_has_nothing_to_do_for_local_and_tiny_models(tmp_path):
  config = config_lib.load_file(REPO / "configs" / "demo.py")
  with config.unlocked():
    config.score.tiny, config.score.model = True, ""
    config.train.model, config.train.loss = "clip", "flyp"
    config.train.clip_model = str(tmp_path / "missing_clip")
  assert [(key, what) for key, _, _, what in hub.fetch(config, stages_lib.ORDER)] == [
      ("score.model", "score.tiny=True: built into the workdir, nothing to fetch"),
      ("diffusion.model", "local directory, nothing to fetch"),
      ("train.clip_model", "local path, nothing to fetch (it does not exist here)")]


def test_workdir_is_required_except_for_fetch(tmp_path):
  result = subprocess.run([sys.executable, "-m", "discl_jax.main", "--config=demo", "--workdir="],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
  assert result.returncode != 0 and not list(tmp_path.iterdir())
  assert result.stderr.strip().splitlines()[-1].endswith(
      "--workdir is required (except with --stage=fetch)"), result.stderr
