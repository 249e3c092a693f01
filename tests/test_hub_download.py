"""`discl --stage=fetch` against a loopback hub, then the loaders offline from the cache.

A tiny HTTP server on 127.0.0.1 serves the routes huggingface_hub 0.36 to 2.x uses:
GET /api/models/{repo}[/revision/{rev}] (model_info, repo_info: the file list and commit),
GET /api/models/{repo}/tree/{rev} (list_repo_tree, which 2.x's snapshot_download reads)
and HEAD/GET /{repo}/resolve/{rev}/{file} (hf_hub_download: X-Repo-Commit, ETag,
Content-Length, then the bytes). Its repos are the shipped digit generator and
digit CLIP (twice) with decoy files beside them (a single-file checkpoint, .bin/.h5/.onnx
weights, a safety checker) that the selection must not download. The commands run
in subprocesses: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME at import.
"""

import contextlib
import hashlib
import http.server
import json
import pathlib
import re
import socket
import subprocess
import sys
import threading

import pytest

from discl_jax import digit_models

REPO = pathlib.Path(__file__).resolve().parents[1]
SD_FILES = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
            "text_encoder/flax_model.msgpack", "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_flax_model.msgpack",
            "vae/config.json", "vae/diffusion_flax_model.msgpack"]
DECOYS = {"stub/digits-sd": ["digits-pruned.ckpt", "unet/diffusion_pytorch_model.bin",
                             "text_encoder/tf_model.h5", "vae_decoder/model.onnx",
                             "safety_checker/config.json", "safety_checker/model.safetensors"],
          "stub/digits-clip": ["pytorch_model.bin", "tf_model.h5"]}


def _repo_files(folder, decoys):
  files = {p.relative_to(folder).as_posix(): p.read_bytes()
           for p in pathlib.Path(folder).rglob("*") if p.is_file()}
  files.update({name: b"decoy: never downloaded " + name.encode() for name in decoys})
  return files


class _Hub(http.server.BaseHTTPRequestHandler):
  """Serves `repos` ({repo id: {path: bytes}}) as the hub would; records each request path."""
  repos, requests = {}, []

  def log_message(self, *args):  # quiet
    pass

  def do_HEAD(self):
    self._serve(body=False)

  def do_GET(self):
    self._serve(body=True)

  def _send(self, status, data, headers, body):
    self.send_response(status)
    for name, value in {**headers, "Content-Length": str(len(data))}.items():
      self.send_header(name, value)
    self.end_headers()
    if body:
      self.wfile.write(data)

  def _serve(self, body):
    path = self.path.split("?")[0]
    type(self).requests.append(path)
    api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
    tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+", path)
    resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
    match = api or tree or resolve
    repo = match[1] if match else None
    files = self.repos.get(repo)
    sha = hashlib.sha1(str(repo).encode()).hexdigest()
    if files is None or (resolve and resolve[2] not in files):
      code = "RepoNotFound" if files is None else "EntryNotFound"
      return self._send(404, b'{"error": "not found"}', {"X-Error-Code": code}, body)
    if tree:
      entries = [{"type": "file", "path": name, "size": len(data),
                  "oid": hashlib.sha256(data).hexdigest()} for name, data in sorted(files.items())]
      return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"},
                        body)
    if api:
      info = {"id": repo, "sha": sha, "private": False,
              "siblings": [{"rfilename": name} for name in sorted(files)]}
      return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
    data = files[resolve[2]]
    return self._send(200, data, {"X-Repo-Commit": sha,
                                  "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)


@pytest.fixture(scope="module")
def hub_url():
  clip_repo = _repo_files(digit_models.path("clip"), DECOYS["stub/digits-clip"])
  _Hub.repos = {"stub/digits-sd": _repo_files(digit_models.path("sd"), DECOYS["stub/digits-sd"]),
                "stub/digits-clip": clip_repo, "stub/digits-clip-b16": clip_repo}
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


@contextlib.contextmanager
def _dropping_endpoint():
  """Yields (URL, [connections]) of a loopback port that accepts and at once closes connections."""
  server, connections = socket.create_server(("127.0.0.1", 0)), [0]

  def accept():
    while True:
      try:
        conn, _ = server.accept()
      except OSError:  # closed
        return
      connections[0] += 1
      conn.close()

  thread = threading.Thread(target=accept, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
  finally:
    server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
    server.close()
    thread.join()


def _run(args, hf_home, **env):
  env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HOME": str(hf_home),
         "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
         "JAX_PLATFORMS": "cpu", **env}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=300)


# Offline, the loaders resolve the hub ids to the cached snapshots (whose bytes the test
# compares with the served files) and load them.
_OFFLINE_LOAD = """
from discl_jax.diffusion import models
from discl_jax.scoring import clip
print(models.load_sd("stub/digits-sd").family, clip.load_clip("stub/digits-clip").embed_dim)
"""


# The README's fetch command for iWildCam, its three hub ids swapped for the loopback hub's.
FETCH_IWILDCAM = ["--config=configs/iwildcam.py", "--config.diffusion.model=stub/digits-sd",
                  "--config.score.model=stub/digits-clip",
                  "--config.train.clip_model=stub/digits-clip-b16"]


def test_fetch_downloads_the_selection_and_the_loaders_then_work_offline(hub_url, tmp_path):
  fetched = _run(["-m", "discl_jax.main", *FETCH_IWILDCAM, "--stage=fetch"], tmp_path / "hf",
                 HF_ENDPOINT=hub_url)
  assert fetched.returncode == 0, fetched.stderr
  clip_files = sorted(n for n in _Hub.repos["stub/digits-clip"] if n not in DECOYS["stub/digits-clip"])
  for line in ("fetch diffusion.model=stub/digits-sd: 12 files",
               "fetch train.clip_model=stub/digits-clip-b16: 7 files",
               "fetch score.model=stub/digits-clip: 7 files"):
    assert line in fetched.stderr, fetched.stderr
  cache = tmp_path / "hf" / "hub"
  for repo, files in (("stub/digits-sd", SD_FILES), ("stub/digits-clip", clip_files),
                      ("stub/digits-clip-b16", clip_files)):
    folder = cache / f"models--{repo.replace('/', '--')}"
    (snapshot,) = (folder / "snapshots").iterdir()
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                  if p.is_file()) == files
    assert all((snapshot / f).read_bytes() == _Hub.repos[repo][f] for f in files)
    assert len(list((folder / "blobs").iterdir())) == len(files)  # no decoy bytes stored
  served = len(_Hub.requests)
  loaded = _run(["-c", _OFFLINE_LOAD], tmp_path / "hf", HF_HUB_OFFLINE="1", HF_ENDPOINT=hub_url)
  assert loaded.returncode == 0, loaded.stderr
  assert loaded.stdout.split() == ["sd", "64"], loaded.stdout
  assert len(_Hub.requests) == served  # offline: the hub was not asked
  # The other entry point on a node that forgot HF_HUB_OFFLINE and whose hub connection
  # drops: one connection for the three models, then the complete cached snapshots.
  with _dropping_endpoint() as (endpoint, connections):
    again = _run(["-m", "discl_jax.fetch", *FETCH_IWILDCAM], tmp_path / "hf",
                 HF_ENDPOINT=endpoint)
  assert again.returncode == 0, again.stderr
  assert "fetch score.model=stub/digits-clip: 7 files" in again.stderr
  # requests names the error ConnectionError, httpx (huggingface_hub >= 1) a RemoteProtocolError
  # or ConnectError: the reason is in parentheses either way.
  assert len(re.findall(r"cannot be reached \(\w+\); using the cached snapshot", again.stderr)) == 3
  assert connections == [1]
  # A cache that lost a weight file is named partial, with what it lacks.
  snapshot = next((cache / "models--stub--digits-sd" / "snapshots").iterdir())
  (snapshot / "unet" / "diffusion_flax_model.msgpack").unlink()
  partial = _run(["-c", "from discl_jax import hub; "
                  "hub.check_available('stub/digits-sd', hub.DIFFUSION, 'diffusion.model')"],
                 tmp_path / "hf", HF_HUB_OFFLINE="1")
  assert partial.stderr.strip().splitlines()[-1].startswith(
      "discl_jax.hub.HubUnavailable: diffusion.model='stub/digits-sd' is only partly in the "
      "Hugging Face cache (lacks unet weights (.safetensors or .msgpack))"), partial.stderr


def test_an_unknown_id_on_a_reachable_hub_fails_before_any_stage(hub_url, tmp_path):
  result = _run(["-m", "discl_jax.main", "--config=configs/demo.py",
                 "--config.score.model=stub/no-such-clip", f"--workdir={tmp_path / 'w'}",
                 "--stage=score"], tmp_path / "hf", HF_ENDPOINT=hub_url)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == (
      f"discl: HubUnavailable: score.model='stub/no-such-clip': the hub ({hub_url}) has no such "
      f"repo or it is gated or private (HTTP 404); check the id (e.g. "
      f"openai/clip-vit-base-patch32, stabilityai/stable-diffusion-xl-refiner-1.0), log in for "
      f"a gated repo, or give a local directory"), result.stderr
  assert not (tmp_path / "w").exists()  # refused before the workdir was touched


def test_offline_run_with_an_uncached_id_fails_before_any_stage(tmp_path):
  result = _run(["-m", "discl_jax.main", "--config=configs/demo.py",
                 "--config.diffusion.model=stabilityai/stable-diffusion-xl-refiner-1.0",
                 f"--workdir={tmp_path / 'w'}"], tmp_path / "hf", HF_HUB_OFFLINE="1")
  assert result.returncode != 0
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("discl: HubUnavailable: diffusion.model="
                         "'stabilityai/stable-diffusion-xl-refiner-1.0' is not in the Hugging "
                         "Face cache"), result.stderr
  assert "--stage=fetch" in line and len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "w").exists()
